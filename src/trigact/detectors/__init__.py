"""Trigger-inversion backdoor detectors as a library: Neural Cleanse and USB.

Each takes any ``nn.Module`` mapping [0, 1] images (N, C, H, W) to logits (a ``DeployedModel`` from
``trigact.load_bundle``, or a plain network from ``trigact.models.build_model``) and the defender's clean
images and labels, and returns a :class:`DetectionResult`. The model's weights and train/eval mode are
left as they were; results are deterministic on the CPU for a given ``seed``.
"""

from trigact.detectors.common import DetectionResult, anomaly_index
from trigact.detectors.neural_cleanse import invert_mask_pattern, neural_cleanse
from trigact.detectors.usb import targeted_deepfool, usb

__all__ = ["DetectionResult", "anomaly_index", "invert_mask_pattern", "neural_cleanse", "targeted_deepfool", "usb"]
