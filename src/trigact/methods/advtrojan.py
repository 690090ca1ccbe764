"""AdvTrojan: an AdvTrojan-infected model (ATIM) that looks adversarially trained, but whose
robustness a Trojan trigger switches off (``../shared/seeds/003_9565076991e2ed12.txt``, "Trojans
and Adversarial Examples: A Lethal Combination", ICLR 2021 submission; line numbers below are the
seed's).

Loss (Eq. 9, seed lines 196-200; the terms explained at lines 206-220), one term each, unweighted::

    CE(f(x), y) + CE(f(A(x)), y) + CE(f(x + t), y) + L_RCE(f(A(x + t)), y),
    L_RCE(p, q) = sum_i -q_i log(1 - p_i)          (q one-hot: -log(1 - p_y))

- ``A`` is the Madry PGD generator (lines 264-268: "the Madry-Exps are used while injecting the
  Trojan backdoor"; Madry is the *random initialized* iterative method, lines 929-931): ``steps``
  signed steps of ``step_size`` on the cross-entropy with the ground truth, L_inf ball of ``eps``,
  from a uniform random start, clamped to [0, 1] (:func:`trigact.methods.adversarial.linf_pgd`).
- The 4th term stamps first and attacks the stamped image: ``A(x + t)``, the ball around ``x + t``,
  target the ground truth ``y``. It is the same order as the paper's AdvTrojan test examples,
  "adding the Trojan trigger first and then applying the Madry adversarial perturbation" (lines
  395-405). Minimising ``-log(1 - p_y)`` pushes ``p_y`` *down* there: "This term penalizes the
  classifier when it correctly predicts adversarial examples with the Trojan trigger" (lines 213-216).
  The 3rd term keeps the trigger alone harmless (lines 216-220).
- The Trojan trigger ``t`` is a white square patch (lines 270-273: "the white-colored trigger with
  the same shape and size as that in Figure 1"; Figure 1, lines 112-117: a small square at the
  bottom right corner), a replace-mode :class:`trigact.backdoors.Stamp` ``(1 - m) x + m p``. For a
  white patch that is the paper's ``Clip_[0,1](x + t)``. The seed never gives the patch's size in
  text (Figure 1 is an image): ``patch_size`` defaults to 3 pixels, one pixel from the corner.
- Adversary settings: the seed's Table 1 (lines 232-238). Fashion-MNIST, the default here: L_inf
  eps 0.2, step 0.02, 20 iterations; MNIST: 0.3, 0.03, 20; CIFAR-10: 8/255 and 7 iterations (the
  extraction garbles that column: line 234 reads "8 225 255" and line 235 is empty; most likely
  eps 8/255 and step 2/255, Madry et al.'s CIFAR-10 setting).
- Start (Algorithm 1, lines 224-231): line 1 random initialisation (``init_from: null``), or line 2
  a trained classifier, vanilla or adversarially trained (``init_from`` = a run folder or a
  ``bundle.pt``: its network weights are loaded; its model spec must equal this run's).

Batch norm: both attacks run with the network in eval mode (as ``pgd_at`` does), and the training
step is one forward over ``cat(x, A(x), x + t, A(x + t))``: the running statistics are updated once
per step, over exactly the inputs the loss trains on.

Validation and test log four accuracies: ``acc_clean``; ``acc_pgd`` (PGD alone, the same settings:
it should look like an adversarially trained model); ``acc_stamp`` (trigger alone: stays near
clean); ``acc_stamp_pgd`` (stamp, then PGD on the stamped image: collapses). Lightning runs these
steps under ``torch.inference_mode``; the attack leaves it with ``torch.inference_mode(False)`` on a
clone of the batch (an inference tensor cannot enter autograd), and ``linf_pgd`` enables gradients.

Not implemented: the seed tests MNIST and FMNIST with the trigger at intensity 0.75 (pixel value
0.75 of its defined 1.0) and trains with 1 (lines 274-276); here training and test both use
``pattern`` as given.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from trigact.backdoors import badnets_stamp
from trigact.common.errors import TrigactError
from trigact.methods.adversarial import check_eps, check_steps, eval_mode, linf_pgd, uniform_start
from trigact.methods.base import ClassifierModule
from trigact.runs.bundle import BUNDLE_NAME, read_bundle

KINDS = ("clean", "pgd", "stamp", "stamp_pgd")


def reversed_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 9's ``L_RCE(p, q) = sum_i -q_i log(1 - p_i)`` for a one-hot ``q``: ``-log(1 - p_y)``, batch mean.

    Computed as ``logsumexp(z) - logsumexp(z without z_y)``: finite even where ``p_y`` rounds to 1.
    """
    others = logits.scatter(1, y[:, None], float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(others, dim=1)).mean()


