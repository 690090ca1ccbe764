"""Lightning callbacks: the learnable-trigger update (Algorithm 2)."""

from trigact.callbacks.trigger_update import TriggerUpdateCallback, trigger_gradient_sum

__all__ = ["TriggerUpdateCallback", "trigger_gradient_sum"]
