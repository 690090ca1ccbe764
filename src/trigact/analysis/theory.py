"""Theorems 1 and 2 of the trigger-activation paper, measured on trained victims.

``python -m trigact.analysis.theory results=<results folder of a pipeline or evaluate run>``
(the command's body: :mod:`trigact.cli.theory`; this module is the computation).

What the paper states (Sec. "Analysis on Robustness", quoted; ``l_t(x, y) = L_ce(f(x), y)`` (10), with
``f`` the RAW network, ``f_t(x) = f(x + tau)`` the deployed unit, ``C`` classes):

    Theorem 1 (Relationship of tau with dataset and model). Given a model trained in Algorithm 1,
    under the assumption of linearity, the relationship of tau with dataset and model is
        -eps_t * sgn[ E_{(x,y)~D_train} [grad_x l_t(x, y)] ] = tau,                    (8)
        -log(C) = E_{(x,y)~D_train} [grad_x l_t(x, y)]^T tau,                          (9)
    Proof: first-order Taylor, l_t(x + tau, y) = l_t(x, y) + [grad_x l_t(x, y)]^T tau (11), in
    expectation (12), with E[l_t(x, y)] designed to be log(C) and E[l_t(x + tau, y)] close to 0.

    Theorem 2 (Adversarial impact of TAEs). Given adversarial perturbations delta_s with an
    l_inf-norm bound eps generated from the surrogate model f_s, the effect of delta_s on the victim
    model f_t(x) = f(x + tau) can be described as follows
        E_{(x,y)~D_test} [l_t(x + tau + delta_s, y)]
          = E_{(x,y)~D_train} [grad_x l_t(x, y)]^T delta_s                             (13)
          <= (eps / eps_t) log(C),
    and the maximum is achieved when delta_s = -(eps / eps_t) tau (14). Proof (15): the expectation
    is E[l_t(x)] + g^T (tau + delta_s) = log(C) + g^T tau + g^T delta_s = g^T delta_s (Eq. 9)
    <= g^T (eps / eps_t)(-tau) (Eq. 8) = (eps / eps_t) log(C).

What is measured here (``g`` below is always the paper's ``E_train[grad_x l_t(x, y)]``):

- ``g`` (:func:`input_gradient_mean`): the mean, over ``n`` clean training images, of each image's
  own input gradient ``grad_x CE(f(x_i), y_i)`` of the RAW network ``f`` in eval mode; i.e. the
  gradient of the per-image loss (not of a batch-mean loss, which would scale it by 1/batch), averaged:
  ``g = (1/n) sum_i grad_{x_i} CE(f(x_i), y_i)``, a tensor shaped like one image.
- Eq. 8 (:func:`sign_agreement`): the share of coordinates where ``-sign(g) == sign(tau)``, over the
  coordinates where ``tau != 0`` and ``g != 0`` (a sparse trigger's zeros say nothing about its sign),
  and the same share weighted by ``|g|``. A trigger drawn at random, independent of ``f``, agrees on
  0.5 of them (:data:`RANDOM_AGREEMENT`). Also ``cos(-g, tau)`` and the share of tau's nonzero
  coordinates at ``+-eps_t`` (Eq. 8's magnitude part; a sparse or learnable trigger breaks it by design).
- Eq. 9: ``g^T tau`` against ``-log C``. The paper writes an equality; we report both numbers, their
  ratio ``g^T tau / (-log C)`` (1 when Eq. 9 holds exactly) and ``g^T tau <= -log C`` (the first-order
  picture taking the loss from ``E[l_t(x)]`` down by at least ``log C``).
- The first-order picture itself (Eq. 11-12): its prediction ``E[CE(f(x))] + g^T tau`` against the
  measured ``E[CE(f(x + tau))]`` on the same images, with and without the deployed unit's clamp to
  [0, 1] (``ce_trigger``: ``f_t``, clamped; ``ce_trigger_unclamped``: the paper's ``f(x + tau)``),
  and the per-image first-order prediction with the clamped perturbation,
  ``mean_i [CE_i + grad_i^T (clamp(x_i + tau, 0, 1) - x_i)]``.
- Theorem 2 (:func:`theorem2_rows`), per victim and TAE bank: the bound ``(eps / eps_t) log C``
  (``eps``: the bank's l_inf budget from its ``meta.json``; ``eps_t = max |tau|``) against the
  measured mean CE of the deployed unit ``f_t`` on the bank's adversarial images, i.e. the theorem's
  left-hand side ``E_test[l_t(x + tau + delta_s, y)]`` (the LOSS itself, not its increase: the theorem
  bounds the loss, its baseline ``E[l_t(x + tau)]`` being ~0 by design). ``holds`` is
  ``ce_adv <= bound``. Beside it: the loss on the bank's clean images and the increase (for reading,
  no verdict), Eq. 13's first-order value ``mean_i g^T delta_i`` (``delta_i = x_adv_i - x_clean_i``),
  the proof's unreduced line ``E[CE(f(x))] + g^T tau + mean_i g^T delta_i``, and the largest
  first-order value any ``eps``-bounded perturbation could reach, ``eps * ||g||_1`` (equal to the
  bound exactly when Eq. 8 and Eq. 9 both hold).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from trigact.common.devices import model_device
from trigact.evaluation.bank import stored_images, to_device_pixels

# The share of coordinates on which a random sign trigger, drawn independently of f, agrees with -sign(g).
RANDOM_AGREEMENT = 0.5


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def gradient_pass(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                  tau: torch.Tensor | None = None) -> dict:
    """One pass of the raw network ``net`` (eval mode) over clean images: ``g`` (float64, image-shaped),
    the mean CE and accuracy, the number of classes, and with ``tau`` the per-image first-order
    prediction of the clamped triggered loss, ``mean_i [CE_i + grad_i^T (clamp(x_i + tau) - x_i)]``.

    Each image's gradient is the gradient of its own loss: the batch loss is the SUM of per-image CE,
    and (eval mode: no batch statistics) image i's input enters only its own term.
    """
    was_training = net.training
    net.eval()
    device = model_device(net)
    n = int(labels.shape[0])
    g = torch.zeros(images.shape[1:], dtype=torch.float64)
    ce_sum, correct, first_order_sum, classes = 0.0, 0, 0.0, None
    try:
        for part in _batches(n, batch_size):
            x = images[part].to(device).detach().requires_grad_(True)
            y = labels[part].to(device)
            logits = net(x)
            classes = int(logits.shape[1])
            per_image = F.cross_entropy(logits, y, reduction="none")
            (grad,) = torch.autograd.grad(per_image.sum(), x)
            g += grad.detach().double().sum(0).cpu()
            ce_sum += float(per_image.detach().double().sum())
            correct += int((logits.argmax(1) == y).sum())
            if tau is not None:
                step = ((x.detach() + tau.to(device)).clamp(0, 1) - x.detach()).double()
                first_order_sum += float((per_image.detach().double() + (grad.double() * step).flatten(1).sum(1)).sum())
    finally:
        net.train(was_training)
    return {"g": g / n, "ce": ce_sum / n, "acc": correct / n, "classes": classes,
            "first_order_clamped": first_order_sum / n if tau is not None else None}


def input_gradient_mean(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``g = (1/n) sum_i grad_{x_i} CE(f(x_i), y_i)``: the mean of the per-image input gradients of the
    raw network ``net`` (eval mode), float64, shaped like one image (the paper's ``E_train[grad_x l_t]``)."""
    return gradient_pass(net, images, labels, batch_size)["g"]