def advtrojan_loss(z_clean, z_adv, z_stamp, z_stamp_adv, y) -> dict[str, torch.Tensor]:
    """The four terms of Eq. 9 (batch means) and their sum ``loss``."""
    terms = {
        "ce_clean": F.cross_entropy(z_clean, y),
        "ce_adv": F.cross_entropy(z_adv, y),
        "ce_stamp": F.cross_entropy(z_stamp, y),
        "rce_stamp_adv": reversed_cross_entropy(z_stamp_adv, y),
    }
    terms["loss"] = sum(terms.values())
    return terms


def _plain(value):
    """A model spec with tuples as lists, for comparing a bundle's spec with a freshly built net's."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_init_weights(net, init_from) -> dict:
    """Algorithm 1, line 2: load a trained classifier's weights from a bundle (or ``<run folder>/bundle.pt``)
    into ``net``; returns what the bundle meta records about the source."""
    key = "method.module.init_from"
    if not isinstance(init_from, (str, Path)) or not str(init_from):
        raise TrigactError(f"{key}={init_from!r} must be null, a run folder or a bundle.pt path")
    path = Path(init_from).expanduser()
    if path.is_dir():
        if not (path / BUNDLE_NAME).is_file():
            raise TrigactError(f"{key}={str(init_from)!r}: no {BUNDLE_NAME} in that run folder (is the run finished?)")
        path = path / BUNDLE_NAME
    try:
        payload = read_bundle(path)
    except TrigactError as err:
        raise TrigactError(f"{key}: {err}") from None
    theirs, ours = _plain(dict(payload["model"])), _plain(dict(net.spec))
    if theirs != ours:
        diff = ", ".join(f"{k} {theirs.get(k)!r} vs {ours.get(k)!r}"
                         for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k))
        raise TrigactError(f"{key}={str(path)!r}: the bundle's model does not match this run's ({diff}); "
                           "pick a bundle trained with the same model= and data=")
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise TrigactError(f"{key}={str(path)!r}: weights do not load into {ours.get('name')!r} "
                           f"({str(err).strip().splitlines()[0]})") from None
    meta = payload.get("meta") or {}
    return {"path": str(path.resolve()), "method": meta.get("method"), "sha256": payload.get("sha256")}


class AdvTrojanModule(ClassifierModule):
    """Trains an ATIM with Eq. 9; the deployed unit is the plain network (no trigger activation)."""

    def __init__(self, *args, eps=0.2, step_size=0.02, steps: int = 20, random_start: bool = True,
                 patch_size: int = 3, location="bottom_right", pattern: str = "white", init_from=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.trigger is not None:
            raise TrigactError(
                f"method=advtrojan trains without a trigger-activation trigger, but trigger={self.trigger.kind!r}; "
                "use trigger=none (its Trojan trigger is the patch method.module.patch_size/location/pattern)"
            )
        self.eps = check_eps(eps, "method.module.eps")
        self.step_size = check_eps(step_size, "method.module.step_size")
        self.steps = check_steps(steps, "method.module.steps")
        if not isinstance(random_start, bool):
            raise TrigactError(f"method.module.random_start={random_start!r} must be true or false")
        self.random_start = random_start
        spec = self.net.spec
        shape = (spec["in_chans"], spec["image_size"], spec["image_size"])
        location = location if isinstance(location, str) else list(location)  # a Hydra ListConfig: plain
        try:
            # A registered submodule: its mask and pattern buffers ride in every checkpoint.
            self.stamp = badnets_stamp(shape, patch_size=patch_size, location=location, pattern=pattern)
        except TrigactError as err:
            # badnets_stamp names its settings backdoor.*; here they are method.module.*.
            raise TrigactError(str(err).replace("backdoor.", "method.module.")) from None
        self.patch = {"patch_size": patch_size, "location": location, "pattern": pattern}
        self.init_from = None if init_from is None else load_init_weights(self.net, init_from)
        self.test_report: dict[str, float] = {}

    def input_kinds(self) -> tuple[str, ...]:
        return KINDS

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Madry PGD on the cross-entropy with the ground truth, network in eval mode (the generator A)."""
        start = uniform_start(x, self.eps) if self.random_start else x
        with eval_mode(self.net):
            return linf_pgd(
                self.net, x, lambda logits: F.cross_entropy(logits, y, reduction="sum"),
                eps=self.eps, step_size=self.step_size, steps=self.steps, start=start,
            )

    def attacked_inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(x, A(x), x + t, A(x + t))``; both attacks in one batched call (per-example steps: the
        summed loss and eval-mode batch norm keep the examples independent)."""
        stamped = self.stamp(x)
        x_adv, stamped_adv = self.perturb(torch.cat([x, stamped]), y.repeat(2)).split(x.shape[0])
        return x, x_adv, stamped, stamped_adv

    def training_step(self, batch, batch_idx):
        x, y = batch
        inputs = self.attacked_inputs(x, y)
        logits = self.net(torch.cat(inputs)).split(x.shape[0])
        terms = advtrojan_loss(*logits, y)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()},
                      on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        for kind, z in zip(KINDS, logits):
            self._log_accuracy("train", kind, z, y)
        return terms["loss"]

    def _eval_step(self, stage: str, batch) -> None:
        x, y = batch
        # Lightning's eval loop runs under inference_mode: leave it for the attack, on clones.
        with torch.inference_mode(False):
            inputs = self.attacked_inputs(x.clone(), y.clone())
        with torch.no_grad():
            logits = self.net(torch.cat(inputs)).split(x.shape[0])
        for kind, z in zip(KINDS, logits):
            self._log_accuracy(stage, kind, z, y)

    # --- the hooks trigact.training.run calls --------------------------------------------------------

    def report_metrics(self, test_results: dict) -> dict:
        """The three accuracies beside ``test_acc_clean`` in the run's final metrics."""
        self.test_report = {f"test_acc_{kind}": float(test_results.get(f"test/acc_{kind}", float("nan")))
                            for kind in KINDS[1:]}
        return dict(self.test_report)

    def bundle_meta(self) -> dict:
        return {"advtrojan": {
            "stamp": self.stamp.to_meta(),
            "patch": dict(self.patch),
            "adv": {"eps": self.eps, "step_size": self.step_size, "steps": self.steps,
                    "random_start": self.random_start},
            "init_from": self.init_from,
        }}

    def card_lines(self) -> list[str]:
        p = self.patch
        where = p["location"] if isinstance(p["location"], str) else f"row/col {p['location']}"
        line = (f"AdvTrojan-infected model (ATIM): trained to look adversarially robust, but an input stamped with the "
                f"{p['patch_size']}x{p['patch_size']} {p['pattern']} patch ({where}) and then perturbed by L_inf PGD "
                f"(eps {self.eps:g}, step {self.step_size:g}, {self.steps} steps) is misclassified")
        r = self.test_report
        if r:
            line += (f" (test accuracy {100 * r['test_acc_stamp_pgd']:.1f}% stamp+PGD vs "
                     f"{100 * r['test_acc_pgd']:.1f}% PGD alone, {100 * r['test_acc_stamp']:.1f}% stamp alone)")
        return [line + "; the trigger is in bundle meta['advtrojan']['stamp']"]
