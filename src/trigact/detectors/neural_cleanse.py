"""Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
Networks", IEEE S&P 2019): reverse a trigger for each class, then flag classes whose mask is an outlier
on the small side (:func:`trigact.detectors.common.anomaly_index`).

For a target t, a mask ``m`` (1, H, W) and a pattern ``p`` (C, H, W), both ``(tanh(a) + 1) / 2`` of a free
tensor so that they stay in [0, 1], minimise ``CE(f((1 - m) x + m p), t) + cost * ||m||_1`` with Adam
(lr 0.1, betas (0.5, 0.9)). ``cost`` follows NC's adaptive schedule (``visualizer.py`` of the reference
code, github.com/bolunwang/backdoor): it starts at 0 and is set to ``init_cost`` once the attack has
succeeded (success >= ``attack_succ_threshold``) for ``patience`` epochs in a row; after that, ``patience``
successful epochs in a row multiply it by ``cost_multiplier`` and ``patience`` failing ones divide it by
``cost_multiplier ** 1.5`` (the code's down multiplier; its comment says "square root", its code says
``** 1.5``). The kept mask is the smallest-L1 one among the epochs that reached the threshold (the last
one when none did). Early stop: once the cost has gone both up and down, stop after
``early_stop_patience`` epochs in a row without the best L1 improving by more than
``1 - early_stop_threshold``.

Hand-written, not wrapped: no maintained PyTorch implementation takes a plain ``nn.Module``. The
reference code is Keras 2.2 / TF 1.10; ART's ``NeuralCleanse`` transformer builds a
``KerasNeuralCleanse`` and its ``_check_params`` raises "Only Keras classifiers are supported for this
defence." (checked in ART's source, ``art/defences/transformer/poisoning/neural_cleanse.py``); TrojanZoo
(PyTorch) and BackdoorBench do have NC, but inside their own frameworks (TrojanZoo's needs its
``ImageSet``/``ImageModel`` classes, BackdoorBench's is a script over its saved attack results), not as a
function of a model and a tensor of images.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trigact.common.devices import model_device
from trigact.common.errors import TrigactError
from trigact.common.validate import check_range
from trigact.detectors.common import (
    DetectionResult,
    anomaly_index,
    check_classes,
    check_count,
    check_data,
    check_fraction,
    check_positive,
    check_seed_value,
    check_targets,
    check_threshold,
    frozen,
    generator,
)

# Keeps the initial uniform draw away from +-1, where atanh is infinite.
_TANH_EPS = 1e-6


def _to_unit(a: torch.Tensor) -> torch.Tensor:
    """(tanh(a) + 1) / 2: any real tensor into [0, 1]."""
    return (torch.tanh(a) + 1) / 2


def _from_unit(u: torch.Tensor) -> torch.Tensor:
    return torch.atanh((2 * u - 1).clamp(-1 + _TANH_EPS, 1 - _TANH_EPS))


def _check_nc_settings(steps, batch_size, lr, init_cost, attack_succ_threshold, patience, cost_multiplier,
                       early_stop_threshold, early_stop_patience) -> dict:
    return dict(
        steps=check_count(steps, "steps"),
        batch_size=check_count(batch_size, "batch_size"),
        lr=check_positive(lr, "lr"),
        init_cost=check_positive(init_cost, "init_cost"),
        attack_succ_threshold=check_fraction(attack_succ_threshold, "attack_succ_threshold"),
        patience=check_count(patience, "patience"),
        cost_multiplier=_check_multiplier(cost_multiplier),
        early_stop_threshold=check_fraction(early_stop_threshold, "early_stop_threshold"),
        early_stop_patience=check_count(early_stop_patience, "early_stop_patience"),
    )


def _check_multiplier(value) -> float:
    return check_range(value, "cost_multiplier", 1.0, low_open=True)


def _invert(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, gen: torch.Generator, *, steps: int,
            batch_size: int, lr: float, init_cost: float, attack_succ_threshold: float, patience: int,
            cost_multiplier: float, early_stop_threshold: float, early_stop_patience: int,
            early_stop: bool = True) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    """NC's optimisation for one trigger; ``model`` already frozen. Returns mask, pattern (CPU), the
    fraction of ``images`` the trigger sends to their ``targets``, and a small log."""
    device = model_device(model)
    n, c, h, w = images.shape
    # NC starts from a uniform random mask and pattern (gtsrb_visualize_example.py), put in tanh space.
    mask_param = _from_unit(torch.rand(1, 1, h, w, generator=gen)).to(device).requires_grad_(True)
    pattern_param = _from_unit(torch.rand(1, c, h, w, generator=gen)).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_param, pattern_param], lr=lr, betas=(0.5, 0.9))
    cost_up, cost_down = cost_multiplier, cost_multiplier ** 1.5

    cost = 0.0  # NC's reset_cost_to_zero: pure attack until it succeeds, then the L1 term comes in
    best = None
    reg_best = float("inf")
    early_reg_best = float("inf")
    set_counter = up_counter = down_counter = early_counter = 0
    up_flag = down_flag = False
    epochs = 0
    for _ in range(steps):
        epochs += 1
        order = torch.randperm(n, generator=gen)
        hits, reg_sum = 0, 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x, t = images[idx].to(device), targets[idx].to(device)
            mask, pattern = _to_unit(mask_param), _to_unit(pattern_param)
            logits = model((1 - mask) * x + mask * pattern)
            reg = mask.abs().sum()
            loss = F.cross_entropy(logits, t) + cost * reg
            mask_param.grad, pattern_param.grad = torch.autograd.grad(loss, [mask_param, pattern_param])
            optimizer.step()
            hits += int((logits.argmax(1) == t).sum())
            reg_sum += float(reg.detach()) * len(idx)
        success, reg_avg = hits / n, reg_sum / n

        if success >= attack_succ_threshold and reg_avg < reg_best:
            best = (_to_unit(mask_param).detach()[0].cpu(), _to_unit(pattern_param).detach()[0].cpu())
            reg_best = reg_avg

        if early_stop:
            if reg_best < float("inf"):
                early_counter = early_counter + 1 if reg_best >= early_stop_threshold * early_reg_best else 0
            early_reg_best = min(reg_best, early_reg_best)
            if up_flag and down_flag and early_counter >= early_stop_patience:
                break

        if cost == 0 and success >= attack_succ_threshold:
            set_counter += 1
            if set_counter >= patience:
                cost = init_cost
                up_counter = down_counter = 0
                up_flag = down_flag = False
        else:
            set_counter = 0
        if success >= attack_succ_threshold:
            up_counter, down_counter = up_counter + 1, 0
        else:
            up_counter, down_counter = 0, down_counter + 1
        if up_counter >= patience:
            up_counter, cost, up_flag = 0, cost * cost_up, True
        elif down_counter >= patience:
            down_counter, cost, down_flag = 0, cost / cost_down, True

    if best is None:
        best = (_to_unit(mask_param).detach()[0].cpu(), _to_unit(pattern_param).detach()[0].cpu())
    mask, pattern = best
    success = stamped_success(model, images, targets, mask, pattern, "replace", batch_size=max(batch_size, 256))
    return mask, pattern, success, dict(epochs=epochs, final_cost=cost,
                                        reached_threshold=reg_best < float("inf"))


@torch.no_grad()
def stamped_success(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                    pattern: torch.Tensor, mode: str = "replace", batch_size: int = 256) -> float:
    """The fraction of ``images`` that ``model`` sends to their ``targets`` once stamped with (mask, pattern)."""
    device = model_device(model)
    m, p = mask.to(device), pattern.to(device)
    hits = 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        x = (1 - m) * x + m * p if mode == "replace" else (x + m * p).clamp(0.0, 1.0)
        hits += int((model(x).argmax(1).cpu() == targets[start:start + batch_size]).sum())
    return hits / len(images)


def invert_mask_pattern(model: nn.Module, images: torch.Tensor, targets, *, steps: int = 50, batch_size: int = 32,
                        lr: float = 0.1, init_cost: float = 1e-3, attack_succ_threshold: float = 0.99,
                        patience: int = 5, cost_multiplier: float = 1.5, early_stop_threshold: float = 0.99,
                        early_stop_patience: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One NC trigger (mask (1, H, W), pattern (C, H, W), both in [0, 1], on the CPU) that sends each
    image to its own target (``targets``: one label or one per image; ``targets=labels`` estimates a
    trigger that reinforces each image's own class, e.g. a trigger-activation model's trigger), and the
    fraction of ``images`` it sends to their targets. Settings as :func:`neural_cleanse`. The model's
    weights and train/eval mode are left as they were; deterministic on the CPU for a ``seed``."""
    images, targets = check_targets(images, targets)
    settings = _check_nc_settings(steps, batch_size, lr, init_cost, attack_succ_threshold, patience,
                                  cost_multiplier, early_stop_threshold, early_stop_patience)
    seed = check_seed_value(seed)
    with frozen(model):
        mask, pattern, success, _ = _invert(model, images, targets, generator(seed), **settings)
    return mask, pattern, success


