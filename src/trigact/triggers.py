"""The trigger ``tau``: one constant image added to every input of a model with trigger activation.

``tau`` is a buffer, not a parameter: the optimizer never touches it, it rides in every state dict
(Lightning checkpoint and bundle), and Algorithm 2 changes it only through :meth:`Trigger.sign_step`.

Kinds (the registry :data:`TRIGGERS`): ``fixed`` (Algorithm 1), ``learnable`` (Algorithm 2), and
their sparse variants ``sparse`` and ``sparse_learnable`` (SIBA's constraints ``||tau||_0 <= k``,
``||tau||_inf <= eps``). A sparse trigger is still a dense (C, H, W) tensor, zero off its support,
so bundles, attacks and evaluation treat it like any other.
"""

from __future__ import annotations

import math
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
            raise TrigactError(f"a {self.kind!r} trigger has no update rule; use trigger=learnable "
                               "(or trigger=sparse_learnable)")
        if grad.shape != self.tau.shape:
            raise TrigactError(f"trigger gradient shape {tuple(grad.shape)} != tau shape {tuple(self.tau.shape)}")
        self.tau.sub_(self.step_size * grad.to(self.tau).sign())

    def extra_repr(self) -> str:
        return f"kind={self.kind}, shape={tuple(self.tau.shape)}, max|tau|={self.tau.abs().max().item():.4f}"


def trigger_stats(tau: torch.Tensor | None) -> dict:
    """How large a trigger is, as the summaries report it (in pixel units, images in [0, 1]):
    ``trigger_mse`` = MSE(0, tau) = mean(tau^2), the paper's Table XI (which prints it in units of
    1e-2: a fixed trigger at 64/255 gives (64/255)^2 = 6.30e-2), ``trigger_linf`` = max|tau| and
    ``trigger_nonzero`` = the fraction of coordinates that are not 0. Empty for no trigger."""
    if tau is None:
        return {}
    tau = tau.detach().float()
    return {"trigger_mse": float(tau.pow(2).mean()), "trigger_linf": float(tau.abs().max()),
            "trigger_nonzero": float((tau != 0).float().mean())}


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


# ------------------------------------------------------------------------------------ sparse kinds


def resolve_k(k, numel: int, name: str = "trigger.k") -> int:
    """The support size of a sparse trigger: an int is a count of coordinates in [1, numel], a float in
    (0, 1] a fraction of them, ``max(1, round(k * numel))``. ``1`` is one coordinate, ``1.0`` all."""
    allowed = f"an integer count in [1, {numel}] or a fraction in (0, 1] of the {numel} coordinates of tau"
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TrigactError(f"{name}={k!r} is not a number; it must be {allowed}")
    if isinstance(k, int):
        if not 1 <= k <= numel:
            raise TrigactError(f"{name}={k!r} must be {allowed}")
        return k
    if not math.isfinite(k) or not 0 < k <= 1:
        hint = f" (write {int(k)} for a count)" if math.isfinite(k) and k > 1 and k == int(k) else ""
        raise TrigactError(f"{name}={k!r} must be {allowed}{hint}")
    return max(1, round(k * numel))


