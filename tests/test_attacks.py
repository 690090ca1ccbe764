"""Attack registry: budgets, white-box strength, the L2T CPU fix, RPA masking/weighting, configs."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from trigact.attacks import (
    DEFAULT_EPS,
    DEFAULT_STEPS,
    FAMILIES,
    AttackSpec,
    aggregate_gradient,
    attack_info,
    build_attack,
    expand_patches,
    list_attacks,
    random_patch_mask,
)
from trigact.common.validate import parse_eps
from trigact.common.errors import TrigactError
from trigact.models import build_model
from _helpers_torch import train_digits_net  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "attack"
EPS = 8 / 255
# Cheap settings for the ensemble-heavy attacks (the pinned paper values are tested in the configs),
# attacks that cannot run on the tiny CNN here (name -> why; each has its own test of that), and the
# strength tests' steps, one settings file per attack family so that they are edited apart.
from _attack_settings_common import SMALL as _SMALL_COMMON, STEPS as _STEPS_COMMON, UNAVAILABLE as _UN_COMMON  # noqa: E402
from _attack_settings_feature import SMALL as _SMALL_FEATURE, STEPS as _STEPS_FEATURE, UNAVAILABLE as _UN_FEATURE  # noqa: E402

SMALL = {
    "naa": {"num_ens": 4},
    "fia": {"num_ens": 4},
    "rpa": {"num_ens": 8, "ens_batch": 4},
    "bsr": {"num_scale": 4},
    "gra": {"num_neighbors": 4},
    "l2t": {"num_scale": 2},
    **_SMALL_COMMON,
    **_SMALL_FEATURE,
}
UNAVAILABLE = {"diff_pgd": "needs a pretrained diffusion model", **_UN_COMMON, **_UN_FEATURE}


@pytest.fixture(scope="module")
def digits_batch():
    from trigact.data import DigitsDataModule

    dm = DigitsDataModule(image_size=16)
    dm.setup()
    x, y = dm.test_set.tensors
    return dm, x[:8], y[:8]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(
        "small_cnn", num_classes=10, in_chans=1, image_size=16, mean=[0.3], std=[0.3]
    ).eval()


RUNNABLE = sorted(set(list_attacks()) - set(UNAVAILABLE))


def raw_attack_output(attack, x, y):
    """``attack(x, y)`` and what its implementation returned before TransferAttack's projection.

    The wrapper projects every output into the eps-ball and [0, 1]; a budget check on its output alone
    would pass an attack that ignores its budget.
    """
    seen = []
    impl = attack.impl

    def recording(*args):
        seen.append(impl(*args).detach().clone())
        return seen[-1]

    attack.impl = recording
    try:
        x_adv = attack(x, y)
    finally:
        attack.impl = impl
    assert len(seen) == 1
    return x_adv, seen[0]


def assert_within_budget(x_adv, x, eps, atol=1e-6):
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max().item() <= eps + atol, "outside the eps-ball"
    assert x_adv.min().item() >= -atol and x_adv.max().item() <= 1 + atol, "outside [0, 1]"


@pytest.mark.parametrize("name", RUNNABLE)
def test_attack_respects_budget_and_box(name, tiny_model, digits_batch):
    _, x, y = digits_batch
    torch.manual_seed(0)
    # Steps of a whole eps: three of them leave the ball unless the attack projects back into it.
    whole_steps = {"alpha": "8/255"} if "alpha" in attack_info(name).params else {}
    attack = build_attack(name, tiny_model, eps="8/255", steps=3, **whole_steps, **SMALL.get(name, {}))
    x_adv, raw = raw_attack_output(attack, x, y)
    assert_within_budget(raw, x, EPS)  # the attack's own output, not just our projection of it
    assert_within_budget(x_adv, x, EPS)
    assert (x_adv - x).abs().max() > 0, "the attack did not change the input"
    assert not tiny_model.training


def test_budget_check_catches_an_attack_that_ignores_its_budget(tiny_model, digits_batch):
    from torchattack.attack import Attack, register_attack

    @register_attack("TrigactTestOvershoot")
    class Overshoot(Attack):
        """Steps 3 eps away and out of the pixel box: the wrapper's projection hides both."""

        def __init__(self, model, normalize=None, device=None, eps=8 / 255):
            super().__init__(model, normalize, device)
            self.eps = eps

        def forward(self, x, y):
            return x + 3 * self.eps * torch.randn_like(x).sign()

    spec = AttackSpec.from_mapping({"name": "overshoot", "attack": "TrigactTestOvershoot", "family": "gradient",
                                    "paper": "a deliberately broken attack"})
    _, x, y = digits_batch
    x_adv, raw = raw_attack_output(build_attack(spec, tiny_model, eps="8/255"), x, y)
    assert_within_budget(x_adv, x, EPS)  # the projected output looks fine ...
    with pytest.raises(AssertionError, match="eps-ball"):
        assert_within_budget(raw, x, EPS)  # ... the raw output does not
    with pytest.raises(AssertionError, match=r"\[0, 1\]"):
        assert_within_budget(torch.min(torch.max(raw, x - EPS), x + EPS), x, EPS)


