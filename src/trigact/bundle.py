"""Moved to trigact.runs.bundle and trigact.models.deployed (temporary shim during the restructure)."""
from trigact.models.deployed import DeployedModel  # noqa: F401
from trigact.runs.bundle import load_bundle, read_bundle, save_bundle  # noqa: F401
