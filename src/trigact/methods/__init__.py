"""Training paradigms, one LightningModule each over :class:`ClassifierModule`."""

from trigact.methods.advtrojan import AdvTrojanModule
from trigact.methods.backdoor import BackdoorModule
from trigact.methods.base import ClassifierModule
from trigact.methods.pgd_at import PGDATModule
from trigact.methods.rat import RATModule
from trigact.methods.standard import StandardModule
from trigact.methods.tdat import TDATModule
from trigact.methods.trades import TradesModule
from trigact.methods.trigger_activation import TriggerActivationModule

__all__ = [
    "AdvTrojanModule",
    "BackdoorModule",
    "ClassifierModule",
    "PGDATModule",
    "RATModule",
    "StandardModule",
    "TDATModule",
    "TradesModule",
    "TriggerActivationModule",
]
