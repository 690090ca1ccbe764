"""``python -m trigact.evaluate surrogates=[...] victims=[...]``: score victims against TAE banks.

Victims and surrogates are picked by bundle, run folder, glob or Hydra sweep folder (see
:mod:`trigact.runs.selection`). ``victims`` is a list (one table column per run) or a mapping
``group -> patterns`` (one column per group, averaged over its runs: the paper's Eq. 7, e.g. seeds).
``defense=<name>`` (conf/defense/) puts a preprocessing defense in front of every victim.

The banks must exist (``python -m trigact.attack`` or the pipeline made them), and are found by the
settings they were crafted with (``attacks``, ``attack_overrides``, ``seed``, ``n_eval``, ``split``,
``data_overrides``); evaluate never crafts. Clean accuracy is measured on the banks' own clean
images (:func:`trigact.evaluation.victims.evaluate_victims`, shared with the pipeline), so no dataset is needed here. Writes
``matrix.csv``, ``table.md``, ``robustness.png`` and ``victims.json`` to ``results_dir``
(``<output_dir>/evaluate/<name>``).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from trigact.attacks.config import budget_overrides
from trigact.cli import quiet_libraries, user_errors
from trigact.common.batching import AUTO, CPU_DEFAULT, batch_size_for
from trigact.common.config import CONF_DIR
from trigact.common.errors import TrigactError
from trigact.common.io import atomic_write_json, atomic_write_text
from trigact.common.tracking import job_run, log_tables
from trigact.common.validate import check_n_eval, check_name, check_seed, check_split, check_steps
from trigact.evaluation.bank import stored_images
from trigact.evaluation.budgets import load_at_budgets
from trigact.evaluation.crafting import data_config_of, evaluation_images
from trigact.evaluation.tables import bank_rows, robustness_tables, write_results
from trigact.evaluation.victims import defend, evaluate_victims, victim_record
from trigact.runs import register_resolvers
from trigact.runs.selection import as_dict, compose_train, find_runs, plain, select, unique_labels

register_resolvers()


def victim_columns(cfg: DictConfig) -> dict[str, dict]:
    """Column name -> {table name -> deployed model}."""
    spec = plain(cfg, "victims")
    if isinstance(spec, (str, list)):
        return {label: {label: model} for label, model in unique_labels(find_runs(spec, cfg.paths.runs_dir, compose_train)).items()}
    if isinstance(spec, dict) and spec:
        return {group: unique_labels(find_runs(patterns, cfg.paths.runs_dir, compose_train)) for group, patterns in spec.items()}
    raise TrigactError("victims must be a list of runs (one column each) or a mapping group -> runs")


def run_evaluate(cfg: DictConfig):
    # Settings first: a bad one must not wait for every bundle and bank to load.
    check_name(cfg.name, "name")  # a folder name under outputs/evaluate, not a path out of it
    batch_size = cfg.batch_size if cfg.batch_size == AUTO else check_steps(cfg.batch_size, "batch_size")
    # What the banks were crafted with: they are found by it.
    seed, n_eval, split = check_seed(cfg.seed, "seed"), check_n_eval(cfg.get("n_eval")), check_split(cfg.get("split", "test"))
    if cfg.get("threat"):
        return run_adaptive(cfg, batch_size, seed, n_eval, split)
    surrogates = select(cfg, "surrogates")
    columns = victim_columns(cfg)
    everyone = {**surrogates, **{n: m for group in columns.values() for n, m in group.items()}}
    data_name = data_config_of(everyone)["name"]
    budget = budget_overrides(as_dict(cfg.get("attack_protocol")), as_dict(cfg.get("attack_overrides")),
                              as_dict(cfg.get("attack_params")))
    banks = load_at_budgets(cfg.paths.output_dir, data_name, surrogates, list(cfg.attacks), CONF_DIR, budget,
                            seed=seed, n_eval=n_eval, split=split, data_overrides=as_dict(cfg.get("data_overrides")))
    victims, runs, records, groups = defended_victims(cfg, columns)
    # auto: the largest scoring batch (forward only) that fits on every victim's device.
    if batch_size == AUTO and banks:
        shape = tuple(stored_images(next(iter(banks.values()))).shape[1:])
        batch_size = batch_size_for(victims.values(), shape, batch_size, backward=False)
    elif batch_size == AUTO:
        batch_size = CPU_DEFAULT  # no banks: evaluate_victims says what is missing
    matrix = evaluate_victims(victims, surrogates, banks, allow_whitebox=bool(cfg.allow_whitebox),
                           batch_size=batch_size, victim_runs=runs)
    out = write_results(matrix, groups, records, cfg.results_dir, intervals=bool(cfg.get("intervals", False)))
    atomic_write_json(bank_rows(banks), Path(out) / "banks.json")  # which bank each (surrogate, attack) cell used
    run = job_run(cfg, "eval", f"eval-{Path(out).name}", out)
    if run is not None:
        log_tables(run, robustness_tables(matrix, groups, records))
        run.finish()
    return matrix, groups, out


def defended_victims(cfg: DictConfig, columns: dict[str, dict]):
    """``(victims, runs, records, groups)``: every victim behind ``defense`` (if any), named by column."""
    defense = as_dict(cfg.get("defense")) or None
    if defense and defense.get("name") in (None, "none"):
        defense = None
    tag = defense.get("label", defense["name"]) if defense else None
    victims, runs, records, groups = {}, {}, [], {}
    for group, members in columns.items():
        column = f"{group} + {tag}" if tag else group  # the table says which defense stood in front
        groups[column] = []
        for label, model in members.items():
            name = column if len(members) == 1 and label == group else f"{column} / {label}"
            victims[name], runs[name] = defend(model, defense), model.meta.get("path")
            records.append(victim_record(name, column, model, tag))
            groups[column].append(name)
    return victims, runs, records, groups


def run_adaptive(cfg: DictConfig, batch_size: int, seed: int, n_eval, split: str):
    """``threat=L4|L5|L6``: each victim attacked itself on the first ``n_eval`` images of ``split``."""
    from trigact.threats.evaluate import check_level_config, evaluate_adaptive
    from trigact.threats.levels import level_meta
    from trigact.threats.store import store_root

    level_cfg = as_dict(cfg.threat)
    level, _, _ = check_level_config(level_cfg)
    columns = victim_columns(cfg)
    victims, _, records, groups = defended_victims(cfg, columns)
    models = {n: m for group in columns.values() for n, m in group.items()}
    images = evaluation_images(data_config_of(models), n_eval, as_dict(cfg.get("data_overrides")), split=split)
    x, y = (torch.stack(t) for t in zip(*(images[i] for i in range(len(images)))))
    # auto: the largest batch whose forward and input-gradient backward fit on every victim's device.
    batch_size = batch_size_for(victims.values(), tuple(x.shape[1:]), batch_size)
    attacker = None
    if level == "L4":  # the attacker's own labelled images: validation images, never the test split
        if split == "val":
            raise TrigactError("threat=L4 draws the attacker's images from the validation split; evaluate on split=test")
        own = evaluation_images(data_config_of(models), (level_cfg.get("estimate") or {}).get("n_images"),
                                as_dict(cfg.get("data_overrides")), split="val")
        ax, ay = (torch.stack(t) for t in zip(*(own[i] for i in range(len(own)))))
        attacker = (ax, ay.long())
    matrix, sanity = evaluate_adaptive(victims, x, y.long(), level_cfg, seed=seed, batch_size=batch_size,
                                       sanity=bool(cfg.get("sanity", True)), attacker=attacker,
                                       store=store_root(cfg.paths.output_dir, data_config_of(models)["name"]))
    out = write_results(matrix, groups, records, cfg.results_dir, intervals=bool(cfg.get("intervals", False)))
    atomic_write_json({"threat": level_meta(level), "config": level_cfg, "sanity": sanity}, Path(out) / "threat.json")
    flags = [f"- {name}: {flag}" for name, report in sanity.items() for flag in report.get("flags", [])]
    if flags:  # a flagged victim is said so under its table, not silently reported
        table = Path(out) / "table.md"
        atomic_write_text(table.read_text() + "\nSanity flags:\n" + "\n".join(flags) + "\n", table)
    return matrix, groups, out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    with user_errors():
        matrix, groups, out = run_evaluate(cfg)
        print(matrix.to_markdown(groups, intervals=bool(cfg.get("intervals", False))))
        print(f"results: {Path(out).resolve()}")


if __name__ == "__main__":
    main()
