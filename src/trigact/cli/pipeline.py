"""``python -m trigact.pipeline experiment=<name>``: the main job.

1. train: every run the experiment names (runs whose bundle exists are skipped, so re-running
   resumes where it stopped); ``accuracy.md`` has each model's accuracy with and without its trigger.
2. attack: when the experiment names ``surrogates`` and ``attacks``, one TAE bank per (surrogate,
   attack) on the first ``n_eval`` images of ``pipeline.split`` (``test`` for final tables, ``val``
   for model selection such as ``hparams_search``); existing banks are reused.
3. evaluate: every victim (grouped, e.g. one group per defense) against every bank: ``matrix.csv``,
   the paper-style ``table.md`` (Clean, one row per attack, Mean; Eq. 5-7) and ``robustness.png``.
   Clean accuracy is measured on the banks' own quantized clean images, as ``trigact.evaluate``
   measures it (:func:`trigact.evaluation.victims.evaluate_victims`), so both write the same table.
"""

from __future__ import annotations

import re
from pathlib import Path

import hydra
import torch
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from trigact.attacks.config import attack_config, budget_overrides
from trigact.cli import quiet_libraries, user_errors
from trigact.cli.grid import expand_grid
from trigact.common.config import CONF_DIR
from trigact.common.devices import cpu_fallback
from trigact.common.errors import TrigactError, unknown_name
from trigact.common.io import atomic_write_json, atomic_write_text
from trigact.common.report import markdown_table, print_table
from trigact.common.tracking import job_run, log_tables
from trigact.common.validate import check_n_eval, check_seed, check_split
from trigact.evaluation.budgets import check_attacks, craft_at_budgets
from trigact.evaluation.crafting import evaluation_images, unfit_pairs, unfit_reason
from trigact.evaluation.matrix import RobustnessMatrix
from trigact.evaluation.tables import bank_rows, robustness_tables, write_results
from trigact.evaluation.victims import defend, defense_config, evaluate_victims, victim_record
from trigact.runs import register_resolvers
from trigact.models.ensemble import EnsembleModel
from trigact.runs.bundle import BUNDLE_NAME, load_bundle
from trigact.training.run import train

register_resolvers()


def run_overrides(cfg: DictConfig, name: str) -> list[str]:
    """The train-config overrides for one run: the experiment's common ones, then the run's own."""
    own = cfg.pipeline.runs[name]
    if own is None or isinstance(own, str) or not OmegaConf.is_list(own):
        raise TrigactError(f"pipeline.runs.{name} must be a list of train overrides, e.g. [method=standard]")
    # The pipeline's own path settings apply to its training runs too (quoted: paths may hold , = [).
    shared = [f"paths.{key}={quote(cfg.paths[key])}" for key in FORWARDED_PATHS] + [f"seed={cfg.seed}"]
    shared.append(f"allow_cpu={str(bool(cfg.get('allow_cpu', False))).lower()}")  # for experiment=paper_* runs
    if cfg.get("wandb") and cfg.wandb.enabled:  # the training runs log to W&B in the pipeline's group
        shared += ["logger=wandb", f"logger.wandb.group={quote(wandb_group(cfg))}"]
        shared += [f"logger.wandb.project={quote(cfg.wandb.project)}"]
    # A GPU-sized experiment (the paper tables select trainer=gpu) run with allow_cpu=true where there
    # is no GPU: its runs train on the CPU (last, so that it wins over trainer=gpu).
    fallback = ["trainer.accelerator=cpu"] if cpu_fallback(
        bool(cfg.get("require_accelerator", False)), bool(cfg.get("allow_cpu", False)),
        f"experiment {cfg.pipeline.name}") else []
    return shared + list(cfg.pipeline.train_overrides) + list(own) + fallback


RUN_LINK = re.compile(r"@run:([A-Za-z0-9_.-]+)")


