"""``python -m trigact.train``: train one model (standard or with trigger activation) and write its bundle.

Thin on purpose: it builds the datamodule, the network, the trigger and the method's LightningModule
from the Hydra config, calls ``Trainer.fit``, tests, and saves the deployment bundle.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import shutil
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from trigact.bundle import check_finite_model, nonfinite_tensors, read_bundle, save_bundle, tree_sha256
from trigact.cli import quiet_libraries, user_errors
from trigact.config import instantiate_named
from trigact.errors import TrigactError, check_steps
from trigact.evaluation.selection import check_seed
from trigact.io import atomic_write_json
from trigact.report import print_table
from trigact.models import build_model
from trigact.run_status import RunAttempt, RunLocked, is_bad_input
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


# What Trainer.fit needs to resume (Lightning's dump_checkpoint writes all of them).
CHECKPOINT_KEYS = ("state_dict", "loops", "optimizer_states", "lr_schedulers", "callbacks", "epoch", "global_step")
CHECKPOINT_DIGEST = "trigact_sha256"  # tree_sha256 of all other entries, added by VerifiedCheckpointIO


def load_checkpoint(path) -> dict:
    """Open a Lightning checkpoint of a trigact run, safely and checked; a one-line error otherwise.

    - ``weights_only=True``: only tensors and plain values are unpickled, so a planted checkpoint
      cannot run code. Our own checkpoints need no allow-list: every method's, trigger's and
      callback's state is tensors, numbers, strings, lists and dicts (tests/test_resume.py loads one
      of each method).
    - Its sha256 (written by :class:`VerifiedCheckpointIO`) must match: a few garbled bytes would
      otherwise resume with silently wrong weights. Checkpoints from before the digest are accepted.
    - It must hold what resuming needs, and only finite weights.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:  # not corruption: the file asks to import and call something
            raise TrigactError(f"checkpoint {path} holds pickled objects that are not plain data ({refused.group(1)}); "
                               "refusing to load it, as it could run code; pass another ckpt_path") from None
        raise _unreadable(path, err) from None
    except Exception as err:  # noqa: BLE001 -- any failure to read it is the same user-facing problem
        raise _unreadable(path, err) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise TrigactError(f"checkpoint {path} holds no state_dict: not a Lightning checkpoint of a trigact run; "
                           "pass another ckpt_path")
    expected = checkpoint.pop(CHECKPOINT_DIGEST, None)
    if expected is not None and expected != tree_sha256(checkpoint):
        raise TrigactError(f"checkpoint {path} is corrupt: its contents do not match the sha256 saved in it; "
                           "pass another ckpt_path (e.g. an epochNNN.ckpt beside it)")
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise TrigactError(f"checkpoint {path} cannot resume training: it has no {', '.join(missing)} "
                           "(saved with weights only?); pass another ckpt_path")
    bad = nonfinite_tensors(checkpoint["state_dict"])
    if bad:
        raise TrigactError(f"checkpoint {path} holds non-finite (NaN or inf) weights in {', '.join(bad[:3])}; "
                           "the run had diverged or the file is damaged; pass another ckpt_path")
    return checkpoint


def _unreadable(path, err) -> TrigactError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return TrigactError(f"checkpoint {path} is unreadable (corrupt or truncated: {first}); "
                        "pass another ckpt_path (e.g. an epochNNN.ckpt beside it)")


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files with our sha256 in them, opened only through :func:`load_checkpoint`,
    so that ``Trainer.fit(ckpt_path=...)`` reads a checkpoint as safely as our own check before it."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        super().save_checkpoint({**checkpoint, CHECKPOINT_DIGEST: tree_sha256(checkpoint)}, path, storage_options)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint(path)


def resume_request(ckpt_path, run_dir: Path):
    """What to resume from: ``ckpt_path`` as given; for null, ``last`` if an earlier attempt of this
    (unfinished) run left a checkpoint in its folder.

    Decided from files that no rank writes before training starts, so every DDP rank decides the
    same: rank 0 rewrites status.json for the new attempt before the other ranks exist (Lightning's
    launcher starts them from Trainer.fit) or while they start (SLURM), so they cannot read the
    previous attempt's status there.
    """
    if ckpt_path is None and newest_checkpoint(run_dir).is_file():
        return "last"
    return ckpt_path


def resolve_checkpoint(ckpt_path, run_dir: Path, module: L.LightningModule | None = None) -> str | None:
    """Check the checkpoint to resume from before Lightning does, for a one-line error.

    ``last`` means the newest of ``<run_dir>/checkpoints/last.ckpt`` and SLURM ``hpc_ckpt_*.ckpt`` and starts from scratch when there is none
    yet (a first launch under a requeueing scheduler); an explicit path must exist. Either must pass
    :func:`load_checkpoint`, and with ``module`` its weights must fit that module (:func:`check_checkpoint_fits`).
    """
    if ckpt_path is None:
        return None
    path = newest_checkpoint(run_dir) if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        if ckpt_path == "last":
            print(f"no checkpoint at {path} yet: starting from scratch")
            return None
        raise TrigactError(f"ckpt_path={ckpt_path!r}: no such file (use a .ckpt path or ckpt_path=last)")
    checkpoint = load_checkpoint(path)
    if module is not None:
        check_checkpoint_fits(checkpoint, module, path)
    return str(path)


