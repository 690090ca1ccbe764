"""Attack registry: ``build_attack(name, model, eps, steps, **params)`` -> ``attack(x, y) -> x_adv``.

Pixels in [0, 1]; ``x_adv`` stays in [0, 1] and within ``eps`` (L_inf) of ``x``. torchattack supplies
the attacks it has (hyperparameters pinned in :mod:`trigact.attacks.transfer`); L2T runs through a
CPU-safe subclass (:mod:`trigact.attacks.l2t`); RPA is ours (:mod:`trigact.attacks.rpa`); Diff-PGD is
registered but needs a diffusion model we do not have (:mod:`trigact.attacks.diff_pgd`).
"""

from trigact.attacks import diff_pgd, transfer  # noqa: F401  (registration side effect)
from trigact.attacks.registry import (
    DEFAULT_EPS,
    DEFAULT_STEPS,
    AttackInfo,
    TransferAttack,
    attack_from_config,
    attack_info,
    build_attack,
    list_attacks,
    register_attack,
)
from trigact.attacks.rpa import (
    RPA,
    aggregate_gradient,
    expand_patches,
    random_patch_mask,
)

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_STEPS",
    "RPA",
    "AttackInfo",
    "TransferAttack",
    "aggregate_gradient",
    "attack_from_config",
    "attack_info",
    "build_attack",
    "expand_patches",
    "list_attacks",
    "random_patch_mask",
    "register_attack",
]
