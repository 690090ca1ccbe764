"""Scoring victims against the attackers that attack them directly (L5 query-only, L6 white box).

Each victim is attacked on the evaluation images themselves (no bank: the TAEs are the victim's own);
the cells land in a :class:`~trigact.evaluation.matrix.RobustnessMatrix` under the surrogate name
``"<level> <name>"``, so the tables, the Worst case row and the intervals are those of the transfer
matrix. Clean accuracy is scored on the images quantized to uint8, as the banks' clean images are;
the adversarial images are scored as the attack returns them (not quantized: rounding would be a
small defense of its own). Every output is checked to lie in [0, 1] and inside the eps ball.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from torch import nn

from trigact.common.errors import TrigactError
from trigact.common.validate import parse_eps
from trigact.evaluation.matrix import RobustnessMatrix
from trigact.threats.adaptive import applicable, build_adaptive
from trigact.threats.levels import level_meta
from trigact.threats.sanity import sanity_flags

ADAPTIVE_LEVELS = ("L5", "L6")
BLACK_BOX_KINDS = frozenset({"square"})


def check_level_config(level_cfg: Mapping) -> tuple[str, float, dict]:
    """``(level, eps, attacks)`` of a ``conf/threat/`` config, or a one-line error."""
    level = level_cfg.get("level")
    level_meta(str(level))  # an unknown level: one line naming the known ones
    if level not in ADAPTIVE_LEVELS:
        raise TrigactError(f"threat level {level} is a transfer attacker: craft its banks with trigger.attack "
                           f"(surrogates=...) and score them with trigact.evaluate; threat= runs {', '.join(ADAPTIVE_LEVELS)}")
    attacks = dict(level_cfg.get("attacks") or {})
    if not attacks:
        raise TrigactError(f"threat {level}: no attacks (threat.attacks is empty)")
    return level, parse_eps(level_cfg.get("eps"), "threat.eps", allow_zero=False), attacks


def _quantized(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round() / 255


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]
                      for i in range(0, len(x), batch_size)])


def evaluate_adaptive(victims: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, level_cfg: Mapping,
                      seed: int = 0, batch_size: int = 256, sanity: bool = True) -> tuple[RobustnessMatrix, dict]:
    """Every victim under every attack of the level; ``(matrix, sanity)`` where ``sanity`` maps a victim to
    :func:`~trigact.threats.sanity.sanity_flags` (the white-box worst case over the gradient attacks
    against each black-box attack's accuracy)."""
    level, eps, attacks = check_level_config(level_cfg)
    meta = level_meta(level)
    surrogate = f"{level} {meta['name']}"
    x = _quantized(x)
    for name, model in victims.items():  # build every attack first: a bad setting fails before any work
        for attack, spec in attacks.items():
            if applicable(spec, model):
                build_adaptive(attack, spec, model, eps)
    matrix, report = RobustnessMatrix(), {}
    for name, model in victims.items():
        model.eval()
        clean = _correct(model, x, y, batch_size)
        matrix.clean[name], matrix.clean_n[name] = clean.float().mean().item(), len(clean)
        gradient, blackbox = [], {}
        for attack, spec in attacks.items():
            if not applicable(spec, model):  # e.g. trigger_flip on a victim without a trigger: "-" in the table
                continue
            L.seed_everything(seed, verbose=False)
            fn = build_adaptive(attack, spec, model, eps)
            parts = []
            for i in range(0, len(x), batch_size):
                xb, yb = x[i : i + batch_size], y[i : i + batch_size]
                adv = fn(xb, yb).detach()
                if adv.shape != xb.shape or adv.min() < 0 or adv.max() > 1 or (adv - xb).abs().max() > eps + 1e-6:
                    raise TrigactError(f"threat attack {attack} returned images outside [0, 1] or the eps ball "
                                       f"(max |delta| {(adv - xb).abs().max().item():.5f} > eps {eps:.5f})")
                parts.append(_correct(model, adv, yb, batch_size))
            mask = torch.cat(parts)
            acc = mask.float().mean().item()
            matrix.cells.append({"victim": name, "surrogate": surrogate, "attack": attack, "accuracy": acc, "n": len(mask)})
            matrix.per_image[(name, surrogate, attack)] = mask
            if spec.get("kind") in BLACK_BOX_KINDS:
                blackbox[attack] = acc
            else:
                gradient.append(mask)
        whitebox = None
        if gradient:
            robust = gradient[0].clone()
            for mask in gradient[1:]:
                robust &= mask
            whitebox = robust.float().mean().item()
        if sanity:
            report[name] = sanity_flags(model, x, y, whitebox_acc=whitebox, weaker_accs=blackbox)
            for flag in report[name]["flags"]:
                print(f"sanity flag, victim {name}: {flag}")
    return matrix, report
