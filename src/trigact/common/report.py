"""The accuracy summary every entry point ends with: as a rich table on the terminal and as Markdown."""

from __future__ import annotations

# (column header, summary key). "guess" is the mean probability of the true class on clean inputs:
# what a guess drawn from the model's output would score (~1/C for trigger activation).
COLUMNS = (
    ("clean acc (%)", "test_acc_clean"),
    ("clean guess acc (%)", "test_guess_acc_clean"),
    ("acc with trigger (%)", "test_acc_trigger"),
    ("deployed acc (%)", "test_acc_deployed"),
)

# Metrics some methods add (a backdoor's ASR, AdvTrojan's accuracies): shown only when a row has them.
EXTRA_HEADERS = {
    "test_asr": "ASR (%)",
    "test_acc_pgd": "acc PGD (%)",
    "test_acc_stamp": "acc stamp (%)",
    "test_acc_stamp_pgd": "acc stamp+PGD (%)",
}


def _columns(rows: list[dict]) -> tuple:
    known = {k for _, k in COLUMNS}
    extra = []
    for row in rows:
        for key, value in row.items():
            if key.startswith("test_") and key not in known and isinstance(value, float) and key not in extra:
                extra.append(key)
    # The trigger's size (the paper's Table XI, MSE(0, tau) in units of 1e-2: shown x100 as the rest).
    size = (("MSE(0, tau) (1e-2)", "trigger_mse"),) if any(row.get("trigger_mse") is not None for row in rows) else ()
    return COLUMNS + tuple((EXTRA_HEADERS.get(k, k), k) for k in extra) + size


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}"


def markdown_table(rows: list[dict]) -> str:
    columns = _columns(rows)
    lines = ["| run | " + " | ".join(h for h, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in rows:
        lines.append(f"| {row['name']} | " + " | ".join(_pct(row.get(k)) for _, k in columns) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))
    table.add_column("run", no_wrap=True)
    columns = _columns(rows)
    for header, _ in columns:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(escape(str(row["name"])), *(_pct(row.get(k)) for _, k in columns))
    Console().print(table)
