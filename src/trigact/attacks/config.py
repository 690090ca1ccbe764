"""An attack's resolved settings: ``conf/attack/<name>.yaml`` with the protocol's budget and the
experiment's ``attack_overrides`` on top. This mapping keys TAE banks and is what crafting builds."""

from __future__ import annotations

from collections.abc import Mapping

from trigact.attacks.registry import DEFAULT_PROTOCOL, attack_spec, protocol
from trigact.common.precision import parse_precision
from trigact.common.validate import check_steps, parse_eps

# What an override may set: the budget (eps, steps) for every attack, the step size for every
# attack that has one, and the surrogate's arithmetic (precision: bf16 autocast, trigact.common.precision).
OVERRIDABLE = ("eps", "steps", "alpha", "precision")


def attack_config(conf_dir, name: str, overrides: Mapping | None = None, protocol_name: str = DEFAULT_PROTOCOL) -> dict:
    """``{name, attack, eps, steps, params}`` for attack ``name``: its config's pinned ``params``, the
    budget of ``conf/attack_protocol/<protocol_name>.yaml``, and non-null ``overrides`` on top
    (``overrides["params"][name]``: parameters of this attack, see :func:`budget_overrides`).

    An attack whose number of steps is part of the method (FGSM: 1) keeps it. ``alpha`` from the
    protocol or an override applies to the attacks that take a step size.
    """
    spec = attack_spec(name, conf_dir)
    budget = {k: v for k, v in protocol(protocol_name, conf_dir).items() if k in OVERRIDABLE and v is not None}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    own = dict((overrides.pop("params", None) or {}).get(name) or {})
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        from trigact.common.errors import TrigactError

        raise TrigactError(f"attack_overrides: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(OVERRIDABLE)}")
    merged = {**budget, **overrides}
    # Checked here, before any int()/float() of them: steps=2.5 must not silently become 2.
    where = {k: f"attack_overrides.{k}" if k in overrides else f"{k} of attack_protocol {protocol_name}"
             for k in OVERRIDABLE}
    eps = parse_eps(merged["eps"], where["eps"])
    steps = spec.steps or check_steps(merged["steps"], where["steps"])
    params = dict(spec.params)
    if "alpha" in params and merged.get("alpha") is not None:
        params["alpha"] = parse_eps(merged["alpha"], where["alpha"], allow_zero=False)
    wrong = sorted(set(own) - set(params))
    if wrong:
        from trigact.common.errors import TrigactError

        raise TrigactError(f"attack_params.{name}: attack {name!r} has no parameter(s) {', '.join(wrong)}; "
                           f"allowed: {', '.join(sorted(params)) or 'none'}")
    params.update(own)
    precision = parse_precision(merged.get("precision"), where["precision"])
    # eps as written ("8/255") where it came in as a string: bank keys and names stay readable.
    del eps
    resolved = {"name": spec.name, "attack": spec.attack, "eps": merged["eps"], "steps": steps, "params": params}
    if precision is not None:  # only then: fp32 banks keep the keys (and folders) they always had
        resolved["precision"] = precision
    return resolved


def budget_overrides(protocol_cfg: Mapping | None, attack_overrides: Mapping | None,
                     attack_params: Mapping | None = None) -> dict:
    """What an entry point passes to :func:`attack_config`: its ``attack_protocol`` (a config group)
    with the non-null ``attack_overrides`` on top, and ``attack_params`` (attack name -> parameters of
    that attack, e.g. ``{diff_pgd: {weights: /models/ddpm}}``) under ``params``."""
    merged = {k: v for k, v in dict(protocol_cfg or {}).items() if k in OVERRIDABLE and v is not None}
    merged.update({k: v for k, v in dict(attack_overrides or {}).items() if v is not None})
    if attack_params:
        merged["params"] = {name: dict(values or {}) for name, values in dict(attack_params).items()}
    return merged


def budget_points(budget: Mapping) -> list[tuple[str, dict]]:
    """One ``(suffix, overrides)`` per budget the attacks run at: ``[("", budget)]`` for one eps, and
    for a list of them (``attack_protocol=budget_sweep``) one point per eps, suffixed ``@<k>/255``:
    the attack ``pgd`` then becomes the rows ``pgd@2/255``, ``pgd@4/255``, ... of the tables."""
    from trigact.runs.naming import in_255ths

    eps = budget.get("eps")
    if not isinstance(eps, (list, tuple)):
        return [("", dict(budget))]
    if not eps:
        from trigact.common.errors import TrigactError

        raise TrigactError("attack_protocol.eps is an empty list; give one epsilon or several, e.g. [2/255, 8/255]")
    for value in eps:
        parse_eps(value, "attack_protocol.eps", allow_zero=False)
    return [(f"@{in_255ths(value)}/255", {**budget, "eps": value}) for value in eps]


def split_label(label: str) -> tuple[str, str | None]:
    """``'pgd@8/255'`` -> ``('pgd', '8/255')``; ``'pgd'`` -> ``('pgd', None)``."""
    name, _, eps = label.partition("@")
    return name, (eps or None)
