"""``python -m trigact.analysis.theory results=<results folder>``: Theorems 1 and 2 of the paper,
measured on the trigger victims of a ``trigact.pipeline`` or ``trigact.evaluate`` results folder
(what is computed, and the paper's statements: :mod:`trigact.analysis.theory`).

The results folder gives the victims (``victims.json``: name, bundle, defense) and the cells they were
scored on (``matrix.csv``: victim, surrogate, attack, accuracy, n). The banks are found:

- ``banks=null`` (default): the banks the folder's ``banks.json`` names (pipeline and evaluate write
  it: exactly the banks its cells were scored on), else every bank under ``bank_root`` (default: two
  levels above the results folder, the ``output_dir`` holding ``pipeline/<name>`` or
  ``evaluate/<name>``), ``advbank/<dataset>``; either way matched to each (surrogate, attack) cell of ``matrix.csv`` by its ``meta.json``: the attack (and the
  ``@k/255`` budget of a budget sweep), the number of images, and the surrogate (its bundle, as
  ``runs.json`` of a pipeline names it, or its registry id or run label). When several banks fit a cell
  (e.g. crafted with different seeds), the one on which each victim's accuracy reproduces
  ``matrix.csv`` (within one image) is used; a cell with no (or no single) bank is listed in the notes.
- ``banks=[<bank folder or glob>, ...]``: exactly those banks, for every trigger victim (matched to
  ``matrix.csv``'s labels where they fit, else named by the bank's own surrogate and attack).

Victims without a trigger, or behind a preprocessing defense (the theorems are about the bare
``f_t``), are skipped and listed. Writes ``theory.md``, ``theory.csv`` (one row per Theorem 1 victim,
then one per Theorem 2 (victim, bank), a ``table`` column telling which) and ``theory.json`` to
``out_dir`` (default ``<results>/theory``).
"""

from __future__ import annotations

import csv
import glob
import io
import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from trigact.analysis.theory import THEOREM1_COLUMNS, CleanLosses, summary_paragraph, theorem1_row, theorem2_rows, theory_markdown
from trigact.cli import quiet_libraries, user_errors
from trigact.common.config import CONF_DIR
from trigact.common.errors import TrigactError
from trigact.common.io import atomic_write_json, atomic_write_text
from trigact.common.validate import check_steps
from trigact.runs import register_resolvers

register_resolvers()  # ${trigact_launch:...} in the launch folder's name


# ------------------------------------------------------------------------------------ the results


def read_results(results: Path) -> tuple[list[dict], list[dict], dict[str, str]]:
    """``(victims.json records, matrix.csv rows, runs.json name -> bundle)`` of a results folder."""
    if not results.is_dir():
        raise TrigactError(f"results={results}: no such folder; give a results folder of trigact.pipeline or trigact.evaluate")
    for name in ("victims.json", "matrix.csv"):
        if not (results / name).is_file():
            raise TrigactError(f"results={results} has no {name}; give a results folder of trigact.pipeline or "
                               "trigact.evaluate (one that evaluated victims against banks)")
    try:
        records = json.loads((results / "victims.json").read_text())
        with open(results / "matrix.csv", newline="") as handle:
            cells = [{"victim": r["victim"], "surrogate": r["surrogate"], "attack": r["attack"],
                      "accuracy": float(r["accuracy"]), "n": int(r["n"])} for r in csv.DictReader(handle)]
    except (json.JSONDecodeError, KeyError, ValueError) as err:
        raise TrigactError(f"results={results}: unreadable victims.json or matrix.csv ({type(err).__name__}: {err})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "name" in r for r in records):
        raise TrigactError(f"results={results}: victims.json must be a list of victim records with a name")
    runs = {}
    if (results / "runs.json").is_file():  # a pipeline's: run name -> bundle (its surrogates too)
        for row in json.loads((results / "runs.json").read_text()):
            if isinstance(row, dict) and row.get("name") and row.get("bundle"):
                runs[str(row["name"])] = str(row["bundle"])
    return records, cells, runs


def training_images(data_cfg: dict, n: int, seed: int, data_overrides: dict | None = None):
    """``n`` clean training images (the train split without augmentation, i.e. its ``train_eval_set``;
    validation images carved out of it are not among them), a seeded random choice, as ``(x, y)``."""
    from trigact.common.config import instantiate_named

    datamodule = instantiate_named(OmegaConf.create({**data_cfg, **(data_overrides or {})}))
    datamodule.setup()
    images = getattr(datamodule, "train_eval_set", None) or datamodule.train_set
    if images is None or len(images) == 0:
        raise TrigactError(f"the train split of {data_cfg.get('name')} is empty")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[: min(n, len(images))]
    pairs = [images[int(i)] for i in order.sort().values]
    return torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs], dtype=torch.long)


