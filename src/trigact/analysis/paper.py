"""The paper's numbers as data, and our results side by side with them.

The trigger-activation paper's Tables I-IV and VII-XI live in ``experiments/paper_reference/``, one CSV
per table (``table2.csv`` is Table II), typed in from the paper's text; that folder's README gives the
key vocabulary, what was left out and how it was checked. Every file has the same long format:

    table,dataset,victim,defense,attack,metric,value
    II,cifar10,,none,pgd,accuracy,11.29

- ``table``: the paper's roman numeral; ``dataset``: ``cifar10``, ``cifar100`` or ``imagenet100``;
- ``victim``: an architecture (``resnet18``, ...) where the paper reports one, else empty (the Eq. 7
  mean over the victim set T);
- ``defense``: the column (``none``, ``jpeg_q50``, ``pgd_at``, ``fixed_eps64``, ``learnable_alpha4``, ...);
- ``attack``: the row, in our attack names (``pgd``, ``ifgsm``, ``diff_pgd``, ...), plus ``clean`` and
  ``mean`` (and ``none`` where a table has no attack, Table XI);
- ``metric``: ``accuracy`` (%, as printed) or ``mse_1e-2`` (Table XI); ``value``: the number as printed.

API (pure Python; the ``pandas`` variants need pandas, which the project does not install):

- :func:`reference_records` / :func:`load_reference`: every validated cell (all tables, or one);
- :func:`reference_value`: one cell, or None;
- :func:`side_by_side`: a markdown table of ``ours / paper (Δ ...)`` and the same as records;
- :func:`read_ours_dict` / :func:`read_ours`: a results folder's ``table.csv`` (the group rows, in %),
  the input ``side_by_side`` takes.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trigact.common.errors import TrigactError
from trigact.common.validate import parse_eps

# The source tree's experiments/paper_reference (found like trigact.common.config.CONF_DIR).
REFERENCE_DIR = Path(__file__).resolve().parents[3] / "experiments" / "paper_reference"

COLUMNS = ("table", "dataset", "victim", "defense", "attack", "metric", "value")
KEY_COLUMNS = COLUMNS[:-1]
# The tables shipped, in the paper's order, with their number (the file is table<number>.csv).
# Tables V (times) and VI (a qualitative comparison) are not numbers to compare ours with.
TABLES = {"I": 1, "II": 2, "III": 3, "IV": 4, "VII": 7, "VIII": 8, "IX": 9, "X": 10, "XI": 11}
DATASETS = ("cifar10", "cifar100", "imagenet100")
VICTIMS = ("resnet18", "resnet50", "vgg19_bn", "mobilenet_v2", "densenet121", "inception_v4")
# The L_inf budget of each table's attacks (Sec. IV-A: 8/255 for every experiment; Tables II-IV print it
# in their Bound column). A row of ours suffixed with a budget (``pgd@8/255``) matches only at this one.
ATTACK_BUDGET: dict[str, str | None] = {t: "8/255" for t in TABLES}
ATTACK_BUDGET["XI"] = None  # trigger magnitudes: no attack

_ROMAN_OF_NUMBER = {number: roman for roman, number in TABLES.items()}


def table_id(table: str | int) -> str:
    """The paper's roman numeral of ``table``: ``"II"``, ``"ii"``, ``2``, ``"2"``, ``"table2"``,
    ``"Table II"`` and ``"table_ii"`` all give ``"II"``; a table not shipped raises TrigactError."""
    text = str(table).strip()
    bare = text.lower()
    if bare.startswith("table"):
        bare = bare[len("table"):].lstrip(" _-")
    roman = _ROMAN_OF_NUMBER.get(int(bare)) if bare.isdigit() else bare.upper()
    if roman not in TABLES:
        known = ", ".join(TABLES)
        raise TrigactError(f"unknown paper table {table!r}; known: {known} (also as 2 or table2)")
    return roman


def reference_file(table: str | int, directory: str | Path | None = None) -> Path:
    """The CSV of ``table``: ``<directory>/table<number>.csv`` (``directory``: :data:`REFERENCE_DIR`)."""
    return Path(directory if directory is not None else REFERENCE_DIR) / f"table{TABLES[table_id(table)]}.csv"


def _read_table_file(roman: str, directory: str | Path | None) -> list[dict]:
    """The validated rows of one table's CSV; a bad file raises one TrigactError line naming file and line."""
    path = reference_file(roman, directory)
    if not path.is_file():
        raise TrigactError(f"paper reference file {path} is missing (Table {roman})")
    records: list[dict] = []
    seen: dict[tuple, int] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise TrigactError(f"{path} line 1: header {','.join(header or [])!r}; it must be {','.join(COLUMNS)!r}")
        for line, fields in enumerate(reader, start=2):
            if not fields:
                continue
            where = f"{path} line {line}"
            if len(fields) != len(COLUMNS):
                raise TrigactError(f"{where}: {len(fields)} fields; expected {len(COLUMNS)} ({','.join(COLUMNS)})")
            row = dict(zip(COLUMNS, (f.strip() for f in fields)))
            if row["table"] != roman:
                raise TrigactError(f"{where}: table {row['table']!r} in the file of Table {roman}")
            if row["dataset"] not in DATASETS:
                raise TrigactError(f"{where}: dataset {row['dataset']!r}; allowed: {', '.join(DATASETS)}")
            if row["victim"] and row["victim"] not in VICTIMS:
                raise TrigactError(f"{where}: victim {row['victim']!r}; allowed: empty (the mean over T), "
                                   f"{', '.join(VICTIMS)}")
            for name in ("defense", "attack", "metric"):
                if not row[name]:
                    raise TrigactError(f"{where}: empty {name}; every cell names its {name}")
            try:
                value = float(row["value"])
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise TrigactError(f"{where}: value {row['value']!r} is not a finite number")
            key = tuple(row[k] for k in KEY_COLUMNS)
            if key in seen:
                raise TrigactError(f"{where}: duplicate key {','.join(key)} (first at line {seen[key]})")
            seen[key] = line
            records.append({**row, "value": value})
    return records


