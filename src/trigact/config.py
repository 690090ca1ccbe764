"""Helpers for Hydra config nodes shared by the entry points."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def instantiate_named(node: DictConfig, **kwargs):
    """Instantiate a config node whose ``name`` key labels run folders and is not an argument.

    The node is resolved against its root first (``${seed}`` and ``${paths...}`` live there).
    """
    resolved = OmegaConf.to_container(node, resolve=True)
    resolved.pop("name", None)
    return instantiate(resolved, **kwargs)
