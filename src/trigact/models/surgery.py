"""Editing the first convolution of a library network (input channels, CIFAR stems)."""

from __future__ import annotations

from torch import nn


def replace_conv(conv: nn.Conv2d, in_chans: int, fan_mode: str | None = "fan_out", **changes) -> nn.Conv2d:
    """A Conv2d like ``conv`` but reading ``in_chans`` channels, with ``changes`` (kernel_size, stride, ...).

    Returns ``conv`` itself when nothing changes. The new conv is initialized like its neighbours:
    kaiming-normal with ``fan_mode`` as torchvision does for that net, or PyTorch's default when None.
    """
    if in_chans == conv.in_channels and not changes:
        return conv
    args = dict(
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    args.update(changes)
    new = nn.Conv2d(in_chans, **args)
    if fan_mode is not None:
        nn.init.kaiming_normal_(new.weight, mode=fan_mode, nonlinearity="relu")
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    return new
