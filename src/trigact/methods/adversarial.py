"""What the adversarial-training methods share: an L_inf PGD inner loop, hyperparameter checks, a base.

The inner loop is batched, takes gradients with respect to the *input only*
(``torch.autograd.grad``), so no ``.grad`` is ever left on a parameter, and runs under
``torch.enable_grad()`` so that it also works when called from a no-grad context. Every iterate is
projected onto the eps-ball around ``x`` and clamped to the pixel box [0, 1].

Batch norm: methods that attack with a separate inner loop (``pgd_at``, ``trades``, ``rat``) craft
the examples with the network in eval mode (:func:`eval_mode`), as TRADES' and MART's reference code
do: the running statistics then see only the inputs the loss is trained on (one update per training
forward), never the 10 intermediate iterates of the attack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from trigact.common.errors import TrigactError
from trigact.common.validate import check_range, check_steps, parse_eps  # noqa: F401  (check_* re-exported)
from trigact.methods.base import ClassifierModule

Forward = Callable[[torch.Tensor], torch.Tensor]


# --- hyperparameter checks: one-line TrigactError naming the value and the allowed range ---------------

def check_eps(value, name: str) -> float:
    """An L_inf radius or step in pixel units: ``'8/255'`` or a number, in (0, 1]."""
    return parse_eps(value, name, allow_zero=False)


# --- the inner maximisation ------------------------------------------------------------------------------

def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Closest point of the eps-ball around ``x`` intersected with the pixel box [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def uniform_start(x: torch.Tensor, eps: float) -> torch.Tensor:
    """PGD's random start (Madry et al.): uniform in the eps-ball, clamped to [0, 1]."""
    return project_linf(x + torch.empty_like(x).uniform_(-eps, eps), x, eps)


def gaussian_start(x: torch.Tensor, eps: float, std: float = 0.001) -> torch.Tensor:
    """TRADES' start ``x + 0.001 * N(0, 1)``, projected (the reference code projects after step 1)."""
    return project_linf(x + std * torch.randn_like(x), x, eps)


def linf_pgd(
    forward: Forward,
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    eps: float,
    step_size: float,
    steps: int,
    start: torch.Tensor,
) -> torch.Tensor:
    """Maximise ``loss_fn(forward(x_adv))`` by signed-gradient ascent in the L_inf eps-ball around ``x``.

    ``loss_fn`` maps logits to a scalar that *sums* per-example losses, so each example's step does
    not depend on the batch size. ``forward`` is called as given: put the network in the mode you want
    (see :func:`eval_mode`) before calling. Returns a detached tensor in the ball and in [0, 1].
    """
    x = x.detach()
    x_adv = start.detach()
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(forward(x_adv))
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """Run ``net`` in eval mode (batch norm reads, never updates, its running statistics); restore after."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def last_linear(net: nn.Module) -> nn.Linear:
    """The classifier head: the last ``nn.Linear`` registered in ``net`` (``fc``, ``head``, ``classifier``)."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TrigactError(f"{type(net).__name__} has no nn.Linear classifier head; this method needs one")
    return linears[-1]


# --- the LightningModule base ----------------------------------------------------------------------------

class AdversarialTrainingModule(ClassifierModule):
    """Base of the adversarial-training baselines: no trigger, and a ``train/acc_adv`` metric.

    The deployed unit is the plain network, so bundles written by ``train.py`` load as victims
    unchanged; validation and test log clean accuracy through :class:`ClassifierModule`.
    """

    #: The ``method=`` name, for error messages.
    method_name = "adversarial training"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.trigger is not None:
            raise TrigactError(
                f"method={self.method_name} trains without a trigger, but trigger={self.trigger.kind!r}; "
                "use trigger=none"
            )
        # Accuracy on the training adversarial examples (torchmetrics states are not persistent:
        # checkpoints and bundles keep the same keys as standard training).
        self.metrics["train_adv"] = MulticlassAccuracy(self.num_classes, average="micro")

    def _log_losses(self, **values: torch.Tensor) -> None:
        self.log_dict({f"train/{k}": v.detach() for k, v in values.items()},
                      on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
