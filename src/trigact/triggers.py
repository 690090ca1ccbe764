"""The trigger ``tau``: one constant image added to every input of a model with trigger activation.

``tau`` is a buffer, not a parameter: the optimizer never touches it, it rides in every state dict
(Lightning checkpoint and bundle), and Algorithm 2 changes it only through :meth:`Trigger.sign_step`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from trigact.common.validate import parse_eps
from trigact.common.errors import TrigactError, unknown_name


class Trigger(nn.Module):
    """Holds ``tau`` of shape (C, H, W) and applies it in pixel space: ``clamp(x + tau, 0, 1)``."""

    def __init__(self, tau: torch.Tensor, kind: str, step_size: float | None = None):
        super().__init__()
        if tau.dim() != 3:
            raise TrigactError(f"trigger tau must have shape (C, H, W); got {tuple(tau.shape)}")
        self.kind = kind
        # Algorithm 2's step is alpha, the same as its init range; None for a fixed trigger.
        self.step_size = step_size
        self.register_buffer("tau", tau.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.tau).clamp(0.0, 1.0)

    apply = forward

    @torch.no_grad()
    def sign_step(self, grad: torch.Tensor) -> None:
        """Algorithm 2's update: ``tau <- tau - alpha * sign(grad)`` (descends the CE with trigger).

        The paper does not project tau back into [-alpha, alpha] after the step, so neither do we:
        after k updates |tau| can reach (k + 1) * alpha.
        """
        if self.step_size is None:
            raise TrigactError(f"a {self.kind!r} trigger has no update rule; use trigger=learnable")
        if grad.shape != self.tau.shape:
            raise TrigactError(f"trigger gradient shape {tuple(grad.shape)} != tau shape {tuple(self.tau.shape)}")
        self.tau.sub_(self.step_size * grad.to(self.tau).sign())

    def extra_repr(self) -> str:
        return f"kind={self.kind}, shape={tuple(self.tau.shape)}, max|tau|={self.tau.abs().max().item():.4f}"


def _generator(seed: int) -> torch.Generator:
    # A private generator: the trigger is the same for a given seed on every DDP rank and does not
    # depend on (or disturb) the global RNG stream used for weights and data order.
    return torch.Generator().manual_seed(int(seed))


def fixed_trigger(shape, eps, seed: int = 0) -> Trigger:
    """Algorithm 1: ``tau = eps_t * (2 * Bernoulli(0.5) - 1)``, each pixel exactly +eps_t or -eps_t."""
    eps = parse_eps(eps, "trigger.eps", allow_zero=False)
    signs = torch.randint(0, 2, tuple(shape), generator=_generator(seed)).float() * 2 - 1
    return Trigger(eps * signs, kind="fixed")


def learnable_trigger(shape, alpha, seed: int = 0) -> Trigger:
    """Algorithm 2's init: ``tau ~ U(-alpha, alpha)``; later sign steps of size alpha."""
    alpha = parse_eps(alpha, "trigger.alpha", allow_zero=False)
    u = torch.rand(tuple(shape), generator=_generator(seed))
    return Trigger((2 * u - 1) * alpha, kind="learnable", step_size=alpha)


TRIGGERS: dict[str, Callable[..., Trigger]] = {
    "fixed": lambda shape, eps=None, alpha=None, seed=0: fixed_trigger(shape, eps, seed),
    "learnable": lambda shape, eps=None, alpha=None, seed=0: learnable_trigger(shape, alpha, seed),
}


def build_trigger(kind: str, shape, eps=None, alpha=None, seed: int = 0) -> Trigger | None:
    """Look a trigger kind up by name; ``'none'`` (a standard model) gives None."""
    if kind in (None, "none"):
        return None
    if kind not in TRIGGERS:
        raise unknown_name("trigger kind", kind, list(TRIGGERS) + ["none"])
    if kind == "fixed" and eps is None:
        raise TrigactError("trigger=fixed needs trigger.eps (e.g. trigger.eps=8/255)")
    if kind == "learnable" and alpha is None:
        raise TrigactError("trigger=learnable needs trigger.alpha (e.g. trigger.alpha=4/255)")
    return TRIGGERS[kind](shape, eps=eps, alpha=alpha, seed=seed)
