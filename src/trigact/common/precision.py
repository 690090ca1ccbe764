"""The arithmetic an attack's forward and backward passes run in: fp32, or bf16 autocast.

bf16 autocast roughly doubles convolution throughput on GPU tensor cores. An attack applies it to the
surrogate's forward only (:class:`trigact.attacks.registry.TransferAttack`), whose logits come out as
fp32: inside the model the ops on autocast's lists (convolutions, matmuls) run in bf16; the attack's
own steps (``x + alpha * sign(g)``, the projection onto the eps ball, TI's smoothing, SSA's DCT) and
its loss stay fp32, and so does the input gradient, which arrives at the fp32 image. Whether success rates stay within
noise of fp32 is measured, not assumed: ``benchmarks/precision_cost.py``.
"""

from __future__ import annotations

import contextlib

import torch

from trigact.common.errors import TrigactError

FP32 = ("32", "fp32", "32-true")
BF16 = ("bf16", "bf16-mixed")


def parse_precision(value, what: str = "precision") -> str | None:
    """None for fp32 (``null``, ``32``, ``fp32``, ``32-true``), ``"bf16"`` for bf16 autocast."""
    if value is None or str(value) in FP32:
        return None
    if str(value) in BF16:
        return "bf16"
    raise TrigactError(f"{what}={value!r}: expected one of {', '.join(FP32 + BF16)} (or null: fp32)")


def autocast(device: torch.device, precision: str | None):
    """A bf16 autocast context on ``device``'s type for ``precision='bf16'``, else a no-op."""
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
