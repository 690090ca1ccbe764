"""The run registry: where a run lives (naming), how its attempts went (status), its bundle, and
picking runs for attack and evaluate (selection)."""

from trigact.runs.naming import config_hash, in_255ths, register_resolvers, run_name, trigger_tag, world_size

__all__ = ["config_hash", "in_255ths", "register_resolvers", "run_name", "trigger_tag", "world_size"]
