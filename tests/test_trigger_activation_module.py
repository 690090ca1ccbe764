"""Trigger activation's training loss: which half of the doubled batch gets which term.

The module runs ``f(cat(x, x + tau))`` once and splits the logits: cross-entropy must apply to the
TRIGGERED half (z_pos, the deployed unit has to be right) and KL-to-uniform to the CLEAN half (z_neg,
the bare network has to guess). A net whose logits are known for each image, clean or triggered, pins
both, against CE and KL computed by hand.
"""

import functools
import math

import pytest
import torch
from torch import nn

from trigact.methods import TriggerActivationModule
from trigact.triggers import Trigger

NUM_CLASSES = 3
# Image i (its id in pixel 0) has these logits clean and these with the trigger.
CLEAN_LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.5], [1.0, 1.0, -2.0]])
TRIGGERED_LOGITS = torch.tensor([[0.5, -1.0, 1.5], [-0.5, 0.0, 2.0], [4.0, 0.0, 1.0]])
LABELS = torch.tensor([2, 0, 0])
TAU = torch.tensor([[[0.0, 0.5]]])  # pixel 0 (the id) untouched, pixel 1 marks "triggered"


class TwoFacedNet(nn.Module):
    """Logits looked up by image id (pixel 0, as id/10) and by whether pixel 1 carries the trigger."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # something for the optimizer to own

    def forward(self, x):
        ids = (x[:, 0, 0, 0] * 10).round().long()
        triggered = (x[:, 0, 0, 1] > 0.5)[:, None]
        return self.scale * torch.where(triggered, TRIGGERED_LOGITS[ids], CLEAN_LOGITS[ids])


def batch():
    x = torch.zeros(len(LABELS), 1, 1, 2)
    x[:, 0, 0, 0] = torch.arange(len(LABELS)) / 10
    x[:, 0, 0, 1] = 0.25  # clean; + tau gives 0.75
    return x, LABELS


def cross_entropy(logits, labels):
    """By hand: mean over images of log(sum_c exp z_c) - z_y."""
    rows = [math.log(sum(math.exp(v) for v in z)) - z[y] for z, y in zip(logits.tolist(), labels.tolist())]
    return sum(rows) / len(rows)


def kl_to_uniform(logits, direction):
    """By hand: KL(U || p) or KL(p || U) per image, averaged."""
    total = 0.0
    for z in logits.tolist():
        norm = sum(math.exp(v) for v in z)
        p = [math.exp(v) / norm for v in z]
        u = 1 / len(z)
        if direction == "uniform_to_pred":
            total += sum(u * (math.log(u) - math.log(pc)) for pc in p)
        else:
            total += sum(pc * (math.log(pc) - math.log(u)) for pc in p)
    return total / len(logits)


def training_loss(net, kl_weight, kl_direction):
    module = TriggerActivationModule(
        net,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        num_classes=NUM_CLASSES,
        trigger=Trigger(TAU, kind="fixed"),
        kl_weight=kl_weight,
        kl_direction=kl_direction,
    )
    return module.training_step(batch(), 0).item()


@pytest.mark.parametrize("kl_direction", ["uniform_to_pred", "pred_to_uniform"])
def test_ce_on_the_triggered_half_and_kl_on_the_clean_half(kl_direction):
    w = 0.7
    expected = cross_entropy(TRIGGERED_LOGITS, LABELS) + w * kl_to_uniform(CLEAN_LOGITS, kl_direction)
    swapped = cross_entropy(CLEAN_LOGITS, LABELS) + w * kl_to_uniform(TRIGGERED_LOGITS, kl_direction)
    assert abs(expected - swapped) > 0.5  # the data tell the two halves apart

    assert training_loss(TwoFacedNet(), w, kl_direction) == pytest.approx(expected, rel=1e-6)


class HalvesSwapped(nn.Module):
    """What the module would compute if it split its doubled batch the other way round."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        clean, triggered = x.chunk(2)
        return self.net(torch.cat([triggered, clean]))


def test_swapping_the_halves_fails_the_check():
    w = 0.7
    expected = cross_entropy(TRIGGERED_LOGITS, LABELS) + w * kl_to_uniform(CLEAN_LOGITS, "uniform_to_pred")
    loss = training_loss(HalvesSwapped(TwoFacedNet()), w, "uniform_to_pred")
    assert loss != pytest.approx(expected, rel=1e-3)
