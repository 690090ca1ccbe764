"""Sparse triggers (trigger=sparse, trigger=sparse_learnable): SIBA's constraints ||tau||_0 <= k and
||tau||_inf <= eps, the top-k projection after Algorithm 2's sign step, k as a count or a fraction,
one-line errors, real training runs, resume, and the bundle of a sparse run downstream."""

import subprocess
import sys

import lightning as L
import pytest
import torch

from helpers_hydra import QUIET, SimulatedPreemption, compose_config
from trigact import load_bundle
from trigact.attacks import build_attack
from trigact.common.errors import TrigactError
from trigact.training.run import train
from trigact.triggers import (
    SparseTrigger,
    build_trigger,
    project_sparse,
    resolve_k,
    sparse_learnable_trigger,
    sparse_trigger,
)

EPS = 32 / 255
ALPHA = 16 / 255
# Digits at 8x8 (64 coordinates), a small CNN, a few batches: seconds per run.
TINY = ["data=digits", "data.image_size=8", "model=small_cnn", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=2"] + QUIET
SPARSE_LEARNABLE = TINY + ["trigger=sparse_learnable", "trigger.k=6", "trigger.eps=32/255", "trigger.alpha=16/255"]


def nonzeros(tau: torch.Tensor) -> int:
    return int(tau.count_nonzero())


# ------------------------------------------------------------------------------------------ projection


def test_projection_matches_a_hand_computation():
    tau = torch.tensor([[[0.5, -0.1, 0.3], [-0.7, 0.05, 0.2]]])
    # k=3: the largest magnitudes are -0.7, 0.5, 0.3; clipped to eps=0.4: -0.4, 0.4, 0.3; the rest 0.
    expected = torch.tensor([[[0.4, 0.0, 0.3], [-0.4, 0.0, 0.0]]])
    out = project_sparse(tau, k=3, eps=0.4)
    assert torch.equal(out, expected)
    assert nonzeros(out) == 3 and out.abs().max() <= 0.4
    assert torch.equal(tau, torch.tensor([[[0.5, -0.1, 0.3], [-0.7, 0.05, 0.2]]]))  # input untouched
    # k = numel keeps everything (only clipped); k=1 only the largest.
    assert torch.equal(project_sparse(tau, k=6, eps=0.4), tau.clamp(-0.4, 0.4))
    assert torch.equal(project_sparse(tau, k=1, eps=1.0), torch.tensor([[[0.0, 0, 0], [-0.7, 0, 0]]]))


def test_projection_breaks_ties_by_the_gradient_then_by_index():
    """After a sign step every off-support coordinate sits at exactly alpha: the tie-break decides."""
    tau = torch.full((1, 1, 4), 0.1)
    by_index = project_sparse(tau, k=2, eps=1.0)
    assert torch.equal(by_index, torch.tensor([[[0.1, 0.1, 0.0, 0.0]]]))
    by_grad = project_sparse(tau, k=2, eps=1.0, tiebreak=torch.tensor([[[0.0, 3.0, -5.0, 1.0]]]))
    assert torch.equal(by_grad, torch.tensor([[[0.0, 0.1, 0.1, 0.0]]]))
    # A larger |tau| still wins over a larger |grad|.
    tau2 = torch.tensor([[[0.1, 0.2, 0.1, 0.1]]])
    out = project_sparse(tau2, k=2, eps=1.0, tiebreak=torch.tensor([[[0.0, 0.0, -5.0, 1.0]]]))
    assert torch.equal(out, torch.tensor([[[0.0, 0.2, 0.1, 0.0]]]))


def test_sign_step_is_followed_by_the_projection():
    trig = sparse_learnable_trigger((1, 2, 3), k=2, eps=0.25, alpha=0.1, seed=0)
    trig.tau.copy_(torch.tensor([[[0.2, 0.0, 0.0], [0.0, -0.05, 0.0]]]))
    grad = torch.tensor([[[-1.0, 0.5, 0.0], [2.0, -3.0, 1.0]]])
    trig.sign_step(grad)
    # tau - 0.1 * sign(grad) = [[0.3, -0.1, 0], [-0.1, 0.05, -0.1]]: keep 0.3 (clipped to 0.25), then of
    # the three ties at 0.1 the one with the largest |grad| (2.0, flat index 3; not the lowest index, 1).
    assert torch.allclose(trig.tau, torch.tensor([[[0.25, 0.0, 0.0], [-0.1, 0.0, 0.0]]]))
    assert nonzeros(trig.tau) == 2 and trig.tau.abs().max() <= 0.25


# ------------------------------------------------------------------------------------------ the two kinds


def test_fixed_sparse_trigger_has_exactly_k_coordinates_at_eps_and_depends_only_on_its_seed():
    shape = (3, 8, 8)
    trig = sparse_trigger(shape, k=20, eps="32/255", seed=1)
    tau = trig.tau
    assert isinstance(trig, SparseTrigger) and trig.kind == "sparse" and trig.step_size is None
    assert tau.shape == shape and nonzeros(tau) == 20
    assert torch.all(tau[tau != 0].abs() == EPS)
    assert (tau > 0).any() and (tau < 0).any()  # random signs
    torch.manual_seed(123)  # the global RNG must not matter (DDP ranks agree through the seed alone)
    assert torch.equal(sparse_trigger(shape, k=20, eps="32/255", seed=1).tau, tau)
    other = sparse_trigger(shape, k=20, eps="32/255", seed=2).tau
    assert not torch.equal(other, tau) and nonzeros(other) == 20
    with pytest.raises(TrigactError, match="no update rule"):
        trig.sign_step(torch.ones(shape))


def test_fixed_sparse_signs_are_balanced_and_the_support_spreads_over_channels():
    tau = sparse_trigger((3, 32, 32), k=1000, eps=0.1, seed=0).tau
    # 1000 fair coin flips: the std of the fraction is ~0.016, so 0.42..0.58 is a 5-sigma band.
    assert 0.42 < (tau > 0).float().sum().item() / 1000 < 0.58
    per_channel = (tau != 0).sum(dim=(1, 2))
    assert per_channel.sum() == 1000 and per_channel.min() > 250  # a uniform support: ~333 each


def test_learnable_sparse_init_is_the_projected_uniform_draw():
    shape, k = (1, 8, 8), 10
    trig = sparse_learnable_trigger(shape, k=k, eps=0.05, alpha=0.1, seed=3)
    assert trig.kind == "sparse_learnable" and trig.step_size == pytest.approx(0.1)
    tau = trig.tau
    assert nonzeros(tau) == k and tau.abs().max() <= 0.05
    uniform = (2 * torch.rand(shape, generator=torch.Generator().manual_seed(3)) - 1) * 0.1
    top = uniform.flatten().abs().topk(k).indices
    assert set(torch.nonzero(tau.flatten()).flatten().tolist()) == set(top.tolist())
    assert torch.equal(tau.flatten()[top], uniform.flatten()[top].clamp(-0.05, 0.05))


@pytest.mark.parametrize("k,numel,count", [(0.1, 64, 6), (1.0, 64, 64), (0.001, 64, 1), (0.25, 192, 48),
                                           (0.3, 10, 3), (0.59, 64, 38), (1, 64, 1), (64, 64, 64), (7, 192, 7)])
def test_k_is_a_count_or_a_fraction_of_the_coordinates(k, numel, count):
    assert resolve_k(k, numel) == count


def test_k_as_a_fraction_through_build_trigger():
    # 3 * 8 * 8 = 192 coordinates; 10% of them is round(19.2) = 19.
    fixed = build_trigger("sparse", (3, 8, 8), eps=0.1, k=0.1, seed=0)
    learnable = build_trigger("sparse_learnable", (3, 8, 8), eps=0.1, alpha=0.05, k=0.1, seed=0)
    assert fixed.k == learnable.k == 19 and nonzeros(fixed.tau) == 19 and nonzeros(learnable.tau) == 19


@pytest.mark.parametrize("k,expected", [
    (0, "trigger.k=0 must be an integer count in [1, 64] or a fraction in (0, 1]"),
    (65, "trigger.k=65 must be an integer count in [1, 64]"),
    (-3, "trigger.k=-3 must be"),
    (0.0, "trigger.k=0.0 must be"),
    (1.5, "trigger.k=1.5 must be"),
    (10.0, "(write 10 for a count)"),
    (float("nan"), "trigger.k=nan must be"),
    ("10", "trigger.k='10' is not a number"),
    ("abc", "trigger.k='abc' is not a number"),
    (True, "trigger.k=True is not a number"),
])
def test_bad_k_is_one_clear_line(k, expected):
    for kind, extra in (("sparse", {}), ("sparse_learnable", {"alpha": 0.05})):
        with pytest.raises(TrigactError) as err:
            build_trigger(kind, (1, 8, 8), eps=0.1, k=k, **extra)
        assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind,kwargs,expected", [
    ("sparse", {"eps": 0, "k": 3}, "trigger.eps=0 must be > 0"),
    ("sparse", {"eps": "-8/255", "k": 3}, "trigger.eps='-8/255' must be > 0"),
    ("sparse", {"eps": "abc", "k": 3}, "trigger.eps='abc' is not a number"),
    ("sparse", {"eps": 2, "k": 3}, "trigger.eps=2 must be in (0, 1]"),
    ("sparse", {"k": 3}, "trigger=sparse needs trigger.eps"),
    ("sparse", {"eps": 0.1}, "trigger=sparse needs trigger.k"),
    ("sparse_learnable", {"eps": 0.1, "k": 3}, "trigger=sparse_learnable needs trigger.alpha"),
    ("sparse_learnable", {"eps": 0.1, "k": 3, "alpha": 0}, "trigger.alpha=0 must be > 0"),
    ("sparse_learnable", {"eps": -0.1, "k": 3, "alpha": 0.1}, "trigger.eps=-0.1 must be > 0"),
])
def test_bad_eps_alpha_or_a_missing_setting_is_one_clear_line(kind, kwargs, expected):
    with pytest.raises(TrigactError) as err:
        build_trigger(kind, (1, 8, 8), **kwargs)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_the_train_entry_point_refuses_a_bad_k_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trigact.train", "trigger=sparse", "trigger.k=0",
                           f"paths.root_dir={tmp_path}", "logger=none"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("trigact: error:")]
    assert len(errors) == 1 and "trigger.k=0 must be an integer count in [1, 256]" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ real runs


