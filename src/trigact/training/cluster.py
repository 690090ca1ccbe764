"""Cluster glue: Lightning's SLURM environment listening to the signal submitit's jobs receive."""

from __future__ import annotations

import signal

from trigact.common.errors import TrigactError


def slurm_environment(requeue_signal: str = "SIGUSR2", auto_requeue: bool = True):
    """``SLURMEnvironment`` that saves ``hpc_ckpt_N.ckpt`` into the run folder and requeues the job
    on ``requeue_signal``.

    hydra-submitit-launcher asks SLURM for ``--signal=USR2@<signal_delay_s>`` (submitit's default
    preemption signal), while Lightning listens to SIGUSR1 by default: the two must agree, and a
    config cannot name a ``signal.Signals`` member directly, hence this factory.
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    name = requeue_signal if requeue_signal.startswith("SIG") else f"SIG{requeue_signal}"
    if not hasattr(signal, name) or not isinstance(getattr(signal, name), signal.Signals):
        raise TrigactError(f"requeue_signal={requeue_signal!r} is not a signal; e.g. SIGUSR1 or SIGUSR2")
    return SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=getattr(signal, name))
