"""What every entry point shares: one-line errors for bad input, and quiet third-party logging."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

from omegaconf.errors import MissingMandatoryValue

from trigact.errors import TrigactError


@contextlib.contextmanager
def user_errors():
    """Turn a :class:`TrigactError` (or a mandatory ``???`` config value left unset) into
    ``trigact: error: <message>`` and exit status 2; in a multirun job, into that line and a failed job,
    so the sweep goes on with its other points."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 -- re-raised unless a TrigactError is behind it
        # Hydra's instantiate wraps a constructor's exception in InstantiationException.
        cause = err
        while cause is not None and not isinstance(cause, (TrigactError, MissingMandatoryValue)):
            cause = cause.__cause__
        if cause is None:
            raise
        if isinstance(cause, MissingMandatoryValue):  # a `???` in conf/ nobody set on the command line
            key = cause.full_key or str(cause).splitlines()[0]
            cause = f"{key} is required and was not given; set it on the command line ({key}=...)"
        print(f"trigact: error: {cause}", file=sys.stderr)
        if in_multirun():
            # Hydra runs the other jobs of a sweep (and Optuna the other trials) only when a job fails
            # with an Exception; SystemExit would end the whole sweep at the first bad point.
            raise SweepJobError(str(cause)) from None
        sys.exit(2)


class SweepJobError(TrigactError):
    """One job of a Hydra multirun failed on bad input (its one-line message is already printed)."""


def in_multirun() -> bool:
    """Whether this process is running a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def quiet_libraries() -> None:
    """Hide advice that does not apply to this project (e.g. "consider more dataloader workers"
    for in-memory tensor datasets) so the output a user reads is ours."""
    for pattern in (
        ".*does not have many workers.*",
        ".*GPU available but not used.*",
        ".*is an invalid version and will not be supported.*",
        ".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)