# -------------------------------------------------------------------------------------- the banks


def _bank_folders(pattern: str) -> list[Path]:
    from trigact.evaluation.bank import DATA_FILES, META_FILE

    matches = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
    found = []
    for match in map(Path, matches):
        if match.name == META_FILE:
            match = match.parent
        if (match / META_FILE).is_file():
            found.append(match)
        elif match.is_dir():
            found += sorted(p.parent for p in match.rglob(META_FILE) if any((p.parent / f).is_file() for f in DATA_FILES))
    return found


def _recorded_banks(results: Path) -> list[Path] | None:
    """The bank folders a results folder's ``banks.json`` names (pipeline and evaluate write it), or None
    when it has none or one of them is gone (then the banks are searched for)."""
    path = results / "banks.json"
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text())
        folders = [Path(str(row["bank"])) for row in rows]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return folders if folders and all((f / "meta.json").is_file() for f in folders) else None


def bank_candidates(cfg: DictConfig, results: Path, dataset: str) -> tuple[list[tuple[Path, dict]], bool]:
    """``([(folder, meta)], explicit)``: the banks named by ``banks=[...]`` (explicit), or every bank
    under ``<bank_root>/advbank/<dataset>``."""
    spec = OmegaConf.to_container(cfg.banks, resolve=True) if OmegaConf.is_config(cfg.get("banks")) else cfg.get("banks")
    if spec:
        folders = []
        for pattern in [spec] if isinstance(spec, str) else list(spec):
            found = _bank_folders(str(pattern))
            if not found:
                raise TrigactError(f"banks entry {pattern!r} matches no TAE bank (a folder holding meta.json and bank.safetensors or bank.pt)")
            folders += found
        explicit = True
    else:
        recorded = _recorded_banks(results)
        if recorded is not None:  # banks.json: the very banks the results were scored on
            folders = recorded
        else:
            root = Path(cfg.bank_root) if cfg.get("bank_root") else results.resolve().parent.parent
            folders = _bank_folders(str(root / "advbank" / dataset))
        explicit = False
    out, seen = [], set()
    for folder in folders:
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            if explicit:
                raise TrigactError(f"bank {folder}: unreadable meta.json") from None
            continue
        out.append((folder, meta))
    return out, explicit


def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (TypeError, OSError):
        return False


class SurrogateNames:
    """The names a bank's surrogate goes by: its registry id (``meta.surrogate.name``), the pipeline's
    run names whose bundle it is (``runs.json``), and its run label (``trigact.evaluate``'s table name;
    read from the bundle only when needed)."""

    def __init__(self, runs: dict[str, str]):
        self.runs = runs
        self._labels: dict[str, str | None] = {}

    def matches(self, label: str, meta: dict) -> bool:
        surrogate = meta.get("surrogate") or {}
        bundle = surrogate.get("bundle")
        if label == surrogate.get("name"):
            return True
        if label in self.runs:
            return bool(bundle) and _same_file(self.runs[label], bundle)
        return label == self._label(bundle)

    def _label(self, bundle) -> str | None:
        if not bundle:
            return None
        if bundle not in self._labels:
            from trigact.runs.bundle import read_bundle
            from trigact.runs.selection import run_label

            try:
                self._labels[bundle] = run_label(dict(read_bundle(bundle).get("meta") or {}))
            except TrigactError:
                self._labels[bundle] = None
        return self._labels[bundle]


