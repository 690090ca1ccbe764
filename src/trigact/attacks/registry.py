"""Attacks: one Hydra config each, ``conf/attack/<name>.yaml``, built through ``torchattack.create_attack``.

A config is the single source of truth for an attack::

    # MI-FGSM (Dong et al., CVPR 2018, arXiv:1710.06081): momentum over L1-normalised gradients.
    name: mifgsm           # the file's stem
    attack: MIFGSM         # a class in torchattack's ATTACK_REGISTRY (trigact's own attacks register there too)
    family: gradient       # one of FAMILIES
    paper: Dong et al., CVPR 2018 (arXiv:1710.06081)
    params:                # every tunable argument of the class, pinned (never the library's default)
      alpha: null          # null = eps / steps
      decay: 1.0

Optional keys: ``feature_level: true`` (the attack works at an intermediate layer: ``params.feature_layer``,
null = the model registry's default, is passed as the class's ``layer_arg``, ``feature_layer_cfg`` unless
said otherwise), ``needs_param_grads: true`` (the implementation reaches the input only through gradients
of the weights, which then stay trainable during the attack), ``surrogate: vit`` (the attack hooks
transformer blocks: a CNN surrogate is refused in one line), ``steps: <n>`` (an attack whose number of
steps is part of the method, e.g. 1 for FGSM).

The budget, ``eps`` and ``steps``, is not an attack's own: it is the evaluation protocol's
(``conf/attack_protocol/<name>.yaml``, ``paper`` by default: 8/255, 20 steps), with the experiment's
``attack_overrides`` on top. ``params`` that are ``null`` and named in ``FROM_MODEL`` (``num_classes``)
are read off the surrogate.

An attack that has no honest place in L_inf tables keeps a config whose class refuses in one line when built
(PGD-L2; the ``minimum_norm`` family: DeepFool and GeoDA, which take no eps), so that ``--list`` shows it.

``build_attack(name, model, eps, steps, **params)`` returns a :class:`TransferAttack`, a callable
``attack(x, y) -> x_adv`` on pixels in [0, 1].
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from trigact.common.config import CONF_DIR
from trigact.common.devices import model_device
from trigact.common.errors import TrigactError, unknown_name
from trigact.common.precision import autocast, parse_precision
from trigact.common.validate import check_steps, parse_eps

# The taxonomy of Trustworthy-AI-Group/TransferAttack, plus the families outside it.
FAMILIES = {
    "gradient": "gradient-based (momentum, variance tuning, ...)",
    "input_transformation": "input transformation (resize, scale, mix, shuffle, ...)",
    "feature": "advanced objective at an intermediate layer",
    "model": "model-related (surrogate refinement: skip gradients, back-propagation shaping)",
    "vit": "attacks that hook vision-transformer blocks",
    "generative": "a trained perturbation generator",
    "diffusion": "through a diffusion model",
    "minimum_norm": "minimum-norm attacks without an eps budget (DeepFool, GeoDA): refused in L_inf tables",
}
# Constructor arguments we set ourselves on every attack, never from a config.
MANAGED = ("model", "normalize", "device", "eps", "steps", "clip_min", "clip_max", "targeted")
# Parameters that a null in the config reads off the surrogate.
FROM_MODEL = ("num_classes",)
SPEC_KEYS = {"name", "attack", "family", "paper", "params", "feature_level", "layer_arg", "needs_param_grads",
             "surrogate", "steps"}
DEFAULT_PROTOCOL = "paper"


def _torchattack_registry() -> dict:
    from torchattack.attack import ATTACK_REGISTRY

    import trigact.attacks  # noqa: F401  (our own attack classes register on import)

    return ATTACK_REGISTRY


@dataclass(frozen=True)
class AttackSpec:
    """One attack's config (see the module docstring); ``cls`` is the torchattack class it builds."""

    name: str
    attack: str
    family: str
    paper: str
    params: dict = field(default_factory=dict)
    feature_level: bool = False
    layer_arg: str = "feature_layer_cfg"
    needs_param_grads: bool = False
    surrogate: str = "any"
    steps: int | None = None  # a method-defined number of steps (FGSM: 1); None: the protocol's
    path: str = ""

    @property
    def cls(self):
        registry = _torchattack_registry()
        if self.attack not in registry:
            raise unknown_name(f"torchattack class (attack: in {self.path})", self.attack, registry)
        return registry[self.attack]

    @property
    def arguments(self) -> set[str]:
        """The keyword arguments the class takes (a subclass passing ``**kwargs`` on: its parents' too)."""
        names: set[str] = set()
        for klass in self.cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters.values()
            names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                break
        return names - {"self"}

    @property
    def description(self) -> str:
        return f"{self.attack} ({self.paper})"

    @classmethod
    def from_mapping(cls, cfg: Mapping, path: str = "") -> AttackSpec:
        cfg = dict(cfg)
        where = path or f"attack {cfg.get('name')!r}"
        unknown = sorted(set(cfg) - SPEC_KEYS - {"eps"})  # eps: written by attack_config, the protocol's
        if unknown:
            raise TrigactError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(SPEC_KEYS))}")
        for key in ("name", "attack", "family", "paper"):
            if not cfg.get(key):
                raise TrigactError(f"{where}: `{key}` is required")
        if cfg["family"] not in FAMILIES:
            raise unknown_name(f"attack family (in {where})", cfg["family"], FAMILIES)
        params = dict(cfg.get("params") or {})
        if cfg.get("feature_level"):
            params.setdefault("feature_layer", None)
        steps = cfg.get("steps")
        return cls(
            name=str(cfg["name"]), attack=str(cfg["attack"]), family=str(cfg["family"]), paper=str(cfg["paper"]),
            params={k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
            feature_level=bool(cfg.get("feature_level", False)),
            layer_arg=str(cfg.get("layer_arg", "feature_layer_cfg")),
            needs_param_grads=bool(cfg.get("needs_param_grads", False)),
            surrogate=str(cfg.get("surrogate", "any")),
            steps=None if steps is None else check_steps(steps, f"steps in {where}"),
            path=path,
        )


def attack_dir(conf_dir=CONF_DIR) -> Path:
    return Path(conf_dir) / "attack"


def list_attacks(conf_dir=CONF_DIR) -> list[str]:
    """Every attack with a config, sorted."""
    return sorted(p.stem for p in attack_dir(conf_dir).glob("*.yaml"))


@lru_cache(maxsize=None)
def _load_spec(path: str, mtime: float) -> AttackSpec:  # mtime: an edited config is read again
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(cfg, dict):
        raise TrigactError(f"{path} is not a mapping")
    spec = AttackSpec.from_mapping(cfg, path)
    if spec.name != Path(path).stem:
        raise TrigactError(f"{path}: name={spec.name!r} must be the file's stem {Path(path).stem!r}")
    return spec


def attack_spec(name: str, conf_dir=CONF_DIR) -> AttackSpec:
    """The config of attack ``name``; an unknown name fails listing the known ones."""
    path = attack_dir(conf_dir) / f"{name}.yaml"
    if not isinstance(name, str) or "/" in name or not path.is_file():
        raise unknown_name("attack", name, list_attacks(conf_dir))
    return _load_spec(str(path), path.stat().st_mtime)


attack_info = attack_spec  # the older name


def protocol(name: str = DEFAULT_PROTOCOL, conf_dir=CONF_DIR) -> dict:
    """``conf/attack_protocol/<name>.yaml``: the budget (eps, steps, alpha) every attack runs with."""
    path = Path(conf_dir) / "attack_protocol" / f"{name}.yaml"
    if not path.is_file():
        raise unknown_name("attack_protocol", name, sorted(p.stem for p in path.parent.glob("*.yaml")))
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def _paper_budget() -> tuple[float, int]:
    budget = protocol(DEFAULT_PROTOCOL)
    return parse_eps(budget["eps"], "eps"), int(budget["steps"])


DEFAULT_EPS, DEFAULT_STEPS = _paper_budget()


def model_num_classes(model: nn.Module) -> int:
    """The number of classes of a classifier: its ``num_classes`` spec, else its last linear layer."""
    for module in model.modules():
        spec = getattr(module, "spec", None)
        if isinstance(spec, Mapping) and isinstance(spec.get("num_classes"), int):
            return spec["num_classes"]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TrigactError(f"cannot tell how many classes {type(model).__name__} has; set params.num_classes")
    return linears[-1].out_features


class TransferAttack:
    """``attack(x, y) -> x_adv``: a built attack with its resolved settings.

    Runs the model in eval mode (batch-norm statistics untouched) with gradients enabled, even when
    called under ``torch.no_grad()``, and restores the model's mode and weights' gradient state
    afterwards. The output is detached, in [0, 1] and within ``eps`` of ``x`` in L_inf.
    """

    def __init__(self, spec: AttackSpec, model: nn.Module, impl, eps: float, steps: int, params: dict):
        self.name = spec.name
        self.info = self.spec = spec
        self.model = model
        self.impl = impl
        self.eps = eps
        self.steps = steps
        self.params = params
        self.device = model_device(model)
        # None: fp32; "bf16": the model's forward and backward under bf16 autocast (trigact.common.precision).
        self.precision: str | None = None

    @property
    def config(self) -> dict:
        """Everything that determines the attack, e.g. to record beside a TAE bank."""
        config = dict(name=self.name, attack=self.spec.attack, eps=self.eps, steps=self.steps, **self.params)
        if self.precision is not None:
            config["precision"] = self.precision
        return config

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise TrigactError(f"attack {self.name!r} expects images of shape (B, C, H, W), got {tuple(x.shape)}")
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
        saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        try:
            self.model.eval()
            # Only input gradients are needed: skipping weight gradients roughly halves backward cost. An
            # attack that backpropagates from a loss with no input in its graph (NAA's attribution pass)
            # needs the weights to require grad, even on a surrogate its caller froze.
            for p in params:
                p.requires_grad_(self.spec.needs_param_grads)
            if self.precision is not None:
                # Only the model's forward (and its backward) in bf16, with fp32 logits out: the attack's
                # own autocast-listed ops (TI's smoothing conv, SSA's DCT matmuls) stay fp32. Set on the
                # instance, so every hook and submodule path the attack relies on is unchanged.
                self.model.forward = _autocast_forward(self.model.forward, self.device, self.precision)
            with torch.enable_grad():
                x_adv = self.impl(x, y).detach()
        finally:
            if self.precision is not None:
                self.model.__dict__.pop("forward", None)
            self.model.train(was_training)
            for p, flag, grad in zip(params, requires_grad, saved_grads):
                p.requires_grad_(flag)
                p.grad = grad
        # Defensive projection: every attack already stays in the box (a test checks the raw output),
        # this only absorbs float error.
        x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0.0, 1.0)
        return x_adv.to(out_device)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"TransferAttack({settings})"


