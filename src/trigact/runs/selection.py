"""Pick trained runs for ``attack`` and ``evaluate``: by bundle, run folder, glob or sweep folder.

A pattern may be

- a ``bundle.pt`` file, or a run folder holding one;
- any folder: every finished run below it (e.g. ``outputs/runs/fashion_mnist/trigger_activation``);
- a glob (``outputs/runs/*/trigger_activation/small_cnn/fixed-*/s0``; ``**`` recurses);
- a Hydra multirun sweep folder (it holds ``multirun.yaml``): each job's overrides are composed into
  its train config again, which names its run folder (run folders are a pure function of the
  config, see :mod:`trigact.runs`), so a sweep's runs are found wherever the registry is.

Relative patterns are tried against the working directory, then against the run registry
(``paths.runs_dir``). A pattern that matches no finished run is an error naming it; a sweep job
whose run has no bundle (crashed or still running) is an error too, naming the job, since silently
evaluating part of a sweep would give a wrong curve.

Surrogates (:func:`select`, :func:`select_models`) may also be ensembles: an entry
``{ensemble: [patterns...], fusion: logits|probs}`` is one surrogate, the fused model of every run its
patterns name (each pattern as above; a glob or folder may name several members; duplicates count
once; at least 2 runs). See :mod:`trigact.models.ensemble`. Victims are runs only.
"""

from __future__ import annotations

import glob
from collections.abc import Mapping
from pathlib import Path

from hydra import compose
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trigact.models.ensemble import FUSIONS, EnsembleModel
from trigact.runs.bundle import BUNDLE_NAME, load_bundle
from trigact.common.errors import TrigactError, unknown_name
from trigact.runs.naming import in_255ths

SWEEP_MARKER = "multirun.yaml"


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _bundles_below(folder: Path) -> list[Path]:
    if (folder / BUNDLE_NAME).is_file():
        return [folder / BUNDLE_NAME]
    # Lightning and Hydra folders never hold bundles; skipping them keeps big registries fast.
    return sorted(p for p in folder.rglob(BUNDLE_NAME) if "checkpoints" not in p.parts and "launches" not in p.parts)


def sweep_runs(sweep_dir: Path, compose_train) -> list[Path]:
    """Bundles of every job of a Hydra multirun sweep, in job order.

    ``compose_train(overrides) -> DictConfig`` composes the train config (run folders derive from it).
    """
    import yaml

    jobs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()),
                  key=lambda p: (len(p.name), p.name))
    if not jobs:
        raise TrigactError(f"sweep {sweep_dir} has no jobs (no <job>/.hydra/overrides.yaml): not a train sweep?")
    bundles, missing = [], []
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        run_dir = Path(compose_train(list(overrides)).paths.run_dir)
        if (run_dir / BUNDLE_NAME).is_file():
            bundles.append(run_dir / BUNDLE_NAME)
        else:
            missing.append(f"job {job.name} ({' '.join(overrides)}) -> {run_dir}")
    if missing:
        raise TrigactError(
            f"sweep {sweep_dir}: {len(missing)} job(s) have no finished run (crashed or still running; "
            f"launch the sweep again to finish them): {missing[0]}" + (" ..." if len(missing) > 1 else "")
        )
    return bundles


def find_runs(patterns, runs_dir, compose_train=None) -> list[Path]:
    """Bundle paths of the runs ``patterns`` name, in order, without duplicates."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    for p in patterns or []:
        if isinstance(p, Mapping):
            raise TrigactError(f"{_show(p)}: an ensemble can only be a surrogate; here give runs "
                               "(bundle files, run folders, globs or a sweep folder)")
    patterns = [str(p) for p in (patterns or [])]
    if not patterns:
        raise TrigactError("no runs given: name bundle files, run folders, globs or a sweep folder")
    found: list[Path] = []
    for pattern in patterns:
        matches = _match(pattern, Path(runs_dir), compose_train)
        if not matches:
            raise TrigactError(
                f"no finished run matches {pattern!r} (looked in . and in runs_dir={runs_dir}); "
                "give a bundle.pt, a run folder, a glob or a sweep folder"
            )
        found.extend(matches)
    return list(dict.fromkeys(p.resolve() for p in found))


def _match(pattern: str, runs_dir: Path, compose_train) -> list[Path]:
    bases = [Path(".")] if Path(pattern).is_absolute() else [Path("."), runs_dir]
    for base in bases:
        candidate = base / pattern
        if _is_glob(pattern):
            hits = [Path(h) for h in sorted(glob.glob(str(candidate), recursive=True))]
            bundles = [b for h in hits for b in ([h] if h.name == BUNDLE_NAME and h.is_file() else
                                                   _bundles_below(h) if h.is_dir() else [])]
        elif candidate.is_file():
            if candidate.name != BUNDLE_NAME and candidate.suffix != ".pt":
                raise TrigactError(f"{candidate} is not a bundle (expected {BUNDLE_NAME} or a folder)")
            bundles = [candidate]
        elif (candidate / SWEEP_MARKER).is_file():
            if compose_train is None:
                raise TrigactError(f"{candidate} is a sweep folder; this caller cannot resolve sweeps")
            bundles = sweep_runs(candidate, compose_train)
        elif candidate.is_dir():
            bundles = _bundles_below(candidate)
        else:
            bundles = []
        if bundles:
            return bundles
    return []


def run_label(meta: dict) -> str:
    """A short human name for a run from its bundle metadata, e.g. ``small_cnn fixed eps 8/255 s0``."""
    config = meta.get("config") or {}
    model = (config.get("model") or {}).get("name") or (meta.get("model") or {}).get("name", "model")
    method = meta.get("method") or (config.get("method") or {}).get("name", "")
    trigger = config.get("trigger") or {}
    kind = trigger.get("kind", "none")
    parts = [model]
    if kind == "fixed":
        parts.append(f"fixed eps {in_255ths(trigger.get('eps'))}/255")
    elif kind == "learnable":
        parts.append(f"learnable alpha {in_255ths(trigger.get('alpha'))}/255")
    elif kind in ("sparse", "sparse_learnable"):
        learn = f" alpha {in_255ths(trigger.get('alpha'))}/255" if kind == "sparse_learnable" else ""
        parts.append(f"{kind.replace('_', ' ')} k {trigger.get('k')} eps {in_255ths(trigger.get('eps'))}/255{learn}")
    elif method == "backdoor":
        backdoor = ((config.get("method") or {}).get("module") or {}).get("backdoor") or {}
        parts.append(f"backdoor {backdoor.get('kind', '')} t{backdoor.get('target', '')}")
    elif method and method != "standard":
        parts.append(method)
    else:
        parts.append("standard")
    if "seed" in config:
        parts.append(f"s{config['seed']}")
    return " ".join(parts)


# ---------------------------------------------- what the attack and evaluate entry points share


def compose_train(overrides: list[str]):
    """The train config for a sweep job's overrides (its run folder derives from it)."""
    return compose(config_name="train", overrides=overrides)


