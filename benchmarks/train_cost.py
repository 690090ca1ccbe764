"""Training cost of trigger activation as ratios to standard training, measured in one run.

    python benchmarks/train_cost.py [--model small_cnn] [--image-size 32] [--epochs 3] [--rounds 2]

Every variant trains the same network on the same data (scikit-learn digits, resized) through the
same Lightning loop; one epoch's wall time is taken from the start of the epoch to the end of
``on_train_epoch_end`` (so the learnable trigger's update pass is included). The first epoch of each
fit is a warm-up and is dropped. Variants are interleaved over ``--rounds``; each round's ratio is
taken against that round's standard run (so slow drift of a shared machine cancels), and the median
ratio over rounds is reported.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import lightning as L
import torch
from _epoch_timing import fit_epoch_times

from trigact.callbacks import TriggerUpdateCallback
from trigact.data import DigitsDataModule
from trigact.methods import StandardModule, TriggerActivationModule
from trigact.models import build_model
from trigact.triggers import fixed_trigger, learnable_trigger

VARIANTS = ("standard", "fixed", "learnable_epoch", "learnable_train_step")
CLOCK = time.perf_counter
TARGETS = {"fixed": 2.1, "learnable_epoch": 2.7, "learnable_train_step": 2.2}


def epoch_times(variant: str, args) -> list[float]:
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(image_size=args.image_size, batch_size=args.batch_size, seed=0)
    net = build_model(args.model, dm.num_classes, dm.in_chans, dm.image_size, dm.mean, dm.std)
    shape = (dm.in_chans, dm.image_size, dm.image_size)
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    callbacks: list[L.Callback] = []
    if variant == "standard":
        module = StandardModule(net=net, optimizer=optimizer)
    elif variant == "fixed":
        module = TriggerActivationModule(net=net, trigger=fixed_trigger(shape, 16 / 255), optimizer=optimizer)
    else:
        source = "epoch" if variant == "learnable_epoch" else "train_step"
        module = TriggerActivationModule(net=net, trigger=learnable_trigger(shape, 4 / 255), optimizer=optimizer)
        callbacks.append(TriggerUpdateCallback(update_fraction=1.0, source=source))
    return fit_epoch_times(module, dm, epochs=args.epochs, callbacks=callbacks, clock=CLOCK)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_resnet")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="per fit; the first is dropped as warm-up")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (all threads), less sensitive to other tenants")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time

    seconds = {v: [] for v in VARIANTS}  # mean epoch time of each round
    for _ in range(args.rounds):
        for variant in VARIANTS:
            seconds[variant].append(statistics.mean(epoch_times(variant, args)))
    ratios = {v: [t / s for t, s in zip(seconds[v], seconds["standard"])] for v in VARIANTS}
    print(f"\nmodel={args.model} image_size={args.image_size} batch_size={args.batch_size} "
          f"threads={torch.get_num_threads()} epochs/fit={args.epochs} rounds={args.rounds} clock={args.clock}\n")
    print("| variant | s/epoch (median) | ratio to standard (median over rounds) | min-max over rounds | target |")
    print("|---|---:|---:|---:|---:|")
    for v in VARIANTS:
        target = f"<= {TARGETS[v]}x" if v in TARGETS else "-"
        r = ratios[v]
        print(f"| {v} | {statistics.median(seconds[v]):.3f} | {statistics.median(r):.2f}x | {min(r):.2f}-{max(r):.2f} | {target} |")


if __name__ == "__main__":
    main()
