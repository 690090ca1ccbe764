"""Per-attack test settings for the feature attack families (merged in tests/test_attacks.py)."""

SMALL: dict[str, dict] = {}  # attack -> cheap parameter overrides for the tests
STEPS: dict[str, int] = {}  # attack -> steps in the strength tests (default 5)
UNAVAILABLE: dict[str, str] = {}  # attack -> why it cannot run on the tiny digits CNN (tested separately)