def link_runs(override: str, earlier: dict, name: str) -> str:
    """``@run:<name>`` in a run's override is the run folder of an earlier run of the plan (e.g.
    ``backdoor.surrogate=@run:surrogate_small_cnn``): it is trained first, and its folder is known
    before anything trains."""
    def folder(match):
        if match.group(1) not in earlier:
            raise TrigactError(f"pipeline.runs.{name}: {match.group(0)} names no run listed before it "
                               f"(earlier runs: {', '.join(earlier) or 'none'})")
        return quote(earlier[match.group(1)].paths.run_dir)
    return RUN_LINK.sub(folder, str(override))


def train_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """Every run's train config, in the plan's order (``@run:`` links resolved). A ``pipeline.grid``
    is expanded first (in place; expanding twice is a no-op)."""
    expand_grid(cfg)
    train_cfgs = {}
    for name in cfg.pipeline.runs:
        overrides = [link_runs(o, train_cfgs, name) for o in run_overrides(cfg, name)]
        train_cfgs[name] = compose(config_name="train", overrides=overrides)
    return train_cfgs


def wandb_group(cfg: DictConfig) -> str:
    return cfg.wandb.group or f"pipeline-{cfg.pipeline.name}"


# What paper.md compares with the paper's settings (trigact.analysis.paper.setting_differences).
SETTING_KEYS = ("data", "trainer", "optimizer", "scheduler")
FORWARDED_PATHS = ("root_dir", "data_dir", "output_dir", "runs_dir")


def quote(value) -> str:
    """A Hydra override value that is taken literally."""
    return "'" + str(value).replace("'", "\\'") + "'"


def run_pipeline(cfg: DictConfig) -> list[dict]:
    expand_grid(cfg)  # pipeline.grid (the paper tables): runs, surrogates and victims per architecture
    if not cfg.get("pipeline") or not cfg.pipeline.get("runs"):
        raise TrigactError("no runs to do: choose an experiment, e.g. experiment=demo (see conf/experiment/)")
    check_seed(cfg.seed, "seed")  # every run and bank is seeded with it
    # Composing is cheap: every run's config (and so its run folder) is known before any training.
    train_cfgs = train_configs(cfg)
    if cfg.pipeline.get("attacks"):
        check_evaluation_plan(cfg, {name: c.paths.run_dir for name, c in train_cfgs.items()})  # before hours of training
    rows = []
    for name, train_cfg in train_cfgs.items():
        print(f"== run {name}: {train_cfg.paths.run_dir}")
        rows.append({"name": name, **train(train_cfg)})
    out = Path(cfg.paths.results_dir)
    atomic_write_text(markdown_table(rows), out / "accuracy.md")
    atomic_write_json(rows, out / "runs.json")
    if cfg.pipeline.get("attacks"):
        matrix, columns = attack_and_evaluate(cfg, train_cfgs, out)
        print(matrix.to_markdown(columns, intervals=bool(cfg.get("intervals", False))))
        if cfg.pipeline.get("ladder"):
            print((run_ladder(cfg, train_cfgs, out) / "ladder.md").read_text())
    else:
        atomic_write_text(markdown_table(rows), out / "table.md")
    if cfg.pipeline.get("paper"):
        write_paper_comparison(cfg, rows, out, train_cfgs)
    return rows


