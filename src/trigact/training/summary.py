"""What a finished run reports: its test metrics, named as the bundle, ``summary.json`` and the
summary tables read them."""

from __future__ import annotations


def final_metrics(test_results: dict, uses_trigger: bool) -> dict:
    clean = float(test_results.get("test/acc_clean", float("nan")))
    metrics = {"test_acc_clean": clean}
    if uses_trigger:
        metrics["test_acc_trigger"] = float(test_results.get("test/acc_trigger", float("nan")))
        metrics["test_guess_acc_clean"] = float(test_results.get("test/guess_acc_clean", float("nan")))
    # The deployed unit's accuracy: with the trigger for a trigger-activation model.
    metrics["test_acc_deployed"] = metrics.get("test_acc_trigger", clean)
    return metrics


CARD_NAME = "card.md"  # in every run folder, beside bundle.pt


def model_card(meta: dict, warnings: list[str] | None = None) -> str:
    """A short human-readable card for a finished run: what it is, how it was trained, what it
    scored on the test split, and, first of all, any warning its method gives (a backdoor)."""
    config = meta.get("config") or {}
    lines = [f"# {meta.get('run_name', 'run')}", ""]
    for warning in warnings or []:
        lines += [f"> **WARNING: {warning}**", ""]
    model = (config.get("model") or {}).get("name")
    data = (config.get("data") or {}).get("name")
    trigger = config.get("trigger") or {}
    lines += [
        f"- method: `{meta.get('method')}`",
        f"- model: `{model}` on `{data}`",
        f"- trigger: `{meta.get('trigger_kind')}`" + "".join(
            f", {k} `{trigger[k]}`" for k in ("eps", "alpha", "k") if trigger.get(k) is not None),
        f"- seed: {config.get('seed')}, epochs: {meta.get('epochs')}",
        "",
        "| test metric | value |",
        "|---|---|",
    ]
    for key, value in (meta.get("metrics") or {}).items():
        shown = f"{100 * value:.2f}%" if isinstance(value, float) and 0.0 <= value <= 1.0 else value
        lines.append(f"| `{key}` | {shown} |")
    return "\n".join(lines) + "\n"