def check_checkpoint_fits(checkpoint, module: L.LightningModule, path) -> None:
    """Refuse a checkpoint whose ``state_dict`` keys or shapes differ from ``module``'s.

    Lightning would otherwise fail deep inside ``Trainer.fit`` with a state_dict-mismatch traceback.
    """
    saved = checkpoint["state_dict"]  # present: load_checkpoint checked it
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


def check_training_config(cfg: DictConfig) -> None:
    """Values that would otherwise fail late (a traceback) or wrongly (0 epochs: an untrained model
    written as finished; -1: training forever; a seed out of range: a random one), checked before
    anything is written."""
    check_steps(cfg.trainer.get("max_epochs"), "trainer.max_epochs")
    check_seed(cfg.get("seed"))


def train(cfg: DictConfig) -> dict:
    """Train (or find already trained) the run described by ``cfg``; return its summary."""
    run_dir = Path(cfg.paths.run_dir)
    launch_dir = _launch_dir()
    try:
        check_training_config(cfg)
        bundle_path = run_dir / BUNDLE_NAME
        if bundle_path.exists():
            meta = read_bundle(bundle_path)["meta"]
            resume = "; nothing to resume" if cfg.get("ckpt_path") else ""
            print(f"already finished, not retrained{resume}: {bundle_path}")
            return {"run_dir": str(run_dir), "bundle": str(bundle_path), "skipped": True, **meta["metrics"]}

        L.seed_everything(cfg.seed, workers=True)
        datamodule = build_datamodule(cfg)
        module = build_run(cfg, datamodule)
        callbacks = build_callbacks(cfg)
        ckpt_request = resume_request(cfg.get("ckpt_path"), run_dir)
        # Rank 0 (the process Lightning's launchers start the others from) owns the folder's lock and
        # status; the other ranks of a DDP job train inside its attempt.
        attempt = RunAttempt(run_dir, launch_dir=launch_dir) if rank_zero_only.rank == 0 else None
        with attempt or contextlib.nullcontext():
            return _train_attempt(cfg, run_dir, bundle_path, attempt, datamodule, module, callbacks, ckpt_request)
    except Exception as err:
        if is_bad_input(err) and not isinstance(err, RunLocked) and rank_zero_only.rank == 0:
            _discard_rejected_launch(run_dir, launch_dir, Path(cfg.paths.runs_dir))
        raise


def _launch_dir() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except ValueError:  # not launched through Hydra (tests, the pipeline's compose)
        return None


def _discard_rejected_launch(run_dir: Path, launch_dir: str | None, runs_dir: Path) -> None:
    """A launch rejected for bad input leaves no run folder in the registry: its Hydra launch
    folder, and the folders above it up to ``runs_dir``, go when nothing else is in them. (A first
    attempt's status and lock file are already gone, see RunAttempt.__exit__.)"""
    run_dir, runs_dir = run_dir.resolve(), runs_dir.resolve()
    if not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - {"launches"}:
        return  # the run has a history or files: keep this launch's log beside them
    if launch_dir is not None and run_dir / "launches" in Path(launch_dir).resolve().parents:
        shutil.rmtree(launch_dir, ignore_errors=True)
    for folder in (run_dir / "launches", run_dir, *run_dir.parents):
        if runs_dir not in folder.parents:
            break
        try:
            folder.rmdir()  # only when empty: other runs and launches stay
        except FileNotFoundError:
            continue
        except OSError:
            break


def _train_attempt(cfg: DictConfig, run_dir: Path, bundle_path: Path, attempt: RunAttempt | None,
                   datamodule, module, callbacks, ckpt_request) -> dict:
    note = attempt.retry_note() if attempt is not None else None
    if note:
        print(note)
    ckpt_path = resolve_checkpoint(ckpt_request, run_dir, module)  # before a W&B run is started
    if ckpt_path and cfg.get("ckpt_path") is None and rank_zero_only.rank == 0:
        print(f"resuming from {ckpt_path}, left by an earlier attempt of this run")
    loggers = build_loggers(cfg)
    failed = True
    try:
        # default_root_dir: Lightning's own files (SLURM hpc_ckpt_*.ckpt, default checkpoints) go
        # into this run's folder, never into a launch directory shared by other runs.
        plugins = [instantiate(p) for p in cfg.trainer.get("plugins") or []]
        trainer: L.Trainer = instantiate(
            cfg.trainer, default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers or False,
            plugins=[*plugins, VerifiedCheckpointIO()],
        )
        # weights_only: what VerifiedCheckpointIO does anyway; said here for any strategy that loads
        # a checkpoint without its CheckpointIO.
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if attempt is not None:
            attempt.trained = True
        loss = trainer.callback_metrics.get("train/loss")  # now: trainer.test resets the metrics
        results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        failed = False
    finally:
        # One W&B run per train() call, marked failed if fit raised: a process may train several
        # models (the pipeline), and an open run would stay "running" until the process exits.
        finish_wandb_loggers(loggers, failed=failed)
    metrics = final_metrics(results, module.trigger is not None)
    trigger = None if module.trigger is None else module.trigger.tau
    # On every rank (they hold the same model): rank 0 alone raising would leave the others waiting
    # in the barrier below. The error ends the attempt as crashed, with no bundle.
    check_finite_model(module.net, trigger, f"run {run_dir}")
    if loss is not None and not bool(torch.isfinite(loss).all()):
        raise TrigactError(f"run {run_dir}: the final train/loss is {float(loss)}; the run diverged "
                           "(try a lower optimizer.lr), no bundle written")

    if trainer.is_global_zero:
        config = OmegaConf.to_container(cfg, resolve=True)
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
