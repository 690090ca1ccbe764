"""Algorithm 2's trigger update: after epoch i (1-based), while i <= update_fraction * T,
``tau <- tau - alpha * sign(sum over the whole train set of grad_tau CE(f(x + tau), y))``.

Two sources for that gradient sum:

- ``source='epoch'`` (the paper): a separate pass over the whole training set after the epoch, with
  the epoch's final weights, on un-augmented training images (the datamodule's
  ``trigger_dataloader``), in the model mode given by ``mode``. ``mode='eval'`` (default) uses
  batch-norm running statistics and no dropout, so every sample's gradient is that of the network as
  it is deployed and the pass changes no state; ``mode='train'`` uses batch statistics, and the
  running statistics are restored afterwards so the pass still changes nothing.
- ``source='train_step'``: sums the gradient that each training step's backward pass already
  delivers to tau (scaled from batch-mean to batch-sum), at the cost of one input-gradient per step
  instead of a whole extra pass. It differs from the paper in three ways: the weights change during
  the epoch (each batch's gradient is taken at that step's weights), the images are augmented, and
  batch norm runs in train mode over the concatenated clean+triggered batch, so for networks with
  batch norm the gradient also carries the KL term's dependence on tau through the shared batch
  statistics (for networks without batch norm it is exactly the CE gradient).

Under DDP each rank sums its shard and the sums are all-reduced, so every rank takes the same step
and tau stays bitwise identical. The callback's state (the running sum of a partly finished epoch
and the update history) is saved in checkpoints, and the update is taken in ``on_train_epoch_end``
before ModelCheckpoint saves (our checkpoint config sets ``save_on_train_epoch_end: true``), so a
run resumed from an epoch-end checkpoint takes exactly the updates an uninterrupted one does. A
mid-epoch checkpoint (e.g. SLURM requeue, written at a step boundary by
:class:`trigact.callbacks.DeferredRequeue`) keeps the partial ``train_step`` sum; the rest of that
epoch is batch-for-batch the same with ``data.placement=device`` (which fast-forwards its loader),
not with host loaders (Lightning does not fast-forward them).

Caveat: ``mode='train'`` under DDP with ``sync_batchnorm`` runs a collective per batch; shards that
differ by one batch would then wait on each other, so use ``mode='eval'`` (the default) there.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
import torch.nn.functional as F

from torch import nn
from torch.fx.experimental.optimization import fuse as fuse_conv_bn

from trigact.common.errors import TrigactError, unknown_name
from trigact.common.validate import check_range

SOURCES = ("epoch", "train_step")
MODES = ("eval", "train")


class TriggerUpdateCallback(L.Callback):
    def __init__(self, update_fraction: float = 0.6, source: str = "epoch", mode: str = "eval"):
        if source not in SOURCES:
            raise unknown_name("trigger.update.source", source, SOURCES)
        if mode not in MODES:
            raise unknown_name("trigger.update.mode", mode, MODES)
        self.update_fraction = check_range(update_fraction, "trigger.update.update_fraction", 0.0, 1.0)
        self.source = source
        self.mode = mode
        self.grad_sum: torch.Tensor | None = None  # train_step source: running sum of this epoch
        self.grad_epoch = -1  # the epoch grad_sum belongs to
        self.history: list[dict] = []  # one entry per update taken

    # ----------------------------------------------------------------- schedule
    def last_update_epoch(self, max_epochs: int) -> int:
        """The last 1-based epoch after which tau is updated: floor(update_fraction * T)."""
        return math.floor(self.update_fraction * max_epochs + 1e-9)

    def updates_after(self, trainer: L.Trainer) -> bool:
        """Whether the epoch now running (trainer.current_epoch, 0-based) ends with an update."""
        return trainer.current_epoch + 1 <= self.last_update_epoch(trainer.max_epochs)

    # ----------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage):
        trigger = getattr(pl_module, "trigger", None)
        if trigger is None or trigger.step_size is None:
            kind = None if trigger is None else trigger.kind
            raise TrigactError(f"the trigger update needs a learnable trigger (trigger=learnable or trigger=sparse_learnable), got trigger={kind!r}")
        if stage == "fit" and (trainer.max_epochs is None or trainer.max_epochs < 1):
            raise TrigactError("the trigger update needs trainer.max_epochs (T in 'the first 60% of T epochs')")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # Per batch, not per epoch: Lightning skips on_train_epoch_start when it resumes mid-epoch.
        track = self.source == "train_step" and self.updates_after(trainer)
        pl_module.track_trigger_grad = track
        if not track:
            return
        tau = pl_module.trigger.tau
        if self.grad_epoch != trainer.current_epoch:  # a new epoch (a mid-epoch resume keeps its sum)
            self.grad_sum = torch.zeros_like(tau)
            self.grad_epoch = trainer.current_epoch
        elif self.grad_sum.device != tau.device:  # restored from a checkpoint onto the CPU
            self.grad_sum = self.grad_sum.to(tau.device)

    def on_after_backward(self, trainer, pl_module):
        leaf = getattr(pl_module, "trigger_leaf", None)
        if not pl_module.track_trigger_grad or leaf is None or leaf.grad is None:
            return
        pl_module.trigger_leaf = None
        grad = leaf.grad.detach()
        if not torch.isfinite(grad).all():
            return  # an AMP overflow step: the GradScaler skips it, and so do we
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # undo AMP loss scaling so batches add on the same scale
            grad = grad / scaler.get_scale()
        # training_step's CE is a batch mean, which Lightning also divides by the accumulation
        # count before backward; the paper sums over samples.
        scale = float(pl_module.last_batch_size * trainer.accumulate_grad_batches)
        self.grad_sum += grad * scale

    def on_train_epoch_end(self, trainer, pl_module):
        if not self.updates_after(trainer):
            return
        if self.source == "epoch":
            grad = self.epoch_pass_gradient(trainer, pl_module)
        else:
            grad = self.grad_sum.to(pl_module.trigger.tau.device)
        grad = trainer.strategy.reduce(grad, reduce_op="sum")
        pl_module.trigger.sign_step(grad)
        tau = pl_module.trigger.tau
        entry = {
            "epoch": trainer.current_epoch + 1,
            "grad_l1": float(grad.abs().sum()),
            "tau_linf": float(tau.abs().max()),
            "tau_l2": float(tau.norm()),
        }
        self.history.append(entry)
        # Identical on every rank; sync_dist only averages equal values (and keeps Lightning quiet).
        pl_module.log_dict({"trigger/tau_linf": entry["tau_linf"], "trigger/tau_l2": entry["tau_l2"]}, sync_dist=True)
        self.grad_sum, self.grad_epoch = None, -1
        pl_module.track_trigger_grad = False

    # ----------------------------------------------------------------- the paper's pass
    def epoch_pass_gradient(self, trainer, pl_module) -> torch.Tensor:
        """Sum over this rank's shard of the training set of grad_tau CE(f(clamp(x + tau)), y)."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "trigger_dataloader"):
            raise TrigactError("trigger.update.source=epoch needs a trigact datamodule with trigger_dataloader()")
        loader = datamodule.trigger_dataloader(rank=trainer.global_rank, world_size=trainer.world_size)
        net = eval_copy_with_fused_batchnorm(pl_module.net) if self.mode == "eval" else pl_module.net
        return trigger_gradient_sum(net, pl_module.trigger.tau, loader, mode=self.mode,
                                    max_batches=pass_batch_limit(trainer.limit_train_batches, len(loader)))

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self):
        return {
            "grad_sum": None if self.grad_sum is None else self.grad_sum.cpu(),
            "grad_epoch": self.grad_epoch,
            "history": list(self.history),
        }

    def load_state_dict(self, state_dict):
        self.grad_sum = state_dict["grad_sum"]
        self.grad_epoch = state_dict["grad_epoch"]
        self.history = list(state_dict["history"])