def _autocast_forward(forward, device, precision):
    def run(*args, **kwargs):
        with autocast(device, precision):
            out = forward(*args, **kwargs)
        return out.float() if torch.is_tensor(out) and out.is_floating_point() else out

    return run


def _check_surrogate(spec: AttackSpec, model: nn.Module) -> None:
    if spec.surrogate != "vit":
        return
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover -- timm is a dependency
        VisionTransformer = ()
    if not any(isinstance(m, VisionTransformer) for m in model.modules()):
        raise TrigactError(
            f"attack {spec.name!r} hooks vision-transformer blocks ({spec.paper}); surrogate "
            f"{type(model).__name__} has none: use a timm ViT surrogate (e.g. model=vit_tiny)"
        )


def build_attack(name, model: nn.Module, eps=None, steps: int | None = None, **overrides) -> TransferAttack:
    """Build attack ``name`` (a config name, or an :class:`AttackSpec` / mapping) against ``model``, an
    ``nn.Module`` on pixels in [0, 1], on the device of its parameters.

    ``eps`` (e.g. ``'8/255'``) and ``steps`` default to the paper protocol's; ``overrides`` replace
    pinned parameters by name (``alpha`` None = ``eps / steps``; ``feature_layer`` for feature-level
    attacks).
    """
    spec = name if isinstance(name, AttackSpec) else (
        AttackSpec.from_mapping(name) if isinstance(name, Mapping) else attack_spec(name))
    eps = parse_eps(DEFAULT_EPS if eps is None else eps, "attack.eps")
    steps = spec.steps or (DEFAULT_STEPS if steps is None else check_steps(steps, "attack.steps"))
    unknown = sorted(set(overrides) - set(spec.params))
    if unknown:
        allowed = ", ".join(sorted(spec.params)) or "none"
        raise TrigactError(f"attack {spec.name!r} has no parameter(s) {', '.join(unknown)}; allowed: {allowed}")
    _check_surrogate(spec, model)
    params = {**spec.params, **overrides}
    if "alpha" in params:
        params["alpha"] = eps / steps if params["alpha"] is None else parse_eps(params["alpha"], "attack.alpha",
                                                                                allow_zero=False)
    for key in FROM_MODEL:
        if key in params and params[key] is None:
            params[key] = model_num_classes(model)
    kwargs = dict(params)
    if spec.feature_level:
        params["feature_layer"] = resolve_feature_layer(model, params["feature_layer"], spec.name)
        kwargs[spec.layer_arg] = params["feature_layer"]
        del kwargs["feature_layer"]
    accepted = spec.arguments
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    budget = {"eps": eps, **({"steps": steps} if "steps" in accepted else {})}
    wrong = sorted(set(kwargs) - accepted)
    if wrong:
        raise TrigactError(f"{spec.path or spec.name}: {spec.attack} takes no argument(s) {', '.join(wrong)}")
    import torchattack

    device = model_device(model)
    impl = torchattack.create_attack(spec.attack, model, normalize=None, device=device, **budget, **kwargs)
    return TransferAttack(spec, model, impl, eps, steps, params)


