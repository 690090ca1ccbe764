"""The attack and evaluate stages of the pipeline: TAE banks per (surrogate, attack), then the
transfer matrix of the victims against them.

Attack settings come from ``conf/attack/<name>.yaml`` (eps, steps and every hyperparameter pinned
there), optionally overridden for the whole experiment (e.g. fewer steps in a demo).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset

from trigact.attacks import attack_from_config
from trigact.bundle import DeployedModel
from trigact.errors import TrigactError, unknown_name
from trigact.evaluation.bank import Bank, ensure_bank
from trigact.evaluation.matrix import RobustnessMatrix, evaluate_matrix


def attack_config(conf_dir, name: str, overrides: Mapping | None = None) -> dict:
    """``conf/attack/<name>.yaml`` as a dict, with experiment-wide ``overrides`` (eps, steps) on top."""
    path = Path(conf_dir) / "attack" / f"{name}.yaml"
    if not path.is_file():
        known = [p.stem for p in (Path(conf_dir) / "attack").glob("*.yaml")]
        raise unknown_name("attack", name, known)
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return cfg


def evaluation_subset(dataset, n: int | None):
    """The first ``n`` test images (all when None): fixed, so every bank holds the same images."""
    return dataset if n is None or n >= len(dataset) else Subset(dataset, range(n))


def craft_banks(
    root, dataset_name: str, dataset, surrogates: Mapping[str, DeployedModel], attacks: list[str],
    conf_dir, overrides: Mapping | None = None, batch_size: int = 128, progress: bool = True, seed: int = 0,
) -> dict[tuple[str, str], Bank]:
    """One bank per (surrogate, attack); existing complete banks are reused, never redone.

    Random starts and input diversity draw from the global RNGs, which are re-seeded before each
    bank, so a bank does not depend on what ran before it in the process.
    """
    banks = {}
    for surrogate_name, model in surrogates.items():
        for attack_name in attacks:
            L.seed_everything(seed, verbose=False)
            cfg = attack_config(conf_dir, attack_name, overrides)
            attack = attack_from_config(cfg, model)
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
            banks[(surrogate_name, attack_name)] = ensure_bank(
                root, dataset_name, surrogate_name, model.meta.get("path"), model, attack_name, attack,
                attack.config, cfg["eps"], int(cfg["steps"]), loader, progress=progress,
            )
    return banks


def evaluate_victims(
    victims: Mapping[str, DeployedModel], surrogates: Mapping[str, DeployedModel],
    banks: Mapping[tuple[str, str], Bank], clean_dataset, allow_whitebox: bool = False, batch_size: int = 256,
) -> RobustnessMatrix:
    """``R[victim, surrogate, attack]`` and clean accuracy; a victim that is a surrogate's very run
    is refused unless ``allow_whitebox`` (it would not be a transfer)."""
    if not victims or not banks:
        raise TrigactError("nothing to evaluate: the experiment needs victims, surrogates and attacks")
    clean = DataLoader(clean_dataset, batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        return evaluate_matrix(
            victims, banks, clean_batches=clean,
            victim_runs={k: v.meta.get("path") for k, v in victims.items()},
            surrogate_runs={k: v.meta.get("path") for k, v in surrogates.items()},
            allow_whitebox=allow_whitebox, batch_size=batch_size,
        )
