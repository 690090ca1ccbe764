"""``python -m trigact.train``: train one model (standard or with trigger activation) and write its bundle.

Thin on purpose: it builds the datamodule, the network, the trigger and the method's LightningModule
from the Hydra config, calls ``Trainer.fit``, tests, and saves the deployment bundle.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from trigact.bundle import read_bundle, save_bundle
from trigact.cli import quiet_libraries, user_errors
from trigact.config import instantiate_named
from trigact.errors import TrigactError
from trigact.io import atomic_write_json
from trigact.report import print_table
from trigact.models import build_model
from trigact.run_status import RunAttempt, RunLocked
from trigact.runs import register_resolvers
from trigact.tracking import finish_wandb_loggers, is_wandb_logger_config, wandb_logger
from trigact.triggers import build_trigger

register_resolvers()
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
BUNDLE_NAME = "bundle.pt"


def build_datamodule(cfg: DictConfig):
    return instantiate_named(cfg.data)


def build_run(cfg: DictConfig, datamodule):
    """The network, the trigger and the method's LightningModule for ``cfg``."""
    net = build_model(
        cfg.model.name,
        num_classes=datamodule.num_classes,
        in_chans=datamodule.in_chans,
        image_size=datamodule.image_size,
        mean=datamodule.mean,
        std=datamodule.std,
        **(OmegaConf.to_container(cfg.model, resolve=True).get("kwargs") or {}),
    )
    shape = (datamodule.in_chans, datamodule.image_size, datamodule.image_size)
    trig = cfg.trigger
    trigger = build_trigger(trig.kind, shape, eps=trig.get("eps"), alpha=trig.get("alpha"), seed=trig.get("seed", cfg.seed))
    module = instantiate(
        cfg.method.module,
        net=net,
        trigger=trigger,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        num_classes=datamodule.num_classes,
    )
    return module


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    update = cfg.trigger.get("update")  # not cfg.trigger.update: that is DictConfig's dict.update
    if update:
        # First: Lightning runs on_train_epoch_end hooks in list order, and the trigger image (and
        # anything else that reads tau at epoch end) must see the epoch's updated trigger.
        # ModelCheckpoint needs no care: Lightning always moves it to the end.
        callbacks.insert(0, instantiate(update))
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, (RichProgressBar, TQDMProgressBar))]
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    """The configured Lightning loggers; a W&B one gets its run from :mod:`trigact.tracking`."""
    nodes = [c for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    return [wandb_logger(cfg, c) if is_wandb_logger_config(c) else instantiate(c) for c in nodes]


def newest_checkpoint(run_dir: Path) -> Path:
    """``<run_dir>/checkpoints/last.ckpt`` (written at each epoch end), or a SLURM ``hpc_ckpt_N.ckpt``
    that Lightning saved into the run folder on a preemption signal, whichever is newer."""
    last = run_dir / "checkpoints" / "last.ckpt"
    candidates = [p for p in [last, *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else last


def resolve_checkpoint(ckpt_path, run_dir: Path, module: L.LightningModule | None = None) -> str | None:
    """Check the checkpoint to resume from before Lightning does, for a one-line error.

    ``last`` means the newest of ``<run_dir>/checkpoints/last.ckpt`` and SLURM ``hpc_ckpt_*.ckpt`` and starts from scratch when there is none
    yet (a first launch under a requeueing scheduler); an explicit path must exist. Either must load,
    and with ``module`` its weights must fit that module (:func:`check_checkpoint_fits`).
    """
    if ckpt_path is None:
        return None
    path = newest_checkpoint(run_dir) if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        if ckpt_path == "last":
            print(f"no checkpoint at {path} yet: starting from scratch")
            return None
        raise TrigactError(f"ckpt_path={ckpt_path!r}: no such file (use a .ckpt path or ckpt_path=last)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 -- any failure to read it is the same user-facing problem
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise TrigactError(f"checkpoint {path} is unreadable (corrupt or truncated: {first}); "
                           "pass another ckpt_path (e.g. an epochNNN.ckpt beside it)") from None
    if module is not None:
        check_checkpoint_fits(checkpoint, module, path)
    return str(path)


def check_checkpoint_fits(checkpoint, module: L.LightningModule, path) -> None:
    """Refuse a checkpoint whose ``state_dict`` keys or shapes differ from ``module``'s.

    Lightning would otherwise fail deep inside ``Trainer.fit`` with a state_dict-mismatch traceback.
    Only names and shapes are compared: the checkpoint is memory-mapped, so no weights are read.
    """
    saved = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict):
        raise TrigactError(f"checkpoint {path} holds no state_dict: not a Lightning checkpoint of a trigact run; "
                           "pass another ckpt_path")
    expected = module.state_dict()
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    resized = sorted(
        key for key in expected.keys() & saved.keys()
        if tuple(getattr(saved[key], "shape", ())) != tuple(expected[key].shape)
    )
    if not (missing or unexpected or resized):
        return
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", resized)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{label}: {', '.join(keys[:3])}{more}")
    raise TrigactError(
        f"checkpoint {path} was saved from a different model/config ({'; '.join(problems)}); "
        "resume with the model, data and trigger settings it was trained with, or pass another ckpt_path"
    )


def final_metrics(test_results: dict, uses_trigger: bool) -> dict:
    clean = float(test_results.get("test/acc_clean", float("nan")))
    metrics = {"test_acc_clean": clean}
    if uses_trigger:
        metrics["test_acc_trigger"] = float(test_results.get("test/acc_trigger", float("nan")))
        metrics["test_guess_acc_clean"] = float(test_results.get("test/guess_acc_clean", float("nan")))
    # The deployed unit's accuracy: with the trigger for a trigger-activation model.
    metrics["test_acc_deployed"] = metrics.get("test_acc_trigger", clean)
    return metrics


def train(cfg: DictConfig) -> dict:
    """Train (or find already trained) the run described by ``cfg``; return its summary."""
    run_dir = Path(cfg.paths.run_dir)
    bundle_path = run_dir / BUNDLE_NAME
    if bundle_path.exists():
        meta = read_bundle(bundle_path)["meta"]
        resume = "; nothing to resume" if cfg.get("ckpt_path") else ""
        print(f"already finished, not retrained{resume}: {bundle_path}")
        return {"run_dir": str(run_dir), "bundle": str(bundle_path), "skipped": True, **meta["metrics"]}

    # Rank 0 (the process Lightning's launchers start the others from) owns the folder's lock and
    # status; the other ranks of a DDP job train inside its attempt.
    attempt = RunAttempt(run_dir, launch_dir=_launch_dir()) if rank_zero_only.rank == 0 else contextlib.nullcontext()
    with attempt:
        return _train_attempt(cfg, run_dir, bundle_path, attempt if isinstance(attempt, RunAttempt) else None)


def _launch_dir() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except ValueError:  # not launched through Hydra (tests, the pipeline's compose)
        return None


def _train_attempt(cfg: DictConfig, run_dir: Path, bundle_path: Path, attempt) -> dict:
    ckpt_request = cfg.get("ckpt_path")
    note = attempt.retry_note() if attempt is not None else None
    if note:
        print(note)
        if ckpt_request is None:
            ckpt_request = "last"  # an unfinished earlier attempt: go on from its last checkpoint
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_run(cfg, datamodule)
    ckpt_path = resolve_checkpoint(ckpt_request, run_dir, module)  # before a W&B run is started
    callbacks = build_callbacks(cfg)
    loggers = build_loggers(cfg)
    failed = True
    try:
        # default_root_dir: Lightning's own files (SLURM hpc_ckpt_*.ckpt, default checkpoints) go
        # into this run's folder, never into a launch directory shared by other runs.
        trainer: L.Trainer = instantiate(
            cfg.trainer, default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers or False
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        failed = False
    finally:
        # One W&B run per train() call, marked failed if fit raised: a process may train several
        # models (the pipeline), and an open run would stay "running" until the process exits.
        finish_wandb_loggers(loggers, failed=failed)
    metrics = final_metrics(results, module.trigger is not None)

    if trainer.is_global_zero:
        config = OmegaConf.to_container(cfg, resolve=True)
        trigger = None if module.trigger is None else module.trigger.tau
        history = [c.history for c in trainer.callbacks if hasattr(c, "history")]
        meta = {
            "config": config,
            "metrics": metrics,
            "run_name": str(run_dir),
            "method": cfg.method.name,
            "trigger_kind": cfg.trigger.kind,
            "trigger_updates": history[0] if history else [],
            "epochs": trainer.current_epoch,
        }
        save_bundle(bundle_path, module.net, trigger, meta)
        atomic_write_json({"metrics": metrics, "config": config}, run_dir / "summary.json")
        if attempt is not None:
            attempt.finished(metrics)
    trainer.strategy.barrier()
    return {"run_dir": str(run_dir), "bundle": str(bundle_path), "skipped": False,
            "is_global_zero": trainer.is_global_zero, **metrics}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    with user_errors():
        try:
            summary = train(cfg)
        except RunLocked as busy:
            # Another launch (e.g. an overlapping sweep) is training this very run: not an error
            # of this launch, and a sweep's other jobs go on.
            print(f"skipped: {busy}")
            return
        if not summary.get("is_global_zero", True):
            return  # under DDP only rank 0 reports (and writes)
        print_table([{"name": f"{cfg.method.name} / {cfg.model.name}", **summary}], "trigact.train")
        print(f"bundle: {summary['bundle']}")


if __name__ == "__main__":
    main()