class CheckSparseAfterEveryUpdate(L.Callback):
    """Runs after TriggerUpdateCallback at every epoch end (build_callbacks puts that one first) and
    records tau; used from configs as ``+callbacks.sparse_check._target_=test_sparse_trigger.CheckSparseAfterEveryUpdate``."""

    taus: list[torch.Tensor] = []

    def on_fit_start(self, trainer, pl_module):
        CheckSparseAfterEveryUpdate.taus = [pl_module.trigger.tau.detach().clone()]

    def on_train_epoch_end(self, trainer, pl_module):
        CheckSparseAfterEveryUpdate.taus.append(pl_module.trigger.tau.detach().clone())


CHECK = ["+callbacks.sparse_check._target_=test_sparse_trigger.CheckSparseAfterEveryUpdate"]


@pytest.mark.parametrize("source", ["epoch", "train_step"])
def test_learnable_sparse_trigger_stays_sparse_after_every_update_of_a_real_run(tmp_path, source):
    over = SPARSE_LEARNABLE + CHECK + ["trainer.max_epochs=3", "trigger.update.update_fraction=1.0",
                                       f"trigger.update.source={source}"]
    summary = train(compose_config("train", over, tmp_path))
    taus = CheckSparseAfterEveryUpdate.taus
    assert len(taus) == 4  # the init and after each of the 3 epochs
    for tau in taus:
        assert nonzeros(tau) <= 6 and tau.abs().max() <= EPS + 1e-7
    for before, after in zip(taus, taus[1:]):
        assert not torch.equal(before, after)  # every epoch really updated tau
    assert nonzeros(taus[-1]) == 6  # the sign step moves every coordinate with a gradient: k stay non-zero
    # With alpha = eps / 2 the kept coordinates reach eps in two steps of the same sign: saturation is visible.
    assert taus[-1].abs().max() == pytest.approx(EPS)

    bundle = load_bundle(summary["bundle"])
    assert [u["epoch"] for u in bundle.meta["trigger_updates"]] == [1, 2, 3]
    assert all(u["tau_linf"] <= EPS + 1e-7 for u in bundle.meta["trigger_updates"])
    assert torch.equal(bundle.trigger, taus[-1])
    assert bundle.meta["config"]["trigger"]["kind"] == "sparse_learnable"


