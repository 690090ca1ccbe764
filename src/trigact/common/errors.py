"""One exception type for bad user input.

Entry points catch :class:`TrigactError` and print its message as a single line (no traceback),
so every message must name the bad value and what is allowed.
"""

from __future__ import annotations


class TrigactError(ValueError):
    """Bad input from the user: config value, path, file. The message is shown as one line."""


def unknown_name(kind: str, name: str, known) -> TrigactError:
    """The error for a registry miss: names the bad value and lists the allowed ones."""
    return TrigactError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")
