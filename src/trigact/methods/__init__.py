"""Training paradigms, one LightningModule each over :class:`ClassifierModule`."""

from trigact.methods.base import ClassifierModule
from trigact.methods.standard import StandardModule
from trigact.methods.trigger_activation import TriggerActivationModule

__all__ = ["ClassifierModule", "StandardModule", "TriggerActivationModule"]
