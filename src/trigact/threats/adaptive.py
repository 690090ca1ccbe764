"""Attacks on the victim itself (levels L5 and L6): the attacker holds the deployed unit ``f_t``.

- L6, white box with tau known: PGD with restarts, APGD-CE and APGD-DLR (Croce & Hein 2020, the
  AutoAttack components), and the paper's Theorem 2 direction, the single universal perturbation
  ``delta = -eps * sign(tau)``.
- L5, query-only: Square (Andriushchenko et al. 2020) on ``f_t``'s scores within a query budget.

APGD and Square come from torchattacks (Harry Kim's maintained attack library); PGD too. We only
hand-write the restart loop (torchattacks' PGD has one random start) and the Theorem 2 perturbation,
which no library has. Every attack works on a whole batch; restarts loop over restarts, not images.
Each attack's settings live in ``conf/threat/<level>.yaml`` only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch
from torch import nn

from trigact.common.errors import TrigactError, unknown_name
from trigact.common.validate import check_int, parse_eps

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _torchattacks():
    import torchattacks  # imported late: only the adaptive levels need it

    return torchattacks


@torch.no_grad()
def _wrong(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) != y


def pgd_restarts(model: nn.Module, eps: float, steps: int = 50, restarts: int = 5, step_size: float | None = None,
                 seed: int = 0) -> AttackFn:
    """L_inf PGD from a uniform random start, ``restarts`` times; an image keeps the first restart
    that fools the model (the worst case over restarts). Step ``2.5 eps / steps`` by default
    (Madry et al. 2018)."""
    step_size = 2.5 * eps / steps if step_size is None else step_size

    def attack(x, y):
        best, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        pgd = _torchattacks().PGD(model, eps=eps, alpha=step_size, steps=steps, random_start=True)
        for restart in range(restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            torch.manual_seed(seed + restart)  # torchattacks draws the random start from the global RNG
            adv = pgd(x[todo], y[todo])
            best[todo] = adv
            fooled[todo] = _wrong(model, adv, y[todo])
        return best

    return attack


def apgd(model: nn.Module, eps: float, loss: str = "ce", steps: int = 100, restarts: int = 1, seed: int = 0) -> AttackFn:
    """APGD (Croce & Hein 2020) on the cross-entropy (``ce``) or the DLR loss (``dlr``), from torchattacks."""
    if loss not in ("ce", "dlr"):
        raise unknown_name("APGD loss", loss, ["ce", "dlr"])
    return _torchattacks().APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=restarts, seed=seed, loss=loss)


def square(model: nn.Module, eps: float, n_queries: int = 5000, p_init: float = 0.8, restarts: int = 1,
           seed: int = 0) -> AttackFn:
    """Square (Andriushchenko et al. 2020), L_inf, margin loss, from torchattacks: scores only."""
    return _torchattacks().Square(model, norm="Linf", eps=eps, n_queries=n_queries, n_restarts=restarts,
                                  p_init=p_init, loss="margin", resc_schedule=True, seed=seed)


def trigger_flip(model: nn.Module, eps: float) -> AttackFn:
    """The paper's Theorem 2 direction: the one universal perturbation ``-eps * sign(tau)``, which
    cancels the trigger where it can. Needs the victim's trigger (white box, tau known)."""
    tau = getattr(model, "trigger", None)
    if tau is None:
        raise TrigactError("attack trigger_flip needs a victim with a trigger (a trigger-activation run); "
                           "this victim has none")

    def attack(x, y):
        return (x - eps * torch.sign(tau).to(x)).clamp(0.0, 1.0)

    return attack


ADAPTIVE_KINDS: dict[str, Callable[..., AttackFn]] = {
    "pgd_restarts": pgd_restarts,
    "apgd": apgd,
    "square": square,
    "trigger_flip": trigger_flip,
}
_INT_PARAMS = {"steps": 1, "restarts": 1, "n_queries": 1, "seed": 0}


def applicable(spec: Mapping, model: nn.Module) -> bool:
    """Whether an attack can run on this victim: ``trigger_flip`` needs a trigger."""
    return spec.get("kind") != "trigger_flip" or getattr(model, "trigger", None) is not None


def build_adaptive(name: str, spec: Mapping, model: nn.Module, eps) -> AttackFn:
    """One attack of a level's config: ``spec = {kind: <ADAPTIVE_KINDS key>, **params}``."""
    params = dict(spec)
    kind = params.pop("kind", None)
    if kind not in ADAPTIVE_KINDS:
        raise unknown_name(f"kind of threat attack {name!r}", str(kind), ADAPTIVE_KINDS)
    for key, minimum in _INT_PARAMS.items():
        if key in params:
            params[key] = check_int(params[key], f"{name}.{key}", minimum)
    if "step_size" in params and params["step_size"] is not None:
        params["step_size"] = parse_eps(params["step_size"], f"{name}.step_size")
    allowed = [p for p in inspect.signature(ADAPTIVE_KINDS[kind]).parameters if p not in ("model", "eps")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TrigactError(f"threat attack {name!r} (kind {kind}) has no parameter {unknown[0]!r}; allowed: "
                           f"{', '.join(allowed) or 'none'}")
    return ADAPTIVE_KINDS[kind](model, parse_eps(eps, "eps", allow_zero=False), **params)
