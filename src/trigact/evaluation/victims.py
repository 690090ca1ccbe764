"""Victims against banks: the transfer matrix with clean accuracy, what ``victims.json`` keeps of each
victim, and preprocessing defenses put in front of a victim."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import OmegaConf

from trigact.models.deployed import DeployedModel
from trigact.models.ensemble import run_paths
from trigact.common.validate import parse_eps
from trigact.common.errors import TrigactError, unknown_name
from trigact.triggers import trigger_stats
from trigact.evaluation.bank import Bank
from trigact.evaluation.matrix import RobustnessMatrix, bank_batches, evaluate_matrix


def evaluate_victims(
    victims: Mapping[str, DeployedModel], surrogates: Mapping[str, DeployedModel],
    banks: Mapping[tuple[str, str], Bank], allow_whitebox: bool = False, batch_size: int = 256,
    victim_runs: Mapping[str, str] | None = None,
) -> RobustnessMatrix:
    """``R[victim, surrogate, attack]`` and clean accuracy; a victim that is a surrogate's very run
    is refused unless ``allow_whitebox`` (it would not be a transfer).

    Clean accuracy has one definition: the banks' own clean images, quantized to uint8 like the TAEs
    (what a saved image file gives), so the Clean row and the attack rows of a table are measured on
    the same pixels. ``evaluate`` and ``pipeline`` both score here, so they write identical tables for
    the same runs and banks.

    Every bank must hold the same clean images in the same order (``load_banks`` checks it when it
    reads them, :func:`~trigact.evaluation.matrix.evaluate_matrix` for every caller): the worst case
    ANDs each image across banks, and the clean row is scored on the first bank's images.

    ``victim_runs``: victim -> bundle path, for victims that are not bare deployed models (e.g. behind
    a defense); by default each victim's own ``meta["path"]``.
    """
    if victim_runs is None:
        victim_runs = {k: getattr(v, "meta", {}).get("path") for k, v in victims.items()}
    if not victims or not banks:
        raise TrigactError("nothing to evaluate: the experiment needs victims, surrogates and attacks")
    first = next(iter(banks.values()))  # the same clean images in every bank (evaluate_matrix checks)

    def clean():  # the stored uint8 images, dequantized batch by batch on each victim's device
        return bank_batches(first, batch_size, clean=True)

    with torch.no_grad():
        return evaluate_matrix(
            victims, banks, clean_batches=clean,
            victim_runs=victim_runs,
            surrogate_runs={k: run_paths(v) for k, v in surrogates.items()},
            allow_whitebox=allow_whitebox, batch_size=batch_size,
        )


def victim_record(name: str, group: str, model: DeployedModel, defense: str | None = None) -> dict:
    """What ``victims.json`` keeps of a victim: enough for analysis plots (trigger kind, eps_t, alpha)."""
    config = model.meta.get("config") or {}
    trigger = config.get("trigger") or {}
    record = {
        "name": name,
        "group": group,
        "bundle": model.meta.get("path"),
        "method": model.meta.get("method"),
        "model": (config.get("model") or {}).get("name"),
        "seed": config.get("seed"),
        "trigger_kind": trigger.get("kind", "none"),
        "defense": defense,
        "test_metrics": model.meta.get("metrics", {}),
    }
    for key in ("eps", "alpha"):
        if trigger.get(key) is not None:
            record[key] = parse_eps(trigger[key])
    record.update(trigger_stats(getattr(model, "trigger", None)))  # trigger_mse (the paper's Table XI), trigger_linf
    return record


def defense_config(conf_dir, name: str | None) -> dict | None:
    """``conf/defense/<name>.yaml`` as a dict (None for no defense)."""
    if name in (None, "", "none"):
        return None
    path = Path(conf_dir) / "defense" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (Path(conf_dir) / "defense").glob("*.yaml"))
        raise unknown_name("defense", name, known)
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return None if cfg.get("name") in (None, "none") else cfg


def defend(model: torch.nn.Module, defense_cfg: Mapping | None) -> torch.nn.Module:
    """``model`` behind the preprocessing defense ``defense_cfg`` (the defense sees the attacker's input)."""
    if not defense_cfg:
        return model
    from trigact.defenses import build_defense_from_config, defended

    cfg = {k: v for k, v in dict(defense_cfg).items() if k != "label"}
    return defended(model, build_defense_from_config(cfg))