def test_a_fixed_sparse_run_keeps_its_trigger_and_its_bundle_runs_downstream(tmp_path):
    over = TINY + CHECK + ["trigger=sparse", "trigger.k=0.1", "trigger.eps=32/255", "trainer.max_epochs=2"]
    cfg = compose_config("train", over, tmp_path)
    assert "update" not in cfg.trigger  # no update callback for the fixed variant
    summary = train(cfg)
    expected = sparse_trigger((1, 8, 8), k=0.1, eps="32/255", seed=0).tau
    assert all(torch.equal(tau, expected) for tau in CheckSparseAfterEveryUpdate.taus)

    model = load_bundle(summary["bundle"])
    tau = model.trigger
    assert tau.shape == (1, 8, 8) and torch.equal(tau, expected)
    assert nonzeros(tau) == 6 and torch.all(tau[tau != 0].abs() == torch.tensor(EPS))  # round(0.1 * 64)
    assert model.meta["trigger_kind"] == "sparse"
    # The deployed unit f(clamp(x + tau, 0, 1)), a plain nn.Module, and an attack on it, unchanged.
    x = torch.rand(8, 1, 8, 8)
    y = torch.arange(8) % 10
    with torch.no_grad():
        out = model(x)
        assert out.shape == (8, 10) and torch.allclose(out, model.net((x + tau).clamp(0, 1)))
    x_adv = build_attack("pgd", model, eps="8/255", steps=2)(x, y)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 8 / 255 + 1e-6


