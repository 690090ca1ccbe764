"""Diff-PGD (trigact.attacks.diff_pgd) on a tiny random UNet: flow, budget, seeding, errors, and that
the gradient really goes through the SDEdit purification. Sized for 2 shared CPU cores (8x8 images)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchattack
from torch import nn

from trigact.attacks import attack_spec
from trigact.attacks.diff_pgd import DiffPGD
from trigact.common.errors import TrigactError
from _helpers_torch import one_thread  # noqa: F401  (autouse: one intra-op thread)

# About 40k parameters; a UNet call on a few 8x8 images takes a few ms.
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
}
EPS = 8 / 255
CLASSES = 4


def linear_classifier(channels=3, size=8, seed=0):
    """A fixed random linear classifier: its loss surface is simple, so the gradient sign is testable."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, CLASSES))
    return model.eval().requires_grad_(False)


def batch(n=3, channels=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def tiny_attack(model, **kwargs):
    options = {"eps": EPS, "steps": 2, "t_star": 0.06, "denoise_steps": 2, "allow_random_init": True,
               "unet_config": TINY_UNET, "seed": 0, "device": torch.device("cpu")}
    return DiffPGD(model, **{**options, **kwargs})


def assert_one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(TrigactError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def in_budget(x_adv, x, eps=EPS):
    return (x_adv - x).abs().max().item() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1




@pytest.fixture(scope="module")
def model():
    return linear_classifier()


# --- flow, budget, registration ------------------------------------------------------------------------


def test_schedule_is_the_reference_codes():
    attack = tiny_attack(linear_classifier(), denoise_steps=4)
    assert attack.timesteps == [60, 40, 20, 0]  # DDIM-50 from respaced step 3, as the released code runs
    assert tiny_attack(linear_classifier(), denoise_steps=1).timesteps == [60]  # one step straight to x_0
    pinned = attack_spec("diff_pgd").params  # conf/attack/diff_pgd.yaml, the one source of the settings
    assert (pinned["t_star"], pinned["denoise_steps"], pinned["gradient"]) == (0.06, 4, "full")


@pytest.mark.parametrize("output", ["purified", "iterate"])
@pytest.mark.parametrize("gradient", ["full", "skip"])
def test_raw_output_has_the_shape_and_stays_in_the_budget(model, output, gradient):
    x, y = batch()
    x_adv = tiny_attack(model, output=output, gradient=gradient)(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert in_budget(x_adv, x)
    assert not torch.equal(x_adv, x)


def test_grayscale_other_size_input_is_resized_through_the_unet():
    x, y = batch(n=2, channels=1, size=12)
    attack = tiny_attack(linear_classifier(channels=1, size=12))
    assert attack.purify(x).shape == x.shape
    x_adv = attack(x, y)
    assert x_adv.shape == x.shape and in_budget(x_adv, x)


def test_purified_output_is_projected_by_us(model):
    """The paper's x_0^n = R(x_N) leaves the eps-ball (a random UNet scrambles it); ours is projected."""
    x, y = batch()
    attack = tiny_attack(model)
    x_n = tiny_attack(model, output="iterate")(x, y)
    attack.generator.manual_seed(123)
    assert (attack.purify(x_n) - x).abs().max() > EPS  # unprojected R(x_N): out of budget
    assert in_budget(attack(x, y), x)


def test_registered_in_torchattack_and_runs_through_trigact_build_attack(model):
    from trigact.attacks import build_attack

    assert torchattack.attack.ATTACK_REGISTRY["TrigactDiffPGD"] is DiffPGD
    made = torchattack.create_attack("TrigactDiffPGD", model, eps=EPS, steps=1, denoise_steps=1,
                                     allow_random_init=True, unet_config=TINY_UNET)
    assert isinstance(made, DiffPGD)
    # The config the YAML is to pin (tiny UNet instead of weights), built as any other attack.
    spec = {"name": "diff_pgd", "attack": "TrigactDiffPGD", "family": "diffusion", "paper": "Xue et al., 2023",
            "params": {**attack_spec("diff_pgd").params, "allow_random_init": True, "unet_config": TINY_UNET,
                       "denoise_steps": 1}}
    x, y = batch()
    attack = build_attack(spec, model, eps="8/255", steps=2)
    with torch.no_grad():  # TransferAttack turns gradients back on
        x_adv = attack(x, y)
    assert in_budget(x_adv, x)


def test_fixed_seed_is_deterministic_and_leaves_the_global_rng_alone(model):
    x, y = batch()
    state = torch.get_rng_state()
    first = tiny_attack(model, seed=3)
    out = first(x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first(x, y), out)  # every call restarts from the seed
    assert torch.equal(tiny_attack(model, seed=3)(x, y), out)  # same random UNet and noise for a seed
    assert not torch.equal(tiny_attack(model, seed=4)(x, y), out)


# --- weights and parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [None, "", "???"])
def test_missing_weights_fail_in_one_line(model, weights):
    message = assert_one_line_error("needs a pretrained diffusion model: weights=", DiffPGD, model, weights=weights)
    assert "allow_random_init" in message


def test_weights_load_as_diffpure_loads_them_and_errors_name_the_attack(model, tmp_path):
    x, y = batch(n=2)
    reference = tiny_attack(model, steps=1)
    reference.unet.save_pretrained(tmp_path / "unet_folder")
    torch.save(reference.unet.state_dict(), tmp_path / "unet.pt")
    common = {"eps": EPS, "steps": 1, "t_star": 0.06, "denoise_steps": 2, "device": torch.device("cpu")}
    expected = reference(x, y)
    assert torch.equal(DiffPGD(model, weights=str(tmp_path / "unet_folder"), **common)(x, y), expected)
    assert torch.equal(DiffPGD(model, weights=tmp_path / "unet.pt", unet_config=TINY_UNET, **common)(x, y), expected)
    message = assert_one_line_error("needs unet_config", DiffPGD, model, weights=str(tmp_path / "unet.pt"))
    assert message.startswith("attack 'diff_pgd'") and "defense" not in message
    (tmp_path / "empty").mkdir()
    assert_one_line_error("attack 'diff_pgd': .* holds no diffusers UNet", DiffPGD, model,
                          weights=str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"t_star": 0.0}, r"t_star=0.0 must be in \(0, 1\]"),
        ({"t_star": 1.5}, r"t_star=1.5 must be in \(0, 1\]"),
        ({"t_star": "high"}, "t_star='high' is not a number"),
        ({"t_star": 0.0001}, "t_star=0.0001 is below one step of 1000"),
        ({"denoise_steps": 0}, r"denoise_steps=0 must be an integer >= 1"),
        ({"denoise_steps": 62}, r"denoise_steps=62 must be an integer in \[1, 61\]"),
        ({"denoise_steps": 2.0}, "denoise_steps=2.0 must be an integer"),
        ({"steps": 0}, "steps=0 must be an integer >= 1"),
        ({"eps": "-8/255"}, "eps='-8/255' must be > 0"),
        ({"eps": "wide"}, "eps='wide' is not a number"),
        ({"alpha": 0}, "alpha=0 must be > 0"),
        ({"gradient": "approx"}, "gradient='approx' is not allowed; allowed: full, skip"),
        ({"output": "x0"}, "output='x0' is not allowed; allowed: purified, iterate"),
        ({"random_start": "yes"}, "random_start='yes' must be true or false"),
        ({"allow_random_init": 1}, "allow_random_init=1 must be true or false"),
        ({"seed": -1}, "seed=-1 must be an integer"),
        ({"unet_config": None}, "without weights, unet_config"),
        ({"unet_config": {"sample_size": 8, "colour": 3}}, "bad unet_config"),
        ({"weights": 3}, "weights=3 must be a path"),
    ],
)
def test_bad_parameters_fail_in_one_line(model, params, match):
    message = assert_one_line_error(match, tiny_attack, model, **params)
    assert message.startswith("attack 'diff_pgd'")


