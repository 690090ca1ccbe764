"""Lightning callbacks: the learnable-trigger update (Algorithm 2), trigger images, RNG state for exact
resume, SLURM requeue checkpoints at step boundaries."""

from trigact.callbacks.requeue import DeferredRequeue
from trigact.callbacks.rng_state import RNGStateCallback
from trigact.callbacks.trigger_logging import TriggerImageCallback, trigger_to_image
from trigact.callbacks.trigger_update import TriggerUpdateCallback, trigger_gradient_sum

__all__ = ["DeferredRequeue", "RNGStateCallback", "TriggerImageCallback", "TriggerUpdateCallback", "trigger_gradient_sum",
           "trigger_to_image"]
