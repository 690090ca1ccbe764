"""ImageNet-style networks for 224x224 inputs: the libraries' own definitions, never pretrained.

``in_chans`` other than 3 replaces only the first conv's input channels (timm does this itself).
"""

from __future__ import annotations

import functools

import timm
from torch import nn
from torchvision import models as tvm

from trigact.models.registry import register_model
from trigact.models.surgery import replace_conv

# torchvision's nets halve the input five times: smaller inputs vanish before the head.
_register_tv = functools.partial(register_model, family="imagenet", min_image_size=32)


@_register_tv("tv_resnet18", feature_layer="backbone.layer3")
def tv_resnet18(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """torchvision's ResNet-18."""
    net = tvm.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = replace_conv(net.conv1, in_chans)
    return net


@_register_tv("tv_resnet50", feature_layer="backbone.layer3")
def tv_resnet50(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """torchvision's ResNet-50."""
    net = tvm.resnet50(weights=None, num_classes=num_classes)
    net.conv1 = replace_conv(net.conv1, in_chans)
    return net


# features.26 is the max-pool closing the 256-channel stage (FIA attacks VGG at conv3_3, that stage's end);
# the stage's last ReLU works in place, which the full backward hooks of NAA/FIA reject; the pool does not.
@_register_tv("tv_vgg19_bn", feature_layer="backbone.features.26")
def tv_vgg19_bn(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """torchvision's VGG-19 with batch norm."""
    net = tvm.vgg19_bn(weights=None, num_classes=num_classes)
    net.features[0] = replace_conv(net.features[0], in_chans)
    return net


@_register_tv("tv_mobilenet_v2", feature_layer="backbone.features.13")
def tv_mobilenet_v2(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """torchvision's MobileNetV2."""
    net = tvm.mobilenet_v2(weights=None, num_classes=num_classes)
    net.features[0][0] = replace_conv(net.features[0][0], in_chans)
    return net


@_register_tv("tv_densenet121", feature_layer="backbone.features.denseblock3")
def tv_densenet121(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """torchvision's DenseNet-121."""
    net = tvm.densenet121(weights=None, num_classes=num_classes)
    net.features.conv0 = replace_conv(net.features.conv0, in_chans, fan_mode="fan_in")
    return net


# features.9 is the last Inception-A block (TF's Mixed_5e): a mid-level layer, as FIA/NAA pick on
# Inception nets.
@register_model("inception_v4", family="imagenet", feature_layer="backbone.features.9", min_image_size=75)
def inception_v4(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """timm's Inception-v4 (299x299 in the literature; 75x75 is the smallest input it accepts)."""
    return timm.create_model("inception_v4", pretrained=False, num_classes=num_classes, in_chans=in_chans)