def reference_records(table: str | int | None = None, directory: str | Path | None = None) -> list[dict]:
    """Every cell of the paper's tables (or of ``table`` only), validated, as dicts with the keys of
    :data:`COLUMNS` (``value`` a float, ``victim`` ``""`` for the mean over T), in table order."""
    romans = list(TABLES) if table is None else [table_id(table)]
    return [record for roman in romans for record in _read_table_file(roman, directory)]


def _pandas():
    try:
        import pandas
    except ImportError:
        raise TrigactError("this needs pandas, which is not installed (pip install pandas); "
                           "reference_records() and read_ours_dict() give the same data without it") from None
    return pandas


def load_reference(table: str | int | None = None, directory: str | Path | None = None):
    """:func:`reference_records` as a ``pandas.DataFrame`` with the columns of :data:`COLUMNS`
    (``value`` float). ``table``: ``"II"``, ``"2"``, ``"table2"``, ...; None: every table."""
    return _pandas().DataFrame(reference_records(table, directory), columns=list(COLUMNS))


def reference_value(table: str | int, dataset: str, defense: str, attack: str, victim: str = "",
                    metric: str = "accuracy", directory: str | Path | None = None) -> float | None:
    """The paper's value of one cell (e.g. ``reference_value("II", "cifar10", "none", "pgd")`` -> 11.29),
    or None where the paper has none. An unknown table or dataset raises TrigactError."""
    if dataset not in DATASETS:
        raise TrigactError(f"unknown dataset {dataset!r}; the paper's: {', '.join(DATASETS)}")
    for r in reference_records(table, directory):
        if (r["dataset"], r["victim"], r["defense"], r["attack"], r["metric"]) == (dataset, victim, defense, attack, metric):
            return r["value"]
    return None


def table11_cell(run: str) -> tuple[str, str, str] | None:
    """``(dataset, defense, victim)`` of a Table XI run named ``<dataset>_<defense>[_<arch>]`` (as
    ``conf/experiment/paper_table11_trigger_mse.yaml`` names them: ``cifar10_fixed_eps64``,
    ``imagenet100_learnable_alpha4_tv_resnet18`` -> victim ``resnet18``); None for a name that does not
    start with one of the paper's datasets (it has no paper cell)."""
    dataset, _, rest = str(run).partition("_")
    if dataset not in DATASETS or not rest:
        return None
    parts = rest.split("_")
    defense, arch = "_".join(parts[:2]), "_".join(parts[2:])
    return dataset, defense, arch.removeprefix("tv_")


