"""Model registry: ``build_model(name, num_classes, ...)`` returns ``backbone(normalize(x))``.

Importing the architecture modules registers their models.
"""

from trigact.models import cifar, imagenet, small  # noqa: F401  (registration side effect)
from trigact.models.classifier import ClassifierNet
from trigact.models.normalize import Normalize
from trigact.models.registry import (
    FAMILIES,
    ModelInfo,
    build_model,
    feature_layer,
    list_models,
    model_info,
    register_model,
)

__all__ = [
    "FAMILIES",
    "ClassifierNet",
    "ModelInfo",
    "Normalize",
    "build_model",
    "feature_layer",
    "list_models",
    "model_info",
    "register_model",
]
