"""Scoring victims against the attackers that attack them directly (L4 leaked weights without tau,
L5 query-only, L6 white box).

Each victim is attacked on the evaluation images themselves (no bank: the TAEs are the victim's own);
the cells land in a :class:`~trigact.evaluation.matrix.RobustnessMatrix` under the surrogate name
``"<level> <name>"``, so the tables, the Worst case row and the intervals are those of the transfer
matrix. Clean accuracy is scored on the images quantized to uint8, as the banks' clean images are;
the adversarial images are scored as the attack returns them (not quantized: rounding would be a
small defense of its own). Every output is checked to lie in [0, 1] and inside the eps ball.

L4: the attacker has the raw network ``f`` of each victim and labelled images of its own (``attacker``:
validation images, carved from the training data). It estimates a trigger ``tau'``
(:func:`~trigact.threats.estimate.estimate_trigger`, settings under ``estimate:``), then runs each
attack white-box on ``f(. + tau')`` (``through: estimate``), on ``f(stamp(x))`` with a Neural Cleanse-style
mask-and-pattern estimate (``through: neural_cleanse``, settings under ``neural_cleanse:``;
:func:`~trigact.threats.estimate.estimate_stamp`), on ``f(. + v)`` with a USB-style universal
perturbation that makes f right (``through: universal``, settings under ``universal:``;
:func:`~trigact.threats.estimate.estimate_universal`) or on the raw ``f`` (``through: raw``), and
the TAEs are scored on the true deployed unit ``f_t``. The estimate's quality goes to the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import lightning as L
import torch
from torch import nn

from trigact.common.errors import TrigactError
from trigact.common.validate import parse_eps
from trigact.evaluation.matrix import RobustnessMatrix, restart_randomness
from trigact.models.deployed import DeployedModel
from trigact.threats.adaptive import applicable, build_adaptive
from trigact.threats.estimate import (
    StampedNet,
    estimate_quality,
    estimate_stamp,
    estimate_trigger,
    estimate_universal,
    stamp_quality,
)
from trigact.threats.levels import level_meta
from trigact.threats.sanity import sanity_flags
from trigact.threats.store import StoredResult, images_digest, result_key, stored, victim_identity

ADAPTIVE_LEVELS = ("L4", "L5", "L6")
BLACK_BOX_KINDS = frozenset({"square"})
THROUGH = ("victim", "estimate", "neural_cleanse", "universal", "raw")


def check_level_config(level_cfg: Mapping) -> tuple[str, float, dict]:
    """``(level, eps, attacks)`` of a ``conf/threat/`` config, or a one-line error."""
    level = level_cfg.get("level")
    level_meta(str(level))  # an unknown level: one line naming the known ones
    if level not in ADAPTIVE_LEVELS:
        raise TrigactError(f"threat level {level} is a transfer attacker: craft its banks with trigact.attack "
                           f"(surrogates=...) and score them with trigact.evaluate; threat= runs {', '.join(ADAPTIVE_LEVELS)}")
    attacks = {name: dict(spec) for name, spec in (level_cfg.get("attacks") or {}).items()}
    if not attacks:
        raise TrigactError(f"threat {level}: no attacks (threat.attacks is empty)")
    for name, spec in attacks.items():
        through = spec.get("through", "estimate" if level == "L4" else "victim")
        if through not in (THROUGH[1:] if level == "L4" else THROUGH[:1]):
            allowed = ", ".join(THROUGH[1:]) if level == "L4" else "victim (only L4 attacks through an estimate or raw f)"
            raise TrigactError(f"threat.attacks.{name}.through={through!r}; allowed: {allowed}")
        spec["through"] = through
    return level, parse_eps(level_cfg.get("eps"), "threat.eps", allow_zero=False), attacks


def _quantized(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round() / 255


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]
                      for i in range(0, len(x), batch_size)])


def _additive_stand_in(label: str, name: str, net: nn.Module, tau, estimate: torch.Tensor, x, y,
                       batch_size: int) -> tuple[nn.Module, dict]:
    """``f(. + tau')`` for an additive trigger estimate, and its quality against the true tau (printed)."""
    quality = estimate_quality(net, tau if tau is not None else torch.zeros_like(estimate), estimate, x, y, batch_size)
    print(f"L4 {label} for {name}: sign agreement {quality['sign_agreement']}, cosine {quality['cosine']:.3f}, "
          f"f(x + tau') {quality['acc_estimate']:.1%} right (f(x + tau) {quality['acc_true_trigger']:.1%}, "
          f"f(x) {quality['acc_no_trigger']:.1%})")
    return DeployedModel(net, estimate).eval(), quality


def _attack_models(level: str, name: str, model: nn.Module, level_cfg: Mapping, attacks: Mapping, attacker,
                   seed: int, batch_size: int, x, y) -> tuple[dict, dict]:
    """``through -> model the attack differentiates``, and what the report keeps (L4's estimate)."""
    if level != "L4":
        return {"victim": model}, {}
    if not isinstance(model, DeployedModel):
        raise TrigactError(f"threat L4 needs victim {name} as a bare deployed unit (its raw network leaks); "
                           "drop defense= for L4")
    if attacker is None:
        raise TrigactError("threat L4 needs the attacker's own labelled images (validation images)")
    needed = {spec["through"] for spec in attacks.values()}  # only the stand-ins some attack uses
    models, report = {"raw": model.net}, {}
    tau = model.trigger
    if "estimate" in needed:
        settings = dict(level_cfg.get("estimate") or {})
        settings.pop("n_images", None)
        estimate = estimate_trigger(model.net, *attacker, seed=seed, batch_size=batch_size, **settings)
        models["estimate"], quality = _additive_stand_in("estimate", name, model.net, tau, estimate.tau, x, y, batch_size)
        report["estimate"] = {**quality, "loss": estimate.loss, "restart": estimate.restart}
    if "universal" in needed:
        settings = dict(level_cfg.get("universal") or {})
        estimate = estimate_universal(model.net, *attacker, seed=seed, batch_size=batch_size, **settings)
        label = f"USB-style universal estimate ({estimate.passes} passes)"
        models["universal"], quality = _additive_stand_in(label, name, model.net, tau, estimate.tau, x, y, batch_size)
        report["universal"] = {**quality, "loss": estimate.loss, "passes": estimate.passes,
                               "attacker_accuracy": estimate.accuracy}
    if "neural_cleanse" in needed:
        settings = dict(level_cfg.get("neural_cleanse") or {})
        stamp, success = estimate_stamp(model.net, *attacker, seed=seed, **settings)
        quality = stamp_quality(model.net, tau if tau is not None else torch.zeros(x.shape[1:]), stamp, x, y, batch_size)
        cosine = "-" if quality["cosine"] is None else f"{quality['cosine']:.3f}"
        print(f"L4 Neural Cleanse estimate for {name}: mask L1 {quality['mask_l1']:.1f}, cosine {cosine}, "
              f"f(stamp(x)) {quality['acc_estimate']:.1%} right (f(x + tau) {quality['acc_true_trigger']:.1%}, "
              f"f(x) {quality['acc_no_trigger']:.1%})")
        models["neural_cleanse"] = StampedNet(model.net, stamp).eval()
        report["neural_cleanse"] = {**quality, "attacker_success": success}
    return models, report


def evaluate_adaptive(victims: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, level_cfg: Mapping,
                      seed: int = 0, batch_size: int = 256, sanity: bool = True,
                      attacker: tuple[torch.Tensor, torch.Tensor] | None = None,
                      store=None) -> tuple[RobustnessMatrix, dict]:
    """Every victim under every attack of the level; ``(matrix, report)`` where ``report`` maps a victim to
    :func:`~trigact.threats.sanity.sanity_flags` (L5, L6: the white-box worst case over the gradient
    attacks against each black-box attack's accuracy) and, for L4, the trigger estimate's quality.
    ``attacker``: L4's own labelled images ``(x, y)``. ``store``: a folder (``<output_dir>/threat/<dataset>``)
    where each (victim, level) result is kept and, on a relaunch, reused (:mod:`trigact.threats.store`);
    None: everything is computed and nothing kept."""
    level, eps, attacks = check_level_config(level_cfg)
    meta = level_meta(level)
    surrogate = f"{level} {meta['name']}"
    x = _quantized(x)
    for name, model in victims.items():  # build every attack first: a bad setting fails before any work
        for attack, spec in attacks.items():
            if applicable(spec, model):
                build_adaptive(attack, _own(spec), model, eps)
    check = bool(sanity and level != "L4")  # L4 attacks a stand-in, not f_t: its checks are L6's
    images = own = None
    if store is not None:
        images = images_digest(x, y)
        own = images_digest(*attacker) if level == "L4" and attacker is not None else None
    matrix, report = RobustnessMatrix(), {}
    for name, model in victims.items():
        model.eval()
        identity = victim_identity(model) if store is not None else None
        key = None if identity is None else result_key(level, eps, level_cfg, identity, images, own, seed=seed,
                                                       batch_size=batch_size, sanity=check)
        result = stored(store, key, partial(_attack_victim, level, name, model, level_cfg, attacks, attacker, eps,
                                            seed, batch_size, x, y, check))
        matrix.clean[name], matrix.clean_n[name] = result.clean.float().mean().item(), len(result.clean)
        for attack, mask in result.masks.items():
            matrix.cells.append({"victim": name, "surrogate": surrogate, "attack": attack,
                                 "accuracy": mask.float().mean().item(), "n": len(mask)})
            matrix.per_image[(name, surrogate, attack)] = mask
        report[name] = result.report
        if result.reused and check:  # reused: its flags are said again, as when computed
            for flag in report[name].get("flags", []):
                print(f"sanity flag, victim {name}: {flag}")
    return matrix, report


def _attack_victim(level: str, name: str, model: nn.Module, level_cfg: Mapping, attacks: Mapping, attacker,
                   eps: float, seed: int, batch_size: int, x: torch.Tensor, y: torch.Tensor,
                   check: bool) -> StoredResult:
    """One victim under every applicable attack of the level, scored on the victim itself. A randomized
    defense's stream restarts before the clean images and before each attack, as for the transfer
    cells: a result does not depend on what was evaluated before it (nor on what a relaunch reused)."""
    restart_randomness(model)
    clean = _correct(model, x, y, batch_size).cpu()
    models, report = _attack_models(level, name, model, level_cfg, attacks, attacker, seed, batch_size, x, y)
    masks, gradient, blackbox = {}, [], {}
    for attack, spec in attacks.items():
        attacked = models[spec["through"]]
        if not applicable(spec, attacked):  # e.g. trigger_flip on a victim without a trigger: "-" in the table
            continue
        L.seed_everything(seed, verbose=False)
        restart_randomness(model)
        fn = build_adaptive(attack, _own(spec), attacked, eps)
        parts = []
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            adv = fn(xb, yb).detach()
            if adv.shape != xb.shape or adv.min() < 0 or adv.max() > 1 or (adv - xb).abs().max() > eps + 1e-6:
                raise TrigactError(f"threat attack {attack} returned images outside [0, 1] or the eps ball "
                                   f"(max |delta| {(adv - xb).abs().max().item():.5f} > eps {eps:.5f})")
            parts.append(_correct(model, adv, yb, batch_size))  # scored on the victim itself
        model.eval()  # torchattacks restores a wrapper's train mode recursively
        masks[attack] = torch.cat(parts).cpu()  # as the transfer cells' masks: the ladder ANDs them
        if spec.get("kind") in BLACK_BOX_KINDS:
            blackbox[attack] = masks[attack].float().mean().item()
        else:
            gradient.append(masks[attack])
    if check:
        whitebox = None
        if gradient:
            robust = gradient[0].clone()
            for mask in gradient[1:]:
                robust &= mask
            whitebox = robust.float().mean().item()
        report.update(sanity_flags(model, x, y, whitebox_acc=whitebox, weaker_accs=blackbox))
        for flag in report["flags"]:
            print(f"sanity flag, victim {name}: {flag}")
    return StoredResult(clean, masks, report)


def _own(spec: Mapping) -> dict:
    """An attack's own parameters (``through`` says what it differentiates, not how)."""
    return {k: v for k, v in spec.items() if k != "through"}
