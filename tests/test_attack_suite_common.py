"""The common-family attacks beyond the generic tests of tests/test_attacks.py: trigact's fixes of torchattack
1.7.2 (trigact.attacks.portable_common), each shown failing upstream and working here, PGD-L2's one-line
refusal, and determinism under a fixed seed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _attack_settings_common import SMALL, UNAVAILABLE
from torch import nn

from trigact.attacks import build_attack
from trigact.attacks.portable_common import (
    MomentumLoop,
    PortableDeCoWA,
    PortableMIG,
    PortableMuMoDIG,
    PortableSINIFGSM,
    PortableSSA,
    PortableTIFGSM,
    SortedLBQ,
    random_resize_and_pad,
    random_rotation,
)
from trigact.common.errors import TrigactError
from trigact.models import build_model

OURS = ["fgsm", "nifgsm", "sinifgsm", "vmifgsm", "vnifgsm", "tifgsm", "mig", "admix", "ssa", "decowa", "mumodig"]
# Our subclasses that run MI-FGSM's loop around their own gradient estimate.
MOMENTUM = ["nifgsm", "sinifgsm", "tifgsm", "mig", "ssa", "decowa", "mumodig"]
EPS = 8 / 255
CPU = torch.device("cpu")


def _seed(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=10, in_chans=1, image_size=16, mean=[0.3], std=[0.3]).eval()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(4, 1, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)


def _rgb_cnn():
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=10, in_chans=3, image_size=16, mean=[0.3] * 3, std=[0.3] * 3).eval()


def test_pgdl2_is_refused_in_one_line(cnn):
    assert "pgdl2" in UNAVAILABLE
    with pytest.raises(TrigactError) as err:
        build_attack("pgdl2", cnn)
    message = str(err.value)
    assert "\n" not in message
    assert "L2" in message and "L_inf" in message and "use pgd" in message


@pytest.mark.parametrize("name", OURS)
def test_a_fixed_seed_gives_the_same_adversarial_examples(name, cnn, batch):
    x, y = batch
    runs = []
    for _ in range(2):
        _seed(3)
        runs.append(build_attack(name, cnn, eps="8/255", steps=2, **SMALL.get(name, {}))(x, y))
    assert torch.equal(runs[0], runs[1])


def test_upstream_tifgsm_fails_on_one_channel_and_ours_runs(cnn, batch):
    from torchattack import TIFGSM

    x, y = batch
    with pytest.raises(RuntimeError, match="channels"):
        TIFGSM(cnn, device=CPU, eps=EPS, steps=2, kern_len=7)(x, y)  # a 3-channel kernel, groups=3
    out = PortableTIFGSM(cnn, device=CPU, eps=EPS, steps=2, kern_len=7)(x, y)
    assert out.shape == x.shape and (out - x).abs().max() <= EPS + 1e-6
    kernel = PortableTIFGSM(cnn, device=CPU, kern_len=7).kernel_for(x)
    assert kernel.shape == (1, 1, 7, 7) and kernel.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_upstream_tifgsm_ignores_its_momentum_and_ours_carries_it():
    """Upstream TIFGSM's step is sign(decay * g + g / |g|_1) of the current gradient g alone: decay changes
    nothing. With the momentum carried over, it does."""
    from torchattack import TIFGSM

    net = _rgb_cnn()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)

    def run(cls, decay):
        return cls(net, device=CPU, eps=EPS, steps=6, alpha=2 / 255, decay=decay, kern_len=3)(x, y).detach()

    assert torch.equal(run(TIFGSM, 0.0), run(TIFGSM, 1.0))
    assert not torch.equal(run(PortableTIFGSM, 0.0), run(PortableTIFGSM, 1.0))


@pytest.mark.parametrize("name", MOMENTUM)
def test_momentum_is_accumulated_across_steps(name, cnn, batch, monkeypatch):
    """Replaying MI-FGSM's recurrence on the gradients each attack computed gives its output exactly."""
    x, y = batch
    attack = build_attack(name, cnn, eps="8/255", steps=4, alpha="3/255", **SMALL.get(name, {}))
    impl = attack.impl
    assert isinstance(impl, MomentumLoop)
    seen = []
    estimate = type(impl)._gradient

    def recording(self, *args):
        seen.append(estimate(self, *args).detach().clone())
        return seen[-1]

    monkeypatch.setattr(type(impl), "_gradient", recording)
    _seed(0)
    out = attack(x, y)
    assert len(seen) == 4
    alpha, g, delta = 3 / 255, torch.zeros_like(x), torch.zeros_like(x)
    for grad in seen:
        g = impl.decay * g + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True)
        delta = ((x + (delta + alpha * g.sign()).clamp(-EPS, EPS)).clamp(0, 1)) - x
    assert torch.allclose(out, x + delta, atol=1e-6)


def test_upstream_mig_raises_the_true_class_probability_and_ours_lowers_it(cnn, batch):
    from torchattack import MIG

    x, y = batch

    def true_prob(images):
        with torch.no_grad():
            return F.softmax(cnn(images), dim=1).gather(1, y[:, None]).mean().item()

    clean = true_prob(x)
    upstream = MIG(cnn, device=CPU, eps=EPS, steps=3, s_factor=5)(x, y).detach()
    ours = PortableMIG(cnn, device=CPU, eps=EPS, steps=3, s_factor=5)(x, y)
    assert true_prob(upstream) > clean > true_prob(ours)


