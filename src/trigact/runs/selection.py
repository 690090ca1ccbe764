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
"""

from __future__ import annotations

import glob
from pathlib import Path

from hydra import compose
from omegaconf import DictConfig, OmegaConf

from trigact.runs.bundle import BUNDLE_NAME, load_bundle
from trigact.common.errors import TrigactError
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


def unique_labels(bundles: list[Path]) -> dict[str, object]:
    """Table name -> deployed model, labels made unique (``... (2)``) when two runs look alike."""
    models = {}
    for path in bundles:
        model = load_bundle(path)
        label, k = run_label(model.meta), 2
        while label in models:
            label, k = f"{run_label(model.meta)} ({k})", k + 1
        models[label] = model
    return models


def as_dict(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node else {}


def plain(cfg: DictConfig, key: str):
    """``cfg[key]`` as plain Python (a pattern may be given as one string or as a list)."""
    value = cfg[key]
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def select(cfg: DictConfig, key: str) -> dict:
    return unique_labels(find_runs(plain(cfg, key), cfg.paths.runs_dir, compose_train))