def write_paper_comparison(cfg: DictConfig, rows: list[dict], out: Path, train_cfgs: dict | None = None) -> Path:
    """``paper.md`` / ``paper.json``: our table beside the paper's (``pipeline.paper``), each cell
    ``ours / paper (delta)``; for Table XI (``runs_by_name``) each run's MSE(0, tau) beside the paper's.
    Both list every setting that differs from the paper's (epochs, data, optimizer, attack budget,
    images scored: :func:`trigact.analysis.paper.setting_differences`), so that a smoke run or a
    shortened schedule is never read as a reproduction."""
    from trigact.analysis.paper import (PAPER_EPOCHS, read_ours_dict, reference_value, setting_differences, side_by_side,
                                        table11_cell)

    spec = OmegaConf.to_container(cfg.pipeline.paper, resolve=True)
    lines = [f"# {cfg.pipeline.name}: ours beside the paper's Table {spec['table']}", ""]
    if spec.get("runs_by_name"):  # run <dataset>_<defense>[_<arch>] -> (dataset, victim, defense)
        records, unnamed = [], []
        lines += ["| run | MSE(0, tau) (1e-2), ours | paper | delta |", "|---|---:|---:|---:|"]
        for row in rows:
            if row.get("trigger_mse") is None:
                continue
            cell = table11_cell(row["name"])
            ours = 100 * row["trigger_mse"]
            paper = None
            if cell is None:
                unnamed.append(row["name"])
            else:
                dataset, defense, arch = cell
                paper = reference_value(spec["table"], dataset, defense, "none", victim=arch, metric="mse_1e-2")
            records.append({"run": row["name"], "ours": ours, "paper": paper})
            delta = "-" if paper is None else f"{ours - paper:+.2f}"
            lines.append(f"| {row['name']} | {ours:.2f} | {'-' if paper is None else f'{paper:.2f}'} | {delta} |")
        if unnamed:  # said, not a silent "-": the paper's cell is found by the run's name
            lines += ["", f"No paper cell for {', '.join(unnamed)}: a run is matched to Table XI by its name, "
                      "<dataset>_<defense>[_<arch>] with dataset one of the paper's (cifar10, cifar100, imagenet100)."]
        table = "\n".join(lines) + "\n"
    else:
        ours = read_ours_dict(out)
        present = {c for cells in ours.values() for c in cells}
        gone = {i.get("column") for i in (cfg.pipeline.get("left_out") or [])}
        columns = {c: key for c, key in (spec.get("columns") or {}).items() if c in present or c not in gone}
        markdown, records = side_by_side(ours, spec["table"], spec["dataset"], columns)
        table = "\n".join(lines) + "\n" + markdown
    left_out = OmegaConf.to_container(cfg.pipeline.left_out, resolve=True) if cfg.pipeline.get("left_out") else []
    if left_out:
        table += "\nLeft out: " + "; ".join(f"{i.get('column') or i.get('attack')} ({i['reason']})" for i in left_out) + "\n"
    differences = []
    for dataset in sorted({str(spec["dataset"])} if spec.get("dataset") else
                          {row["name"].partition("_")[0] for row in rows} & set(PAPER_EPOCHS)):
        runs = {name: {key: OmegaConf.to_container(c[key], resolve=True) for key in SETTING_KEYS if c.get(key) is not None}
                for name, c in (train_cfgs or {}).items() if spec.get("dataset") or name.startswith(f"{dataset}_")}
        attacks = bool(cfg.pipeline.get("attacks"))
        differences += setting_differences(dataset, runs, pipeline_budget(cfg) if attacks else None,
                                           cfg.pipeline.get("n_eval") if attacks else None,
                                           str(cfg.pipeline.get("split", "test")) if attacks else "test")
    table += ("\n## Settings that differ from the paper's\n\n" + "\n".join(f"- {d}" for d in differences) + "\n"
              if differences else "\nSettings: the paper's (epochs, data, optimizer, batch, attack budget, images scored).\n")
    atomic_write_json({"paper": spec, "cells": records, "left_out": left_out, "differences": differences},
                      out / "paper.json")
    path = atomic_write_text(table, out / "paper.md")
    print(f"paper comparison: {path}")
    return path