def _attack_fits(label: str, meta: dict) -> bool:
    from trigact.attacks.config import split_label
    from trigact.common.validate import parse_eps

    name, eps = split_label(label)
    if meta.get("attack") != name:
        return False
    return eps is None or abs(float(meta.get("eps", -1)) - parse_eps(eps)) < 1e-9


def match_banks(cells: list[dict], candidates: list[tuple[Path, dict]], runs: dict[str, str]) -> dict:
    """(surrogate, attack) of ``matrix.csv`` -> the candidate bank folders that fit it."""
    names = SurrogateNames(runs)
    pairs = {}
    for cell in cells:
        pairs.setdefault((cell["surrogate"], cell["attack"]), cell["n"])
    return {pair: [folder for folder, meta in candidates
                   if meta.get("n") == n and _attack_fits(pair[1], meta) and names.matches(pair[0], meta)]
            for pair, n in pairs.items()}


# ---------------------------------------------------------------------------------------- the run


def _victims(records: list[dict]):
    """``(victims, skipped)``: name -> (record, deployed model) of the trigger victims, and the rest."""
    from trigact.runs.bundle import load_bundle

    victims, skipped = {}, []
    for record in records:
        name = str(record["name"])
        if record.get("defense"):
            skipped.append({"name": name, "reason": f"behind defense {record['defense']}; the theorems are about "
                            "the bare f_t (its undefended run is measured under its own name when it is a victim)"})
            continue
        if not record.get("bundle") or not Path(record["bundle"]).is_file():
            skipped.append({"name": name, "reason": f"bundle not found: {record.get('bundle')}"})
            continue
        model = load_bundle(record["bundle"])
        if model.trigger is None:
            skipped.append({"name": name, "reason": "no trigger"})
            continue
        victims[name] = (record, model)
    return victims, skipped


