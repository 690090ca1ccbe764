"""Attack throughput per gradient evaluation, as a ratio to the physical limit, measured in one run.

    python benchmarks/attack_cost.py [--model tiny_resnet] [--image-size 32] [--batch-size 64]
                                     [--steps 5] [--rounds 3] [--attacks pgd,mifgsm,...]

Every attack in the suite (``conf/attack/``) runs through the registry, as the pipeline runs it.
A forward hook on the surrogate counts the images it is evaluated on during the attack: an attack
that takes K samples per step (SI-NI, VMI, BSR, NAA, ...) is counted K times per step, so the
figure is its throughput per gradient evaluation, in images per second. The limit is the
throughput of bare forward+backward passes to the input of the same frozen surrogate on the same
batch; the ratio is attack throughput / limit, 1.0 meaning no overhead beyond the evaluations
themselves. Attacks and the bare loop are interleaved over ``--rounds``, each round's ratio taken
against that round's bare loop (drift on a shared machine cancels); the median is reported.
Attacks that cannot run on the surrogate (ViT-only, generative without weights, ...) are listed
with their one-line reason.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from trigact.attacks import build_attack, list_attacks
from trigact.common.errors import TrigactError
from trigact.common.precision import autocast, parse_precision
from trigact.data import DigitsDataModule
from trigact.models import build_model

TARGET = 0.8


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_seconds(model, x, y, steps: int, precision=None) -> float:
    """``steps`` forward+backward passes to the input: what any gradient attack must at least do."""
    sync(x.device)
    start = time.perf_counter()
    for _ in range(steps):
        x_ = x.detach().requires_grad_(True)
        with autocast(x.device, precision):
            loss = F.cross_entropy(model(x_), y)
        (grad,) = torch.autograd.grad(loss, x_)
    sync(x.device)
    return time.perf_counter() - start


class EvaluationCounter:
    """Counts the images a model is evaluated on (its top-level forward calls)."""

    def __init__(self, model):
        self.images = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.images += int(args[0].shape[0])


def attack_run(attack, model, x, y) -> tuple[float, int]:
    """(seconds, images evaluated) for one call of ``attack``."""
    counter = EvaluationCounter(model)
    try:
        sync(x.device)
        start = time.perf_counter()
        attack(x, y)
        sync(x.device)
        return time.perf_counter() - start, counter.images
    finally:
        counter.handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_resnet")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attacks", default="", help="comma-separated names (default: every attack)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default=None, help="bf16: attacks and the limit under bf16 autocast")
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = parse_precision(args.precision, "--precision")

    torch.manual_seed(0)
    dm = DigitsDataModule(image_size=args.image_size)
    dm.setup()
    # Digits has 360 test images: a larger batch repeats them (the cost does not depend on the pixels).
    index = [i % len(dm.test_set) for i in range(args.batch_size)]
    x = torch.stack([dm.test_set[i][0] for i in index]).to(device)
    y = torch.stack([torch.as_tensor(dm.test_set[i][1]) for i in index]).to(device)
    model = build_model(args.model, dm.num_classes, dm.in_chans, dm.image_size, dm.mean, dm.std).eval().to(device)
    for p in model.parameters():  # as for any attack on a frozen surrogate
        p.requires_grad_(False)
    names = [n for n in args.attacks.split(",") if n] or list_attacks()
    attacks, refused = {}, {}
    for name in names:
        try:
            attacks[name] = build_attack(name, model, eps="8/255", steps=args.steps)
            attacks[name].precision = precision
        except TrigactError as err:
            refused[name] = str(err)

    bare_seconds(model, x, y, 2, precision)  # warm-up
    ratios: dict[str, list[float]] = {name: [] for name in attacks}
    per_step: dict[str, float] = {}
    bare = []
    for _ in range(args.rounds):
        base = bare_seconds(model, x, y, args.steps, precision)
        bare.append(base)
        limit = args.batch_size * args.steps / base  # images per second
        for name, attack in attacks.items():
            torch.manual_seed(0)
            seconds, images = attack_run(attack, model, x, y)
            ratios[name].append(images / seconds / limit)
            per_step[name] = images / (args.batch_size * attack.steps)

    limit = args.batch_size * args.steps / statistics.median(bare)
    print(f"\nmodel={args.model} image_size={args.image_size} batch={args.batch_size} steps={args.steps} "
          f"threads={torch.get_num_threads()} rounds={args.rounds} device={args.device} "
          f"precision={precision or 'fp32'}")
    print(f"bare forward+backward: {limit:.0f} images/s (the limit)\n")
    print("| attack | evaluations per image per step | throughput / limit (median) | min-max over rounds |"
          f" >= {TARGET} |")
    print("|---|---:|---:|---:|---|")
    for name in attacks:
        r = ratios[name]
        ok = "yes" if statistics.median(r) >= TARGET else "no"
        print(f"| {name} | {per_step[name]:g} | {statistics.median(r):.2f} | {min(r):.2f}-{max(r):.2f} | {ok} |")
    for name, reason in refused.items():
        print(f"| {name} | - | not run: {reason} | - | - |")


if __name__ == "__main__":
    main()
