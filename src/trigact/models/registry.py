"""Model registry: names to builders plus a metadata card, in the style of timm's ``create_model``.

A builder takes ``(num_classes, in_chans, image_size, **its own kwargs)`` and returns the backbone;
:func:`build_model` validates the arguments, puts :class:`Normalize` in front and records the spec.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from trigact.common import validate
from trigact.common.errors import TrigactError, unknown_name
from trigact.models.classifier import ClassifierNet
from trigact.models.normalize import Normalize, check_stats

FAMILIES = ("small", "cifar", "imagenet")

# Arguments every builder receives from build_model; anything else in its signature is a model kwarg.
_BUILDER_ARGS = ("num_classes", "in_chans", "image_size")


@dataclass(frozen=True)
class ModelInfo:
    """What callers need to know about a registered model without building it.

    ``feature_layer`` is a dotted path inside :class:`ClassifierNet` (e.g. ``'backbone.layer3'``): the
    default intermediate layer for feature-level attacks (NAA, FIA, RPA). ``min_image_size`` is the
    smallest square input the architecture maps to a valid output.
    """

    name: str
    family: str
    feature_layer: str
    min_image_size: int
    description: str


_INFOS: dict[str, ModelInfo] = {}
_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, *, family: str, feature_layer: str, min_image_size: int):
    """Decorator registering a backbone builder; its docstring's first line is the description."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} of model {name!r} is not one of {FAMILIES}")

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _INFOS:
            raise ValueError(f"model {name!r} is registered twice")
        if not builder.__doc__:
            raise ValueError(f"model builder {builder.__name__} needs a docstring: it is its description")
        description = builder.__doc__.strip().splitlines()[0]
        _INFOS[name] = ModelInfo(name, family, feature_layer, min_image_size, description)
        _BUILDERS[name] = builder
        return builder

    return decorator


def list_models(family: str | None = None) -> list[str]:
    """Registered model names, sorted; only those of ``family`` when given."""
    if family is not None and family not in FAMILIES:
        raise unknown_name("model family", family, FAMILIES)
    return sorted(name for name, info in _INFOS.items() if family in (None, info.family))


def model_info(name: str) -> ModelInfo:
    """The metadata card of a registered model."""
    if name not in _INFOS:
        raise unknown_name("model", name, _INFOS)
    return _INFOS[name]


def feature_layer(net_or_name: str | nn.Module) -> str:
    """The default feature layer of a model name, or its full dotted path inside ``net``.

    ``net`` may be a :class:`ClassifierNet` or any module wrapping one (such as a deployed unit with a
    trigger): the path then starts from ``net``, so ``net.get_submodule(path)`` works directly.
    """
    if isinstance(net_or_name, str):
        return model_info(net_or_name).feature_layer
    for prefix, module in net_or_name.named_modules():
        if isinstance(module, ClassifierNet):
            path = model_info(module.spec["name"]).feature_layer
            return f"{prefix}.{path}" if prefix else path
    raise TrigactError(
        f"{type(net_or_name).__name__} contains no ClassifierNet from build_model; pass a model name instead"
    )


def build_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    image_size: int = 32,
    mean=None,
    std=None,
    **kwargs,
) -> ClassifierNet:
    """Build registered model ``name`` as ``backbone(normalize(x))`` for pixels in [0, 1].

    ``kwargs`` go to the model's builder (see its signature). ``build_model(**net.spec)`` rebuilds the net.
    """
    info = model_info(name)
    check_int("num_classes", num_classes, 2)
    check_int("in_chans", in_chans, 1)
    check_int("image_size", image_size, info.min_image_size, f" (model {name!r})")
    mean, std = check_stats(mean, std, in_chans)
    builder = _BUILDERS[name]
    _check_kwargs(name, builder, kwargs)
    backbone = builder(num_classes=num_classes, in_chans=in_chans, image_size=image_size, **kwargs)
    spec = dict(
        name=name,
        num_classes=num_classes,
        in_chans=in_chans,
        image_size=image_size,
        mean=mean,
        std=std,
        **kwargs,
    )
    return ClassifierNet(Normalize(mean, std, in_chans), backbone, spec)


def check_int(name: str, value, minimum: int, context: str = "") -> None:
    """A model's integer argument >= ``minimum``; ``context`` (e.g. `` (model 'mlp')``) ends the error."""
    try:
        validate.check_int(value, name, minimum)
    except TrigactError as err:
        raise TrigactError(f"{err}{context}") from None


def _check_kwargs(name: str, builder: Callable[..., nn.Module], kwargs: dict) -> None:
    """Fail on kwargs the model does not take, naming the ones it does."""
    allowed = [p for p in inspect.signature(builder).parameters if p not in _BUILDER_ARGS]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TrigactError(
            f"model {name!r} got unknown kwargs {unknown}; allowed: {', '.join(allowed) or 'none'}"
        )