def run_theory(cfg: DictConfig) -> dict:
    from trigact.evaluation.bank import load_bank
    from trigact.evaluation.crafting import data_config_of

    results = Path(str(cfg.results))
    n_train = check_steps(cfg.n_train, "n_train")
    batch_size = check_steps(cfg.batch_size, "batch_size")
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TrigactError(f"seed={seed!r} must be an integer")
    data_overrides = OmegaConf.to_container(cfg.data_overrides, resolve=True) if cfg.get("data_overrides") else {}
    out = Path(cfg.out_dir) if cfg.get("out_dir") else results / "theory"
    records, cells, runs = read_results(results)
    victims, skipped = _victims(records)
    notes = []

    # Theorem 1 (Eq. 8-9): each victim's g on clean training images (one draw per data config).
    images, t1, grads = {}, [], {}
    for name, (record, model) in victims.items():
        data_cfg = data_config_of({name: model})
        key = json.dumps(data_cfg, sort_keys=True, default=str)
        if key not in images:
            images[key] = training_images(data_cfg, n_train, seed, data_overrides)
        x, y = images[key]
        row, g = theorem1_row(name, model, x, y, batch_size, kind=record.get("trigger_kind"))
        t1.append(row)
        grads[name] = (g, row["ce_clean"])

    # Theorem 2: every bank each victim was evaluated against.
    t2 = []
    if victims:
        dataset = data_config_of({n: m for n, (_, m) in victims.items()})["name"]
        candidates, explicit = bank_candidates(cfg, results, dataset)
        matched = match_banks(cells, candidates, runs)
        clean_losses = CleanLosses()
        accuracy = {(c["victim"], c["surrogate"], c["attack"]): c["accuracy"] for c in cells}
        if explicit:  # every given bank, named by its matrix.csv cell where one fits
            cell_of = {folder: pair for pair, folders in matched.items() for folder in folders}
            chosen = {}
            for folder, meta in candidates:
                own = ((meta.get("surrogate") or {}).get("name"), f"{meta.get('attack')}@{meta.get('eps_255')}/255")
                chosen.setdefault(cell_of.get(folder, own), []).append(folder)
        else:
            chosen = matched
            for pair, folders in matched.items():
                if not folders:
                    notes.append(f"no bank found for surrogate {pair[0]}, attack {pair[1]} under the bank root; "
                                 "name it with banks=[...]")
        # One bank in memory at a time; (victim, cell) -> a row per bank that fits the cell.
        found: dict[tuple, list[dict]] = {}
        for pair, folders in chosen.items():
            scored = [name for name in victims if explicit or (name, *pair) in accuracy]  # cells the victim has
            for folder in folders:
                if not scored:
                    break
                bank = load_bank(folder)
                for name in scored:
                    g, ce_train = grads[name]
                    found.setdefault((name, pair), []).extend(theorem2_rows(
                        name, victims[name][1], g, {pair: bank}, batch_size, ce_train,
                        {pair: accuracy.get((name, *pair))}, clean_losses))
                del bank
        for name in victims:
            for pair in chosen:
                rows = found.get((name, pair), [])
                if len(rows) > 1 and not explicit:  # several banks fit the cell: keep the one matrix.csv's came from
                    fits = [r for r in rows if abs(r["acc_adv"] - r["acc_matrix"]) <= 1.0 / r["n"] + 1e-9]
                    if len(fits) != 1:
                        notes.append(f"{name}: {len(rows)} banks fit surrogate {pair[0]}, attack {pair[1]} and "
                                     f"{len(fits)} reproduce matrix.csv's accuracy; left out (name it with banks=[...])")
                        continue
                    rows = fits
                t2 += rows
        for r in t2:
            if r["acc_matrix"] is not None and abs(r["acc_adv"] - r["acc_matrix"]) > 1.0 / r["n"] + 1e-9:
                notes.append(f"{r['victim']} on {r['surrogate']}/{r['attack']}: accuracy here {r['acc_adv']:.4f}, "
                             f"matrix.csv {r['acc_matrix']:.4f} (is this the bank it was evaluated on?)")

    text = theory_markdown(str(results), t1, t2, skipped, notes)
    paragraph = summary_paragraph(t1, t2)
    paths = {
        "md": atomic_write_text(text, out / "theory.md"),
        "csv": atomic_write_text(_csv(t1, t2), out / "theory.csv"),
        "json": atomic_write_json({"results": str(results), "n_train": n_train, "seed": seed, "summary": paragraph,
                                   "theorem1": t1, "theorem2": t2, "skipped": skipped, "notes": notes},
                                  out / "theory.json"),
    }
    return {"theorem1": t1, "theorem2": t2, "skipped": skipped, "notes": notes, "summary": paragraph, "paths": paths}


def _csv(t1: list[dict], t2: list[dict]) -> str:
    columns = ["table"]
    for row in t1 + t2:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for table, rows in (("theorem1", t1), ("theorem2", t2)):
        for row in rows:
            writer.writerow({"table": table, **row})
    return buffer.getvalue()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="theory")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    with user_errors():
        done = run_theory(cfg)
        from trigact.analysis.theory import markdown_rows

        print(markdown_rows(done["theorem1"], THEOREM1_COLUMNS[:8]))
        print()
        print(done["summary"])
        for s in done["skipped"]:
            print(f"skipped: {s['name']}: {s['reason']}")
        for note in done["notes"]:
            print(f"note: {note}")
        for kind, path in done["paths"].items():
            print(f"{kind}: {Path(path).resolve()}")


if __name__ == "__main__":
    main()