@pytest.mark.parametrize("side", [16, 28])
def test_upstream_ssa_needs_3x224x224_and_ours_runs_on_any_shape(side, cnn):
    from torchattack import SSA

    x, y = torch.rand(2, 1, side, side), torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="224"):
        SSA(cnn, device=CPU, eps=EPS, steps=1, num_spectrum=1)(x, y)  # noise drawn as (B, 3, 224, 224)
    ssa = PortableSSA(cnn, device=CPU, eps=EPS, steps=2, num_spectrum=2)
    assert ssa.transform(x).shape == x.shape
    out = ssa(x, y)
    assert out.shape == x.shape and (out - x).abs().max() <= EPS + 1e-6


def test_ssa_gradient_is_the_mean_over_spectrum_copies_each_counted_once(cnn, batch):
    """Upstream adds the running total of un-zeroed gradients per copy (copy k of N weighs N - k + 1)."""
    x, y = batch
    ssa = PortableSSA(cnn, device=CPU, eps=EPS, steps=1, num_spectrum=3)
    delta = torch.zeros_like(x)
    torch.manual_seed(5)
    got = ssa._gradient(x, delta, y, torch.zeros_like(x), EPS)
    torch.manual_seed(5)
    expected = torch.zeros_like(x)
    for _ in range(3):
        copy = ssa.transform(x).detach().requires_grad_(True)
        expected += torch.autograd.grad(F.cross_entropy(cnn(copy), y), copy)[0] / 3
    assert torch.allclose(got, expected, atol=1e-7)


def test_sinifgsm_gradient_weighs_each_scale_copy_once(cnn, batch):
    x, y = batch
    si = PortableSINIFGSM(cnn, device=CPU, eps=EPS, steps=1, m=3)
    got = si._gradient(x, torch.zeros_like(x), y, torch.zeros_like(x), EPS)
    expected = torch.zeros_like(x)
    for i in range(3):
        leaf = x.clone().requires_grad_(True)
        expected += torch.autograd.grad(F.cross_entropy(cnn(leaf / 2**i), y), leaf)[0] / 3
    assert torch.allclose(got, expected, atol=1e-7)


def test_decowa_unmoved_mesh_is_the_identity_and_warps_keep_the_shape(cnn):
    decowa = PortableDeCoWA(cnn, device=CPU, eps=EPS, steps=1, num_warping=1)
    x = torch.rand(2, 1, 16, 12)  # not square: upstream reads (N, C, W, H) and transposes the grid
    still = decowa._vwt(x, torch.zeros(1, 1, 2))
    assert torch.allclose(still, x, atol=1e-4)
    moved = decowa._vwt(x, torch.full((1, 1, 2), 0.3))
    assert moved.shape == x.shape and not torch.allclose(moved, x, atol=1e-3)


@pytest.mark.skipif(__import__("importlib").util.find_spec("kornia") is not None,
                    reason="the upstream failure shows only without kornia")
def test_upstream_mumodig_needs_kornia_and_ours_does_not(cnn, batch):
    from torchattack import MuMoDIG

    with pytest.raises(ImportError, match="kornia"):
        MuMoDIG(cnn, device=CPU)
    x, y = batch
    _seed(0)
    out = PortableMuMoDIG(cnn, device=CPU, eps=EPS, steps=2, n_trans=3)(x, y)
    assert out.shape == x.shape and (out - x).abs().max() <= EPS + 1e-6


def test_mumodig_transforms_keep_small_images_at_their_scale():
    x = torch.rand(3, 1, 16, 16)
    torch.manual_seed(0)
    for _ in range(20):
        assert random_resize_and_pad(x).shape == x.shape
        assert random_rotation(x).shape == x.shape
    # canvas int(16 * 245 / 224) = 17: the content keeps at least 16/17 of its size (upstream's 245 canvas
    # would shrink a 16x16 digit to as little as 16/245)
    blob = torch.zeros(1, 1, 16, 16)
    blob[..., 4:12, 4:12] = 1.0
    torch.manual_seed(0)
    assert random_resize_and_pad(blob).sum() > 0.8 * blob.sum()
    # a rotation by 0 degrees is the identity
    assert torch.allclose(random_rotation(x, degrees=0.0), x, atol=1e-5)


def test_mumodig_quantiser_snaps_to_sorted_region_lower_bounds():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    for regions in (2, 4):
        q = SortedLBQ(regions)(x)
        assert q.shape == x.shape and (q <= x).all()
        for plane, source in zip(q.reshape(6, -1), x.reshape(6, -1)):
            assert plane.min() == source.min() and len(plane.unique()) <= regions


def test_mumodig_interpolation_points_differ(cnn, batch):
    """Upstream places point j of a path at (base index + lambda) / n: with one base, every point is the same."""
    x, y = batch
    mumodig = PortableMuMoDIG(cnn, device=CPU, eps=EPS, steps=1, n_interpolate=3)
    assert mumodig.region_num == 2
    inputs = []
    hook = cnn.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    try:
        mumodig._integrated_grad(x, y)
    finally:
        hook.remove()
    assert len(inputs) == 3
    assert not torch.allclose(inputs[0], inputs[1]) and not torch.allclose(inputs[1], inputs[2])


def test_momentum_loop_leaves_alpha_and_gradients_alone(cnn, batch):
    x, y = batch
    attack = PortableTIFGSM(cnn, device=CPU, eps=EPS, steps=2, alpha=None)
    out = attack(x, y)
    assert attack.alpha is None and not out.requires_grad
    assert isinstance(attack.model, nn.Module)