def victim_groups(cfg: DictConfig) -> dict[str, dict]:
    """``pipeline.victims``: group name (a table column) -> ``{"runs": [...], "defense": name or None,
    "surrogates": [...] or None}``.

    A group is a list of run names, or a mapping with ``runs``, a ``defense`` (a conf/defense name)
    put in front of each of its victims, and its own ``surrogates`` (runs: the column's S, e.g. the
    paper's Tables VIII-X, where the attacker trains its surrogates as the column's defender does;
    default ``pipeline.surrogates``); ``defense=`` on the command line applies to every group that names none.
    """
    if not cfg.pipeline.get("victims"):
        raise TrigactError("pipeline.victims is empty: name the runs to evaluate, e.g. "
                           "pipeline.victims={'No defense':[standard]}")
    groups = OmegaConf.to_container(cfg.pipeline.victims, resolve=True)
    if isinstance(groups, (list, str)):  # a plain list of runs: one column each, as in evaluate
        groups = {run: [run] for run in ([groups] if isinstance(groups, str) else groups)}
    default_defense = OmegaConf.to_container(cfg.defense, resolve=True) if cfg.get("defense") else None
    if default_defense and default_defense.get("name") in (None, "none"):
        default_defense = None
    parsed = {}
    for group, spec in groups.items():
        if isinstance(spec, dict):
            unknown = set(spec) - {"runs", "defense", "surrogates"}
            if unknown or "runs" not in spec:
                raise TrigactError(f"pipeline.victims.{group} must be a list of runs or "
                                   "{runs: [...], defense: name, surrogates: [run, ...]}")
            runs, defense, own = spec["runs"], spec.get("defense"), spec.get("surrogates")
        else:
            runs, defense, own = spec, None, None
        runs = list(runs) if isinstance(runs, list) else [runs]
        if own is not None and (not isinstance(own, list) or not own):
            raise TrigactError(f"pipeline.victims.{group}.surrogates must be a non-empty list of runs")
        parsed[group] = {"runs": runs, "defense": defense or default_defense,
                         "surrogates": None if own is None else [str(o) for o in own]}
    return parsed


def surrogate_entries(cfg: DictConfig, node=None) -> list[tuple[str, list[str], str | None]]:
    """``pipeline.surrogates`` as ``(table name, member runs, fusion)``: a run name is itself (fusion
    None); ``{ensemble: [runA, runB], fusion: logits|probs}`` is the fused model of those runs, named
    ``ensemble(runA + runB)`` (``probs`` appended for that fusion)."""
    from trigact.models.ensemble import FUSIONS

    out = []
    node = cfg.pipeline.get("surrogates") if node is None else node
    for entry in (OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else list(node or [])):
        if not isinstance(entry, dict):
            out.append((str(entry), [str(entry)], None))
            continue
        unknown = sorted(set(entry) - {"ensemble", "fusion"})
        members = entry.get("ensemble")
        if unknown or not isinstance(members, list) or len(set(members)) < 2:
            raise TrigactError(f"pipeline.surrogates entry {entry}: an ensemble is {{ensemble: [run, run, ...], "
                               f"fusion: {'|'.join(FUSIONS)}}} with at least 2 distinct runs of pipeline.runs")
        fusion = entry.get("fusion") or "logits"
        if fusion not in FUSIONS:
            raise unknown_name("ensemble fusion", fusion, FUSIONS)
        members = list(dict.fromkeys(map(str, members)))
        name = f"ensemble({' + '.join(members)})" + (" probs" if fusion != "logits" else "")
        out.append((name, members, fusion))
    return out


def all_surrogate_entries(cfg: DictConfig) -> list[tuple[str, list[str], str | None]]:
    """``pipeline.surrogates`` and every victim group's own surrogates (each once): the banks to craft."""
    entries = surrogate_entries(cfg)
    known = {name for name, _, _ in entries}
    for spec in victim_groups(cfg).values():
        for name in spec["surrogates"] or []:
            if name not in known:
                entries.append((name, [name], None))
                known.add(name)
    return entries


