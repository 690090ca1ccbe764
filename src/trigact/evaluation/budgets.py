"""Banks at one or several budgets: ``attack_protocol=budget_sweep`` runs every attack at each of its
epsilons, and each (attack, eps) is its own bank and its own table row ``<attack>@<k>/255``
(:func:`trigact.attacks.config.budget_points`). With one epsilon nothing is renamed."""

from __future__ import annotations

from collections.abc import Mapping

from trigact.attacks.config import attack_config, budget_points
from trigact.evaluation.crafting import craft_banks, load_banks


def check_attacks(conf_dir, attacks, budget: Mapping) -> None:
    """Every attack's config at every budget point resolves (one line naming a bad name or value)."""
    for _, overrides in budget_points(budget):
        for attack in attacks:
            attack_config(conf_dir, attack, overrides)


def _at_budgets(make, attacks, budget: Mapping, **kwargs) -> dict:
    banks = {}
    for suffix, overrides in budget_points(budget):
        for (surrogate, attack), bank in make(attacks=list(attacks), overrides=overrides, **kwargs).items():
            banks[(surrogate, attack + suffix)] = bank
    return banks


def craft_at_budgets(root, dataset_name, dataset, surrogates, attacks, conf_dir, budget: Mapping, **kwargs) -> dict:
    """:func:`~trigact.evaluation.crafting.craft_banks` at every budget point."""
    return _at_budgets(lambda **kw: craft_banks(root, dataset_name, dataset, surrogates, conf_dir=conf_dir, **kw),
                       attacks, budget, **kwargs)


def load_at_budgets(root, dataset_name, surrogates, attacks, conf_dir, budget: Mapping, **kwargs) -> dict:
    """:func:`~trigact.evaluation.crafting.load_banks` at every budget point."""
    return _at_budgets(lambda **kw: load_banks(root, dataset_name, surrogates, conf_dir=conf_dir, **kw),
                       attacks, budget, **kwargs)
