"""What each adaptive rung of the threat ladder costs, as ratios to PGD-20 measured in one run.

    python benchmarks/threat_cost.py [--model small_cnn] [--image-size 16] [--batch-size 128] [--rounds 3]

Every attack of conf/threat/L4.yaml, L5.yaml and L6.yaml runs on one batch of digits images against a
model with a fixed trigger (random weights: cost does not depend on them, except where an attack stops
early on images it has fooled: Square and the PGD restarts; so the model is trained for a few epochs
first). Reported per attack: seconds per image, the ratio to PGD-20 (the paper's attack) in the same
round, and the model evaluations (queries) per image, counted by a forward hook. Rounds interleave
every attack with PGD-20; medians are reported. L4's attacks run here on the deployed model itself
(through an estimate or the raw network they cost the same: one more addition and clamp per call); its
three trigger estimators (the defender's objective, Neural Cleanse-style, USB-style universal) run on
the raw network f, as the attacker has it, once per victim.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from trigact.attacks import build_attack
from trigact.common.config import CONF_DIR
from trigact.data import DigitsDataModule
from trigact.models.deployed import DeployedModel
from trigact.threats.adaptive import applicable, build_adaptive
from trigact.threats.estimate import estimate_stamp, estimate_trigger, estimate_universal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _helpers_torch import train_digits_net  # noqa: E402  (the tests' quick digits training)


class Counter(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.images = model, 0

    @property
    def trigger(self):  # trigger_flip reads it off the victim
        return self.model.trigger

    @property
    def net(self):  # the raw network f, as L4's estimators get it, counted into the same total
        return RawCounter(self)

    def forward(self, x):
        self.images += len(x)
        return self.model(x)


class RawCounter(torch.nn.Module):
    def __init__(self, counter: Counter):
        super().__init__()
        self.raw = counter.model.net
        object.__setattr__(self, "counter", counter)  # not a submodule: no second parameter copy

    def forward(self, x):
        self.counter.images += len(x)
        return self.raw(x)


def timed(fn, model, x, y) -> tuple[float, int]:
    counter = Counter(model).eval()
    start = time.perf_counter()
    fn(counter)(x, y)
    seconds = time.perf_counter() - start
    model.eval()  # torchattacks restores a wrapper's train mode recursively
    return seconds, counter.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eps", default="16/255")
    parser.add_argument("--universal-target", type=float, default=0.9,
                        help="the USB-style estimate's target_accuracy (conf/threat/L4.yaml's 0.9; 1.0: run its passes, see main)")
    args = parser.parse_args()

    dm = DigitsDataModule(image_size=16, batch_size=128, seed=0)
    dm.setup()
    net = train_digits_net(dm, args.model, 4)
    for p in net.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    model = DeployedModel(net, torch.sign(torch.randn(1, 16, 16)) * 32 / 255).eval()
    x, y = next(iter(dm.test_dataloader()))
    x, y = x[: args.batch_size], y[: args.batch_size]

    jobs = {"pgd (L0-L3 banks, PGD-20)": lambda m: build_attack("pgd", m, eps=args.eps, steps=20)}
    for level in ("L4", "L5", "L6"):
        cfg = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "threat" / f"{level}.yaml"), resolve=True)
        for name, spec in cfg["attacks"].items():
            own = {k: v for k, v in spec.items() if k != "through"}
            if applicable(own, model):
                jobs[f"{level} {name}"] = lambda m, own=own, name=name: build_adaptive(name, own, m, args.eps)
        if level == "L4":
            est = cfg["estimate"]

            def estimate(m, est=est):
                return lambda xb, yb: estimate_trigger(m, xb, yb, bound=est["bound"], steps=est["steps"],
                                                       restarts=est["restarts"])
            jobs["L4 trigger estimate (once per victim)"] = estimate
            nc, universal = cfg["neural_cleanse"], cfg["universal"]

            def stamp(m, nc=nc):  # the Neural Cleanse-style estimate (through: neural_cleanse)
                return lambda xb, yb: estimate_stamp(m.net, xb, yb, **nc)

            # The benchmark's network needs no trigger (f alone is right on ~95% of these images), so at
            # L4.yaml's target_accuracy 0.9 the estimate stops before its first pass: a lower bound of its
            # cost. --universal-target 1.0 makes it run passes as on a trigger model's raw f.
            universal = {**universal, "target_accuracy": args.universal_target}

            def uap(m, universal=universal):  # the USB-style estimate (through: universal)
                return lambda xb, yb: estimate_universal(m.net, xb, yb, **universal)
            jobs["L4 Neural Cleanse-style estimate (once per victim)"] = stamp
            jobs["L4 USB-style universal estimate (once per victim)"] = uap

    timed(jobs["pgd (L0-L3 banks, PGD-20)"], model, x, y)  # warm-up: the first call pays one-off costs
    seconds: dict[str, list[float]] = {k: [] for k in jobs}
    ratios: dict[str, list[float]] = {k: [] for k in jobs}
    queries: dict[str, float] = {}
    for _ in range(args.rounds):
        torch.manual_seed(0)
        base, _ = timed(jobs["pgd (L0-L3 banks, PGD-20)"], model, x, y)
        for name, job in jobs.items():
            torch.manual_seed(0)
            s, images = timed(job, model, x, y)
            seconds[name].append(s / len(x))
            ratios[name].append(s / base)
            queries[name] = images / len(x)
    print(f"\nmodel={args.model} (fixed trigger 32/255) 16x16 digits, batch={args.batch_size}, eps={args.eps}, "
          f"threads={torch.get_num_threads()}, rounds={args.rounds}\n")
    print("| attack | ms per image (median) | time / PGD-20 (median, min-max) | model evaluations per image |")
    print("|---|---:|---:|---:|")
    for name in jobs:
        r = ratios[name]
        print(f"| {name} | {1000 * statistics.median(seconds[name]):.2f} | {statistics.median(r):.1f} "
              f"({min(r):.1f}-{max(r):.1f}) | {queries[name]:.0f} |")


if __name__ == "__main__":
    main()