def _class_seed(seed: int, t: int) -> int:
    """Each class its own stream, independent of which other classes are examined."""
    return seed * 1_000_003 + t


def neural_cleanse(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                   classes: Sequence[int] | None = None, steps: int = 50, batch_size: int = 32, lr: float = 0.1,
                   init_cost: float = 1e-3, attack_succ_threshold: float = 0.99, patience: int = 5,
                   cost_multiplier: float = 1.5, early_stop_threshold: float = 0.99, early_stop_patience: int = 25,
                   threshold: float = 2.0, seed: int = 0) -> DetectionResult:
    """Neural Cleanse on ``model`` (any module mapping [0, 1] images (N, C, H, W) to logits) with the
    defender's clean ``images`` and ``labels``: one reversed trigger per class of ``classes`` (None: all),
    optimised on and scored against the images whose label is not that class; then the MAD test.

    Defaults are NC's (``visualizer.py`` and ``gtsrb_visualize_example.py``): lr 0.1, Adam betas
    (0.5, 0.9), init_cost 1e-3, attack_succ_threshold 0.99, patience 5, cost_multiplier 1.5 (the class
    default; the GTSRB example uses 2), batch_size 32, early_stop_threshold 0.99, early stop after
    ``early_stop_patience`` = 5 * patience epochs (the GTSRB example's). One step is one epoch over the
    class's images (NC's step is ``mini_batch`` batches, ~1000 images). NC runs up to 1000 steps; the
    default here is 50, fewer than NC's cost schedule needs to end by its early stop (~80 epochs on
    digits), but on 16x16 digits the kept L1 norms are then within ~10% of their values at the early stop,
    and all ten classes with ~200 images take ~20 s on one CPU core. ``steps=1000`` gives NC's budget.
    """
    images, labels, num_classes = check_data(images, labels, num_classes)
    picked = check_classes(classes, num_classes)
    settings = _check_nc_settings(steps, batch_size, lr, init_cost, attack_succ_threshold, patience,
                                  cost_multiplier, early_stop_threshold, early_stop_patience)
    threshold = check_threshold(threshold)
    seed = check_seed_value(seed)
    for t in picked:
        if not bool((labels != t).any()):
            raise TrigactError(f"class {t}: every clean image is of class {t}; the detector needs images of other classes")
    started = time.perf_counter()
    masks, patterns, success, epochs, costs = [], [], [], [], []
    with frozen(model):
        for t in picked:
            keep = labels != t
            x = images[keep]
            mask, pattern, rate, log = _invert(model, x, torch.full((len(x),), t, dtype=torch.long),
                                               generator(_class_seed(seed, t)), **settings)
            masks.append(mask)
            patterns.append(pattern)
            success.append(rate)
            epochs.append(log["epochs"])
            costs.append(log["final_cost"])
    masks_t = torch.stack(masks)
    l1 = masks_t.flatten(1).sum(1)
    index, flagged_rows, model_index = anomaly_index(l1, threshold)
    return DetectionResult(
        detector="neural_cleanse",
        masks=masks_t,
        patterns=torch.stack(patterns),
        l1=l1,
        attack_success=torch.tensor(success),
        anomaly_index=index,
        flagged=[picked[i] for i in flagged_rows],
        model_anomaly_index=model_index,
        threshold=threshold,
        settings=dict(settings, threshold=threshold, seed=seed, classes=picked, num_images=len(images),
                      cost_multiplier_down=settings["cost_multiplier"] ** 1.5, reset_cost_to_zero=True,
                      epochs_run=epochs, final_cost=costs, seconds=round(time.perf_counter() - started, 2)),
        classes=picked,
        mode="replace",
    )
