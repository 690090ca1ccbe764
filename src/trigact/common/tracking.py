"""Weights & Biases for every entry point: whether it is on, its runs (offline without a network), tables.

``train`` logs through Lightning's ``WandbLogger`` (see :func:`wandb_logger`); ``attack``, ``evaluate``
and ``pipeline`` start their own runs with :func:`init_wandb_run` and log results with
:func:`log_tables`. All runs go through :func:`init_wandb_run`, so they share one policy:

- ``WANDB_MODE`` is honoured as set. When it is unset and W&B cannot be reached (no API key, or
  the server does not answer within ~2 s), it is set to ``offline`` for this process and one line
  says so; ``wandb sync <dir>/wandb/offline-run-*`` uploads such runs later.
- The run's config is the whole resolved Hydra config.
- Runs of one Hydra multirun sweep share a ``group`` (the sweep folder's name) unless the config
  names one (``logger.wandb.group``); a single run is grouped by its dataset.
- ``job_type`` says which entry point wrote the run: ``train``, ``attack``, ``eval``, ...
"""

from __future__ import annotations

import netrc
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from trigact.common.errors import TrigactError

OFFLINE_MODES = ("offline", "dryrun")
DEFAULT_PROJECT = "trigact"
DEFAULT_HOST = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 2.0

_said_offline = False  # the offline notice is printed once per process


# ----------------------------------------------------------------------------- config
def is_wandb_logger_config(node) -> bool:
    """Whether a ``logger.<key>`` config node builds Lightning's WandbLogger."""
    if not isinstance(node, (Mapping, DictConfig)):
        return False
    return str(node.get("_target_", "")).rsplit(".", 1)[-1] == "WandbLogger"


def wandb_settings(cfg) -> dict:
    """The (resolved) W&B logger node of ``cfg``, ``{}`` when there is none."""
    for node in (cfg.get("logger") or {}).values():
        if is_wandb_logger_config(node):
            return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return {}


def wandb_enabled(cfg) -> bool:
    """Whether ``cfg`` logs to W&B: a logger entry is a WandbLogger (``logger=wandb``) and
    ``WANDB_MODE`` is not ``disabled``."""
    return bool(wandb_settings(cfg)) and os.environ.get("WANDB_MODE", "").strip() != "disabled"