def attack_from_config(cfg: Mapping, model: nn.Module) -> TransferAttack:
    """Build from :func:`trigact.attacks.config.attack_config`'s mapping: the attack's name, its
    resolved ``eps`` and ``steps`` and its ``params``."""
    attack = build_attack(cfg["name"], model, eps=cfg.get("eps"), steps=cfg.get("steps"), **dict(cfg.get("params") or {}))
    attack.precision = parse_precision(cfg.get("precision"), "attack precision")
    return attack


def resolve_feature_layer(model: nn.Module, layer: str | None, attack: str = "") -> str:
    """``layer`` or the model registry's default, checked to name a submodule of ``model``."""
    from trigact.models import feature_layer

    path = feature_layer(model) if layer is None else str(layer)
    try:
        model.get_submodule(path)
    except AttributeError:
        raise TrigactError(f"feature_layer={path!r} is not a submodule of {type(model).__name__}") from None
    return path


def describe_attacks(conf_dir=CONF_DIR) -> list[dict]:
    """One row per attack: name, family, class, pinned settings, source paper (``trigact.attack --list``)."""
    rows = []
    for name in list_attacks(conf_dir):
        spec = attack_spec(name, conf_dir)
        settings = ", ".join(f"{k}={v}" for k, v in spec.params.items())
        if spec.steps:
            settings = f"steps={spec.steps}" + (f", {settings}" if settings else "")
        rows.append({"attack": name, "family": spec.family, "class": spec.attack, "settings": settings,
                     "paper": spec.paper})
    return rows
