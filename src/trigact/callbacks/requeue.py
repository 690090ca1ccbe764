"""SLURM requeue checkpoints written at a step boundary, not wherever the signal lands.

Lightning's SLURM handler (``_SignalConnector._slurm_sigusr_handler_fn``) saves ``hpc_ckpt_N.ckpt``
inside the signal handler, i.e. at whatever Python bytecode the main thread was executing: between a
batch being handed out and its optimizer step, half-way through a foreach optimizer update, or in the
middle of the learnable trigger's epoch-end pass. Such a checkpoint mixes states from two moments:
the weights from before the interrupted step, and the data position (``placement=device`` records a
batch as served when it is handed out), the RNG state and the trigger callback's partial gradient sum
from after part of it. A run resumed from it skips (or half-takes) one batch: not what an
uninterrupted run does.

:class:`DeferredRequeue` keeps Lightning's handler but only notes the signal; the save and the
``scontrol requeue`` happen at the next safe point: the end of a training batch (after the optimizer
step and the ``on_train_batch_end`` of every callback listed before it: ``trigact.training.run``
appends it after the configured ones), the end of a training epoch (after the trigger update), or
the end of a validation loop. (It is not a ``Checkpoint`` subclass, which Lightning would run last:
Lightning refuses those with ``enable_checkpointing=false``.) SLURM's warning (``--signal=USR2@<signal_delay_s>``, 120 s in ``conf/hydra/launcher/slurm.yaml``)
leaves far more time than one step; a pass longer than that (an epoch-end trigger update on a large set)
is killed before it saves, and the run then resumes from its last epoch-end checkpoint, which is exact too.

Under DDP every rank must save at the same step (``save_checkpoint`` has a barrier, and the ranks
would otherwise record different positions), so with more than one process the pending flag is
reduced across ranks (any rank flagged) at each safe point: one scalar all-reduce per training step,
only when SLURM auto-requeue is on.

Lightning has no hook for this (its handler is a private method of the private signal connector,
bound when the trainer starts), hence the instance-level override in :meth:`setup`, which runs before
``register_signal_handlers``. Tested against the pinned lightning in ``tests/test_slurm.py``.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment


def requeues_on_signal(trainer: L.Trainer) -> bool:
    environment = trainer._accelerator_connector.cluster_environment
    return isinstance(environment, SLURMEnvironment) and bool(environment.auto_requeue)


def with_deferred_requeue(callbacks: list, plugins: list) -> list:
    """``callbacks`` with a :class:`DeferredRequeue` appended when a plugin is a requeueing SLURM environment."""
    if any(isinstance(p, SLURMEnvironment) and p.auto_requeue for p in plugins):
        return [*callbacks, DeferredRequeue()]
    return list(callbacks)


class DeferredRequeue(L.Callback):
    """Moves Lightning's SLURM requeue save from the signal handler to the next step boundary."""

    def __init__(self) -> None:
        self.pending: int | None = None  # the signal number received and not acted on yet
        self._connector = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not requeues_on_signal(trainer):
            return
        connector = trainer._signal_connector
        if "_slurm_sigusr_handler_fn" in vars(connector):
            return  # this trainer's connector is already deferred (a second fit)
        self._connector = connector
        # Read by register_signal_handlers (called after setup hooks) when it builds the handler list.
        connector._slurm_sigusr_handler_fn = self._note_signal

    def _note_signal(self, signum, frame) -> None:
        self.pending = int(signum)

    def _act_if_signalled(self, trainer: L.Trainer) -> None:
        if self._connector is None:
            return
        pending = self.pending is not None
        if trainer.world_size > 1:
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if not pending:
            return
        signum = self.pending if self.pending is not None else int(
            trainer._accelerator_connector.cluster_environment.requeue_signal)
        self.pending = None
        # Lightning's own handler, unchanged: finalize loggers, save hpc_ckpt_N.ckpt, requeue (rank 0).
        type(self._connector)._slurm_sigusr_handler_fn(self._connector, signum, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._act_if_signalled(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._act_if_signalled(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._act_if_signalled(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._connector is not None and stage == "fit":
            vars(self._connector).pop("_slurm_sigusr_handler_fn", None)
            self._connector = None
