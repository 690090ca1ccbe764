"""CIFAR-style networks for 32x32 inputs, made by editing torchvision's definitions.

ImageNet stems (a 7x7 stride-2 conv and a max-pool, or a stride-2 first conv) shrink 32x32 images to
8x8 before the first stage. The CIFAR literature (kuangliu/pytorch-cifar, which the paper's codebases
use) swaps them for a 3x3 stride-1 conv without pooling, so the last stage sees 4x4 maps. We make the
same edits on torchvision's modules instead of re-implementing the nets. ``in_chans`` only changes
the first conv's input channels.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision import models as tvm
from torchvision.models.vgg import cfgs as vgg_cfgs
from torchvision.models.vgg import make_layers as vgg_layers

from trigact.models.registry import register_model
from trigact.models.surgery import replace_conv


def _cifar_resnet(constructor, num_classes: int, in_chans: int) -> nn.Module:
    net = constructor(weights=None, num_classes=num_classes)
    # kuangliu's ResNet: 3x3 stride-1 stem and no max-pool; its final avg_pool2d(4) equals
    # torchvision's adaptive average pooling on the 4x4 map.
    net.conv1 = replace_conv(net.conv1, in_chans, kernel_size=3, stride=1, padding=1)
    net.maxpool = nn.Identity()
    return net


@register_model("resnet18", family="cifar", feature_layer="backbone.layer3", min_image_size=8)
def resnet18(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool (kuangliu/pytorch-cifar)."""
    return _cifar_resnet(tvm.resnet18, num_classes, in_chans)


@register_model("resnet50", family="cifar", feature_layer="backbone.layer3", min_image_size=8)
def resnet50(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """ResNet-50 with a 3x3 stride-1 stem and no max-pool (kuangliu/pytorch-cifar)."""
    return _cifar_resnet(tvm.resnet50, num_classes, in_chans)


# features.26 is the max-pool closing the 256-channel stage (FIA attacks VGG at conv3_3, that stage's end);
# the stage's last ReLU works in place, which the full backward hooks of NAA/FIA reject; the pool does not.
@register_model("vgg19_bn", family="cifar", feature_layer="backbone.features.26", min_image_size=32)
def vgg19_bn(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """VGG-19 with batch norm: torchvision's conv stack and one linear layer on the 512-d features."""
    # torchvision's conv stack alone, without building ImageNet's 120M-parameter head only to drop it.
    # Its convs keep PyTorch's default init, as in kuangliu's VGG, so the new first conv does too.
    features = vgg_layers(vgg_cfgs["E"], batch_norm=True)
    features[0] = replace_conv(features[0], in_chans, fan_mode=None)
    # Five max-pools take 32x32 to 1x1x512, where kuangliu's VGG has a single Linear(512, classes)
    # instead of ImageNet's 4096-wide MLP over a 7x7 map. Global average pooling is the identity there
    # and lets larger inputs through.
    return nn.Sequential(
        OrderedDict(
            features=features,
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            classifier=nn.Linear(512, num_classes),
        )
    )


@register_model("mobilenet_v2", family="cifar", feature_layer="backbone.features.13", min_image_size=8)
def mobilenet_v2(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """MobileNetV2 with stride 1 in the first conv and first 24-channel block (kuangliu/pytorch-cifar)."""
    net = tvm.mobilenet_v2(weights=None, num_classes=num_classes)
    net.features[0][0] = replace_conv(net.features[0][0], in_chans, stride=1)
    # kuangliu's cfg (6, 24, 2, 1): the first 24-channel block keeps stride 1 on CIFAR, where ImageNet
    # uses 2. Its stride lives in the depthwise 3x3 conv; 16 -> 24 channels means no residual either way.
    block = net.features[2]
    block.conv[1][0].stride = (1, 1)
    block.stride = 1
    return net


@register_model(
    "densenet121", family="cifar", feature_layer="backbone.features.denseblock3", min_image_size=8
)
def densenet121(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """DenseNet-121 with a 3x3 stride-1 conv0 and no pool0 (kuangliu/pytorch-cifar)."""
    net = tvm.densenet121(weights=None, num_classes=num_classes)
    # torchvision initializes DenseNet convs with fan_in kaiming, unlike its other nets.
    net.features.conv0 = replace_conv(
        net.features.conv0, in_chans, fan_mode="fan_in", kernel_size=3, stride=1, padding=1
    )
    net.features.pool0 = nn.Identity()
    return net
