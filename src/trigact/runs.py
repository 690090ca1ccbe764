"""Where a training run lives: ``<runs_dir>/<data>/<method>/<model>/<trigger tag>-<hash>/s<seed>``.

The name is a pure function of the config, so the train entry point, a multirun sweep and the
pipeline all agree on it, and a finished run is found again instead of being redone. ``<hash>``
covers every setting that changes the trained model (data, model, method, trigger, optimizer,
schedule, epochs) but not where or how it runs (paths, devices, loggers, progress bars), so two
configs that would train different models never share a folder.
It is registered as the OmegaConf resolver ``${trigact_run_name:}`` used by ``paths.run_dir``.
"""

from __future__ import annotations

import hashlib
import json
import re

from omegaconf import OmegaConf

from trigact.epsilon import parse_eps
from trigact.errors import TrigactError


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
    return str(kind)


# Settings that do not change the trained model: left out of the hash. `devices` and `num_nodes`
# stay in: the batch size is per device, so the world size changes what is trained.
NOT_HASHED = {
    "data": {"root", "download", "num_workers", "pin_memory"},
    "trainer": {"_target_", "accelerator", "strategy", "deterministic", "enable_progress_bar",
                "enable_model_summary", "log_every_n_steps", "enable_checkpointing", "limit_val_batches",
                "limit_test_batches", "use_distributed_sampler", "plugins"},
}
EPSILONS = ("eps", "alpha")
HASHED = ("data", "model", "method", "trigger", "optimizer", "scheduler", "trainer")


def config_hash(cfg) -> str:
    """8 hex digits identifying what a config trains (see NOT_HASHED for what is left out)."""
    key = {}
    for group in HASHED:
        node = cfg.get(group)
        if node is None:
            continue
        value = OmegaConf.to_container(node, resolve=True)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in NOT_HASHED.get(group, ())}
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
    return f"{data}/{cfg.method.name}/{cfg.model.name}/{tag}/s{cfg.seed}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("trigact_run_name"):
        OmegaConf.register_new_resolver("trigact_run_name", lambda *, _root_: run_name(_root_))