def eval_copy_with_fused_batchnorm(net: nn.Module) -> nn.Module:
    """An eval-mode copy of ``net`` with each BatchNorm folded into the conv before it.

    In eval mode BN is a fixed affine map, so folding it changes nothing but rounding, and it makes
    the epoch pass ~20% cheaper on the CPU, where BN costs almost as much as the convolutions of a
    small network. torch.fx does the folding; a network it cannot trace is used unfused.
    """
    net = copy.deepcopy(net).eval()
    try:
        return fuse_conv_bn(net, inplace=True)
    except Exception:  # noqa: BLE001 -- untraceable control flow: correctness first, speed second
        return net


def pass_batch_limit(limit_train_batches, num_batches: int) -> int:
    """The epoch pass honours ``trainer.limit_train_batches`` (debug runs), like the epoch itself:
    an int is a number of batches, a float a fraction; the default 1.0 means the whole train set."""
    if limit_train_batches is None:
        return num_batches
    if isinstance(limit_train_batches, int):
        return min(num_batches, limit_train_batches)
    return min(num_batches, max(1, math.ceil(float(limit_train_batches) * num_batches)))


def trigger_gradient_sum(net, tau: torch.Tensor, loader, mode: str = "eval", max_batches: int | None = None) -> torch.Tensor:
    """``sum_i grad_tau CE(net(clamp(x_i + tau, 0, 1)), y_i)`` over every sample of ``loader``.

    Only tau's gradient is computed (``autograd.grad``), so no weight gradient is built or
    disturbed. In ``mode='train'`` batch-norm running statistics are restored afterwards.
    """
    device = tau.device
    was_training = net.training
    saved_buffers = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    net.train(mode == "train")
    leaf = tau.detach().clone().requires_grad_(True)
    total = torch.zeros_like(tau)
    try:
        with torch.enable_grad():
            for i, (x, y) in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = x.to(device), y.to(device)
                loss = F.cross_entropy(net((x + leaf).clamp(0.0, 1.0)), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, leaf)
                total += grad
    finally:
        net.train(was_training)
        if mode == "train" and saved_buffers:
            net.load_state_dict(saved_buffers, strict=False)
    return total
