"""``pipeline.grid``: a paper table's plan written once per column, not once per (column, architecture).

The paper's tables train every defense on every architecture of T (and the surrogates S on the same
architectures) and average over them (Eq. 6-7). Writing that out as ``pipeline.runs`` would repeat
each defense five times; a grid names the architectures once and expands to the ordinary plan::

    grid:
      archs: [resnet18, resnet50, vgg19_bn, mobilenet_v2, densenet121]
      variants:                 # name -> train overrides; trained once per arch as <name>_<arch>
        surrogate: [method=standard, seed=1]
        standard: [method=standard]
        fixed_eps8: [method=trigger_activation, trigger=fixed, trigger.eps=8/255]
      surrogates: [surrogate]   # variants whose runs (all archs) are S
      victims:                  # table column -> a variant whose runs (all archs) are T
        w/o: standard
        JPEG (q=50): {variant: standard, defense: jpeg_q50}
        Ours (f): {variant: fixed_eps8, surrogates: [surrogate_ta]}   # its own S (same paradigm)
        NRP: {variant: standard, defense: {name: nrp, weights: "${purifiers.nrp}"}, requires: "${purifiers.nrp}"}

A column's ``defense`` is a conf/defense name, or a mapping with ``name`` and values put over that
file (e.g. purifier weights). A column or an attack whose ``requires`` is null (``pipeline.requires``
for attacks: attack name -> value) is left out, and listed in ``pipeline.left_out`` with the reason:
the paper's NRP, DiffPure and Diff-PGD need pretrained weights a user may not have.

Runs written in ``pipeline.runs`` itself are kept (and come first); ``pipeline.surrogates`` and
``pipeline.victims`` are filled from the grid only where they are empty. The smoke tests shrink a grid
with ``pipeline.grid.archs=[resnet18]``: the columns stay, each with fewer architectures.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from trigact.common.errors import TrigactError, unknown_name

GRID_KEYS = {"archs", "variants", "surrogates", "victims"}
VICTIM_KEYS = {"variant", "defense", "surrogates", "requires"}


def run_name(variant: str, arch: str) -> str:
    return f"{variant}_{arch}"


def expand_grid(cfg: DictConfig) -> None:
    """Expand ``cfg.pipeline.grid`` (if any) into ``pipeline.runs``, ``surrogates`` and ``victims``, in place."""
    node = cfg.pipeline.get("grid")
    if not node:
        return
    grid = OmegaConf.to_container(node, resolve=True)
    unknown = sorted(set(grid) - GRID_KEYS)
    if unknown:
        raise TrigactError(f"pipeline.grid has no key {unknown[0]!r}; allowed: {', '.join(sorted(GRID_KEYS))}")
    archs, variants = grid.get("archs") or [], grid.get("variants") or {}
    if not isinstance(archs, list) or not archs or len(set(archs)) != len(archs):
        raise TrigactError(f"pipeline.grid.archs={archs!r} must be a non-empty list of distinct model names "
                           "(conf/model/), e.g. [resnet18, vgg19_bn]")
    if not isinstance(variants, dict) or not variants:
        raise TrigactError("pipeline.grid.variants is empty: name each defense's train overrides, "
                           "e.g. {standard: [method=standard]}")
    for name, overrides in variants.items():
        if not isinstance(overrides, list):
            raise TrigactError(f"pipeline.grid.variants.{name} must be a list of train overrides, e.g. [method=standard]")
        if any(str(o).split("=")[0].lstrip("+~") == "model" for o in overrides):
            raise TrigactError(f"pipeline.grid.variants.{name} sets model=: the grid sets it from pipeline.grid.archs")

    def variant_runs(name: str, where: str) -> list[str]:
        if name not in variants:
            raise unknown_name(f"grid variant ({where})", name, list(variants))
        return [run_name(name, arch) for arch in archs]

    node = cfg.pipeline.get("runs")
    runs = OmegaConf.to_container(node, resolve=False) if node else {}
    for name, overrides in variants.items():
        for arch in archs:
            key = run_name(name, arch)
            if key in runs:
                raise TrigactError(f"pipeline.runs.{key} is also a run of pipeline.grid (variant {name}, model {arch})")
            runs[key] = [f"model={arch}", *map(str, overrides)]
    node = cfg.pipeline.get("surrogates")
    surrogates = OmegaConf.to_container(node, resolve=True) if node else []
    if not surrogates:
        surrogates = [r for v in grid.get("surrogates") or [] for r in variant_runs(v, "pipeline.grid.surrogates")]
    left_out = []
    node = cfg.pipeline.get("victims")
    victims = OmegaConf.to_container(node, resolve=True) if node else {}
    if not victims:
        for column, spec in (grid.get("victims") or {}).items():
            spec = {"variant": spec} if isinstance(spec, str) else dict(spec or {})
            unknown = sorted(set(spec) - VICTIM_KEYS)
            if unknown or "variant" not in spec:
                raise TrigactError(f"pipeline.grid.victims.{column} must be a variant name or {{variant: name, "
                                   "defense: name or {name: ..., key: value}, surrogates: [variant, ...], requires: value}")
            group = {"runs": variant_runs(spec["variant"], f"pipeline.grid.victims.{column}")}
            if "requires" in spec and spec["requires"] in (None, ""):
                left_out.append({"column": column, "reason": "needs a value it was not given (requires: null), "
                                 "e.g. pretrained purifier weights"})
                continue
            if isinstance(spec.get("defense"), dict):  # values over conf/defense/<name>.yaml
                from trigact.common.config import CONF_DIR
                from trigact.evaluation.victims import defense_config

                params = dict(spec["defense"])
                if "name" not in params:
                    raise TrigactError(f"pipeline.grid.victims.{column}.defense needs a name (conf/defense/)")
                group["defense"] = {**defense_config(CONF_DIR, params.pop("name")), **params}
            elif spec.get("defense"):
                group["defense"] = spec["defense"]
            if spec.get("surrogates"):
                group["surrogates"] = [r for v in spec["surrogates"]
                                       for r in variant_runs(v, f"pipeline.grid.victims.{column}.surrogates")]
            victims[column] = group
    attacks = list(cfg.pipeline.get("attacks") or [])
    node = cfg.pipeline.get("requires")
    requires = OmegaConf.to_container(node, resolve=True) if node else {}
    for attack, value in requires.items():
        if attack in attacks and value in (None, ""):
            attacks.remove(attack)
            left_out.append({"attack": attack, "reason": "needs a value it was not given (pipeline.requires."
                             f"{attack}: null), e.g. pretrained diffusion weights"})
    for item in left_out:
        print(f"left out: {item.get('column') or item.get('attack')}: {item['reason']}")
    with open_dict(cfg):
        cfg.pipeline.attacks = attacks
        cfg.pipeline.left_out = left_out
        cfg.pipeline.runs = runs
        cfg.pipeline.surrogates = surrogates
        cfg.pipeline.victims = victims
        cfg.pipeline.grid = None  # expanded: expanding again would find its runs already there