# --- the gradient goes through the purifier ---------------------------------------------------------------


def test_full_gradient_is_the_derivative_of_the_purified_loss():
    """Finite differences of l(f(R(x))) (same noise) match gradient='full' along a direction, in float64;
    gradient='skip' (the detached purifier) does not: the full chain's gradient really is used."""
    model = linear_classifier().double()
    attack = tiny_attack(model, denoise_steps=2)
    attack.unet.double()
    x, y = batch(n=2)
    x = (x.double() * 0.5 + 0.25)  # away from the clip boundaries
    attack.generator.manual_seed(0)
    noise = attack.draw_noise(x)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        numeric = (attack.loss(attack.purify(x + h * direction, noise), y)
                   - attack.loss(attack.purify(x - h * direction, noise), y)) / (2 * h)
    full = (attack.input_gradient(x, y, noise) * direction).sum()
    attack.gradient = "skip"
    skip = (attack.input_gradient(x, y, noise) * direction).sum()
    assert full.item() == pytest.approx(numeric.item(), rel=1e-4, abs=1e-6)
    assert abs(skip.item() - numeric.item()) > 1e-2 * abs(numeric.item())


def test_result_differs_from_plain_pgd_and_from_the_detached_purifier(model):
    x, y = batch()
    common = {"output": "iterate", "random_start": False}
    full = tiny_attack(model, **common)(x, y)
    skip = tiny_attack(model, gradient="skip", **common)(x, y)
    pgd = torchattack.PGD(model, device=torch.device("cpu"), eps=EPS, steps=2, random_start=False)(x, y)
    assert in_budget(pgd, x)
    assert not torch.equal(full, skip)
    assert not torch.equal(full, pgd)
    assert not torch.equal(skip, pgd)


def test_loss_on_the_purified_image_goes_up(model):
    """Sign check: the classifier's loss on R(x_adv) beats its loss on R(x), over shared noise draws;
    an attack with a flipped gradient sign fails this."""
    x, y = batch(n=4)
    attack = tiny_attack(model, output="iterate", steps=3)
    x_adv = attack(x, y)
    attack.generator.manual_seed(99)
    noises = [attack.draw_noise(x) for _ in range(4)]
    with torch.no_grad():
        clean = sum(F.cross_entropy(model(attack.purify(x, n)), y).item() for n in noises)
        adv = sum(F.cross_entropy(model(attack.purify(x_adv, n)), y).item() for n in noises)
    assert adv > clean + 0.1