def check_evaluation_plan(cfg: DictConfig, run_dirs: dict[str, str] | None = None) -> None:
    """Fail in seconds, not after the training stage, on a mistake in the attack/evaluate plan: no
    surrogates, a surrogate or victim that is not one of ``pipeline.runs``, a victim that is a
    surrogate's run (unless ``pipeline.allow_whitebox``), a bad ``pipeline.n_eval`` or
    ``pipeline.split``, an unknown attack or a bad ``attack_overrides`` value, an unknown defense or
    one that cannot be built (e.g. NRP without weights). A ``pipeline.grid`` is expanded first.

    ``run_dirs``: run name -> run folder; two names with one folder are one run (by default each
    name is its own run)."""
    expand_grid(cfg)
    groups = victim_groups(cfg)
    if not surrogate_entries(cfg) and any(spec["surrogates"] is None for spec in groups.values()):
        raise TrigactError("pipeline.attacks is set but pipeline.surrogates is empty: name the runs to craft TAEs on")
    entries = all_surrogate_entries(cfg)
    members = [m for _, runs, _ in entries for m in runs]
    for name in members + [v for spec in groups.values() for v in spec["runs"]]:
        if name not in cfg.pipeline.runs:
            raise unknown_name("pipeline run", name, list(cfg.pipeline.runs))
    try:
        check_n_eval(cfg.pipeline.get("n_eval"))
        check_split(cfg.pipeline.get("split", "test"))
    except TrigactError as err:  # "n_eval=... must be": named as the key the user set
        raise TrigactError(f"pipeline.{err}") from None
    check_not_whitebox(cfg, entries, groups, run_dirs)
    check_attacks(CONF_DIR, cfg.pipeline.attacks, pipeline_budget(cfg))
    ladder_levels(cfg, run_dirs)
    if not cfg.pipeline.get("skip_inapplicable", True):
        for name, _, fusion in entries:
            for attack in cfg.pipeline.attacks:
                reason = unfit_reason(attack, attack_config(CONF_DIR, attack), CONF_DIR, ensemble=fusion is not None)
                if reason:
                    raise TrigactError(f"pipeline.surrogates: {reason} and cannot run on ensemble surrogate {name}; "
                                       "set pipeline.skip_inapplicable=true to leave out such pairs")
    for spec in groups.values():
        defense = spec["defense"] if isinstance(spec["defense"], dict) else defense_config(CONF_DIR, spec["defense"])
        defend(torch.nn.Identity(), defense)  # builds it: bad parameters and missing weights fail here


def check_not_whitebox(cfg: DictConfig, entries, groups, run_dirs=None, where: str = "") -> None:
    """A victim that is a surrogate's run, or a member of an ensemble surrogate, is a white-box attack."""
    if cfg.pipeline.get("allow_whitebox", False):
        return
    members = [m for _, runs, _ in entries for m in runs]
    run_of = (lambda name: str(run_dirs[name])) if run_dirs else (lambda name: name)
    surrogate_of = {run_of(m): name for name, runs, _ in entries for m in runs}
    for group, spec in groups.items():
        for victim in spec["runs"]:
            if run_of(victim) in surrogate_of:
                raise TrigactError(
                    f"pipeline.victims.{group}: run {victim} is {'' if surrogate_of[run_of(victim)] in members else 'a member of '}"
                    f"surrogate {surrogate_of[run_of(victim)]}{where}: that "
                    "is a white-box attack, not a transfer; set pipeline.allow_whitebox=true to evaluate it anyway"
                )