# ---------------------------------------------------------------------------------- ours vs the paper
def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TrigactError(f"{where}: {value!r} is not a number") from None
    return None if math.isnan(number) else number


def _as_grid(ours) -> dict[str, dict[str, float | None]]:
    """``row -> column -> percent`` from a pandas DataFrame (index = rows) or such a nested mapping."""
    if hasattr(ours, "columns") and hasattr(ours, "to_dict"):
        ours = ours.to_dict(orient="index")
    if not isinstance(ours, Mapping):
        raise TrigactError(f"ours must be a pandas DataFrame or a mapping row -> column -> percent, "
                           f"not {type(ours).__name__}")
    grid = {}
    for row, cells in ours.items():
        if not isinstance(cells, Mapping):
            raise TrigactError(f"ours[{row!r}] must map column -> percent, not {type(cells).__name__}")
        grid[str(row)] = {str(col): _number(v, f"ours[{row!r}][{col!r}]") for col, v in cells.items()}
    return grid


def default_attack_key(row: str, table: str | int) -> str | None:
    """The paper's attack key of our row ``row``: its lower-case name (``Clean`` -> ``clean``,
    ``Mean`` -> ``mean``, ``pgd`` -> ``pgd``). A budget-suffixed row (``pgd@8/255``, what
    ``attack_protocol=budget_sweep`` writes) matches only if ``table``'s budget is that one, else None."""
    name, _, eps = row.partition("@")  # as trigact.attacks.config.split_label (not imported: it is heavy)
    if eps:
        budget = ATTACK_BUDGET[table_id(table)]
        if budget is None or not math.isclose(parse_eps(eps, f"the budget of row {row!r}"), parse_eps(budget),
                                              rel_tol=0, abs_tol=1e-9):
            return None
    return name.strip().lower()


def _cell_text(ours: float | None, paper: float | None) -> str:
    mine = "-" if ours is None else f"{ours:.2f}"
    if paper is None:
        return mine
    if ours is None:
        return f"{mine} / {paper:.2f}"
    return f"{mine} / {paper:.2f} (Δ {ours - paper:+.2f})"


