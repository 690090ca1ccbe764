"""``nrp``: the Neural Representation Purifier (Naseer et al., CVPR 2020, "A Self-supervised Approach
for Adversarial Robustness").

A generator trained (with self-supervised perturbations) to map an adversarial image back to a clean
one; it runs in front of the victim. Both generators of the official code (``networks.py``) are here,
with the official module names so released state dicts load unchanged:

- ``arch: nrp``: ``NRP(in_nc, out_nc, nf, nb, gc)``: ``conv_first`` (no activation), ``RRDB_trunk`` of
  ``nb`` residual-in-residual dense blocks (3 five-conv dense blocks each, growth ``gc``, LeakyReLU 0.2,
  residual scale 0.2), ``trunk_conv`` to 3 channels. The official class ignores ``out_nc``: its last
  conv always has 3 outputs, and so does ours.
- ``arch: nrp_resg``: ``NRP_resG``: ``conv_first`` + LeakyReLU 0.1, ``recon_trunk`` of ``nb`` residual
  blocks without batch norm (conv-ReLU-conv + identity), ``conv_last``.

The released purifiers are built as ``NRP(3, 3, 64, 23)`` and ``NRP_resG(3, 3, 64, 23)`` (the
official ``purify.py``); those are the defaults. The output is clamped to [0, 1] (the official network
does not clamp; its saving step does). Grayscale inputs are repeated to 3 channels and the output
averaged back. ``dynamic: true`` is the official "dynamic inference" against white-box attackers: add
N(0, 0.05^2) noise projected to 16/255 before purifying.

**Accuracy not verified here**: pretrained NRP weights cannot be downloaded on this machine, so only
the architecture, shapes and weight loading are tested; pass the official ``.pth`` files as
``weights=``. The network is differentiable (the official BPDA-free bypass attacks use that).
"""

from __future__ import annotations

import torch
from torch import nn

from trigact.defenses.base import (
    SeededDefense,
    check_choice,
    check_images,
    check_int,
    from_net_channels,
    load_into,
    load_state_dict_file,
    to_net_channels,
    weights_given,
)
from trigact.defenses.registry import register_defense

ARCHS = ("nrp", "nrp_resg")

# Official dynamic inference: Gaussian noise of std 0.05, projected to the L_inf ball of 16/255.
DYNAMIC_NOISE_STD = 0.05
DYNAMIC_EPS = 16 / 255


class ResidualDenseBlock5C(nn.Module):
    """Five 3x3 convs, each seeing all earlier features (growth ``gc``); output scaled 0.2 plus input."""

    def __init__(self, nf: int = 64, gc: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, scaled 0.2 plus input."""

    def __init__(self, nf: int, gc: int = 32):
        super().__init__()
        self.RDB1 = ResidualDenseBlock5C(nf, gc)
        self.RDB2 = ResidualDenseBlock5C(nf, gc)
        self.RDB3 = ResidualDenseBlock5C(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


class ResidualBlockNoBN(nn.Module):
    """conv-ReLU-conv plus identity, no batch norm; convs start at 0.1 x Kaiming, as in the official code."""

    def __init__(self, nf: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
            conv.weight.data *= 0.1
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x)))


class NRPGenerator(nn.Module):
    """The official ``NRP``: conv_first -> RRDB_trunk (nb RRDBs) -> trunk_conv (3 channels)."""

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 23, gc: int = 32):
        super().__init__()
        del out_nc  # kept for the official signature; its last conv always has 3 outputs
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk_conv(self.RRDB_trunk(self.conv_first(x)))


class NRPResGenerator(nn.Module):
    """The official ``NRP_resG``: conv_first + LeakyReLU(0.1) -> recon_trunk (nb res blocks) -> conv_last."""

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 23):
        super().__init__()
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1)
        self.recon_trunk = nn.Sequential(*[ResidualBlockNoBN(nf) for _ in range(nb)])
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.1, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_last(self.recon_trunk(self.lrelu(self.conv_first(x))))


@register_defense("nrp")
class NRPPurifier(SeededDefense):
    """NRP purifier (Naseer et al. 2020); needs weights= (official .pth), RRDB or ResNet generator."""

    def __init__(
        self,
        weights: str | None = None,
        arch: str = "nrp",
        nf: int = 64,
        nb: int = 23,
        gc: int = 32,
        in_chans: int = 3,
        dynamic: bool = False,
        seed: int = 0,
        allow_random_init: bool = False,
    ):
        check_choice("nrp", "arch", arch, ARCHS)
        check_int("nrp", "nf", nf, 1)
        check_int("nrp", "nb", nb, 1)
        check_int("nrp", "gc", gc, 1)
        check_int("nrp", "in_chans", in_chans, 1)
        if not isinstance(dynamic, bool):
            # A quoted command-line override arrives as a string; "false" must not count as true.
            dynamic = check_choice("nrp", "dynamic", dynamic, ("true", "false")) == "true"
        has_weights = weights_given("nrp", weights, allow_random_init, "path to NRP.pth or NRP_resG.pth")
        super().__init__(
            seed=seed, weights=None if not has_weights else str(weights), arch=arch, nf=nf, nb=nb,
            gc=gc, in_chans=in_chans, dynamic=dynamic, allow_random_init=allow_random_init,
        )
        if arch == "nrp":
            self.net = NRPGenerator(in_chans, 3, nf, nb, gc)
        else:
            self.net = NRPResGenerator(in_chans, in_chans, nf, nb)
        if has_weights:
            load_into("nrp", self.net, load_state_dict_file("nrp", weights), weights)
        self.in_chans = in_chans
        self.dynamic = dynamic
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images("nrp", x)
        z = x
        if self.dynamic:
            z = x + self.randn(x) * DYNAMIC_NOISE_STD
            z = torch.min(torch.max(z, x - DYNAMIC_EPS), x + DYNAMIC_EPS).clamp(0.0, 1.0)
        out = self.net(to_net_channels("nrp", z, self.in_chans))
        return from_net_channels(out, x.shape[1]).clamp(0.0, 1.0)