def ladder_levels(cfg: DictConfig, run_dirs=None) -> dict[str, dict]:
    """``pipeline.ladder``: level -> ``{"surrogates": entries}`` (L0-L3: banks on those surrogates, with
    ``pipeline.attacks``) or ``{"threat": level config}`` (L4-L6: ``conf/threat/<level>.yaml`` with the
    entry's ``overrides`` on top); checked in one line per mistake."""
    from trigact.threats.evaluate import ADAPTIVE_LEVELS, check_level_config
    from trigact.threats.levels import LEVELS

    node = cfg.pipeline.get("ladder")
    spec = OmegaConf.to_container(node, resolve=True) if node else {}
    out = {}
    for level, entry in spec.items():
        if level not in LEVELS:
            raise unknown_name("pipeline.ladder level", level, list(LEVELS))
        entry = entry or {}
        unknown = sorted(set(entry) - {"surrogates", "overrides"})
        if unknown:
            raise TrigactError(f"pipeline.ladder.{level} has no key {unknown[0]!r}; allowed: surrogates (L0-L3), "
                               "overrides (L4-L6)")
        if level in ADAPTIVE_LEVELS:
            if "surrogates" in entry:
                raise TrigactError(f"pipeline.ladder.{level} attacks the victim itself: it takes no surrogates")
            level_cfg = OmegaConf.to_container(OmegaConf.merge(
                OmegaConf.load(Path(CONF_DIR) / "threat" / f"{level}.yaml"), entry.get("overrides") or {}), resolve=True)
            check_level_config(level_cfg)
            out[level] = {"threat": level_cfg}
        else:
            if not entry.get("surrogates"):
                raise TrigactError(f"pipeline.ladder.{level} is a transfer level: give it surrogates (runs or "
                                   "{ensemble: [...]})")
            entries = surrogate_entries(cfg, entry["surrogates"])
            for _, runs, _ in entries:
                for name in runs:
                    if name not in cfg.pipeline.runs:
                        raise unknown_name(f"pipeline run (pipeline.ladder.{level})", name, list(cfg.pipeline.runs))
            check_not_whitebox(cfg, entries, victim_groups(cfg), run_dirs, where=f" of ladder level {level}")
            out[level] = {"surrogates": entry["surrogates"], "entries": entries}
    return out


def pipeline_budget(cfg: DictConfig) -> dict:
    """The attacks' budget: ``attack_protocol`` with ``pipeline.attack_overrides`` on top."""
    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if node else {}

    return budget_overrides(plain(cfg.get("attack_protocol")), plain(cfg.pipeline.get("attack_overrides")),
                            plain(cfg.pipeline.get("attack_params")))


def attack_and_evaluate(cfg: DictConfig, train_cfgs: dict, out: Path):
    """Stages 2 and 3 for the experiment's surrogates, attacks and victim groups (checked by
    :func:`check_evaluation_plan` before the training stage)."""
    entries = all_surrogate_entries(cfg)
    first = train_cfgs[entries[0][1][0]]
    images = evaluation_images(OmegaConf.to_container(first.data, resolve=True), cfg.pipeline.get("n_eval"),
                               split=cfg.pipeline.get("split", "test"))
    matrix, columns, records = transfer_matrix(cfg, train_cfgs, entries, images, out, per_group=True)
    write_results(matrix, columns, records, out, intervals=bool(cfg.get("intervals", False)))
    if cfg.get("wandb") and cfg.wandb.enabled:
        wandb_cfg = OmegaConf.merge(cfg, {"wandb": {"group": wandb_group(cfg)}})
        run = job_run(wandb_cfg, "eval", f"eval-{cfg.pipeline.name}", out)
        if run is not None:
            log_tables(run, robustness_tables(matrix, columns, records))
            run.finish()
    return matrix, columns


def _deployed(train_cfgs, name):
    return load_bundle(Path(train_cfgs[name].paths.run_dir) / BUNDLE_NAME)


def victims_and_records(cfg: DictConfig, train_cfgs: dict):
    """``(victims, records, columns, runs)``: every victim group's runs behind its defense, as table names."""
    victims, runs, records, columns = {}, {}, [], {}
    for group, spec in victim_groups(cfg).items():
        defense = spec["defense"] if isinstance(spec["defense"], dict) else defense_config(CONF_DIR, spec["defense"])
        defense_name = defense["name"] if defense else None
        tag = defense.get("label", defense_name) if defense else None
        columns[group] = []
        for run in spec["runs"]:
            name = run if not defense else f"{run} + {tag}"
            if name not in victims:
                model = _deployed(train_cfgs, run)
                victims[name], runs[name] = defend(model, defense), model.meta.get("path")
                records.append(victim_record(name, group, model, tag))
            columns[group].append(name)
    return victims, records, columns, runs


