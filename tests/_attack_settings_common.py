"""Per-attack test settings for the common attack families (merged in tests/test_attacks.py)."""

# attack -> cheap parameter overrides for the tests (the pinned paper values are checked in the configs)
SMALL: dict[str, dict] = {
    "vmifgsm": {"n": 4},
    "vnifgsm": {"n": 4},
    "sinifgsm": {"m": 3},
    "mig": {"s_factor": 5},
    "admix": {"size": 1},
    "ssa": {"num_spectrum": 4},
    "decowa": {"num_warping": 4},
    "mumodig": {"n_trans": 2},
}
STEPS: dict[str, int] = {}  # attack -> steps in the strength tests (default 5; FGSM is one step by definition)
# attack -> why it cannot run on the tiny digits CNN (tested separately, in tests/test_attack_suite_common.py)
UNAVAILABLE: dict[str, str] = {
    "pgdl2": "an L2 attack: refused in one line, our budgets are L_inf",
}
