"""Model registry: ``build_model(name, num_classes, ...)`` returns ``backbone(normalize(x))``.

Importing the architecture modules registers their models.
"""

from torch import nn

from trigact.common.errors import TrigactError
from trigact.models import cifar, imagenet, small, vit  # noqa: F401  (registration side effect)
from trigact.models import registry as _registry
from trigact.models.classifier import ClassifierNet
from trigact.models.ensemble import EnsembleModel, is_ensemble
from trigact.models.normalize import Normalize
from trigact.models.registry import (
    FAMILIES,
    ModelInfo,
    build_model,
    list_models,
    model_info,
    register_model,
)


def feature_layer(net_or_name: str | nn.Module) -> str:
    """The default feature layer of a model name, or its full dotted path inside ``net``
    (:func:`trigact.models.registry.feature_layer`).

    An ensemble surrogate has no single feature layer (each member has its own): refused in one line,
    so that a feature-level attack never silently runs on one member's features.
    """
    if is_ensemble(net_or_name):
        ensemble = next(m for m in net_or_name.modules() if isinstance(m, EnsembleModel))
        raise TrigactError(
            f"ensemble surrogate {ensemble.name} ({len(ensemble.members)} members) has no single feature layer: "
            "feature-level attacks (FIA, NAA, RPA) need one network's intermediate layer; attack its members "
            "one by one, or use an output-level attack on the ensemble"
        )
    return _registry.feature_layer(net_or_name)


__all__ = [
    "FAMILIES",
    "ClassifierNet",
    "EnsembleModel",
    "ModelInfo",
    "Normalize",
    "build_model",
    "feature_layer",
    "list_models",
    "model_info",
    "register_model",
]