def test_attack_works_under_no_grad_and_leaves_model_untouched(
    tiny_model, digits_batch
):
    _, x, y = digits_batch
    tiny_model.train()
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with torch.no_grad():
        x_adv = build_attack("mifgsm", tiny_model, steps=2)(x, y)
    assert tiny_model.training, "the model's mode must be restored"
    tiny_model.eval()
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in state.items()), (
        "BN stats changed"
    )
    assert all(p.requires_grad and p.grad is None for p in tiny_model.parameters())
    assert (x_adv - x).abs().max() > 0


def _other_value(key, value):
    """A valid value different from ``value``, to check that an override reaches the attack."""
    if key == "alpha":
        return 1 / 255
    if key == "feature_layer":
        return "backbone.block1"
    if key == "fill":
        return "zero"
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    if isinstance(value, (tuple, list)):
        return value[:1]
    raise AssertionError(f"no other value for {key}={value!r}")


def _impl_setting(attack, key):
    # Feature-level implementations name the layer as their config's layer_arg says (feature_layer_cfg).
    value = getattr(attack.impl, attack.spec.layer_arg if key == "feature_layer" else key)
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", RUNNABLE)
def test_pinned_hyperparameters_reach_the_implementation(name, tiny_model):
    """Every pinned hyperparameter, and every override of one, is what the attack object runs with:
    a factory that dropped one would silently run the library's default instead."""
    pinned = build_attack(name, tiny_model, eps="4/255", steps=5)
    steps = attack_info(name).steps or 5  # a one-step method (FGSM) keeps its own
    assert pinned.impl.eps == pytest.approx(4 / 255) and pinned.steps == steps
    assert getattr(pinned.impl, "steps", steps) == steps
    for key, value in pinned.params.items():
        assert _impl_setting(pinned, key) == value, key
    for key in attack_info(name).params:
        other = _other_value(key, pinned.params[key])
        overridden = build_attack(name, tiny_model, eps="4/255", steps=5, **{key: other})
        assert _impl_setting(overridden, key) == other != _impl_setting(pinned, key), key


def test_defaults_and_step_size_reach_the_implementation(tiny_model):
    attack = build_attack("ifgsm", tiny_model)
    assert (attack.impl.eps, attack.impl.steps) == (DEFAULT_EPS, DEFAULT_STEPS)
    assert attack.impl.device == torch.device("cpu")
    assert attack.impl.alpha == pytest.approx(DEFAULT_EPS / DEFAULT_STEPS)
    # alpha None means eps / steps for whatever eps and steps are given, not just the defaults.
    assert build_attack("ifgsm", tiny_model, eps="6/255", steps=4).impl.alpha == pytest.approx(6 / 255 / 4)
    assert build_attack("ifgsm", tiny_model, steps=4, alpha="1/255").impl.alpha == pytest.approx(1 / 255)


def test_feature_layer_default_and_override(tiny_model):
    from trigact.models.deployed import DeployedModel

    deployed = DeployedModel(tiny_model, torch.zeros(1, 16, 16))
    assert (
        build_attack("rpa", deployed, steps=1).params["feature_layer"]
        == "net.backbone.block2"
    )
    assert (
        build_attack("naa", tiny_model, feature_layer="backbone.block1").params[
            "feature_layer"
        ]
        == "backbone.block1"
    )
    with pytest.raises(TrigactError, match="no_such_layer"):
        build_attack("fia", tiny_model, feature_layer="no_such_layer")


