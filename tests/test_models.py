"""Model registry: every entry builds, normalizes, rebuilds from its spec and exposes its feature layer."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from trigact.common.errors import TrigactError
from trigact.models import (
    FAMILIES,
    ClassifierNet,
    Normalize,
    build_model,
    feature_layer,
    list_models,
    model_info,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
NUM_CLASSES = 5
# Per CIFAR net: the module giving the last map before global pooling, and that map's size at 32x32.
# An ImageNet stem would leave 1x1 maps where kuangliu's nets have 4x4; VGG's five pools reach 1x1.
CIFAR_LAST_MAP = {
    "resnet18": ("backbone.layer4", 4),
    "resnet50": ("backbone.layer4", 4),
    "vgg19_bn": ("backbone.features", 1),
    "mobilenet_v2": ("backbone.features", 4),
    "densenet121": ("backbone.features", 4),
}


def _slow_if_imagenet(names: list[str]) -> list:
    """Building the big ImageNet nets twice (tv_vgg19_bn has 140M parameters) takes seconds each."""
    slow = pytest.mark.slow
    return [pytest.param(n, marks=slow) if model_info(n).family == "imagenet" else n for n in names]


def _batch(name: str) -> int:
    # ImageNet-style nets are slow on the CPU; with eval-mode batch norm one image is enough.
    return 1 if model_info(name).family == "imagenet" else 2


@functools.cache
def _net(name: str, in_chans: int = 3) -> ClassifierNet:
    """A net at its smallest input size, in eval mode, shared by tests that do not modify it."""
    torch.manual_seed(0)
    size = model_info(name).min_image_size
    return build_model(name, NUM_CLASSES, in_chans=in_chans, image_size=size).eval()


def _input(net: ClassifierNet, batch: int) -> torch.Tensor:
    spec = net.spec
    return torch.rand(batch, spec["in_chans"], spec["image_size"], spec["image_size"])


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_every_model_maps_a_batch_to_logits(name, in_chans):
    net = _net(name, in_chans)
    with torch.no_grad():
        logits = net(_input(net, _batch(name)))
    assert logits.shape == (_batch(name), NUM_CLASSES)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list_models("cifar"))
def test_cifar_nets_keep_kuangliu_map_sizes_at_32x32(name):
    path, size = CIFAR_LAST_MAP[name]
    net = build_model(name, NUM_CLASSES, image_size=32).eval()
    shapes = []
    net.get_submodule(path).register_forward_hook(lambda m, i, o: shapes.append(o.shape[-2:]))
    with torch.no_grad():
        assert net(torch.rand(1, 3, 32, 32)).shape == (1, NUM_CLASSES)
    assert shapes == [(size, size)]


@pytest.mark.parametrize("name", list_models("small"))
def test_small_models_fit_digits_and_fashion_mnist(name):
    for size in (16, 28):
        net = build_model(name, 10, in_chans=1, image_size=size)
        assert net(torch.rand(2, 1, size, size)).shape == (2, 10)
        # Input-diversity attacks (DI-FGSM, L2T, ...) feed resized copies: every small model takes them.
        assert net(torch.rand(2, 1, size + 3, size + 3)).shape == (2, 10)


def test_the_mlps_resize_is_the_identity_at_its_own_size():
    net = build_model("mlp", 10, in_chans=1, image_size=16)
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(net.backbone.resize(x), x)


def test_normalize_is_per_channel_standardization():
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    norm = Normalize(mean, std, in_chans=3)
    assert norm.mean.shape == norm.std.shape == (3, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    assert torch.equal(Normalize()(x), x)


def test_net_applies_its_normalization_first():
    mean, std = [0.5], [0.25]
    torch.manual_seed(0)
    plain = build_model("small_cnn", 10, in_chans=1, image_size=16).eval()
    torch.manual_seed(0)
    normalized = build_model("small_cnn", 10, in_chans=1, image_size=16, mean=mean, std=std).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(normalized.normalize(x), (x - 0.5) / 0.25)
        torch.testing.assert_close(normalized(x), plain((x - 0.5) / 0.25))
        assert not torch.allclose(normalized(x), plain(x))
    assert {"normalize.mean", "normalize.std"} <= set(normalized.state_dict())


@pytest.mark.parametrize(
    "mean, std, in_chans",
    [
        ([0.5, 0.5, 0.5], [0.2, 0.2, 0.2], 1),  # one value per channel, not per RGB
        ([0.5], [0.2, 0.2], 1),
        ([0.5], None, 1),
        ([0.5], [0.0], 1),
        ("0.5", [0.2], 1),
    ],
)
def test_bad_normalization_stats_fail_in_one_line(mean, std, in_chans):
    with pytest.raises(TrigactError) as excinfo:
        build_model("small_cnn", 10, in_chans=in_chans, image_size=16, mean=mean, std=std)
    _one_line_error(excinfo)
    with pytest.raises(TrigactError):
        Normalize(mean, std, in_chans=in_chans)


@pytest.mark.parametrize("name", _slow_if_imagenet(list_models()))
def test_rebuild_from_spec_gives_the_same_net(name):
    net = _net(name)
    rebuilt = build_model(**net.spec).eval()
    original, copy = net.state_dict(), rebuilt.state_dict()
    assert {k: v.shape for k, v in original.items()} == {k: v.shape for k, v in copy.items()}
    rebuilt.load_state_dict(original)
    x = _input(net, _batch(name))
    with torch.no_grad():
        assert torch.equal(net(x), rebuilt(x))


def test_spec_is_plain_data_and_keeps_kwargs():
    net = build_model("small_cnn", 10, in_chans=1, image_size=28, mean=(0.2860,), std=(0.3530,), width=8)
    spec = net.spec
    assert spec == dict(
        name="small_cnn", num_classes=10, in_chans=1, image_size=28, mean=[0.286], std=[0.353], width=8
    )
    # Bundles store the spec beside the weights and load it with weights_only=True.
    buffer = io.BytesIO()
    torch.save(spec, buffer)
    buffer.seek(0)
    rebuilt = build_model(**torch.load(buffer, weights_only=True))
    assert rebuilt.backbone.head.in_features == 4 * 8
    spec["width"] = 99
    assert net.spec["width"] == 8


@pytest.mark.parametrize("name", list_models())
def test_default_feature_layer_fires_forward_and_backward_hooks(name):
    """NAA/FIA register a forward and a full backward hook on this layer (torchattack resolves it by path)."""
    net = _net(name)
    path = model_info(name).feature_layer
    assert path.startswith("backbone.") and feature_layer(name) == feature_layer(net) == path
    seen = []
    layer = net.get_submodule(path)
    hooks = [
        layer.register_forward_hook(lambda m, i, o: seen.append("forward")),
        layer.register_full_backward_hook(lambda m, gi, go: seen.append("backward")),
    ]
    try:
        net(_input(net, _batch(name)).requires_grad_()).sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
        net.zero_grad(set_to_none=True)
    assert seen == ["forward", "backward"]


def test_feature_layer_of_a_wrapped_net_is_prefixed():
    net = build_model("lenet", 10, in_chans=1, image_size=16)
    deployed = nn.Sequential(nn.Identity(), net)  # e.g. a trigger in front of the classifier
    path = feature_layer(deployed)
    assert path == "1.backbone.act2"
    assert deployed.get_submodule(path) is net.backbone.act2
    with pytest.raises(TrigactError) as excinfo:
        feature_layer(nn.Linear(2, 2))
    _one_line_error(excinfo)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(TrigactError) as excinfo:
        build_model("resnet19", 10)
    message = _one_line_error(excinfo)
    assert "'resnet19'" in message and all(name in message for name in list_models())
    with pytest.raises(TrigactError):
        model_info("resnet19")
    with pytest.raises(TrigactError):
        feature_layer("resnet19")


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (dict(num_classes=1), "num_classes=1"),
        (dict(num_classes=True), "num_classes=True"),
        (dict(in_chans=0), "in_chans=0"),
        (dict(image_size=16), "image_size=16"),  # five max-pools need 32x32
        (dict(image_size=32.0), "image_size=32.0"),
        (dict(depth=4), "depth"),
    ],
)
def test_bad_arguments_fail_in_one_line(bad, fragment):
    args = dict(name="vgg19_bn", num_classes=10) | bad
    with pytest.raises(TrigactError) as excinfo:
        build_model(**args)
    assert fragment in _one_line_error(excinfo)


def test_bad_model_kwarg_values_fail_in_one_line():
    with pytest.raises(TrigactError) as excinfo:
        build_model("small_cnn", 10, width=0)
    assert "width=0" in _one_line_error(excinfo)


def test_metadata_cards():
    names = list_models()
    assert names == sorted(names)
    assert sorted(sum((list_models(family) for family in FAMILIES), [])) == names
    assert len(list_models("small")) >= 3
    for name in names:
        info = model_info(name)
        assert info.name == name and info.family in FAMILIES
        assert info.description and "\n" not in info.description
    with pytest.raises(TrigactError):
        list_models("vit")


def test_model_configs_match_the_registry():
    configs = {path.stem: yaml.safe_load(path.read_text()) for path in CONF_DIR.glob("*.yaml")}
    assert sorted(configs) == list_models()
    for stem, config in configs.items():
        assert config == {"name": stem, "kwargs": {}, "compile": False}


def test_a_deployed_unit_takes_resized_inputs_with_its_trigger_resampled():
    """DI-FGSM and friends resize the input of a trigger-activation surrogate (L2): the trigger follows
    the input's size (nearest: +-eps_t stay +-eps_t); at the trained size the unit is unchanged."""
    from trigact.models.deployed import DeployedModel

    torch.manual_seed(0)
    net = build_model("small_cnn", 10, in_chans=1, image_size=16).eval()
    tau = torch.sign(torch.randn(1, 16, 16)) * 32 / 255
    unit = DeployedModel(net, tau).eval()
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(unit(x), net((x + tau).clamp(0, 1)))
    big = torch.rand(2, 1, 19, 19)
    resized = torch.nn.functional.interpolate(tau.unsqueeze(0), size=(19, 19), mode="nearest")
    assert torch.equal(unit(big), net((big + resized).clamp(0, 1)))
    assert set(resized.unique().tolist()) == set(tau.unique().tolist())
