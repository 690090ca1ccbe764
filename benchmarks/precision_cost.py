"""bf16 autocast against fp32, for training and for attacks, measured in one run.

    python benchmarks/precision_cost.py [--device cpu] [--model small_cnn] [--epochs 3] [--rounds 3]

1. **Training speed.** Epochs of ``--steps`` batches of standard and fixed-trigger training, fp32
   (``32-true``) against ``bf16-mixed``, through the same Lightning loop (first epoch of each fit
   dropped); interleaved over ``--rounds``, each round's ratio taken against that round's fp32 run.
2. **Training accuracy.** Each (method, precision) trained for ``--epochs`` full epochs on Fashion-MNIST's
   54,000 training images (seed 0), scored on the 10,000 test images, with Wilson 95% intervals; for
   the trigger model, the deployed unit's accuracy.
3. **Attacks.** PGD-20 at 8/255 on the first ``--n-attack`` test images from the fp32 standard model,
   crafted in fp32 and under bf16 autocast (``attack_overrides.precision=bf16``): time per image,
   white-box success on the surrogate, and transfer accuracy on the bf16-trained standard model and on
   the fp32 fixed-trigger model's deployed unit, with the number of images whose outcome differs.

Falls back to scikit-learn digits (at 28x28) when Fashion-MNIST is not installed. On the CPU, bf16
autocast only pays where the CPU has bf16 instructions (``avx512_bf16``/AMX) and oneDNN uses them.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time

import lightning as L
import torch
from _epoch_timing import EpochTimer

from trigact.attacks import attack_from_config
from trigact.attacks.config import attack_config
from trigact.common.config import CONF_DIR
from trigact.methods import StandardModule, TriggerActivationModule
from trigact.models import build_model
from trigact.models.deployed import DeployedModel
from trigact.triggers import fixed_trigger

PRECISIONS = ("32-true", "bf16-mixed")
METHODS = ("standard", "fixed")


def datamodule(args, limit=None):
    from trigact.data import DigitsDataModule, FashionMNISTDataModule

    try:
        dm = FashionMNISTDataModule(batch_size=args.batch_size, seed=0)
        dm.setup()
    except Exception:  # noqa: BLE001 -- not installed: the embedded data instead
        dm = DigitsDataModule(image_size=28, batch_size=args.batch_size, seed=0)
        dm.setup()
    return dm


def build(method: str, dm):
    L.seed_everything(0, verbose=False)
    net = build_model(ARGS.model, dm.num_classes, dm.in_chans, dm.image_size, dm.mean, dm.std)
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    if method == "standard":
        return StandardModule(net=net, optimizer=optimizer)
    shape = (dm.in_chans, dm.image_size, dm.image_size)
    return TriggerActivationModule(net=net, trigger=fixed_trigger(shape, 32 / 255, seed=0), optimizer=optimizer)


def trainer(precision: str, epochs: int, limit=None, callbacks=()):
    accelerator = "gpu" if ARGS.device == "cuda" else "cpu"
    return L.Trainer(accelerator=accelerator, devices=1, max_epochs=epochs, precision=precision, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, limit_train_batches=limit,
                     callbacks=list(callbacks))


def epoch_seconds(method: str, precision: str, dm) -> float:
    timer = EpochTimer()
    trainer(precision, 2, limit=ARGS.steps, callbacks=[timer]).fit(build(method, dm), datamodule=dm)
    return timer.times[-1]


def wilson(k: int, n: int) -> tuple[float, float]:
    z = 1.96
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@torch.no_grad()
def correct(model, x, y, batch=512) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch].to(device)).argmax(1).cpu() == y[i:i + batch]
                      for i in range(0, len(x), batch)])


def test_tensors(dm, n=None):
    xs, ys = zip(*[dm.test_set[i] for i in range(len(dm.test_set) if n is None else min(n, len(dm.test_set)))])
    return torch.stack(xs), torch.tensor(ys)


def deployed(module) -> torch.nn.Module:
    device = torch.device(ARGS.device)
    if module.trigger is None:
        return module.net.to(device).eval()
    return DeployedModel(module.net, module.trigger.tau.detach().clone()).to(device).eval()


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="batches per timed epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="full epochs of each accuracy run")
    parser.add_argument("--n-attack", type=int, default=1000)
    parser.add_argument("--skip-accuracy", action="store_true")
    ARGS = parser.parse_args()
    dm = datamodule(ARGS)
    print(f"device={ARGS.device} model={ARGS.model} data={dm.name} threads={torch.get_num_threads()} "
          f"batch={ARGS.batch_size} steps/epoch={ARGS.steps} rounds={ARGS.rounds}")

    seconds = {(m, p): [] for m in METHODS for p in PRECISIONS}
    for _ in range(ARGS.rounds):
        for m in METHODS:
            for p in PRECISIONS:
                seconds[(m, p)].append(epoch_seconds(m, p, dm))
    print("\n| method | precision | s/epoch (median) | ratio to fp32 (median over rounds) | min-max |")
    print("|---|---|---:|---:|---:|")
    for m in METHODS:
        for p in PRECISIONS:
            r = [t / f for t, f in zip(seconds[(m, p)], seconds[(m, "32-true")])]
            print(f"| {m} | {p} | {statistics.median(seconds[(m, p)]):.3f} | {statistics.median(r):.2f}x "
                  f"| {min(r):.2f}-{max(r):.2f} |")
    if ARGS.skip_accuracy:
        return

    models = {}
    x_test, y_test = test_tensors(dm)
    print(f"\n| method | precision | epochs | test accuracy (deployed) | 95% Wilson | s/epoch |")
    print("|---|---|---:|---:|---:|---:|")
    for m in METHODS:
        for p in PRECISIONS:
            module = build(m, dm)
            start = time.perf_counter()
            trainer(p, ARGS.epochs).fit(module, datamodule=dm)
            elapsed = (time.perf_counter() - start) / ARGS.epochs
            models[(m, p)] = deployed(module)
            ok = correct(models[(m, p)], x_test, y_test)
            lo, hi = wilson(int(ok.sum()), len(ok))
            print(f"| {m} | {p} | {ARGS.epochs} | {100 * ok.float().mean():.2f} | {100 * lo:.2f}-{100 * hi:.2f} "
                  f"| {elapsed:.1f} |")

    x, y = test_tensors(dm, ARGS.n_attack)
    surrogate = models[("standard", "32-true")]
    victims = {"standard (bf16-trained)": models[("standard", "bf16-mixed")],
               "fixed 32/255 (deployed)": models[("fixed", "32-true")]}
    outcome, timing = {}, {}
    for precision in (None, "bf16"):
        cfg = attack_config(CONF_DIR, "pgd", {"eps": "8/255", "steps": 20, "precision": precision})
        attack = attack_from_config(cfg, surrogate)
        L.seed_everything(0, verbose=False)
        start = time.perf_counter()
        x_adv = torch.cat([attack(x[i:i + 250], y[i:i + 250]) for i in range(0, len(x), 250)])
        timing[precision] = (time.perf_counter() - start) / len(x)
        x_adv = (x_adv * 255).round() / 255  # what a bank stores
        outcome[precision] = {"surrogate": correct(surrogate, x_adv, y),
                              **{name: correct(v, x_adv, y) for name, v in victims.items()}}
    print(f"\nPGD-20 at 8/255 from the fp32 standard {ARGS.model}, {len(x)} test images; "
          f"ms/image fp32 {1e3 * timing[None]:.2f}, bf16 {1e3 * timing['bf16']:.2f} "
          f"(ratio {timing['bf16'] / timing[None]:.2f}x)\n")
    print("| scored on | accuracy fp32-crafted | accuracy bf16-crafted | images whose outcome differs |")
    print("|---|---:|---:|---:|")
    for name in outcome[None]:
        a, b = outcome[None][name], outcome["bf16"][name]
        print(f"| {name} | {100 * a.float().mean():.2f} | {100 * b.float().mean():.2f} | {int((a != b).sum())} |")


ARGS = None

if __name__ == "__main__":
    main()