def _train_small_cnn(dm, epochs=6):
    return train_digits_net(dm, "small_cnn", epochs)


@pytest.fixture(scope="module")
def trained_cnn(digits_batch):
    """small_cnn trained for 6 epochs on 16x16 digits (a few seconds), shared by the strength tests."""
    return _train_small_cnn(digits_batch[0])


def test_white_box_pgd_breaks_a_trained_model(digits_batch, trained_cnn):
    dm, net = digits_batch[0], trained_cnn
    x, y = dm.test_set.tensors
    with torch.no_grad():
        clean = (net(x).argmax(1) == y).float().mean().item()
    torch.manual_seed(0)
    x_adv = build_attack("pgd", net, eps="8/255", steps=10)(x, y)
    with torch.no_grad():
        robust = (net(x_adv).argmax(1) == y).float().mean().item()
    # Measured (seed 0, 6 epochs, all 360 test images): clean 0.978, PGD-10 at 8/255 0.52-0.53 over
    # three attack seeds (digits are upsampled 8x8 images: 8/255 is a small budget for them). The
    # 0.3 margin leaves ~0.15 of slack and still fails if the attack stepped the wrong way.
    assert clean > 0.8
    assert robust < clean - 0.3, (clean, robust)


# Strength of every attack: on a trained surrogate, the attack must lower accuracy clearly more than
# random noise of the same budget. 32/255 and a few steps keep it to about a second per attack on
# 2 cores (digits are smooth, upsampled 8x8 images: at 8/255 even PGD moves them little).
STRENGTH_EPS = 32 / 255
# L2T's ops stack up to 100 copies per sample; BSR is the weakest
STRENGTH_STEPS = {"l2t": 3, "bsr": 20, **_STEPS_COMMON, **_STEPS_FEATURE}
STRENGTH_IMAGES = 64
# Measured on these 64 images (1 and 2 threads): clean 1.0, sign noise 0.93; BSR 0.48-0.59 over six
# seeds (the weakest), GRA 0.14-0.17, every other attack <= 0.06. With every step flipped, every
# attack leaves accuracy at 1.0.
STRENGTH_MARGIN = 0.2


class _FlipInputGradient(torch.autograd.Function):
    """Identity forward, negated gradient backward: every attack step then goes the wrong way."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def _accuracy(net, x, y):
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def strength_setup(digits_batch, trained_cnn):
    """(images, labels, accuracy under random-sign noise of the same budget, averaged over 3 draws)."""
    dm, net = digits_batch[0], trained_cnn
    x, y = (t[:STRENGTH_IMAGES] for t in dm.test_set.tensors)
    gen = torch.Generator().manual_seed(0)
    noisy = [
        (x + STRENGTH_EPS * (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1)).clamp(0, 1)
        for _ in range(3)
    ]
    return x, y, sum(_accuracy(net, n, y) for n in noisy) / len(noisy)


def attack_accuracy(name, net, x, y, wrong_way=False):
    """Accuracy of ``net`` on ``name``'s white-box attack of (x, y); ``wrong_way`` flips every step."""
    hook = (
        net.register_forward_pre_hook(lambda module, args: (_FlipInputGradient.apply(args[0]),))
        if wrong_way
        else None
    )
    try:
        # BSR and L2T also draw from Python's and NumPy's generators.
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        attack = build_attack(
            name, net, eps=STRENGTH_EPS, steps=STRENGTH_STEPS.get(name, 5), **SMALL.get(name, {})
        )
        x_adv = attack(x, y)
    finally:
        if hook is not None:
            hook.remove()
    return _accuracy(net, x_adv, y)


@pytest.mark.parametrize("name", RUNNABLE)
def test_attack_beats_random_noise_of_the_same_budget(name, trained_cnn, strength_setup):
    x, y, noise_acc = strength_setup
    clean = _accuracy(trained_cnn, x, y)
    assert clean > 0.9 and noise_acc > 0.6, (clean, noise_acc)  # the baseline leaves room to beat
    acc = attack_accuracy(name, trained_cnn, x, y)
    assert acc < noise_acc - STRENGTH_MARGIN, (name, acc, noise_acc)