def _hydra_sweep_name() -> str | None:
    """The multirun sweep folder's name when running as a job of a Hydra sweep, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover -- hydra is a dependency
        return None
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(str(hydra_cfg.sweep.dir)).name or None


def run_group(cfg, explicit: str | None = None) -> str | None:
    """The W&B group: ``explicit`` (``logger.wandb.group``) if given; else the Hydra multirun sweep
    folder's name, so every job of one sweep lands in one group; else the dataset's name."""
    if explicit:
        return str(explicit)
    sweep = _hydra_sweep_name()
    if sweep:
        return sweep
    data = cfg.get("data") if hasattr(cfg, "get") else None
    return str(data.get("name")) if data is not None and data.get("name") else None


# ----------------------------------------------------------------------------- online or offline
def _server() -> tuple[str, int]:
    """(host, port) of the W&B server: ``WANDB_BASE_URL`` (a local server) or the public one."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST)
    if not url.hostname:
        url = urlparse(DEFAULT_HOST)
    return url.hostname, url.port or (80 if url.scheme == "http" else 443)


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:  # where `wandb login` stores the key
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connect to ``host`` in a daemon thread, abandoned after ``timeout``: a hanging DNS
    lookup (no network at all) cannot block the caller for longer than that."""
    answered = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, name="wandb-reachability", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered)


def _offline_reason() -> str | None:
    host, port = _server()
    if not _has_api_key(host):
        return "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    if not _reachable(host, port):
        return f"no network ({host}:{port} did not answer)"
    return None


def wandb_mode() -> str:
    """The mode W&B runs in for this process: ``WANDB_MODE`` when set; otherwise ``offline`` if W&B
    cannot be reached (then ``WANDB_MODE=offline`` is set for the rest of the process), else
    ``online``. Says once per process, in one line, when runs are offline and why."""
    global _said_offline
    mode = os.environ.get("WANDB_MODE", "").strip()
    reason = f"WANDB_MODE={mode}" if mode in OFFLINE_MODES else None
    if not mode:
        reason = _offline_reason()
        mode = "offline" if reason else "online"
        os.environ["WANDB_MODE"] = mode  # decided once: later runs neither re-probe nor disagree
    if reason and not _said_offline:
        _said_offline = True
        print(f"wandb: logging offline: {reason}; upload later with `wandb sync <run dir>/wandb/offline-run-*`",
              flush=True)
    return mode


# ----------------------------------------------------------------------------- runs
def init_wandb_run(cfg, job_type: str, name: str | None = None, group: str | None = None, dir=None):
    """Start a W&B run whose config is the whole resolved ``cfg``; the caller finishes it (``run.finish()``).

    ``project``, ``entity`` and ``tags`` come from the config's W&B logger node when it has one;
    ``group`` defaults to :func:`run_group`; ``dir`` (where ``wandb/`` is written) to
    ``paths.output_dir``. ``reinit='create_new'``: a run that is still open in this process is
    neither adopted nor finished.
    """
    import wandb

    settings = wandb_settings(cfg)
    wandb_mode()  # sets WANDB_MODE=offline when W&B cannot be reached
    if dir is None:
        paths = cfg.get("paths") or {}
        dir = paths.get("output_dir") or "."
    Path(dir).mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return wandb.init(
        project=settings.get("project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        entity=settings.get("entity"),
        tags=settings.get("tags"),
        name=name,
        group=run_group(cfg, group or settings.get("group")),
        job_type=job_type,
        dir=str(dir),
        config=config,
        reinit="create_new",
    )


def wandb_logger(cfg, node):
    """Lightning's WandbLogger for a training run, from the ``logger.<key>`` config ``node``.

    Its run is started here through :func:`init_wandb_run` (on global rank 0 only; other DDP
    ranks never log) instead of lazily by Lightning, so that it follows the same policy as every
    other run and never adopts a run left open in this process (the logger's lazy path would).
    """
    from hydra.utils import instantiate
    from lightning.pytorch.utilities import rank_zero_only

    settings = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    experiment = None
    if rank_zero_only.rank == 0:
        experiment = init_wandb_run(cfg, job_type=settings.get("job_type") or "train", name=settings.get("name"),
                                    group=settings.get("group"), dir=settings.get("save_dir"))
        # What WandbLogger sets up when it creates a run itself: metrics against the global step.
        experiment.define_metric("trainer/global_step")
        experiment.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    return instantiate(node, experiment=experiment)


def finish_wandb_loggers(loggers, failed: bool = False) -> None:
    """Finish the runs of the WandbLoggers among ``loggers`` (rank 0; a no-op elsewhere), so the
    next run started in this process (e.g. the pipeline's next model) is a run of its own."""
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    for logger in loggers:
        # The private attribute, not .experiment: that would start a run just to finish it.
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish(exit_code=1 if failed else 0)


# ----------------------------------------------------------------------------- tables
Rows = Sequence[Mapping]
ColumnsAndRows = tuple  # (columns: Sequence[str], rows: Sequence[Sequence])


def table_columns_and_rows(key: str, table) -> tuple[list[str], list[list]]:
    """``(columns, rows)`` from a list of row dicts (columns in first-seen key order; a missing key
    is None) or from a ``(columns, rows)`` pair."""
    if isinstance(table, tuple) and len(table) == 2:
        columns, rows = [str(c) for c in table[0]], [list(r) for r in table[1]]
        for i, row in enumerate(rows):
            if len(row) != len(columns):
                raise TrigactError(f"table {key!r}: row {i} has {len(row)} values for {len(columns)} columns")
        return columns, rows
    if isinstance(table, Sequence) and not isinstance(table, (str, bytes)) and all(isinstance(r, Mapping) for r in table):
        columns = list(dict.fromkeys(str(k) for row in table for k in row))
        return columns, [[row.get(c) for c in columns] for row in table]
    raise TrigactError(f"table {key!r} must be a list of row dicts or a (columns, rows) pair, got {type(table).__name__}")


def log_tables(run, tables: Mapping[str, Rows | ColumnsAndRows]) -> None:
    """Log each ``name -> table`` as a ``wandb.Table`` in one step of ``run``; no-op when ``run`` is None.

    A table is a list of row dicts (e.g. ``[{"attack": "pgd", "R": 0.12}, ...]``) or a
    ``(columns, rows)`` pair. Columns may mix types (a row's value may be None or NaN).
    """
    if run is None or not tables:
        return
    import wandb

    logged = {}
    for key, table in tables.items():
        columns, rows = table_columns_and_rows(key, table)
        logged[key] = wandb.Table(columns=columns, data=rows, allow_mixed_types=True)
    run.log(logged)


def job_run(cfg, job_type: str, name: str, dir):
    """A W&B run for the ``attack``/``eval`` stage when ``cfg.wandb.enabled`` (None otherwise).

    The stage configs carry a small ``wandb:`` node (enabled, project, entity, group, tags) instead
    of a Lightning logger: there is no Trainer in these stages.
    """
    settings = OmegaConf.to_container(cfg.wandb, resolve=True) if cfg.get("wandb") else {}
    if not settings.get("enabled") or os.environ.get("WANDB_MODE", "").strip() == "disabled":
        return None
    node = {"_target_": "lightning.pytorch.loggers.WandbLogger",
            **{k: settings.get(k) for k in ("project", "entity", "tags", "group")}}
    # paths.run_dir names a training run; these stages have none (it cannot resolve here).
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.get("paths", {}).pop("run_dir", None)
    config = OmegaConf.to_container(OmegaConf.create(plain), resolve=True)
    config["logger"] = {"wandb": node}
    return init_wandb_run(config, job_type, name=name, group=settings.get("group"), dir=dir)