def transfer_matrix(cfg: DictConfig, train_cfgs: dict, entries, images, out: Path, per_group: bool = False):
    """Banks of ``pipeline.attacks`` on the ``entries`` surrogates (crafted or reused; pairs that cannot
    run left out and listed in ``skipped.json``), and every victim scored on them: ``(matrix, columns,
    records)``. ``per_group``: a victim group with its own ``surrogates`` is scored on those banks only,
    the others on ``pipeline.surrogates``' (Eq. 6 then averages each victim over its own S)."""
    n_eval, split = cfg.pipeline.get("n_eval"), cfg.pipeline.get("split", "test")
    first = train_cfgs[entries[0][1][0]]
    surrogates = {name: _deployed(train_cfgs, runs[0]) if fusion is None
                  else EnsembleModel([_deployed(train_cfgs, m) for m in runs], fusion, labels=runs)
                  for name, runs, fusion in entries}
    skip = {}
    if cfg.pipeline.get("skip_inapplicable", True):  # else crafting refuses such a pair in one line
        skip = unfit_pairs(surrogates, list(cfg.pipeline.attacks), CONF_DIR)
        for (surrogate, attack), reason in skip.items():
            print(f"skipped: {reason}; it cannot run on surrogate {surrogate}")
        atomic_write_json([{"surrogate": s, "attack": a, "reason": r} for (s, a), r in skip.items()],
                          out / "skipped.json")
    banks = craft_at_budgets(
        cfg.paths.output_dir, first.data.name, images, surrogates, list(cfg.pipeline.attacks), CONF_DIR,
        pipeline_budget(cfg),
        seed=cfg.seed, n_eval=n_eval, split=split, skip=set(skip),
    )
    atomic_write_json(bank_rows(banks), out / "banks.json")  # which bank each (surrogate, attack) cell used
    if cfg.get("wandb") and cfg.wandb.enabled:
        run = job_run(OmegaConf.merge(cfg, {"wandb": {"group": wandb_group(cfg)}}), "attack",
                      f"attack-{cfg.pipeline.name}", out)
        if run is not None:
            log_tables(run, {"banks": bank_rows(banks)})
            run.finish()
    victims, records, columns, runs = victims_and_records(cfg, train_cfgs)
    allow = cfg.pipeline.get("allow_whitebox", False)
    groups = victim_groups(cfg)
    if not per_group or all(spec["surrogates"] is None for spec in groups.values()):
        matrix = evaluate_victims(victims, surrogates, banks, allow_whitebox=allow, victim_runs=runs)
        return matrix, columns, records
    default = [name for name, _, _ in surrogate_entries(cfg)]
    matrix, scored = RobustnessMatrix(), {}
    for group, names in columns.items():
        chosen = groups[group]["surrogates"] or default
        for name in names:
            if name in scored and scored[name] != chosen:
                raise TrigactError(f"pipeline.victims: victim {name} is in groups with different surrogates "
                                   f"({', '.join(scored[name])} / {', '.join(chosen)}); give each group its own run")
        todo = {name: victims[name] for name in names if name not in scored}
        if not todo:
            continue
        part = evaluate_victims(todo, {s: surrogates[s] for s in chosen},
                                {key: bank for key, bank in banks.items() if key[0] in chosen},
                                allow_whitebox=allow, victim_runs={name: runs[name] for name in todo})
        matrix.cells += part.cells
        matrix.clean.update(part.clean)
        matrix.clean_n.update(part.clean_n)
        matrix.per_image.update(part.per_image)
        scored.update({name: chosen for name in todo})
    return matrix, columns, records


