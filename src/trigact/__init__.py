"""trigact: models with trigger activation, a defense against transferable adversarial examples.

``trigact.load_bundle(path)`` gives a trained run's deployed unit ``f(clamp(x + tau, 0, 1))`` as a
plain ``nn.Module``; the entry points are ``python -m trigact.train`` and ``python -m trigact.pipeline``.
"""

__version__ = "0.1.0"


def load_bundle(path, map_location="cpu"):
    """Load a run's bundle as its deployed unit (see :func:`trigact.runs.bundle.load_bundle`)."""
    from trigact.runs.bundle import load_bundle as _load  # lazy: `import trigact` stays cheap

    return _load(path, map_location=map_location)
