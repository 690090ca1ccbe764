"""SLURM requeue checkpoints written at a step boundary, not wherever the signal lands.

Lightning's SLURM handler (``_SignalConnector._slurm_sigusr_handler_fn``) saves ``hpc_ckpt_N.ckpt``
inside the signal handler, i.e. at whatever Python bytecode the main thread was executing: between a
batch being handed out and its optimizer step, half-way through a foreach optimizer update, or in the
middle of the learnable trigger's epoch-end pass. Such a checkpoint mixes states from two moments:
the weights from before the interrupted step, and the data position (``placement=device`` records a
batch as served when it is handed out), the RNG state and the trigger callback's partial gradient sum
from after part of it. A run resumed from it skips (or half-takes) one batch: not what an
uninterrupted run does.

Under hydra-submitit-launcher (``hydra/launcher=slurm``) Lightning installs no handler at all:
submitit has already put its own on the signal (``checkpoint_and_try_requeue``), and Lightning only
registers where none exists. Submitit's handler then requeues the job and exits on rank 0 in the
middle of a step, with no checkpoint, and the requeued job restarts from the last epoch end.

:class:`DeferredRequeue` notes the signal and acts at the next safe point: the end of a training batch
that takes an optimizer step (after the step and the ``on_train_batch_end`` of every callback listed
before it: ``trigact.training.run`` appends it after the configured ones; not in the middle of
gradient accumulation, whose partial ``.grad`` a checkpoint does not hold), the end of a training
epoch (after the trigger update), the end of a validation loop, or the end of training. There it saves
``hpc_ckpt_N.ckpt`` on every rank and then requeues as the handler it displaced would have: with
Lightning's own (``scontrol requeue``), or with submitit's (its requeue count, then ``sys.exit`` on
rank 0). SLURM's warning (``--signal=USR2@<signal_delay_s>``, 120 s in ``conf/hydra/launcher/slurm.yaml``)
leaves far more time than one step; a pass longer than that (an epoch-end trigger update on a large set)
is killed before it saves, and the run then resumes from its last epoch-end checkpoint, which is exact too.
(It is not a ``Checkpoint`` subclass, which Lightning would run last: Lightning refuses those with
``enable_checkpointing=false``.)

Under DDP every rank must save at the same step (``save_checkpoint`` has a barrier, and the ranks
would otherwise record different positions), so with more than one process the pending flag is
reduced across ranks (any rank flagged) at each safe point: one scalar all-reduce per training step,
only when SLURM auto-requeue is on.

Lightning has no hook for this (its handler is a private method of the private signal connector,
bound when the trainer starts), hence the instance-level override in :meth:`setup` (which runs before
``register_signal_handlers``) and, where another handler was there first, a direct ``signal.signal``
once training starts. Tested against the pinned lightning in ``tests/test_slurm.py`` and
``tests/test_device_data.py``.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

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


def discard_requeue_checkpoints(trainer: L.Trainer, run_dir) -> None:
    """Delete ``run_dir``'s ``hpc_ckpt_*.ckpt`` once a fit has finished (every rank calls this).

    They are superseded by the finished fit (its last epoch-end checkpoint stays), and Lightning would
    otherwise load the newest of them into the model for ``trainer.test(ckpt_path=None)`` whenever
    it detects SLURM: a resumed run's test and bundle would then hold the weights, trigger and
    callback state of the attempt before."""
    if trainer.is_global_zero:
        for path in Path(run_dir).glob("hpc_ckpt_*.ckpt"):
            path.unlink(missing_ok=True)
    trainer.strategy.barrier("trigact.discard_requeue_checkpoints")


class DeferredRequeue(L.Callback):
    """Moves SLURM's requeue checkpoint from the signal handler to the next step boundary."""

    def __init__(self) -> None:
        self.pending: int | None = None  # the signal number received and not acted on yet
        self.acted = False  # a requeue was started: later signals of this attempt are ignored
        self._connector = None
        self._signal: int | None = None
        self._displaced = None  # a handler that was on the signal before Lightning's (submitit's)

    # ------------------------------------------------------------------ installing
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not requeues_on_signal(trainer):
            return
        connector = trainer._signal_connector
        if "_slurm_sigusr_handler_fn" in vars(connector):
            return  # this trainer's connector is already deferred (a second fit)
        self._connector = connector
        self._signal = int(trainer._accelerator_connector.cluster_environment.requeue_signal)
        # Read by register_signal_handlers (called after setup hooks) when it builds the handler list.
        connector._slurm_sigusr_handler_fn = self._note_signal

    def _install_over_displaced(self) -> None:
        """Where Lightning registered nothing because a handler was already there, take the signal."""
        if self._connector is None or self._displaced is not None:
            return
        current = signal.getsignal(self._signal)
        if self._note_signal in getattr(current, "signal_handlers", ()):
            return  # Lightning's handler list holds ours
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works there (Lightning skips registering too)
        self._displaced = current
        signal.signal(self._signal, self._note_signal)

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install_over_displaced()

    def on_train_start(self, trainer, pl_module) -> None:
        self._install_over_displaced()

    def _note_signal(self, signum, frame) -> None:
        if not self.acted:
            self.pending = int(signum)

    # ------------------------------------------------------------------ acting
    def _act_if_signalled(self, trainer: L.Trainer) -> None:
        if self._connector is None or self.acted:
            return
        pending = self.pending is not None
        if trainer.world_size > 1:
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if not pending:
            return
        signum = self.pending if self.pending is not None else self._signal
        self.pending, self.acted = None, True
        displaced = self._displaced
        if displaced is None:
            # Lightning's own handler, unchanged: finalize loggers, save hpc_ckpt_N.ckpt, requeue (rank 0).
            type(self._connector)._slurm_sigusr_handler_fn(self._connector, signum, None)
            return
        for logger in trainer.loggers:  # what Lightning's handler does first
            logger.finalize("finished")
        trainer.save_checkpoint(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        if callable(displaced):
            displaced(signum, None)  # submitit: rank 0 requeues (or raises: requeued too often) and exits

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        epoch_loop = trainer.fit_loop.epoch_loop
        if epoch_loop._should_accumulate():  # the same answer on every rank
            return
        self._act_if_signalled(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._act_if_signalled(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._act_if_signalled(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._act_if_signalled(trainer)

    # ------------------------------------------------------------------ cleaning up
    def _uninstall(self) -> None:
        if self._connector is None:
            return
        vars(self._connector).pop("_slurm_sigusr_handler_fn", None)  # Lightning's own method again
        if self._displaced is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self._signal, self._displaced)
        self._connector, self._displaced, self.pending = None, None, None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._uninstall()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._uninstall()