def model_label(model) -> str:
    """A short human name for a loaded surrogate or victim: :func:`run_label` of a run, and
    ``ensemble(lenet standard s0 + tiny_resnet standard s0)`` (`` probs`` appended for that fusion)
    for an ensemble. (No square brackets: rich would read them as markup in the summary tables.)"""
    if isinstance(model, EnsembleModel):
        fusion = "" if model.fusion == "logits" else f" {model.fusion}"
        return f"ensemble({' + '.join(model.labels)}){fusion}"
    return run_label(model.meta)


def unique_labels(bundles) -> dict[str, object]:
    """Table name -> deployed model (or ensemble), labels made unique (``... (2)``) when two look alike.

    ``bundles``: bundle paths (loaded here) or models already loaded (e.g. an :class:`EnsembleModel`).
    """
    models = {}
    for item in bundles:
        model = item if isinstance(item, nn.Module) else load_bundle(item)
        label, k = model_label(model), 2
        while label in models:
            label, k = f"{model_label(model)} ({k})", k + 1
        models[label] = model
    return models


# ---------------------------------------------------------------------------------------- ensembles

ENSEMBLE_KEYS = ("ensemble", "fusion")


def _show(entry) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in dict(entry).items()) + "}"


def ensemble_from_spec(entry: Mapping, runs_dir, compose_train=None) -> EnsembleModel:
    """The ensemble surrogate an entry ``{ensemble: [patterns...], fusion: logits|probs}`` names.

    Each pattern is anything :func:`find_runs` takes (a glob or a folder may name several members);
    every run they name is a member, once. One-line errors for a bad key, fusion or member list.
    """
    entry = dict(entry)
    unknown = sorted(set(entry) - set(ENSEMBLE_KEYS))
    if unknown or "ensemble" not in entry:
        raise TrigactError(f"surrogate entry {_show(entry)}: an ensemble is {{ensemble: [runs...], fusion: "
                           f"{'|'.join(FUSIONS)}}}" + (f"; unknown key(s) {', '.join(map(str, unknown))}" if unknown else ""))
    fusion = entry.get("fusion") or "logits"
    if fusion not in FUSIONS:
        raise unknown_name("ensemble fusion", fusion, FUSIONS)
    patterns = entry["ensemble"]
    patterns = [patterns] if isinstance(patterns, (str, Path)) else list(patterns or [])
    if not patterns or not all(isinstance(p, (str, Path)) for p in patterns):
        raise TrigactError(f"surrogate entry {_show(entry)}: `ensemble` must list runs (bundle files, run folders, "
                           "globs or sweep folders); ensembles do not nest")
    bundles = find_runs(patterns, runs_dir, compose_train)
    if len(bundles) < 2:
        raise TrigactError(f"ensemble {list(map(str, patterns))} names {len(bundles)} run ({bundles[0]}); "
                           "an ensemble needs at least 2 distinct runs")
    members = [load_bundle(path) for path in bundles]
    labels = list(unique_labels(members))  # two runs that look alike: "... (2)", as in the tables
    return EnsembleModel(members, fusion, labels=labels)


def select_models(spec, runs_dir, compose_train=None) -> dict[str, object]:
    """Table name -> surrogate for ``spec``: patterns of runs (:func:`find_runs`) and ensemble entries
    (:func:`ensemble_from_spec`), in order; a run or an ensemble named twice counts once."""
    entries = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not any(isinstance(e, Mapping) for e in entries):
        return unique_labels(find_runs(spec, runs_dir, compose_train))
    items, seen = [], set()
    for entry in entries:
        found = ([ensemble_from_spec(entry, runs_dir, compose_train)] if isinstance(entry, Mapping)
                 else find_runs([entry], runs_dir, compose_train))
        for item in found:
            identity = item.identity if isinstance(item, EnsembleModel) else item
            if identity not in seen:
                seen.add(identity)
                items.append(item)
    return unique_labels(items)


def as_dict(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node else {}


def plain(cfg: DictConfig, key: str):
    """``cfg[key]`` as plain Python (a pattern may be given as one string or as a list)."""
    value = cfg[key]
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def select(cfg: DictConfig, key: str) -> dict:
    """Table name -> surrogate (deployed model or :class:`EnsembleModel`) for ``cfg[key]``."""
    return select_models(plain(cfg, key), cfg.paths.runs_dir, compose_train)
