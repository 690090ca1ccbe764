"""Algorithm 2: the epoch-end sign step of the learnable trigger, its schedule and its state."""

import copy
import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import make_trainer
from trigact.callbacks import TriggerUpdateCallback, trigger_gradient_sum
from trigact.common.errors import TrigactError
from trigact.methods import TriggerActivationModule
from trigact.models import build_model
from trigact.triggers import fixed_trigger, learnable_trigger

ALPHA = 8 / 255


def make_module(dm, model="small_cnn", lr=0.05, trigger=None, seed=0):
    torch.manual_seed(seed)
    net = build_model(model, dm.num_classes, dm.in_chans, dm.image_size, dm.mean, dm.std)
    trigger = trigger or learnable_trigger((dm.in_chans, dm.image_size, dm.image_size), ALPHA, seed=seed)
    return TriggerActivationModule(
        net=net, trigger=trigger, optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=0.9)
    )


class Snapshot(L.Callback):
    """Records the net and tau at every epoch end, before the trigger update (it runs first)."""

    def __init__(self):
        self.nets, self.taus_before = [], []

    def on_train_epoch_end(self, trainer, pl_module):
        self.nets.append(copy.deepcopy(pl_module.net))
        self.taus_before.append(pl_module.trigger.tau.clone())


def independent_gradient_sum(net, tau, dataset, batch_size=50):
    """The paper's sum, computed without the callback: per-batch CE-sum gradients added up."""
    net = copy.deepcopy(net).eval()
    total = torch.zeros_like(tau)
    for start in range(0, len(dataset), batch_size):
        xs, ys = zip(*[dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        leaf = tau.clone().requires_grad_(True)
        loss = F.cross_entropy(net((torch.stack(xs) + leaf).clamp(0, 1)), torch.stack(ys), reduction="sum")
        loss.backward()
        total += leaf.grad
    return total


def test_one_update_equals_minus_alpha_sign_of_summed_gradient(tmp_path, digits8):
    module = make_module(digits8)
    snap = Snapshot()
    trainer = make_trainer(tmp_path, 1, [snap, TriggerUpdateCallback(update_fraction=1.0)])
    trainer.fit(module, datamodule=digits8)
    expected_grad = independent_gradient_sum(snap.nets[0], snap.taus_before[0], digits8.train_eval_set)
    assert expected_grad.abs().sum() > 0
    expected = snap.taus_before[0] - ALPHA * expected_grad.sign()
    assert torch.allclose(module.trigger.tau, expected, atol=1e-7)
    # The pass itself changes no network state (eval mode: no BN statistics moved).
    for a, b in zip(snap.nets[0].state_dict().values(), module.net.state_dict().values()):
        assert torch.equal(a, b)


def test_gradient_sum_train_mode_restores_batchnorm_statistics(digits8):
    module = make_module(digits8)
    before = copy.deepcopy(module.net.state_dict())
    grad = trigger_gradient_sum(module.net, module.trigger.tau, digits8.trigger_dataloader(), mode="train")
    assert grad.abs().sum() > 0
    for k, v in module.net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_no_update_after_sixty_percent_of_epochs(tmp_path, digits8):
    module = make_module(digits8)
    snap = Snapshot()
    update = TriggerUpdateCallback(update_fraction=0.6)
    trainer = make_trainer(tmp_path, 5, [snap, update], limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=digits8)
    # T=5: updates after epochs 1, 2, 3 (3 <= 0.6 * 5), none after 4 and 5.
    assert [h["epoch"] for h in update.history] == [1, 2, 3]
    taus = snap.taus_before + [module.trigger.tau]
    for epoch in (1, 2, 3):  # tau before epoch e+1's end differs from tau before epoch e's end
        assert not torch.equal(taus[epoch - 1], taus[epoch])
    assert torch.equal(taus[3], taus[4]) and torch.equal(taus[4], taus[5])


def test_train_step_source_equals_epoch_pass_when_weights_and_statistics_are_fixed(tmp_path, digits8):
    """With lr=0 and a network without batch norm or dropout (mlp), every training step sees
    the same weights, so the per-step sums must add up to the paper's whole-train-set sum."""
    dm = digits8
    kwargs = dict(model="mlp", lr=0.0)
    by_step = make_module(dm, **kwargs)
    by_pass = make_module(dm, **kwargs)
    cb_step = TriggerUpdateCallback(update_fraction=1.0, source="train_step")
    cb_pass = TriggerUpdateCallback(update_fraction=1.0, source="epoch", mode="train")
    make_trainer(tmp_path / "a", 1, [cb_step]).fit(by_step, datamodule=dm)
    make_trainer(tmp_path / "b", 1, [cb_pass]).fit(by_pass, datamodule=dm)
    assert cb_step.history[0]["grad_l1"] == pytest.approx(cb_pass.history[0]["grad_l1"], rel=1e-4)
    assert torch.equal(by_step.trigger.tau, by_pass.trigger.tau)


def test_checkpoint_round_trip_restores_tau_and_callback_state(tmp_path, digits8):
    module = make_module(digits8)
    update = TriggerUpdateCallback(update_fraction=1.0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_train_epoch_end=True)
    make_trainer(tmp_path, 2, [update, ckpt], limit_train_batches=2, limit_val_batches=1).fit(module, datamodule=digits8)
    assert len(update.history) == 2

    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert torch.equal(state["state_dict"]["trigger.tau"], module.trigger.tau)

    # Resume into a fresh module whose tau is different: both tau and the history come back.
    fresh = make_module(digits8, seed=1)
    assert not torch.equal(fresh.trigger.tau, module.trigger.tau)
    update2 = TriggerUpdateCallback(update_fraction=1.0)
    seen = {}

    class Peek(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["tau"] = pl_module.trigger.tau.clone()
            seen["history"] = list(update2.history)

    trainer = make_trainer(tmp_path, 3, [Peek(), update2], limit_train_batches=2, limit_val_batches=1)
    trainer.fit(fresh, datamodule=digits8, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(seen["tau"], module.trigger.tau)
    assert seen["history"] == update.history
    assert [h["epoch"] for h in update2.history] == [1, 2, 3]


def test_update_refuses_a_fixed_trigger(tmp_path, digits8):
    shape = (digits8.in_chans, digits8.image_size, digits8.image_size)
    module = make_module(digits8, trigger=fixed_trigger(shape, ALPHA))
    with pytest.raises(TrigactError, match="learnable"):
        make_trainer(tmp_path, 1, [TriggerUpdateCallback()]).fit(module, datamodule=digits8)


@pytest.mark.parametrize("kwargs", [{"source": "both"}, {"mode": "inference"}, {"update_fraction": 1.5}])
def test_bad_update_options(kwargs):
    with pytest.raises(TrigactError):
        TriggerUpdateCallback(**kwargs)


@pytest.mark.parametrize(
    "value,expected",
    [("abc", "update_fraction='abc' is not a number; expected one in [0, 1]"),
     (None, "update_fraction=None is not a number; expected one in [0, 1]"),
     (float("nan"), "update_fraction=nan is not a number"),
     (float("inf"), "update_fraction=inf must be in [0, 1]")],
)
def test_update_fraction_must_be_a_number_in_range(value, expected):
    with pytest.raises(TrigactError) as err:
        TriggerUpdateCallback(update_fraction=value)
    assert f"trigger.update.{expected}" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "value,expected",
    [("abc", "kl_weight='abc' is not a number; expected one in [0, inf)"),
     (float("nan"), "kl_weight=nan is not a number"),
     (float("inf"), "kl_weight=inf must be in [0, inf)"),
     (-0.5, "kl_weight=-0.5 must be in [0, inf)")],
)
def test_kl_weight_must_be_a_finite_number_at_least_zero(value, expected):
    net = build_model("mlp", 10, 1, 8, (0.5,), (0.5,))
    with pytest.raises(TrigactError) as err:
        TriggerActivationModule(net=net, trigger=learnable_trigger((1, 8, 8), ALPHA), optimizer=torch.optim.SGD,
                                kl_weight=value)
    assert f"method.module.{expected}" in str(err.value) and "\n" not in str(err.value)


def test_fused_eval_copy_gives_the_same_gradient_and_leaves_the_net_alone(digits8):
    from trigact.callbacks.trigger_update import eval_copy_with_fused_batchnorm

    module = make_module(digits8, model="tiny_resnet")
    module.net.train()
    for m in module.net.modules():  # non-trivial BN statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fused = eval_copy_with_fused_batchnorm(module.net)
    assert module.net.training  # the original is untouched
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    loader = digits8.trigger_dataloader()
    tau = module.trigger.tau
    plain = trigger_gradient_sum(module.net, tau, loader, mode="eval")
    folded = trigger_gradient_sum(fused, tau, loader, mode="eval")
    assert torch.allclose(plain, folded, rtol=1e-4, atol=1e-5 * plain.abs().max().item())
