"""Attack throughput as a ratio to the physical limit, measured in one run.

    python benchmarks/attack_cost.py [--model tiny_resnet] [--image-size 32] [--batch-size 128] [--rounds 7]

An iterative attack with ``steps`` iterations needs ``steps`` forward+backward passes (to the input)
per image. The limit is therefore the throughput of bare forward+backward passes of the same
surrogate on the same batch, in images x steps per second. Each attack's throughput (through the
registry, as the pipeline runs it) is divided by that limit; 1.0 means no overhead at all. Attacks
and the bare loop are interleaved over ``--rounds`` and each round's ratio is taken against that
round's bare loop, so drift on a shared machine cancels; the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from trigact.attacks import build_attack
from trigact.data import DigitsDataModule
from trigact.models import build_model

ATTACKS = ("ifgsm", "pgd", "mifgsm", "difgsm")
TARGETS = {"ifgsm": 0.8, "pgd": 0.8, "mifgsm": 0.8}


def bare_seconds(model, x, y, steps: int) -> float:
    """``steps`` forward+backward passes to the input: what any gradient attack must at least do."""
    start = time.perf_counter()
    for _ in range(steps):
        x_ = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_), y), x_)
    return time.perf_counter() - start


def attack_seconds(attack, x, y) -> float:
    start = time.perf_counter()
    attack(x, y)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_resnet")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    dm = DigitsDataModule(image_size=args.image_size)
    dm.setup()
    x = torch.stack([dm.test_set[i][0] for i in range(args.batch_size)])
    y = torch.stack([dm.test_set[i][1] for i in range(args.batch_size)])
    model = build_model(args.model, dm.num_classes, dm.in_chans, dm.image_size, dm.mean, dm.std).eval()
    for p in model.parameters():  # as for any attack on a frozen surrogate
        p.requires_grad_(False)
    attacks = {name: build_attack(name, model, eps="8/255", steps=args.steps) for name in ATTACKS}

    bare_seconds(model, x, y, 2)  # warm-up
    ratios = {name: [] for name in ATTACKS}
    bare = []
    for _ in range(args.rounds):
        base = bare_seconds(model, x, y, args.steps)
        bare.append(base)
        for name, attack in attacks.items():
            ratios[name].append(base / attack_seconds(attack, x, y))  # throughput ratio = time ratio inverted

    limit = args.batch_size * args.steps / statistics.median(bare)
    print(f"\nmodel={args.model} image_size={args.image_size} batch={args.batch_size} steps={args.steps} "
          f"threads={torch.get_num_threads()} rounds={args.rounds}")
    print(f"bare forward+backward: {limit:.0f} image-steps/s (the limit)\n")
    print("| attack | throughput / limit (median) | min-max over rounds | target |")
    print("|---|---:|---:|---:|")
    for name in ATTACKS:
        r = ratios[name]
        target = f">= {TARGETS[name]}" if name in TARGETS else "-"
        print(f"| {name} | {statistics.median(r):.2f} | {min(r):.2f}-{max(r):.2f} | {target} |")


if __name__ == "__main__":
    main()