def side_by_side(ours, table: str | int, dataset: str, columns: Mapping[str, str],
                 rows: Mapping[str, str | None] | None = None, victim: str = "", metric: str = "accuracy",
                 directory: str | Path | None = None) -> tuple[str, list[dict]]:
    """Our results next to the paper's ``table`` on ``dataset``.

    ``ours``: our values in percent, a pandas DataFrame (index = our row names such as ``Clean``,
    ``pgd``, ``Mean``; columns = our victim groups such as ``No defense``) or the same as a mapping
    ``row -> column -> percent`` (:func:`read_ours_dict`). ``columns`` maps our column -> the paper's
    defense key (``{"No defense": "none", "Ours (fixed 64/255)": "fixed_eps64"}``); our columns not in it
    are shown with ours only. ``rows`` maps our row -> the paper's attack key (None: no counterpart);
    rows not in it take :func:`default_attack_key`. ``victim``: ``""`` for the mean over T, else an
    architecture (Table XI).

    Returns ``(markdown, records)``: a markdown table, our rows and columns in our order, each cell
    ``ours / paper (Δ +x.xx)`` (Δ = ours - paper) where the paper has the cell and ``ours`` alone
    otherwise, followed by a legend line; and one record per cell,
    ``{row, column, ours, paper, delta}`` (None where unknown).

    A mapping naming a column or row ours lacks, or a paper key the table lacks, raises TrigactError.
    """
    roman = table_id(table)
    if dataset not in DATASETS:
        raise TrigactError(f"unknown dataset {dataset!r}; the paper's: {', '.join(DATASETS)}")
    records = reference_records(roman, directory)
    paper = {(r["defense"], r["attack"]): r["value"] for r in records
             if (r["dataset"], r["victim"], r["metric"]) == (dataset, victim, metric)}
    if not paper:
        have = sorted({f"dataset={r['dataset']} victim={r['victim'] or '(mean)'} metric={r['metric']}"
                       for r in records})
        raise TrigactError(f"paper Table {roman} has no cell for dataset={dataset} victim={victim or '(mean)'} "
                           f"metric={metric}; it has: {'; '.join(have)}")
    defenses = list(dict.fromkeys(d for d, _ in paper))
    attacks = list(dict.fromkeys(a for _, a in paper))

    grid = _as_grid(ours)
    our_columns = list(dict.fromkeys(c for cells in grid.values() for c in cells))
    for col, key in columns.items():
        if col not in our_columns:
            raise TrigactError(f"columns maps {col!r}, which is not a column of ours; ours: {', '.join(our_columns)}")
        if key not in defenses:
            raise TrigactError(f"columns maps {col!r} to {key!r}, which is not a column of paper Table {roman} "
                               f"({dataset}); it has: {', '.join(defenses)}")
    rows = dict(rows or {})
    for row, key in rows.items():
        if row not in grid:
            raise TrigactError(f"rows maps {row!r}, which is not a row of ours; ours: {', '.join(grid)}")
        if key is not None and key not in attacks:
            raise TrigactError(f"rows maps {row!r} to {key!r}, which is not a row of paper Table {roman} "
                               f"({dataset}); it has: {', '.join(attacks)}")

    out: list[dict] = []
    lines = ["| | " + " | ".join(our_columns) + " |", "|---|" + "---:|" * len(our_columns)]
    for row, cells in grid.items():
        attack = rows[row] if row in rows else default_attack_key(row, roman)
        texts = []
        for col in our_columns:
            mine = cells.get(col)
            theirs = paper.get((columns[col], attack)) if col in columns and attack is not None else None
            delta = mine - theirs if mine is not None and theirs is not None else None
            out.append({"row": row, "column": col, "ours": mine, "paper": theirs, "delta": delta})
            texts.append(_cell_text(mine, theirs))
        lines.append(f"| {row} | " + " | ".join(texts) + " |")
    matched = ", ".join(f"{col} = {key}" for col, key in columns.items()) or "none"
    lines += ["", f"Cells: ours / paper Table {roman} ({dataset}, {metric}{', ' + victim if victim else ''}) "
                  f"(Δ = ours - paper); a cell without a paper value is ours alone. Columns matched: {matched}."]
    return "\n".join(lines) + "\n", out


# ------------------------------------------------------------------------------------- our results
def _table_csv(results_dir: str | Path) -> Path:
    path = Path(results_dir)
    path = path / "table.csv" if path.is_dir() else path
    if not path.is_file():
        raise TrigactError(f"no results table {path}; give a pipeline/evaluate results folder holding table.csv")
    return path


