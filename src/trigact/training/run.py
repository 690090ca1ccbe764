"""One training job at its run folder: train the run a config describes, or find it finished.

Rank 0 holds the folder's lock and status (:mod:`trigact.runs.status`); every rank decides alike
whether to resume (:func:`trigact.training.checkpoints.resume_request`); the bundle is written only
for a finite model, by rank 0.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from trigact.callbacks.requeue import discard_requeue_checkpoints, with_deferred_requeue
from trigact.common.devices import cpu_fallback
from trigact.common.errors import TrigactError
from trigact.common.io import atomic_write_json, atomic_write_text
from trigact.common.tracking import finish_wandb_loggers
from trigact.common.validate import check_seed, check_steps
from trigact.runs.bundle import BUNDLE_NAME, check_finite_model, read_bundle, save_bundle
from trigact.runs.status import RunAttempt, RunLocked, is_bad_input
from trigact.training.build import build_callbacks, build_datamodule, build_loggers, build_run
from trigact.training.checkpoints import VerifiedCheckpointIO, resolve_checkpoint, resume_request
from trigact.training.performance import (
    apply_process_settings, compile_options, contiguous_network, prepare_network, split_trainer_config,
)
from trigact.training.summary import CARD_NAME, final_metrics, model_card
from trigact.triggers import trigger_stats


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
    # The profile's TF32 setting is process-wide: restored afterwards, so that what runs next in this
    # process (the pipeline's attacks, another training) computes as it would in a process of its own.
    matmul_precision = torch.get_float32_matmul_precision()
    try:
        # experiment=paper_* selects trainer=gpu: refused without a GPU, unless allow_cpu=true.
        if cpu_fallback(bool(cfg.get("require_accelerator", False)), bool(cfg.get("allow_cpu", False)),
                        "this training (require_accelerator=true)"):
            with open_dict(cfg):
                cfg.trainer.accelerator = "cpu"
        check_training_config(cfg)
        trainer_cfg, execution = split_trainer_config(cfg.trainer)
        compile_kwargs = compile_options(cfg.model.get("compile"))
        bundle_path = run_dir / BUNDLE_NAME
        if bundle_path.exists():
            payload = read_bundle(bundle_path)
            resume = "; nothing to resume" if cfg.get("ckpt_path") else ""
            print(f"already finished, not retrained{resume}: {bundle_path}")
            return {"run_dir": str(run_dir), "bundle": str(bundle_path), "skipped": True,
                    **payload["meta"]["metrics"], **trigger_stats(payload.get("trigger"))}

        L.seed_everything(cfg.seed, workers=True)
        apply_process_settings(execution)
        datamodule = build_datamodule(cfg)
        module = build_run(cfg, datamodule)
        prepare_network(module, execution, compile_kwargs)
        callbacks = build_callbacks(cfg)
        ckpt_request = resume_request(cfg.get("ckpt_path"), run_dir)
        # Rank 0 (the process Lightning's launchers start the others from) owns the folder's lock and
        # status; the other ranks of a DDP job train inside its attempt.
        attempt = RunAttempt(run_dir, launch_dir=launch_dir) if rank_zero_only.rank == 0 else None
        with attempt or contextlib.nullcontext():
            return _train_attempt(cfg, trainer_cfg, run_dir, bundle_path, attempt, datamodule, module, callbacks,
                                  ckpt_request)
    except Exception as err:
        if is_bad_input(err) and not isinstance(err, RunLocked) and rank_zero_only.rank == 0:
            _discard_rejected_launch(run_dir, launch_dir, Path(cfg.paths.runs_dir))
        raise
    finally:
        torch.set_float32_matmul_precision(matmul_precision)


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


def _train_attempt(cfg: DictConfig, trainer_cfg: DictConfig, run_dir: Path, bundle_path: Path, attempt: RunAttempt | None,
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
        # SLURM's requeue checkpoint at a step boundary, not inside the signal handler (see its module).
        callbacks = with_deferred_requeue(callbacks, plugins)
        trainer: L.Trainer = instantiate(
            trainer_cfg, default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers or False,
            plugins=[*plugins, VerifiedCheckpointIO()],
        )
        # weights_only: what VerifiedCheckpointIO does anyway; said here for any strategy that loads
        # a checkpoint without its CheckpointIO.
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if attempt is not None:
            attempt.trained = True
        loss = trainer.callback_metrics.get("train/loss")  # now: trainer.test resets the metrics
        discard_requeue_checkpoints(trainer, run_dir)  # else a SLURM test would load the attempt before's
        results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        failed = False
    finally:
        # One W&B run per train() call, marked failed if fit raised: a process may train several
        # models (the pipeline), and an open run would stay "running" until the process exits.
        finish_wandb_loggers(loggers, failed=failed)
    metrics = final_metrics(results, module.trigger is not None)
    # A method with more to report (a backdoor's ASR, AdvTrojan's three accuracies) names its own
    # test metrics, its bundle meta (e.g. the backdoor's stamp and target) and its card's warning.
    if hasattr(module, "report_metrics"):
        metrics.update(module.report_metrics(results))
    trigger = None if module.trigger is None else module.trigger.tau
    contiguous_network(module.net)  # a channels_last run's bundle holds weights in the default layout
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
        if hasattr(module, "bundle_meta"):
            meta.update(module.bundle_meta())
        save_bundle(bundle_path, module.net, trigger, meta)
        atomic_write_json({"metrics": metrics, "config": config}, run_dir / "summary.json")
        atomic_write_text(model_card(meta, getattr(module, "card_lines", lambda: [])()), run_dir / CARD_NAME)
        if attempt is not None:
            attempt.finished(metrics)
    trainer.strategy.barrier()
    return {"run_dir": str(run_dir), "bundle": str(bundle_path), "skipped": False,
            "is_global_zero": trainer.is_global_zero, **metrics, **trigger_stats(trigger)}