def test_resume_restores_the_sparse_trigger_exactly(tmp_path):
    """4 epochs straight vs 2 epochs, a crash, and ckpt_path=last to 4: the same tau (k and eps come
    from the config, tau from the checkpoint); updates after epochs 1 and 2 (floor(0.6 * 4))."""
    over = SPARSE_LEARNABLE + ["trainer.max_epochs=4"]
    straight = load_bundle(train(compose_config("train", over, tmp_path / "a"))["bundle"])
    crash = ["+callbacks.crash._target_=helpers_hydra.CrashAtEpochStart", "+callbacks.crash.epoch=2"]
    with pytest.raises(SimulatedPreemption):
        train(compose_config("train", over + crash, tmp_path / "b"))
    resumed = load_bundle(train(compose_config("train", over + ["ckpt_path=last"], tmp_path / "b"))["bundle"])
    assert [u["epoch"] for u in resumed.meta["trigger_updates"]] == [1, 2]
    assert torch.equal(resumed.trigger, straight.trigger)
    init = sparse_learnable_trigger((1, 8, 8), k=6, eps=EPS, alpha=ALPHA, seed=0).tau
    assert not torch.equal(resumed.trigger, init)  # tau really moved
    assert nonzeros(resumed.trigger) <= 6 and resumed.trigger.abs().max() <= EPS + 1e-7
