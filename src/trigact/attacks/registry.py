"""Attack registry: a name maps to a factory plus the hyperparameters it pins.

``build_attack(name, model, eps, steps, **overrides)`` returns a :class:`TransferAttack`, a callable
``attack(x, y) -> x_adv`` on pixels in [0, 1]. Every hyperparameter an attack has is pinned in its
registration (and repeated in ``conf/attack/<name>.yaml``), so results never depend on a library's
defaults changing under us.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from trigact.common.devices import model_device
from trigact.common.validate import parse_eps
from trigact.common.errors import TrigactError, unknown_name

# Paper settings of the project: L_inf budget 8/255, 20 iterations, step size eps / steps.
DEFAULT_EPS = 8 / 255
DEFAULT_STEPS = 20


@dataclass(frozen=True)
class AttackInfo:
    """A registered attack.

    ``factory(model, device=..., eps=..., steps=..., **params)`` builds the underlying attack object,
    callable as ``(x, y) -> x_adv``. ``params`` are the pinned hyperparameters (overridable by name);
    ``alpha`` None means ``eps / steps``. ``feature_level`` attacks get a ``feature_layer`` (a dotted
    module path; None = the model registry's default for the network). ``needs_param_grads``: the
    implementation reaches the input only through gradients of the weights, so they stay trainable
    during the attack (their ``.grad`` is restored afterwards).
    """

    name: str
    factory: Callable[..., Callable]
    params: dict = field(default_factory=dict)
    description: str = ""
    feature_level: bool = False
    needs_param_grads: bool = False


_ATTACKS: dict[str, AttackInfo] = {}


def register_attack(
    name: str,
    *,
    params: Mapping | None = None,
    feature_level: bool = False,
    needs_param_grads: bool = False,
):
    """Decorator registering an attack factory; its docstring's first line is the description."""

    def decorator(factory: Callable[..., Callable]) -> Callable[..., Callable]:
        if name in _ATTACKS:
            raise ValueError(f"attack {name!r} is registered twice")
        pinned = dict(params or {})
        if feature_level:
            pinned.setdefault("feature_layer", None)
        description = (
            (factory.__doc__ or "").strip().splitlines()[0] if factory.__doc__ else ""
        )
        _ATTACKS[name] = AttackInfo(
            name, factory, pinned, description, feature_level, needs_param_grads
        )
        return factory

    return decorator


def list_attacks() -> list[str]:
    """Registered attack names, sorted."""
    return sorted(_ATTACKS)


def attack_info(name: str) -> AttackInfo:
    """The registration of attack ``name``; an unknown name fails listing the known ones."""
    if name not in _ATTACKS:
        raise unknown_name("attack", name, _ATTACKS)
    return _ATTACKS[name]


class TransferAttack:
    """``attack(x, y) -> x_adv``: a built attack with its resolved settings.

    Runs the model in eval mode (batch-norm statistics untouched) with gradients enabled, even when
    called under ``torch.no_grad()``, and restores the model's mode and weights' gradient state
    afterwards. The output is detached, in [0, 1] and within ``eps`` of ``x`` in L_inf.
    """

    def __init__(
        self,
        info: AttackInfo,
        model: nn.Module,
        impl: Callable,
        eps: float,
        steps: int,
        params: dict,
    ):
        self.name = info.name
        self.info = info
        self.model = model
        self.impl = impl
        self.eps = eps
        self.steps = steps
        self.params = params
        self.device = model_device(model)

    @property
    def config(self) -> dict:
        """Everything that determines the attack, e.g. to record beside a TAE bank."""
        return dict(name=self.name, eps=self.eps, steps=self.steps, **self.params)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise TrigactError(
                f"attack {self.name!r} expects images of shape (B, C, H, W), got {tuple(x.shape)}"
            )
        if y.shape != x.shape[:1]:
            raise TrigactError(
                f"attack {self.name!r}: labels of shape {tuple(y.shape)} do not match {x.shape[0]} images"
            )
        out_device = x.device
        x = x.detach().to(self.device, torch.float32)
        y = y.detach().to(self.device, torch.long)
        was_training = self.model.training
        params = list(self.model.parameters())
        requires_grad = [p.requires_grad for p in params]
        saved_grads = [
            None if p.grad is None else p.grad.detach().clone() for p in params
        ]
        try:
            self.model.eval()
            if not self.info.needs_param_grads:
                # Only input gradients are needed: skipping weight gradients roughly halves backward cost.
                for p in params:
                    p.requires_grad_(False)
            with torch.enable_grad():
                x_adv = self.impl(x, y).detach()
        finally:
            self.model.train(was_training)
            for p, flag, grad in zip(params, requires_grad, saved_grads):
                p.requires_grad_(flag)
                p.grad = grad
        # Defensive projection: every attack already stays in the box, this only absorbs float error.
        x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0.0, 1.0)
        return x_adv.to(out_device)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"TransferAttack({settings})"


def build_attack(
    name: str,
    model: nn.Module,
    eps=DEFAULT_EPS,
    steps: int = DEFAULT_STEPS,
    **overrides,
) -> TransferAttack:
    """Build registered attack ``name`` against ``model`` (an ``nn.Module`` on pixels in [0, 1]).

    ``eps`` may be a string like ``'8/255'``; ``overrides`` replace pinned hyperparameters by name
    (``alpha`` None = ``eps / steps``; ``feature_layer`` for feature-level attacks). The attack runs on
    the device of the model's parameters.
    """
    info = attack_info(name)
    eps = parse_eps(eps, "attack.eps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TrigactError(f"attack.steps={steps!r} must be an integer >= 1")
    unknown = sorted(set(overrides) - set(info.params))
    if unknown:
        allowed = ", ".join(sorted(info.params)) or "none"
        raise TrigactError(
            f"attack {name!r} has no parameter(s) {', '.join(unknown)}; allowed: {allowed}"
        )
    params = {**info.params, **overrides}
    if "alpha" in params:
        params["alpha"] = (
            eps / steps
            if params["alpha"] is None
            else parse_eps(params["alpha"], "attack.alpha")
        )
    if info.feature_level:
        params["feature_layer"] = resolve_feature_layer(model, params["feature_layer"])
    device = model_device(model)
    impl = info.factory(model, device=device, eps=eps, steps=steps, **params)
    return TransferAttack(info, model, impl, eps, steps, params)


def attack_from_config(cfg: Mapping, model: nn.Module) -> TransferAttack:
    """Build from a ``conf/attack/<name>.yaml`` mapping: ``name``, ``eps``, ``steps``, ``params``."""
    params = dict(cfg.get("params") or {})
    return build_attack(
        cfg["name"],
        model,
        eps=cfg.get("eps", DEFAULT_EPS),
        steps=cfg.get("steps", DEFAULT_STEPS),
        **params,
    )


def resolve_feature_layer(model: nn.Module, layer: str | None) -> str:
    """``layer`` or the model registry's default, checked to name a submodule of ``model``."""
    from trigact.models import feature_layer

    path = feature_layer(model) if layer is None else str(layer)
    try:
        model.get_submodule(path)
    except AttributeError:
        raise TrigactError(
            f"feature_layer={path!r} is not a submodule of {type(model).__name__}"
        ) from None
    return path