def read_ours_dict(results_dir: str | Path) -> dict[str, dict[str, float | None]]:
    """The group rows of a pipeline/evaluate results folder's ``table.csv`` (or of that file) as
    ``row -> column -> accuracy in %`` (rows and columns in the file's order; an empty accuracy is None).
    The format: :mod:`trigact.evaluation.matrix` (``level,name,row,accuracy,...``, accuracy in [0, 1])."""
    path = _table_csv(results_dir)
    grid: dict[str, dict[str, float | None]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [f for f in ("level", "name", "row", "accuracy") if f not in (reader.fieldnames or [])]
        if missing:
            raise TrigactError(f"{path}: columns {', '.join(missing)} missing; a results table.csv has "
                               "level,name,row,accuracy,ci_low,ci_high,n,std,interval")
        for line, rec in enumerate(reader, start=2):
            if rec["level"] != "group":
                continue
            acc = None if rec["accuracy"] in ("", None) else _number(rec["accuracy"], f"{path} line {line} accuracy")
            grid.setdefault(rec["row"], {})[rec["name"]] = None if acc is None else 100.0 * acc
    if not grid:
        raise TrigactError(f"{path} has no 'group' rows; a table.csv written by pipeline/evaluate has them")
    return grid


def read_ours(results_dir: str | Path):
    """:func:`read_ours_dict` as a ``pandas.DataFrame`` (index = rows, columns = victim groups, in %)."""
    pandas = _pandas()
    grid = read_ours_dict(results_dir)
    cols = list(dict.fromkeys(c for cells in grid.values() for c in cells))
    return pandas.DataFrame([[cells.get(c) for c in cols] for cells in grid.values()],
                            index=list(grid), columns=cols, dtype=float)


# ------------------------------------------------------------------ settings that differ from the paper's

# The paper's protocol (Sec. V-A, "Model Training" and "Attack Methods"): 60 epochs on CIFAR-10, 100 on
# CIFAR-100 and the ImageNet subset; SGD lr 0.1 with CosineAnnealingLR, batch 128; attacks at
# L_inf 8/255 with 20 iterations. It does not say how many test images it scores: we read it as all.
PAPER_EPOCHS = {"cifar10": 60, "cifar100": 100, "imagenet100": 100}
PAPER_DATA = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet100": "imagenet_subset"}
PAPER_ATTACK = {"eps": 8 / 255, "steps": 20}


def _get(tree: Mapping, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _short(names: list[str], keep: int = 4) -> str:
    return ", ".join(names[:keep]) + (f" and {len(names) - keep} more" if len(names) > keep else "")


def setting_differences(dataset: str, runs: Mapping[str, Mapping], budget: Mapping | None = None,
                        n_eval: int | None = None, split: str = "test") -> list[str]:
    """Where an experiment's settings differ from the paper's, one line each (an empty list: none).

    ``runs``: run name -> its resolved train config as a plain dict; ``budget``: the attacks' budget
    (``eps``, ``steps``; see :func:`trigact.attacks.config.budget_overrides`); ``n_eval`` and
    ``split``: the images the banks are crafted on. A difference shared by several runs is one line
    naming them. Architectures are not checked: the table's columns name them."""
    if dataset not in PAPER_EPOCHS:
        raise TrigactError(f"dataset={dataset!r} is not one of the paper's; allowed: {', '.join(PAPER_EPOCHS)}")
    found: dict[tuple[str, str, str], list[str]] = {}

    def differs(key: str, ours, paper, name: str) -> None:
        found.setdefault((key, repr(ours), str(paper)), []).append(name)

    for name, cfg in runs.items():
        checks = [("data.name", PAPER_DATA[dataset]), ("trainer.max_epochs", PAPER_EPOCHS[dataset]),
                  ("data.batch_size", 128), ("optimizer._target_", "torch.optim.SGD"), ("optimizer.lr", 0.1),
                  ("scheduler._target_", "torch.optim.lr_scheduler.CosineAnnealingLR")]
        for key, paper in checks:
            ours = _get(cfg, key)
            if ours != paper and not (isinstance(ours, (int, float)) and isinstance(paper, (int, float))
                                      and math.isclose(ours, paper)):
                differs(key, ours, paper, name)
        val = _get(cfg, "data.val_size")
        if val not in (None, 0, 0.0):
            differs("data.val_size", val, "0 (all training images are trained on)", name)
        if _get(cfg, "trainer.limit_train_batches") not in (None, 1, 1.0):
            differs("trainer.limit_train_batches", _get(cfg, "trainer.limit_train_batches"), "1.0 (every batch)", name)
    lines = [f"`{key}` = {ours} (paper: {paper}) in {_short(names)}" for (key, ours, paper), names in found.items()]
    budget = dict(budget or {})
    for key, paper in PAPER_ATTACK.items():
        ours = budget.get(key)
        if ours is None:
            continue
        values = ours if isinstance(ours, (list, tuple)) else [ours]
        parsed = [parse_eps(v, f"attack_protocol.{key}") if key == "eps" else int(v) for v in values]
        if any(not math.isclose(float(v), paper) for v in parsed):
            shown = ", ".join(str(v) for v in values)
            lines.append(f"attack `{key}` = {shown} (paper: {'8/255' if key == 'eps' else paper})")
    if n_eval is not None:
        lines.append(f"`pipeline.n_eval` = {n_eval}: the first {n_eval} {split} images are scored (paper: "
                     "not stated, read as the whole test set)")
    if split != "test":
        lines.append(f"`pipeline.split` = {split} (paper: the test set)")
    return lines
