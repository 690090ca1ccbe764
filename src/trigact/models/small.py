"""Small networks for digits (1x16x16) and Fashion-MNIST (1x28x28) that train fast on 2 CPU cores.

They serve as surrogates and victims of transfer experiments, so they are deliberately different:
a plain conv stack with batch norm, LeNet-5 (max-pooling, no batch norm), a residual net, and an MLP
without any convolution. The conv nets end in adaptive pooling, so any input size works.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models.resnet import BasicBlock

from trigact.models.registry import check_int, register_model


def _conv_bn_relu(in_chans: int, out_chans: int) -> nn.Sequential:
    conv = nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_chans), nn.ReLU())


def _head(features: int, num_classes: int) -> OrderedDict:
    """Global average pooling and a linear classifier, as named layers of a Sequential."""
    return OrderedDict(
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), head=nn.Linear(features, num_classes)
    )


@register_model("small_cnn", family="small", feature_layer="backbone.block2", min_image_size=4)
def small_cnn(num_classes: int, in_chans: int, image_size: int, width: int = 16) -> nn.Module:
    """Three conv-BN-ReLU blocks (width w, 2w, 4w; max-pool after the first two), average pool, linear."""
    check_int("width", width, 1, " (model 'small_cnn')")
    return nn.Sequential(
        OrderedDict(
            block1=nn.Sequential(_conv_bn_relu(in_chans, width), nn.MaxPool2d(2)),
            block2=nn.Sequential(_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2)),
            block3=_conv_bn_relu(2 * width, 4 * width),
            **_head(4 * width, num_classes),
        )
    )


@register_model("lenet", family="small", feature_layer="backbone.act2", min_image_size=10)
def lenet(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """LeNet-5: two 5x5 convs with ReLU and max-pooling, then three linear layers; no batch norm."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_chans, 6, 5, padding=2),
            act1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(6, 16, 5),
            act2=nn.ReLU(),
            # Adaptive so that 28x28 inputs get LeNet-5's 16x5x5 map exactly and other sizes fit the head.
            pool2=nn.AdaptiveMaxPool2d(5),
            flatten=nn.Flatten(),
            fc1=nn.Linear(16 * 5 * 5, 120),
            act3=nn.ReLU(),
            fc2=nn.Linear(120, 84),
            act4=nn.ReLU(),
            head=nn.Linear(84, num_classes),
        )
    )


def _downsampling_block(in_chans: int, out_chans: int) -> BasicBlock:
    """A stride-2 residual block whose shortcut is a 1x1 conv, as in ResNet."""
    conv = nn.Conv2d(in_chans, out_chans, 1, stride=2, bias=False)
    shortcut = nn.Sequential(conv, nn.BatchNorm2d(out_chans))
    return BasicBlock(in_chans, out_chans, stride=2, downsample=shortcut)


@register_model("tiny_resnet", family="small", feature_layer="backbone.layer2", min_image_size=4)
def tiny_resnet(num_classes: int, in_chans: int, image_size: int, width: int = 16) -> nn.Module:
    """A 3x3 stem, three residual basic blocks (width w, 2w, 4w; stride 1, 2, 2), average pool, linear."""
    check_int("width", width, 1, " (model 'tiny_resnet')")
    return nn.Sequential(
        OrderedDict(
            stem=_conv_bn_relu(in_chans, width),
            layer1=BasicBlock(width, width),
            layer2=_downsampling_block(width, 2 * width),
            layer3=_downsampling_block(2 * width, 4 * width),
            **_head(4 * width, num_classes),
        )
    )


@register_model("mlp", family="small", feature_layer="backbone.act1", min_image_size=1)
def mlp(num_classes: int, in_chans: int, image_size: int, hidden: int = 256) -> nn.Module:
    """Two hidden ReLU layers on the flattened image: no convolution. An input of another size (the
    resized copies of DI-FGSM, L2T, ...) is average-pooled to image_size first; at image_size that is the
    identity."""
    check_int("hidden", hidden, 1, " (model 'mlp')")
    return nn.Sequential(
        OrderedDict(
            resize=nn.AdaptiveAvgPool2d(image_size),
            flatten=nn.Flatten(),
            fc1=nn.Linear(in_chans * image_size * image_size, hidden),
            act1=nn.ReLU(),
            fc2=nn.Linear(hidden, hidden),
            act2=nn.ReLU(),
            head=nn.Linear(hidden, num_classes),
        )
    )
