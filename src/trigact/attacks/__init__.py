"""Attacks: ``build_attack(name, model, eps, steps, **params)`` -> ``attack(x, y) -> x_adv``.

Each attack is one config, ``conf/attack/<name>.yaml`` (see :mod:`trigact.attacks.registry`), built
through ``torchattack.create_attack``. Pixels in [0, 1]; ``x_adv`` stays in [0, 1] and within ``eps``
(L_inf) of ``x``. Our own attack classes register in torchattack's registry on import: L2T's CPU-safe
subclass (:mod:`trigact.attacks.l2t`), RPA (:mod:`trigact.attacks.rpa`) and Diff-PGD
(:mod:`trigact.attacks.diff_pgd`).
"""

from trigact.attacks import diff_pgd, l2t, portable_common, portable_feature, rpa  # noqa: F401  (registration in torchattack's registry)
from trigact.attacks.registry import (
    DEFAULT_EPS,
    DEFAULT_STEPS,
    FAMILIES,
    AttackSpec,
    TransferAttack,
    attack_from_config,
    attack_info,
    attack_spec,
    build_attack,
    describe_attacks,
    list_attacks,
)
from trigact.attacks.rpa import RPA, aggregate_gradient, expand_patches, random_patch_mask

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_STEPS",
    "FAMILIES",
    "RPA",
    "AttackSpec",
    "TransferAttack",
    "aggregate_gradient",
    "attack_from_config",
    "attack_info",
    "attack_spec",
    "build_attack",
    "describe_attacks",
    "expand_patches",
    "list_attacks",
    "random_patch_mask",
]
