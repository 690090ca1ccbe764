"""Where the Hydra configs live, and helpers for config nodes shared by the entry points.

Importing this is cheap (no Lightning): every entry point finds ``conf/`` through it.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

# The source tree's conf/ (the package is installed editable, as the Makefile does).
CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")


def instantiate_named(node: DictConfig, **kwargs):
    """Instantiate a config node whose ``name`` key labels run folders and is not an argument.

    The node is resolved against its root first (``${seed}`` and ``${paths...}`` live there).
    """
    resolved = OmegaConf.to_container(node, resolve=True)
    resolved.pop("name", None)
    return instantiate(resolved, **kwargs)