@pytest.mark.parametrize("name", RUNNABLE)
def test_strength_check_catches_a_sign_flip(name, trained_cnn, strength_setup):
    # The same attack stepping up the model's confidence instead of down must fail the check above.
    x, y, noise_acc = strength_setup
    acc = attack_accuracy(name, trained_cnn, x, y, wrong_way=True)
    assert acc >= noise_acc - STRENGTH_MARGIN, (name, acc, noise_acc)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the upstream bug only shows without CUDA"
)
def test_upstream_l2t_ssm_needs_cuda_and_ours_does_not():
    from torchattack.l2t import AUG_OPS, SSM

    from trigact.attacks.l2t import PORTABLE_AUG_OPS

    x = torch.rand(2, 1, 16, 16)
    index = next(i for i, op in enumerate(AUG_OPS) if isinstance(op, SSM))
    with pytest.raises((RuntimeError, AssertionError)):
        AUG_OPS[index](x)  # the root cause: .cuda() (and a 3x224x224 noise shape)
    for op in PORTABLE_AUG_OPS:  # every one of the 100 ops now runs on the CPU at 16x16
        out = op(x)
        assert out.shape[1:] == x.shape[1:] and out.shape[0] % x.shape[0] == 0


def test_l2t_block_shuffle_lengths_fit_small_images():
    from torchattack.l2t import BlockShuffle

    from trigact.attacks.l2t import NonNegativeBlockShuffle

    for num_block in (3, 12):
        shuffle = NonNegativeBlockShuffle(num_block, 1)
        assert isinstance(shuffle, BlockShuffle)
        for _ in range(200):
            lengths = shuffle.get_length(16)
            assert (
                len(lengths) == num_block and sum(lengths) == 16 and min(lengths) >= 0
            )


def test_l2t_runs_on_cpu(tiny_model, digits_batch):
    _, x, y = digits_batch
    torch.manual_seed(1)
    x_adv = build_attack("l2t", tiny_model, steps=2, num_scale=2)(x, y)
    assert x_adv.device.type == "cpu" and (x_adv - x).abs().max() <= EPS + 1e-6


