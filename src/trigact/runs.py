"""Where a training run lives: ``<runs_dir>/<data>/<method>/<model>/<trigger tag>/s<seed>``.

The name is a pure function of the config, so the train entry point, a multirun sweep and the
pipeline all agree on it, and a finished run is found again instead of being redone.
It is registered as the OmegaConf resolver ``${trigact_run_name:}`` used by ``paths.run_dir``.
"""

from __future__ import annotations

import re

from omegaconf import OmegaConf

from trigact.epsilon import parse_eps
from trigact.errors import TrigactError


def _in_255ths(value) -> str:
    """``8/255`` -> ``8``, ``0.1`` -> ``25.5``; an unparsable value is kept (sanitized) so that the
    real validation later gives the one-line error, not the path builder."""
    try:
        return f"{round(parse_eps(value) * 255, 4):g}"
    except TrigactError:
        return re.sub(r"[^A-Za-z0-9.+-]", "_", str(value))


def trigger_tag(trigger_cfg) -> str:
    kind = trigger_cfg.get("kind", "none") if trigger_cfg is not None else "none"
    if kind == "fixed":
        return f"fixed-eps{_in_255ths(trigger_cfg.get('eps'))}"
    if kind == "learnable":
        return f"learnable-alpha{_in_255ths(trigger_cfg.get('alpha'))}"
    return str(kind)


def run_name(cfg) -> str:
    data = cfg.data.get("name", "data")
    return f"{data}/{cfg.method.name}/{cfg.model.name}/{trigger_tag(cfg.get('trigger'))}/s{cfg.seed}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("trigact_run_name"):
        OmegaConf.register_new_resolver("trigact_run_name", lambda *, _root_: run_name(_root_))
