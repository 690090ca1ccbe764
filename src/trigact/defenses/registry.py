"""Defense registry: a name maps to a :class:`Defense` class; its constructor's signature is its parameters.

``build_defense(name, **params)`` builds one; ``build_defense_from_config`` takes a
``conf/defense/<name>.yaml`` mapping (``name`` plus parameters; ``label`` is for tables and ignored);
``defended(model, defense)`` puts the defense in front of a victim.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from trigact.defenses.base import Defense
from trigact.common.errors import TrigactError, unknown_name

# Keys of a defense config that are not constructor parameters.
_CONFIG_ONLY_KEYS = ("label",)


@dataclass(frozen=True)
class DefenseInfo:
    """A registered defense: its class, its parameters with their defaults, and a one-line description."""

    name: str
    cls: type
    params: dict = field(default_factory=dict)
    description: str = ""


_DEFENSES: dict[str, DefenseInfo] = {}


def register_defense(name: str):
    """Class decorator registering a :class:`Defense`; its docstring's first line is the description."""

    def decorator(cls: type) -> type:
        if name in _DEFENSES:
            raise ValueError(f"defense {name!r} is registered twice")
        if not (isinstance(cls, type) and issubclass(cls, Defense)):
            raise TypeError(f"defense {name!r} must be a Defense subclass, got {cls!r}")
        if not cls.__doc__:
            raise ValueError(f"defense class {cls.__name__} needs a docstring: it is its description")
        signature = inspect.signature(cls.__init__)
        params = {
            p.name: (None if p.default is inspect.Parameter.empty else p.default)
            for p in list(signature.parameters.values())[1:]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        cls.name = name
        _DEFENSES[name] = DefenseInfo(name, cls, params, cls.__doc__.strip().splitlines()[0])
        return cls

    return decorator


def list_defenses() -> list[str]:
    """Registered defense names, sorted (``none`` included)."""
    return sorted(_DEFENSES)


def defense_info(name: str) -> DefenseInfo:
    """The registration of defense ``name``; an unknown name fails listing the known ones."""
    if name not in _DEFENSES:
        raise unknown_name("defense", name, _DEFENSES)
    return _DEFENSES[name]


def build_defense(name: str | None, **params) -> nn.Module:
    """Build registered defense ``name`` (None or ``'none'``: no defense, an identity).

    ``params`` are the class's constructor arguments; an unknown one fails naming the allowed ones, a
    bad value fails in the constructor naming what is allowed.
    """
    info = defense_info("none" if name is None else name)
    unknown = sorted(set(params) - set(info.params))
    if unknown:
        allowed = ", ".join(info.params) or "none"
        raise TrigactError(f"defense {info.name!r} has no parameter(s) {', '.join(unknown)}; allowed: {allowed}")
    return info.cls(**params)


def build_defense_from_config(cfg: Mapping | None) -> nn.Module:
    """Build from a mapping like ``{"name": "jpeg", "quality": 50}`` (a ``conf/defense/*.yaml``).

    ``label`` (the table column) is dropped; None, ``{}`` or ``name: none`` give no defense. An
    OmegaConf ``DictConfig`` is accepted as well as a plain dict.
    """
    if cfg is None:
        return build_defense("none")
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):  # a Mapping too, but nested nodes must become plain dicts
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise TrigactError(f"a defense config must be a mapping like {{name: jpeg, quality: 50}}, got {cfg!r}")
    params = {k: v for k, v in cfg.items() if k not in _CONFIG_ONLY_KEYS}
    if not params:
        return build_defense("none")
    if "name" not in params:
        raise TrigactError(f"defense config {dict(cfg)!r} has no 'name'; known: {', '.join(list_defenses())}")
    name = params.pop("name")
    return build_defense(name, **params)


class DefendedModel(nn.Sequential):
    """``model(defense(x))``: the defense sees the attacker's input, then the victim runs.

    For a victim with trigger activation the victim is its deployed unit, so the trigger is added after
    the defense, as it would be in deployment. ``meta`` carries the victim's (if any) plus the defense's
    config, so code that reads ``victim.meta`` keeps working.
    """

    def __init__(self, model: nn.Module, defense: nn.Module):
        super().__init__(OrderedDict(defense=defense, model=model))
        self.meta = dict(getattr(model, "meta", None) or {})
        self.meta["defense"] = getattr(defense, "config", {"name": type(defense).__name__})


def defended(model: nn.Module, defense: nn.Module | None) -> nn.Module:
    """``model`` behind ``defense`` (None or an identity: ``model`` itself, unchanged)."""
    if defense is None or isinstance(defense, nn.Identity) or getattr(defense, "is_identity", False):
        return model
    return DefendedModel(model, defense)
