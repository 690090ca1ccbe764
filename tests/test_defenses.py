"""Preprocessing defenses: registry and errors, each defense's behaviour, configs, composition."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from trigact.defenses import (
    DefendedModel,
    build_defense,
    build_defense_from_config,
    defended,
    list_defenses,
)
from trigact.common.errors import TrigactError

CONF_DEFENSE = Path(__file__).resolve().parents[1] / "conf" / "defense"

# A tiny DiffPure UNet: about 40k parameters, runs a few steps on 16x16 in well under a second.
TINY_UNET = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
}
TINY_NRP = {"allow_random_init": True, "nf": 8, "nb": 1, "gc": 4}
# Options turning the weights-requiring configs into tiny random networks for the config test.
TINY_OPTIONS = {
    "nrp": dict(weights=None, **TINY_NRP),
    "diffpure": {"weights": None, "allow_random_init": True, "unet_config": TINY_UNET, "t_star": 0.01, "steps": 2},
}


def images(n=4, c=1, size=28, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def assert_one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(TrigactError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- registry ---------------------------------------------------------------------------------------


def test_registry_lists_every_defense_and_unknown_names_fail_listing_them():
    assert list_defenses() == ["bit_depth", "diffpure", "gaussian", "jpeg", "none", "nrp", "randomization"]
    message = assert_one_line_error("unknown defense 'jpg'", build_defense, "jpg")
    for name in list_defenses():
        assert name in message
    assert_one_line_error("unknown defense 'median'", build_defense_from_config, {"name": "median"})


@pytest.mark.parametrize(
    "name, params, bad",
    [
        ("jpeg", {"quality": 0}, r"quality=0 must be an integer in \[1, 100\]"),
        ("jpeg", {"quality": 101}, r"quality=101 must be an integer in \[1, 100\]"),
        ("jpeg", {"quality": 50.5}, r"quality=50.5 must be an integer in \[1, 100\]"),
        ("bit_depth", {"bits": 0}, r"bits=0 must be an integer in \[1, 8\]"),
        ("bit_depth", {"bits": 9}, r"bits=9 must be an integer in \[1, 8\]"),
        ("gaussian", {"sigma": -0.5}, r"sigma=-0.5 must be in \[0, inf\)"),
        ("gaussian", {"sigma": "wide"}, "sigma='wide' is not a number"),
        ("gaussian", {"sigma": 1.0, "kernel_size": 4}, "kernel_size=4 is even"),
        ("randomization", {"scale": 0.9}, r"scale=0.9 must be in \[1, 4\]"),
        ("randomization", {"seed": -1}, r"seed=-1 must be an integer >= 0"),
        ("nrp", dict(arch="unet", **TINY_NRP), "arch='unet' .*nrp, nrp_resg"),
        ("diffpure", {"t_star": 0.0, "allow_random_init": True, "unet_config": TINY_UNET}, r"t_star=0.0 must be in \(0, 1\]"),
        ("diffpure", {"t_star": 0.01, "steps": 50, "allow_random_init": True, "unet_config": TINY_UNET}, r"steps=50 must be an integer in \[1, 10\]"),
        ("jpeg", {"quality": 50, "strength": 2}, "no parameter\\(s\\) strength; allowed: quality"),
    ],
)
def test_bad_parameters_fail_on_one_line_naming_the_value(name, params, bad):
    message = assert_one_line_error(bad, build_defense, name, **params)
    assert f"defense {name!r}" in message


def test_config_helpers_none_and_label():
    x = images()
    for cfg in (None, {}, {"name": "none", "label": "No defense"}):
        defense = build_defense_from_config(cfg)
        assert torch.equal(defense(x), x)
    jpeg = build_defense_from_config(OmegaConf.create({"name": "jpeg", "quality": 50, "label": "JPEG (q=50)"}))
    assert jpeg.config == {"name": "jpeg", "quality": 50}
    # A defense rebuilds from its own config.
    assert build_defense_from_config(jpeg.config).config == jpeg.config
    assert_one_line_error("has no 'name'", build_defense_from_config, {"quality": 50})


# --- JPEG -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_shape_range_and_quality(channels):
    # A smooth random image (4x4 noise upsampled): JPEG's 4:2:0 chroma subsampling would wreck pixel
    # noise in colour even at q=100, as it does in any JPEG file.
    x = torch.nn.functional.interpolate(images(c=channels, size=4), size=32, mode="bilinear")
    high = build_defense("jpeg", quality=100)(x)
    low = build_defense("jpeg", quality=10)(x)
    for out in (high, low):
        assert out.shape == x.shape and out.dtype == x.dtype
        assert 0.0 <= out.min() and out.max() <= 1.0
    assert (high - x).abs().mean() < 0.01 and (high - x).abs().max() < 0.1
    assert (low - x).abs().mean() > 4 * (high - x).abs().mean()
    noise = images(c=channels, size=32)
    assert (build_defense("jpeg", quality=10)(noise) - noise).abs().mean() > 0.1


def test_jpeg_keeps_a_smooth_image_and_its_device_and_dtype():
    ramp = torch.linspace(0, 1, 32).repeat(2, 3, 32, 1).double()
    out = build_defense("jpeg", quality=90)(ramp)
    assert out.dtype == torch.float64
    assert (out - ramp).abs().max() < 0.05
    assert build_defense("jpeg")(ramp[:0]).shape == (0, 3, 32, 32)
    assert_one_line_error("1 or 3 channels, got 2", build_defense("jpeg"), torch.rand(1, 2, 8, 8))


# --- bit depth ---------------------------------------------------------------------------------------


def test_bit_depth_levels_and_hand_computed_values():
    x = images(size=16)
    assert set(build_defense("bit_depth", bits=1)(x).unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(build_defense("bit_depth", bits=2)(x).unique(), torch.tensor([0, 1 / 3, 2 / 3, 1]))
    tiny = torch.tensor([0.0, 0.1, 0.2, 0.4, 0.6, 0.9, 1.0]).view(1, 1, 1, 7)
    # 2 bits: x * 3 = 0, .3, .6, 1.2, 1.8, 2.7, 3 -> rounds to 0, 0, 1, 1, 2, 3, 3.
    expected = torch.tensor([0, 0, 1, 1, 2, 3, 3]).view(1, 1, 1, 7) / 3
    assert torch.allclose(build_defense("bit_depth", bits=2)(tiny), expected)
    # 8 bits is uint8 quantization.
    assert torch.allclose(build_defense("bit_depth", bits=8)(x), (x * 255).round() / 255)


# --- Gaussian -----------------------------------------------------------------------------------------


def test_gaussian_constant_mass_and_smoothing():
    constant = torch.full((2, 3, 20, 20), 0.3)
    assert torch.allclose(build_defense("gaussian", sigma=1.5)(constant), constant, atol=1e-6)
    x = images(size=32)
    small, large = build_defense("gaussian", sigma=0.6)(x), build_defense("gaussian", sigma=3.0)(x)
    assert small.shape == x.shape
    # Reflect padding: total mass kept within a fraction of a percent.
    assert torch.allclose(small.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=5e-3)
    assert torch.allclose(large.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=2e-2)
    assert x.var() > small.var() > large.var()
    assert torch.equal(build_defense("gaussian", sigma=0)(x), x)
    # A kernel larger than the image is cut to fit instead of failing.
    assert build_defense("gaussian", sigma=3.0)(images(size=5)).shape == (4, 1, 5, 5)


# --- R&P ------------------------------------------------------------------------------------------------


def test_randomization_shape_seeding_and_identity():
    x = images(size=28)
    out = build_defense("randomization", scale=1.2, seed=0)(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(out, x)
    assert torch.equal(build_defense("randomization", scale=1.2, seed=0)(x), out)
    assert not torch.equal(build_defense("randomization", scale=1.2, seed=1)(x), out)
    assert torch.equal(build_defense("randomization", scale=1.0)(x), x)
    # The stream goes on between batches; reseed restarts it.
    defense = build_defense("randomization", scale=1.2, seed=0)
    first = defense(x)
    draws = [defense(x) for _ in range(4)]
    assert any(not torch.equal(d, first) for d in draws)
    defense.reseed()
    assert torch.equal(defense(x), first)


# --- NRP ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["nrp", "nrp_resg"])
def test_nrp_shape_and_weights_round_trip(arch, tmp_path):
    x = images(n=1, c=3, size=16)
    purifier = build_defense("nrp", arch=arch, **TINY_NRP)
    out = purifier(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert purifier(images(n=2, c=1, size=16)).shape == (2, 1, 16, 16)  # grayscale through an RGB net

    path = tmp_path / f"{arch}.pth"
    torch.save(purifier.net.state_dict(), path)
    loaded = build_defense("nrp", arch=arch, weights=str(path), nf=8, nb=1, gc=4)
    assert torch.equal(loaded(x), out)
    # The official file names: RRDB_trunk / recon_trunk, so released weights load as they are.
    trunk = "RRDB_trunk" if arch == "nrp" else "recon_trunk"
    assert any(key.startswith(f"{trunk}.0.") for key in purifier.net.state_dict())


def test_nrp_dynamic_given_as_a_string_means_what_it_says():
    # A quoted override (defense.dynamic="false") arrives as a string; it must not switch the noise on.
    x = images(n=2, c=3, size=16)
    static = build_defense("nrp", arch="nrp_resg", **TINY_NRP)
    off = build_defense("nrp", arch="nrp_resg", dynamic="false", **TINY_NRP)
    on = build_defense("nrp", arch="nrp_resg", dynamic="true", **TINY_NRP)
    off.net.load_state_dict(static.net.state_dict())
    on.net.load_state_dict(static.net.state_dict())
    assert off.dynamic is False and on.dynamic is True
    assert torch.equal(off(x), static(x))
    assert not torch.equal(on(x), static(x))


def test_nrp_weights_errors(tmp_path):
    assert_one_line_error("needs weights=", build_defense, "nrp")
    assert_one_line_error("needs weights=", build_defense_from_config, {"name": "nrp", "weights": "???"})
    assert_one_line_error("weights file not found", build_defense, "nrp", weights=str(tmp_path / "nope.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file at all")
    assert_one_line_error("is not a readable weights file", build_defense, "nrp", weights=str(corrupt))
    wrong = tmp_path / "wrong.pth"
    torch.save(build_defense("nrp", arch="nrp_resg", **TINY_NRP).net.state_dict(), wrong)
    assert_one_line_error("do not match the network", build_defense, "nrp", weights=str(wrong), nf=8, nb=1, gc=4)


# --- DiffPure -------------------------------------------------------------------------------------------


def tiny_diffpure(**kwargs):
    options = {"allow_random_init": True, "unet_config": TINY_UNET, "t_star": 0.01, "steps": 3, "seed": 0}
    return build_defense("diffpure", **{**options, **kwargs})


def test_diffpure_shape_range_and_seed():
    x = images(n=2, c=3, size=16)
    defense = tiny_diffpure()
    out = defense(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    defense.reseed()
    assert torch.equal(defense(x), out)
    defense.reseed(1)
    assert not torch.equal(defense(x), out)
    # A 28x28 grayscale batch is resized to the UNet's 16x16 and back, channels repeated and averaged.
    gray = images(n=2, c=1, size=28)
    assert tiny_diffpure()(gray).shape == gray.shape
    assert tiny_diffpure().timesteps == [9, 4, 0]  # t* = 0.01 of 1000: q_sample at 9, 3 strided steps


def test_diffpure_loads_a_diffusers_folder_and_a_state_dict(tmp_path):
    x = images(n=1, c=3, size=16)
    defense = tiny_diffpure()
    expected = defense(x)
    defense.unet.save_pretrained(tmp_path / "unet_folder")
    from_folder = build_defense("diffpure", weights=str(tmp_path / "unet_folder"), t_star=0.01, steps=3)
    assert torch.allclose(from_folder(x), expected, atol=1e-5)
    torch.save(defense.unet.state_dict(), tmp_path / "unet.pt")
    from_file = build_defense("diffpure", weights=str(tmp_path / "unet.pt"), unet_config=TINY_UNET, t_star=0.01, steps=3)
    assert torch.allclose(from_file(x), expected, atol=1e-5)
    assert_one_line_error("needs unet_config", build_defense, "diffpure", weights=str(tmp_path / "unet.pt"))
    assert_one_line_error("needs weights=", build_defense_from_config, {"name": "diffpure", "weights": "???"})


# --- configs and composition -------------------------------------------------------------------------


def test_every_defense_config_builds():
    paths = sorted(CONF_DEFENSE.glob("*.yaml"))
    expected = {"none", "jpeg_q50", "jpeg_q75", "bdr_d2", "gaussian_s06", "rp_s12", "jpeg_q20", "jpeg_q30",
                "gaussian_s12", "gaussian_s30", "nrp", "diffpure"}
    assert expected <= {p.stem for p in paths}
    x = images(n=2, c=3, size=16)
    for path in paths:
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        assert isinstance(cfg.get("label"), str) and cfg["label"], path.name
        cfg.update(TINY_OPTIONS.get(cfg["name"], {}))
        defense = build_defense_from_config(cfg)
        assert defense(x).shape == x.shape, path.name


def test_defense_configs_compose_with_hydra():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DEFENSE.parent), version_base="1.3"):
        cfg = compose("evaluate", overrides=["defense=gaussian_s06"])
    assert OmegaConf.to_container(cfg.defense) == {"name": "gaussian", "label": "Gaussian (sigma=0.6)", "sigma": 0.6}


def test_defended_runs_the_defense_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    model.meta = {"path": "runs/x/bundle.pt"}
    defense = build_defense("bit_depth", bits=2)
    victim = defended(model, defense)
    x = images(n=3, c=3, size=16)
    assert isinstance(victim, DefendedModel)
    assert torch.equal(victim(x), model(defense(x)))
    assert not torch.equal(victim(x), model(x))
    assert victim.meta == {"path": "runs/x/bundle.pt", "defense": {"name": "bit_depth", "bits": 2}}
    assert victim.defense is defense and victim.model is model
    assert defended(model, build_defense("none")) is model
    assert defended(model, None) is model
    # A defense never switches to train mode with its victim.
    victim.train()
    assert model.training and not defense.training


def test_a_dictconfig_with_nested_settings_builds_like_a_plain_dict():
    from omegaconf import OmegaConf

    from trigact.defenses import build_defense_from_config

    cfg = OmegaConf.create({"name": "diffpure", "allow_random_init": True, "t_star": 0.05, "steps": 2,
                            "unet_config": TINY_UNET})
    defense = build_defense_from_config(cfg)
    x = torch.rand(1, 1, 16, 16)
    assert defense(x).shape == x.shape


def test_a_randomized_defense_gives_each_matrix_cell_the_same_draws_whatever_comes_before():
    from types import SimpleNamespace

    from trigact.evaluation.matrix import evaluate_matrix

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(1 * 16 * 16, 10))
    victim = defended(model, build_defense("randomization", scale=1.5, seed=0))
    x = images(n=64, c=1, size=16)
    y = model(x).argmax(dim=1)  # labels the bare model gets right: the defense's draws decide the cells
    bank_a = SimpleNamespace(x_adv=x, y=y)
    bank_b = SimpleNamespace(x_adv=x.flip(-1), y=y)
    alone = evaluate_matrix({"v": victim}, {("s", "b"): bank_b}, batch_size=16).cells[0]["accuracy"]
    after = evaluate_matrix({"v": victim}, {("s", "a"): bank_a, ("s", "b"): bank_b}, batch_size=16)
    assert after.cells[1]["accuracy"] == alone
    # The same images as two banks get the same draws, hence the same accuracy (paired cells).
    twice = evaluate_matrix({"v": victim}, {("s", "a"): bank_a, ("t", "a"): bank_a}, batch_size=16)
    assert twice.cells[0]["accuracy"] == twice.cells[1]["accuracy"]