@torch.no_grad()
def project_sparse(tau: torch.Tensor, k: int, eps: float, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """SIBA's projection onto ``{||tau||_0 <= k, ||tau||_inf <= eps}``: keep the k coordinates of
    largest ``|tau|``, zero the others, clip the kept ones to [-eps, eps].

    The k are chosen before clipping (clipping keeps the order of magnitudes, so it would only make
    ties). Ties in ``|tau|`` -- common after a sign step, which moves every off-support coordinate to
    exactly ``alpha`` -- go to the larger ``|tiebreak|`` (the gradient: the steepest descent), then to
    the lower flat index, so the result is deterministic and the same on every DDP rank.
    """
    flat = tau.flatten()
    numel = flat.numel()
    if tiebreak is None:
        order = torch.arange(numel, device=flat.device)
    else:
        order = torch.sort(tiebreak.flatten().to(flat).abs(), descending=True, stable=True).indices
    keep = order[torch.sort(flat.abs()[order], descending=True, stable=True).indices[:k]]
    mask = torch.zeros(numel, dtype=torch.bool, device=flat.device)
    mask[keep] = True
    return torch.where(mask, flat.clamp(-eps, eps), torch.zeros_like(flat)).view_as(tau)


class SparseTrigger(Trigger):
    """A trigger kept in ``{||tau||_0 <= k, ||tau||_inf <= eps}``. L0 counts coordinates of the
    (C, H, W) tensor: each channel of a pixel is one coordinate (not one pixel across channels).

    A learnable one (``step_size`` set) follows Algorithm 2's sign step with SIBA's projection after
    it, so :class:`~trigact.callbacks.TriggerUpdateCallback` updates it like any learnable trigger.
    ``k`` and ``eps`` are rebuilt from the config on resume; tau itself comes from the checkpoint.
    """

    def __init__(self, tau: torch.Tensor, kind: str, k: int, eps: float, step_size: float | None = None):
        super().__init__(tau, kind=kind, step_size=step_size)
        self.k = int(k)
        self.eps = float(eps)

    @torch.no_grad()
    def sign_step(self, grad: torch.Tensor) -> None:
        """``tau <- P(tau - alpha * sign(grad))`` with P :func:`project_sparse` (ties broken by |grad|)."""
        super().sign_step(grad)
        self.tau.copy_(project_sparse(self.tau, self.k, self.eps, tiebreak=grad))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, eps={self.eps:.4f}, nonzeros={int(self.tau.count_nonzero())}"


def _numel(shape) -> int:
    return math.prod(int(n) for n in shape)


def sparse_trigger(shape, k, eps, seed: int = 0) -> SparseTrigger:
    """A fixed sparse trigger: a seeded random support of exactly k coordinates, each +eps or -eps
    (fair random signs), zeros elsewhere."""
    eps = parse_eps(eps, "trigger.eps", allow_zero=False)
    numel = _numel(shape)
    k = resolve_k(k, numel)
    gen = _generator(seed)
    support = torch.randperm(numel, generator=gen)[:k]
    signs = torch.randint(0, 2, (k,), generator=gen).float() * 2 - 1
    tau = torch.zeros(numel)
    tau[support] = eps * signs
    return SparseTrigger(tau.view(tuple(shape)), kind="sparse", k=k, eps=eps)


def sparse_learnable_trigger(shape, k, eps, alpha, seed: int = 0) -> SparseTrigger:
    """A learnable sparse trigger: Algorithm 2's ``U(-alpha, alpha)`` init, projected (the k largest
    magnitudes kept, clipped to eps); then sign steps of size alpha, each followed by the projection."""
    eps = parse_eps(eps, "trigger.eps", allow_zero=False)
    alpha = parse_eps(alpha, "trigger.alpha", allow_zero=False)
    k = resolve_k(k, _numel(shape))
    u = torch.rand(tuple(shape), generator=_generator(seed))
    tau = project_sparse((2 * u - 1) * alpha, k, eps)
    return SparseTrigger(tau, kind="sparse_learnable", k=k, eps=eps, step_size=alpha)


TRIGGERS: dict[str, Callable[..., Trigger]] = {
    "fixed": lambda shape, eps=None, alpha=None, k=None, seed=0: fixed_trigger(shape, eps, seed),
    "learnable": lambda shape, eps=None, alpha=None, k=None, seed=0: learnable_trigger(shape, alpha, seed),
    "sparse": lambda shape, eps=None, alpha=None, k=None, seed=0: sparse_trigger(shape, k, eps, seed),
    "sparse_learnable": lambda shape, eps=None, alpha=None, k=None, seed=0:
        sparse_learnable_trigger(shape, k, eps, alpha, seed),
}
# The settings each kind cannot do without, with an example for the error message.
REQUIRED: dict[str, dict[str, str]] = {
    "fixed": {"eps": "8/255"},
    "learnable": {"alpha": "4/255"},
    "sparse": {"k": "0.05", "eps": "64/255"},
    "sparse_learnable": {"k": "0.05", "eps": "64/255", "alpha": "16/255"},
}


def build_trigger(kind: str, shape, eps=None, alpha=None, seed: int = 0, k=None) -> Trigger | None:
    """Look a trigger kind up by name; ``'none'`` (a standard model) gives None."""
    if kind in (None, "none"):
        return None
    if kind not in TRIGGERS:
        raise unknown_name("trigger kind", kind, list(TRIGGERS) + ["none"])
    given = {"eps": eps, "alpha": alpha, "k": k}
    for key, example in REQUIRED.get(kind, {}).items():
        if given[key] is None:
            raise TrigactError(f"trigger={kind} needs trigger.{key} (e.g. trigger.{key}={example})")
    return TRIGGERS[kind](shape, eps=eps, alpha=alpha, k=k, seed=seed)
