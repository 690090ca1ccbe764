"""An attack's settings: ``conf/attack/<name>.yaml``, with experiment-wide overrides (eps, steps) on top."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

from trigact.common.validate import parse_eps
from trigact.common.validate import check_steps
from trigact.common.errors import unknown_name


def attack_config(conf_dir, name: str, overrides: Mapping | None = None) -> dict:
    """``conf/attack/<name>.yaml`` as a dict, with experiment-wide ``overrides`` (eps, steps) on top."""
    path = Path(conf_dir) / "attack" / f"{name}.yaml"
    if not path.is_file():
        known = [p.stem for p in (Path(conf_dir) / "attack").glob("*.yaml")]
        raise unknown_name("attack", name, known)
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg.update(overrides)
    # Checked here, before any int()/float() of them: steps=2.5 must not silently become 2.
    where = {key: f"attack_overrides.{key}" if key in overrides else f"{key} in {path}" for key in ("eps", "steps")}
    if "eps" in cfg:
        parse_eps(cfg["eps"], where["eps"])
    if "steps" in cfg:
        check_steps(cfg["steps"], where["steps"])
    return cfg