def test_expand_patches_by_hand():
    grid = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    expected = torch.tensor(
        [[1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [3.0, 3.0, 4.0]]
    )  # 3x3 image, 2x2 patches
    assert torch.equal(expand_patches(grid, 2, 3, 3), expected)


def test_random_patch_mask_matches_hand_computation():
    shape, n, p = (2, 1, 5, 5), 3, 0.3
    mask = random_patch_mask(shape, n, p, generator=torch.Generator().manual_seed(7))
    # Redo the draws in the documented order: patch grid (2x2 patches of 3x3 cover 5x5), then pixels.
    gen = torch.Generator().manual_seed(7)
    modified = torch.rand(2, 1, 2, 2, generator=gen) < p
    values = torch.rand(shape, generator=gen)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                expect = values[b, 0, i, j] if modified[b, 0, i // 3, j // 3] else 1.0
                assert mask[b, 0, i, j] == expect
    zero = random_patch_mask(
        shape, n, p, fill="zero", generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(zero == 0, mask != 1)
    assert torch.equal(random_patch_mask(shape, 1, 0.0), torch.ones(shape))
    assert (random_patch_mask(shape, 1, 1.0) < 1).all()
    big = random_patch_mask(
        (4, 3, 64, 64), 1, p, generator=torch.Generator().manual_seed(0)
    )
    assert abs((big != 1).float().mean().item() - p) < 0.02


def test_aggregate_gradient_matches_hand_computation():
    # Feature layer = the two pixels; logits = pixels (identity head), so d p_0 / d z = p_0 (e_0 - p).
    model = nn.Sequential()
    model.add_module("feat", nn.Flatten())
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    model.add_module("head", head)
    x = torch.tensor([[[[math.log(3.0), 0.0]]]])  # (1, 1, 1, 2)
    y = torch.tensor([0])
    masks = torch.tensor(
        [[[[[1.0, 1.0]]]], [[[[0.0, 1.0]]]]]
    )  # two copies: kept, first pixel zeroed
    # copy 1: z = (ln 3, 0), p = (3/4, 1/4), grad = 3/4 * (1/4, -1/4) = (3/16, -3/16)
    # copy 2: z = (0, 0),    p = (1/2, 1/2), grad = 1/2 * (1/2, -1/2) = (1/4, -1/4)
    raw = aggregate_gradient(model, model.feat, x, y, [masks], unit_norm=False)
    assert torch.allclose(raw, torch.tensor([[7 / 16, -7 / 16]]))
    # Chunking the copies must not change the sum; unit_norm divides by the per-image L2 norm.
    unit = aggregate_gradient(model, model.feat, x, y, [masks[:1], masks[1:]])
    assert torch.allclose(unit, torch.tensor([[1.0, -1.0]]) / math.sqrt(2))


def test_unknown_attack_lists_known_names(tiny_model):
    with pytest.raises(TrigactError) as err:
        build_attack("nope", tiny_model)
    message = str(err.value)
    assert "\n" not in message and "nope" in message
    assert all(name in message for name in list_attacks())


def test_bad_parameters_fail_clearly(tiny_model):
    with pytest.raises(TrigactError, match="allowed: alpha, random_start"):
        build_attack("pgd", tiny_model, decay=1.0)
    with pytest.raises(TrigactError, match="eps"):
        build_attack("pgd", tiny_model, eps="-8/255")


def test_diff_pgd_says_it_needs_a_diffusion_model(tiny_model):
    assert "diff_pgd" in list_attacks()
    with pytest.raises(TrigactError) as err:
        build_attack("diff_pgd", tiny_model)
    assert "diffusion model" in str(err.value) and "\n" not in str(err.value)


def test_every_config_pins_every_setting_of_its_class_once(tiny_model):
    """One source of truth: each conf/attack file names a torchattack class and pins every tunable
    argument it has (so a changed library default cannot change our attacks), and nothing else; the
    budget is the protocol's, not the attack's."""
    from trigact.attacks.registry import MANAGED

    files = sorted(CONF_DIR.glob("*.yaml"))
    assert {f.stem for f in files} == set(list_attacks()) and len(files) >= 10
    for path in files:
        cfg = yaml.safe_load(path.read_text())
        spec = attack_info(path.stem)
        assert cfg["name"] == path.stem and spec.family in FAMILIES and spec.paper, path.name
        assert "eps" not in cfg and ("steps" not in cfg or cfg["steps"] == 1), path.name
        assert path.read_text().startswith("# "), f"{path.name}: a one-line citation comes first"
        tunable = spec.arguments - set(MANAGED) - ({spec.layer_arg} if spec.feature_level else set())
        pinned = set(spec.params) - ({"feature_layer"} if spec.feature_level else set())
        assert pinned == tunable, (path.name, "unpinned:", tunable - pinned, "unknown:", pinned - tunable)
        if cfg["name"] in UNAVAILABLE:
            continue
        attack = build_attack(cfg["name"], tiny_model)
        assert attack.name == cfg["name"] and (attack.eps, attack.steps) == (DEFAULT_EPS, spec.steps or DEFAULT_STEPS)


def test_protocols_and_overrides_set_the_budget():
    from trigact.attacks.config import attack_config, budget_overrides
    from trigact.common.config import CONF_DIR as ROOT

    paper = attack_config(ROOT, "mifgsm")
    assert (parse_eps(paper["eps"]), paper["steps"], paper["params"]["alpha"]) == (8 / 255, 20, None)
    protocol = yaml.safe_load((Path(ROOT) / "attack_protocol" / "transferattack.yaml").read_text())
    ta = attack_config(ROOT, "mifgsm", budget_overrides(protocol, {"eps": None}))
    assert (parse_eps(ta["eps"]), ta["steps"], ta["params"]["alpha"]) == (16 / 255, 10, pytest.approx(1.6 / 255))
    mine = attack_config(ROOT, "mifgsm", budget_overrides(protocol, {"eps": "4/255", "steps": 5}))
    assert (parse_eps(mine["eps"]), mine["steps"]) == (4 / 255, 5)
    with pytest.raises(TrigactError, match="attack_overrides: unknown key.*decay"):
        attack_config(ROOT, "mifgsm", {"decay": 0.5})


@pytest.mark.parametrize("params", [{"p_modify": 2.0}, {"fill": "noise"}, {"patch_sizes": (0, 3)}])
def test_bad_rpa_settings_are_one_line_user_errors(params):
    model = build_model("small_cnn", num_classes=10, in_chans=1, image_size=16)
    with pytest.raises(TrigactError) as err:
        build_attack("rpa", model, **params)
    assert "\n" not in str(err.value)
