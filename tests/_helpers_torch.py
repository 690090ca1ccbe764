"""Test helpers shared by several test modules: one intra-op thread, and a quickly trained digits net."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trigact.models import build_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for a module (import this fixture into it): small convolutions and a ViT's
    small matmuls run several times faster on one thread than on two busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_digits_net(dm, name: str, epochs: int) -> nn.Module:
    """``name`` trained with Adam (lr 3e-3, batch 64, seed 0) for ``epochs`` on a digits datamodule."""
    torch.manual_seed(0)
    net = build_model(name, num_classes=10, in_chans=1, image_size=16, mean=dm.mean, std=dm.std)
    x, y = dm.train_set.tensors
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()