def sign_agreement(g: torch.Tensor, tau: torch.Tensor) -> dict:
    """Eq. 8's sign part: on the coordinates where ``tau != 0`` and ``g != 0``, the share where
    ``-sign(g) == sign(tau)`` (``agreement``) and that share weighted by ``|g|`` (``weighted``);
    ``coords``: how many coordinates count. None for both when no coordinate counts."""
    g, tau = g.detach().double().flatten().cpu(), tau.detach().double().flatten().cpu()
    if g.shape != tau.shape:
        raise ValueError(f"g has {g.numel()} coordinates and tau {tau.numel()}")
    mask = (tau != 0) & (g != 0)
    coords = int(mask.sum())
    if coords == 0:
        return {"agreement": None, "weighted": None, "coords": 0}
    agree = (-torch.sign(g[mask]) == torch.sign(tau[mask])).double()
    weight = g[mask].abs()
    return {"agreement": float(agree.mean()), "weighted": float((weight * agree).sum() / weight.sum()),
            "coords": coords}


@torch.no_grad()
def mean_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """``(mean CE, accuracy)`` of ``model`` (eval mode) on ``images`` (float pixels, or a bank's uint8,
    dequantized one batch at a time on the model's device)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    ce, correct = 0.0, 0
    try:
        for part in _batches(int(labels.shape[0]), batch_size):
            logits = model(to_device_pixels(images[part], device))
            y = labels[part].to(device)
            ce += float(F.cross_entropy(logits, y, reduction="sum").double())
            correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    n = int(labels.shape[0])
    return ce / n, correct / n


def _tau_of(model) -> torch.Tensor:
    tau = getattr(model, "trigger", None)
    if tau is None:
        raise ValueError("the model has no trigger")
    return tau.detach().cpu()


def theorem1_row(name: str, model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                 kind: str | None = None) -> tuple[dict, torch.Tensor]:
    """Theorem 1 (Eq. 8-9) and the first-order picture for one deployed model with a trigger
    (``model.net`` is ``f``, ``model.trigger`` is ``tau``) on clean training ``images``.

    Returns ``(row, g)``: the row of ``theory.csv`` and ``g`` (for :func:`theorem2_rows`)."""
    tau = _tau_of(model)
    net = model.net
    grads = gradient_pass(net, images, labels, batch_size, tau=tau)
    g, classes = grads["g"], grads["classes"]
    tau64 = tau.double()
    eps_t = float(tau64.abs().max())
    log_c = math.log(classes)
    nonzero = tau64 != 0
    signs = sign_agreement(g, tau64)
    g_dot_tau = float((g * tau64).sum())
    norms = float(g.norm() * tau64.norm())
    ce_trigger, acc_trigger = mean_loss(model, images, labels, batch_size)  # f_t: f(clamp(x + tau, 0, 1))
    ce_unclamped, _ = mean_loss(_Shifted(net, tau), images, labels, batch_size)  # the paper's f(x + tau)
    row = {
        "victim": name,
        "trigger_kind": kind,
        "n_train": int(labels.shape[0]),
        "classes": classes,
        "log_c": log_c,
        "eps_t": eps_t,
        "support": float(nonzero.double().mean()),
        "at_eps_t": float((tau64[nonzero].abs() >= eps_t * (1 - 1e-6)).double().mean()) if bool(nonzero.any()) else None,
        "sign_agreement": signs["agreement"],
        "sign_agreement_weighted": signs["weighted"],
        "sign_coords": signs["coords"],
        "random_agreement": RANDOM_AGREEMENT,
        "cos_neg_g_tau": -g_dot_tau / norms if norms > 0 else None,
        "g_dot_tau": g_dot_tau,
        "minus_log_c": -log_c,
        "eq9_ratio": g_dot_tau / -log_c,
        "eq9_le": g_dot_tau <= -log_c,
        "g_l1": float(g.abs().sum()),
        "ce_clean": grads["ce"],
        "acc_clean": grads["acc"],
        "first_order": grads["ce"] + g_dot_tau,
        "first_order_clamped": grads["first_order_clamped"],
        "ce_trigger": ce_trigger,
        "ce_trigger_unclamped": ce_unclamped,
        "acc_trigger": acc_trigger,
    }
    return row, g


class _Shifted(nn.Module):
    """``f(x + tau)`` without the deployed unit's clamp: Eq. 11's left-hand side as written."""

    def __init__(self, net: nn.Module, tau: torch.Tensor):
        super().__init__()
        self.net, self.tau = net, tau

    def forward(self, x):
        return self.net(x + self.tau.to(x.device))


class CleanLosses:
    """``(mean CE, accuracy)`` of each victim on a bank's clean images, computed once per distinct set
    of clean images: every bank of one evaluation holds the same ones (pipeline and evaluate check it)."""

    def __init__(self):
        self._seen: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def __call__(self, name: str, model, bank, batch_size: int) -> tuple[float, float]:
        clean = stored_images(bank, clean=True)  # a Bank's uint8, as stored: no float copy kept or compared
        entry = next((e for e in self._seen if e[0].shape == clean.shape and e[0].dtype == clean.dtype
                      and torch.equal(e[0], clean) and torch.equal(e[1], bank.y)), None)
        if entry is None:
            entry = (clean, bank.y, {})
            self._seen.append(entry)
        if name not in entry[2]:
            entry[2][name] = mean_loss(model, clean, bank.y, batch_size)
        return entry[2][name]


def theorem2_rows(name: str, model, g: torch.Tensor, banks: Mapping, batch_size: int = 256,
                  ce_clean_train: float | None = None, accuracies: Mapping | None = None,
                  clean_losses: CleanLosses | None = None) -> list[dict]:
    """Theorem 2 for one deployed model with a trigger against each bank: ``banks`` maps
    ``(surrogate, attack)`` to a loaded :class:`~trigact.evaluation.bank.Bank` (``meta["eps"]`` its
    budget). ``g``: the model's mean input gradient (:func:`theorem1_row`); ``ce_clean_train``:
    ``E_train[CE(f(x))]`` for the proof's unreduced line; ``accuracies``: ``(surrogate, attack)`` ->
    the accuracy ``matrix.csv`` recorded, shown beside the one measured here (a check that the bank
    is the one the victim was evaluated on); ``clean_losses``: a :class:`CleanLosses` shared across
    calls, so banks with the same clean images score them once.

    ``holds``: the measured mean CE of ``f_t`` on the bank's adversarial images is at most
    ``(eps / eps_t) log C`` (the theorem bounds the loss, not its increase)."""
    tau = _tau_of(model).double()
    eps_t = float(tau.abs().max())
    g = g.double().cpu()
    clean_losses = CleanLosses() if clean_losses is None else clean_losses
    rows = []
    for (surrogate, attack), bank in banks.items():
        eps = float(bank.meta["eps"])
        ce_adv, acc_adv = mean_loss(model, stored_images(bank), bank.y, batch_size)
        ce_clean, acc_clean = clean_losses(name, model, bank, batch_size)
        with torch.no_grad():
            was_training = model.training
            first_image = to_device_pixels(stored_images(bank, clean=True)[:1], model_device(model))
            classes = int(model.eval()(first_image).shape[1])
            model.train(was_training)
        log_c = math.log(classes)
        bound = eps / eps_t * log_c
        # Batch by batch: a whole-bank float64 copy of both image sets would be 16 bytes per pixel.
        g_flat, total = g.flatten(), 0.0
        for (x_adv, _), (x_clean, _) in zip(bank.batches(batch_size), bank.batches(batch_size, clean=True)):
            total += float(((x_adv.double() - x_clean.double()).flatten(1) @ g_flat).sum())
        g_dot_delta = total / max(len(bank), 1)
        g_dot_tau = float((g * tau).sum())
        rows.append({
            "victim": name,
            "surrogate": surrogate,
            "attack": attack,
            "bank": str(getattr(bank, "path", "")),
            "n": int(bank.y.shape[0]),
            "eps": eps,
            "eps_t": eps_t,
            "classes": classes,
            "bound": bound,
            "ce_adv": ce_adv,
            "holds": ce_adv <= bound,
            "ce_clean": ce_clean,
            "increase": ce_adv - ce_clean,
            "g_dot_delta": g_dot_delta,
            "first_order_loss": None if ce_clean_train is None else ce_clean_train + g_dot_tau + g_dot_delta,
            "linear_max": eps * float(g.abs().sum()),
            "acc_adv": acc_adv,
            "acc_clean": acc_clean,
            "acc_matrix": None if accuracies is None else accuracies.get((surrogate, attack)),
        })
    return rows


# ----------------------------------------------------------------------------------------- report


def _span(values, fmt="{:.3g}") -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)} to {fmt.format(hi)}"


def summary_paragraph(t1: list[dict], t2: list[dict]) -> str:
    """How well the first-order picture holds, in numbers (the top of ``theory.md``)."""
    if not t1:
        return "No victim with a trigger: nothing to measure."
    log_c = _span([r["log_c"] for r in t1])
    parts = [
        f"Theorem 1 / Eq. 8 (tau = -eps_t sgn(g), g = E_train[grad_x CE(f(x), y)] of the raw network): over "
        f"{len(t1)} trigger victim(s), -sign(g) agrees with sign(tau) on {_span([r['sign_agreement'] for r in t1])} "
        f"of the coordinates (|g|-weighted {_span([r['sign_agreement_weighted'] for r in t1])}), against "
        f"{RANDOM_AGREEMENT} for a random trigger; cos(-g, tau) {_span([r['cos_neg_g_tau'] for r in t1])}.",
        f"Eq. 9 (g^T tau = -log C = -{log_c}): g^T tau is {_span([r['g_dot_tau'] for r in t1])}, i.e. "
        f"{_span([r['eq9_ratio'] for r in t1], '{:.2g}')} of -log C "
        f"(g^T tau <= -log C for {sum(bool(r['eq9_le']) for r in t1)} of {len(t1)}).",
        f"First order (Eq. 11-12): CE(f(x)) = {_span([r['ce_clean'] for r in t1])} (the design's log C = {log_c}), "
        f"CE(f(x)) + g^T tau predicts {_span([r['first_order'] for r in t1])} for the triggered loss, measured "
        f"CE(f(x + tau)) {_span([r['ce_trigger_unclamped'] for r in t1])} "
        f"(deployed, clamped: {_span([r['ce_trigger'] for r in t1])}); mean |prediction - measured| "
        f"{sum(abs(r['first_order'] - r['ce_trigger_unclamped']) for r in t1) / len(t1):.3g} "
        f"({sum(abs(r['first_order'] - r['ce_trigger']) for r in t1) / len(t1):.3g} against the deployed unit).",
    ]
    if t2:
        held = sum(bool(r["holds"]) for r in t2)
        parts.append(
            f"Theorem 2 (E_test[CE(f_t(x + delta_s))] <= (eps/eps_t) log C): the bound holds for {held} of "
            f"{len(t2)} (victim, bank) pairs; bound {_span([r['bound'] for r in t2])}, measured mean CE of f_t on "
            f"the TAEs {_span([r['ce_adv'] for r in t2])} (on the clean images {_span([r['ce_clean'] for r in t2])}); "
            f"the first-order g^T delta_s (Eq. 13) is {_span([r['g_dot_delta'] for r in t2])}, and the largest "
            f"first-order value an eps-ball allows, eps ||g||_1, {_span([r['linear_max'] for r in t2])}.")
    else:
        parts.append("Theorem 2: no bank was matched to a trigger victim.")
    return " ".join(parts)


def _cell(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


THEOREM1_COLUMNS = (
    ("victim", "victim"), ("trigger", "trigger_kind"), ("eps_t", "eps_t"), ("support", "support"),
    ("sign agree", "sign_agreement"), ("|g|-weighted", "sign_agreement_weighted"), ("random", "random_agreement"),
    ("cos(-g, tau)", "cos_neg_g_tau"), ("g^T tau", "g_dot_tau"), ("-log C", "minus_log_c"),
    ("g^T tau / -log C", "eq9_ratio"), ("CE f(x)", "ce_clean"), ("CE f(x) + g^T tau", "first_order"),
    ("CE f(x+tau)", "ce_trigger_unclamped"), ("CE f_t(x)", "ce_trigger"),
)
THEOREM2_COLUMNS = (
    ("victim", "victim"), ("surrogate", "surrogate"), ("attack", "attack"), ("eps", "eps"), ("eps_t", "eps_t"),
    ("bound (eps/eps_t) log C", "bound"), ("CE f_t(x_adv)", "ce_adv"), ("holds", "holds"),
    ("CE f_t(x)", "ce_clean"), ("g^T delta", "g_dot_delta"), ("eps ||g||_1", "linear_max"),
    ("acc here", "acc_adv"), ("acc matrix.csv", "acc_matrix"),
)


def markdown_rows(rows: list[dict], columns) -> str:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for _, k in columns) + " |" for r in rows]
    return "\n".join(lines)


def theory_markdown(results: str, t1: list[dict], t2: list[dict], skipped: list[dict], notes: list[str] = ()) -> str:
    """``theory.md``: the summary paragraph, the Theorem 1 table (one row per trigger victim), the
    Theorem 2 table (one row per victim x bank), and what was skipped."""
    out = [f"# Theorems 1 and 2, measured: {results}", "", summary_paragraph(t1, t2), "",
           "## Theorem 1 (Eq. 8-9): the trigger against g = E_train[grad_x CE(f(x), y)] of the raw network", "",
           "Sign agreement: share of coordinates with tau != 0 and g != 0 where -sign(g) = sign(tau). "
           "CE columns: mean cross-entropy on the same clean training images; f(x+tau) unclamped as in Eq. 11, "
           "f_t(x) = f(clamp(x + tau, 0, 1)) the deployed unit.", "",
           markdown_rows(t1, THEOREM1_COLUMNS), "",
           "## Theorem 2: mean CE of f_t on each bank's TAEs against (eps / eps_t) log C", "",
           "eps: the bank's l_inf budget; eps_t = max |tau|; holds: CE f_t(x_adv) <= bound (the theorem bounds the "
           "loss itself). g^T delta: Eq. 13's first-order value, mean over the bank's images of g^T (x_adv - x).", ""]
    out.append(markdown_rows(t2, THEOREM2_COLUMNS) if t2 else "No bank matched.")
    if skipped:
        out += ["", "## Skipped", ""] + [f"- {s['name']}: {s['reason']}" for s in skipped]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    from trigact.cli.theory import main

    main()