def run_ladder(cfg: DictConfig, train_cfgs: dict, out: Path) -> Path:
    """``pipeline.ladder``: every level's matrix (``ladder/<level>/``) and the ladder (``ladder.md``,
    ``ladder.csv``, ``ladder.png``) beside the experiment's own table."""
    from trigact.threats.evaluate import evaluate_adaptive
    from trigact.threats.ladder import clamp_share, write_ladder
    from trigact.threats.levels import level_meta
    from trigact.threats.store import store_root

    levels = ladder_levels(cfg)
    victims, records, columns, _ = victims_and_records(cfg, train_cfgs)
    first = next(iter(train_cfgs.values()))
    data = OmegaConf.to_container(first.data, resolve=True)
    n_eval, split = cfg.pipeline.get("n_eval"), cfg.pipeline.get("split", "test")
    images = evaluation_images(data, n_eval, split=split)
    x, y = (torch.stack(t) for t in zip(*(images[i] for i in range(len(images)))))
    y = y.long()
    store = store_root(cfg.paths.output_dir, data["name"])  # finished (victim, level) results: reused
    matrices, reports = {}, {}
    for level, spec in levels.items():
        print(f"== ladder {level}: {level_meta(level)['name']}")
        if "entries" in spec:
            matrix, _, _ = transfer_matrix(cfg, train_cfgs, spec["entries"], images, out / "ladder" / level)
        else:
            attacker = None
            if level == "L4":  # the attacker's own images: validation images, never the test split
                own = evaluation_images(data, spec["threat"].get("estimate", {}).get("n_images"), split="val")
                ax, ay = (torch.stack(t) for t in zip(*(own[i] for i in range(len(own)))))
                attacker = (ax, ay.long())
            matrix, reports[level] = evaluate_adaptive(victims, x, y, spec["threat"], seed=cfg.seed,
                                                       attacker=attacker, store=store)
        write_results(matrix, columns, [dict(r) for r in records], out / "ladder" / level,
                      intervals=bool(cfg.get("intervals", False)))
        matrices[level] = matrix
    notes = [f"clamp active (x + tau outside [0, 1]) on {share:.1%} of the pixels of {name}'s inputs"
             for name, model in victims.items() if (share := clamp_share(model, x)) is not None]
    flags = [f"{level} {name}: {flag}" for level, report in reports.items() for name, r in report.items()
             for flag in r.get("flags", [])]
    atomic_write_json({"levels": {lv: level_meta(lv) for lv in levels}, "reports": reports, "notes": notes},
                      out / "ladder.json")
    return write_ladder(matrices, columns, out, notes=notes + [f"sanity: {f}" for f in flags])


def search_objective(cfg: DictConfig, results_dir) -> float:
    """``hparams_search``'s value for Optuna: the searched run's mean robust accuracy (over attacks
    and surrogates) when its clean accuracy reaches ``search.clean_floor``, else ``clean - floor`` (< 0).
    Both are measured on the banks of ``pipeline.split`` (the search sets ``val``: no test image)."""
    import json

    run, floor = cfg.search.run, float(cfg.search.clean_floor)
    records = {r["name"]: r for r in json.loads((Path(results_dir) / "victims.json").read_text())}
    if run not in records:
        raise TrigactError(f"search.run={run!r} is not a victim of this experiment; victims: {', '.join(records)}")
    clean, robust = records[run]["clean_acc"], records[run]["mean_robust_acc"]
    value = robust if clean >= floor else clean - floor
    print(f"objective: {value:.4f} (clean {clean:.2%}, floor {floor:.0%}, mean robust {robust:.2%})")
    return float(value)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="pipeline")
def main(cfg: DictConfig) -> float | None:
    quiet_libraries()
    with user_errors():
        rows = run_pipeline(cfg)
        print_table(rows, f"trigact.pipeline experiment={cfg.pipeline.name}")
        print(f"results: {Path(cfg.paths.results_dir).resolve()}")
        if cfg.get("search"):
            return search_objective(cfg, cfg.paths.results_dir)
    return None


if __name__ == "__main__":
    main()
