"""Where a training run lives: ``<runs_dir>/<data>/<method>/<model>/<trigger tag>-<hash>/s<seed>``.

The name is a pure function of the config, so the train entry point, a multirun sweep and the
pipeline all agree on it, and a finished run is found again instead of being redone. ``<hash>``
covers an allow-list of what changes the trained model (HASHED: the data, model, method, trigger,
optimizer and schedule, and from the trainer the epochs, precision, gradient settings and the world
size) and nothing else, so that a config key added later (a Lightning flag, a logger setting) neither
moves every finished run nor lets two configs that train different models share a folder.
It is registered as the OmegaConf resolver ``${trigact_run_name:}`` used by ``paths.run_dir``.

Launch folders (Hydra's log and ``.hydra/`` of one launch) are named by ``${trigact_launch:<strftime>}``,
the time plus a random suffix, so two launches in the same second never share one.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import warnings
from datetime import datetime

from omegaconf import OmegaConf

from trigact.common.validate import parse_eps
from trigact.common.errors import TrigactError


def in_255ths(value) -> str:
    """``8/255`` -> ``8``, ``0.1`` -> ``25.5``; an unparsable value is kept (sanitized) so that the
    real validation later gives the one-line error, not the path builder."""
    try:
        return f"{round(parse_eps(value) * 255, 4):g}"
    except TrigactError:
        return re.sub(r"[^A-Za-z0-9.+-]", "_", str(value))


def trigger_tag(trigger_cfg) -> str:
    kind = trigger_cfg.get("kind", "none") if trigger_cfg is not None else "none"
    if kind == "fixed":
        return f"fixed-eps{in_255ths(trigger_cfg.get('eps'))}"
    if kind == "learnable":
        return f"learnable-alpha{in_255ths(trigger_cfg.get('alpha'))}"
    if kind in ("sparse", "sparse_learnable"):
        k = re.sub(r"[^A-Za-z0-9.+-]", "_", str(trigger_cfg.get("k")))
        tag = f"{kind.replace('_', '-')}-k{k}-eps{in_255ths(trigger_cfg.get('eps'))}"
        return tag + (f"-alpha{in_255ths(trigger_cfg.get('alpha'))}" if kind == "sparse_learnable" else "")
    return str(kind)


# What the hash covers. A group mapped to None is hashed whole: every key of it defines the model or
# how it is trained. `data` and `trainer` also hold where and how a run executes, so only the keys
# named here count, and a key missing, null or at Lightning's default (the value given here, the
# Trainer's own; a test checks them) counts as not set: writing a default out moves no run.
HASHED = {
    "data": ("name", "_target_", "image_size", "augment", "num_classes", "split_seed", "test_fraction",
             "val_fraction", "val_size", "batch_size", "seed", "decoder"),
    "model": None,
    "method": None,
    "trigger": None,
    "optimizer": None,
    "scheduler": None,
    # `devices` and `num_nodes` enter as their product, the world size (see world_size): the batch
    # size is per process, so it sets the global batch and how the train set is sharded.
    "trainer": {"max_epochs": None, "min_epochs": None, "max_steps": -1, "min_steps": None, "max_time": None,
                "limit_train_batches": None, "overfit_batches": 0.0, "fast_dev_run": False, "precision": None,
                "accumulate_grad_batches": 1, "gradient_clip_val": None, "gradient_clip_algorithm": None,
                "sync_batchnorm": False},
}
# Not used by the hash. Every argument of a datamodule and of lightning.Trainer is named either in
# HASHED or here, and tests/test_runs.py checks that, so a new argument gets decided on, not dropped.
# `data.eval_batch_size` is the one conditional key: see _data_key. `data.placement` (device-resident
# batches) draws its crops from another stream than the host workers, as a different num_workers does:
# the same config, another draw of the augmentation, not another model.
NOT_HASHED = {
    "data": ("root", "download", "num_workers", "pin_memory", "eval_batch_size", "placement"),
    "trainer": ("accelerator", "strategy", "devices", "num_nodes", "plugins", "logger", "callbacks",
                "default_root_dir", "deterministic", "benchmark", "inference_mode", "detect_anomaly",
                "barebones", "profiler", "enable_checkpointing", "enable_progress_bar", "enable_model_summary",
                "enable_autolog_hparams", "model_registry", "log_every_n_steps", "limit_val_batches",
                "limit_test_batches", "limit_predict_batches", "val_check_interval", "check_val_every_n_epoch",
                "num_sanity_val_steps", "use_distributed_sampler", "reload_dataloaders_every_n_epochs"),
}
# Keys of a hashed-whole group that change how fast a model trains, not which model: torch.compile
# (trigact.training.performance) rounds differently at most, like trainer.deterministic.
EXECUTION_ONLY = {"model": ("compile",)}
EPSILONS = ("eps", "alpha")
# Lightning's own flags that only act across processes: at world size 1 they leave the model as it is.
MULTI_PROCESS_ONLY = ("sync_batchnorm",)


def _devices_per_node(accelerator, devices):
    """How many processes per node Lightning starts for ``devices``, resolved as its accelerator
    connector does (``auto`` and ``-1``: the accelerator's device count), without touching the
    hardware for an explicit count; None for a value Lightning would refuse (it then says why)."""
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices  # the usual case, answered without importing Lightning
    if devices != "auto":
        from lightning.fabric.utilities.device_parser import _normalize_parse_gpu_string_input

        try:
            devices = _normalize_parse_gpu_string_input(devices)
        except (TypeError, ValueError):
            return None
        if isinstance(devices, (list, tuple)):  # device indices
            return len(devices) or None
        if isinstance(devices, bool) or not isinstance(devices, int) or devices == 0 or devices < -1:
            return None
        if devices > 0:
            return devices
    # "auto" or -1 (all devices): ask the accelerator Lightning would pick.
    from lightning.fabric.utilities.device_parser import _select_auto_accelerator
    from lightning.pytorch.accelerators import AcceleratorRegistry, CPUAccelerator, CUDAAccelerator, MPSAccelerator
    from lightning.pytorch.trainer.connectors.accelerator_connector import _IS_INTERACTIVE

    if accelerator == "auto":
        accelerator = _select_auto_accelerator()
    elif accelerator == "gpu":
        accelerator = "mps" if MPSAccelerator.is_available() else "cuda"
    if not isinstance(accelerator, str) or accelerator not in AcceleratorRegistry:
        return None
    cls = AcceleratorRegistry[accelerator]["accelerator"]
    if devices == -1 and issubclass(cls, CPUAccelerator):
        return None
    count = cls.auto_device_count()
    if devices == "auto" and _IS_INTERACTIVE and issubclass(cls, CUDAAccelerator) and count > 1:
        return 1  # Lightning's rule for notebooks
    return count or None


def world_size(trainer) -> int | str:
    """The number of training processes, ``devices x num_nodes`` as Lightning resolves them.

    Where torchrun or SLURM start the processes, Lightning refuses to train unless that product equals
    their count (``validate_settings`` of its cluster environments), so the product is the world size
    of every run that trains, and every rank computes the same one from the same command line. A value
    Lightning would refuse is kept as written, so that the Trainer gives the error, not the path builder.
    """
    devices, num_nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1)
    per_node = _devices_per_node(trainer.get("accelerator", "auto"), devices)
    if per_node is None or isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        return f"devices={devices},num_nodes={num_nodes}"
    return per_node * num_nodes


def _precision(value):
    """Lightning's spelling of a precision (``32`` and ``32-true`` train the same model)."""
    if isinstance(value, str) and "-" in value:  # already the canonical form: skip importing Lightning
        return value
    from lightning.fabric.connector import _convert_precision_to_unified_args

    try:
        with warnings.catch_warnings():  # the "supported for historical reasons" warnings: not our business here
            warnings.simplefilter("ignore")
            return _convert_precision_to_unified_args(value)
    except ValueError:
        return str(value)


def _is_default(value, default) -> bool:
    # Type-aware: limit_train_batches=1 (one batch) is not 1.0 (all of them).
    return value is None or (type(value) is type(default) and value == default)


def _trainer_key(trainer: dict) -> dict:
    key = {k: trainer[k] for k, default in HASHED["trainer"].items() if not _is_default(trainer.get(k), default)}
    key["world_size"] = world_size(trainer)
    if key["world_size"] == 1:
        for k in MULTI_PROCESS_ONLY:
            key.pop(k, None)
    if "precision" in key:
        key["precision"] = _precision(key["precision"])
    return key


def _data_key(data: dict, cfg) -> dict:
    key = {k: v for k, v in data.items() if k in HASHED["data"] and v is not None}
    # Algorithm 2's epoch pass with the network in train mode normalises each batch by its own
    # statistics, and its batches are data.eval_batch_size images: only then does that size change
    # the trigger, and so the model.
    update = OmegaConf.select(cfg, "trigger.update") if OmegaConf.is_config(cfg) else None
    if (cfg.get("trigger") or {}).get("kind") in ("learnable", "sparse_learnable") and update is not None \
            and update.get("source", "epoch") == "epoch" and update.get("mode", "eval") == "train":
        key["eval_batch_size"] = data.get("eval_batch_size") or data.get("batch_size")
    return key


def config_hash(cfg) -> str:
    """8 hex digits identifying what a config trains (HASHED says what counts)."""
    key = {}
    for group, keys in HASHED.items():
        node = cfg.get(group)
        if node is None:
            continue
        value = OmegaConf.to_container(node, resolve=True)
        if isinstance(value, dict):
            if group == "trainer":
                value = _trainer_key(value)
            elif group == "data":
                value = _data_key(value, cfg)
            elif keys is not None:
                value = {k: v for k, v in value.items() if k in keys and v is not None}
            for k in EXECUTION_ONLY.get(group, ()):
                value.pop(k, None)
            # The seed is already in the folder name (s<seed>); a group seed that just follows it
            # must not split one config's seeds into different folders.
            if value.get("seed") == cfg.get("seed"):
                value.pop("seed")
            for k in EPSILONS:  # 8/255 and 0.0313725... are the same trigger
                if k in value:
                    try:
                        value[k] = round(parse_eps(value[k]), 10)
                    except TrigactError:
                        pass
        key[group] = value
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_name(cfg) -> str:
    data = cfg.data.get("name", "data")
    tag = f"{trigger_tag(cfg.get('trigger'))}-{config_hash(cfg)}"
    backdoor = OmegaConf.select(cfg, "method.module.backdoor") if OmegaConf.is_config(cfg) else None
    if backdoor is not None and backdoor.get("kind"):
        rate = re.sub(r"[^A-Za-z0-9.+-]", "_", str(backdoor.get("poison_rate")))
        tag = f"{backdoor.kind}-t{backdoor.get('target')}-p{rate}-{config_hash(cfg)}"
    return f"{data}/{cfg.method.name}/{cfg.model.name}/{tag}/s{cfg.seed}"


def launch_name(pattern: str) -> str:
    """The time in ``pattern`` (strftime) and 6 random hex digits: two launches in one second differ."""
    return f"{datetime.now().strftime(pattern)}-{secrets.token_hex(3)}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("trigact_run_name"):
        OmegaConf.register_new_resolver("trigact_run_name", lambda *, _root_: run_name(_root_))
    if not OmegaConf.has_resolver("trigact_launch"):
        # Cached per config, as Hydra's ${now:}: a launch reads its folder name many times and must get
        # one answer, and Hydra copies the cache into each multirun job, so the jobs share the sweep
        # folder. DDP ranks that Lightning starts get the parent's folder as hydra.run.dir.
        OmegaConf.register_new_resolver("trigact_launch", launch_name, use_cache=True)
