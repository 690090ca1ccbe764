"""What each ``paper_*`` experiment costs: GPU hours of training and disk space, from its own plan.

GPU hours: the paper's Table V (one RTX 3090, ResNet-18: hours of training per method, CIFAR-10 at 60
epochs and the ImageNet subset at 100) times each architecture's cost relative to ResNet-18, measured
here as the median ratio of a training step (forward, backward, SGD step) over interleaved rounds on
this machine's CPU. A CPU ratio is only a proxy for a GPU's (GPUs favour wide convolutions more than
depthwise ones), so the figures are estimates, to plan a cluster allocation, not measurements.
CIFAR-100 runs 100 epochs where CIFAR-10 runs 60: its hours are Table V's CIFAR figure x 100/60.
Attack crafting is left out (20 steps over the test set per bank: minutes per bank on a GPU).

Disk: every run keeps a bundle (weights, fp32) and Lightning's ``last.ckpt`` (weights, SGD momentum
and BN statistics: about 2x the weights); every bank stores its adversarial and clean images as uint8.

    .venv/bin/python benchmarks/paper_cost.py            # measures the ratios (about 3 min on 2 cores)
    .venv/bin/python benchmarks/paper_cost.py --rounds 1 # quicker, noisier
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

TABLE_V_HOURS = {  # Table V, training time (hours), ResNet-18 on one RTX 3090
    "cifar": {"standard": 0.5, "pgd_at": 3.6, "rat": 5.4, "tdat": 0.91, "trigger_activation": 0.86},
    "imagenet": {"standard": 5.5, "pgd_at": 39.4, "rat": 40.3, "tdat": 8.5, "trigger_activation": 8.3},
}
EXPERIMENTS = ["paper_table1_cifar10", "paper_table2_cifar10", "paper_table3_cifar100", "paper_table4_imagenet100",
               "paper_table7_alpha_cifar10", "paper_table8_cifar10", "paper_table9_cifar100",
               "paper_table10_imagenet100", "paper_table11_trigger_mse"]
TEST_IMAGES = {"cifar10": 10_000, "cifar100": 10_000, "imagenet_subset": 5_000}


def step_seconds(name: str, size: int, batch: int, num_classes: int) -> float:
    from trigact.models import build_model

    net = build_model(name=name, num_classes=num_classes, in_chans=3, image_size=size)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, num_classes, (batch,))
    net.train()
    for i in range(3):
        if i == 1:
            start = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return (time.perf_counter() - start) / 2


def arch_ratios(rounds: int) -> dict[str, float]:
    """Each architecture's training-step time over ResNet-18's of its family, median over interleaved rounds."""
    families = {"cifar": (["resnet18", "resnet50", "vgg19_bn", "mobilenet_v2", "densenet121"], 32, 32, 10),
                "imagenet": (["tv_resnet18", "tv_resnet50", "tv_vgg19_bn", "tv_mobilenet_v2", "tv_densenet121",
                              "inception_v4"], 224, 4, 100)}
    ratios = {}
    for family, (names, size, batch, classes) in families.items():
        per = {n: [] for n in names}
        for _ in range(rounds):
            base = step_seconds(names[0], size, batch, classes)
            for n in names:
                per[n].append(step_seconds(n, size, batch, classes) / base if n != names[0] else 1.0)
        ratios.update({n: statistics.median(v) for n, v in per.items()})
    return ratios


def parameters(name: str, num_classes: int, size: int) -> int:
    from trigact.models import build_model

    return sum(p.numel() for p in build_model(name=name, num_classes=num_classes, in_chans=3, image_size=size).parameters())


def plan(experiment: str):
    from hydra import compose, initialize_config_dir

    from trigact.cli.grid import expand_grid
    from trigact.cli.pipeline import train_configs
    from trigact.common.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=[f"experiment={experiment}", "paths.root_dir=/tmp/paper_cost",
                                                             "allow_cpu=true"])  # composing only
        expand_grid(cfg)
        return cfg, train_configs(cfg)


def main() -> None:
    from trigact.cli.pipeline import all_surrogate_entries

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ratios = arch_ratios(args.rounds)
    print("| architecture | training step / ResNet-18's (CPU, median of", args.rounds, "rounds) |\n|---|---:|")
    for name, ratio in ratios.items():
        print(f"| {name} | {ratio:.2f}x |")
    print("\n| experiment | trainings | GPU hours (est.) | banks | disk (GB) |\n|---|---:|---:|---:|---:|")
    seen_params: dict[tuple, int] = {}
    for experiment in EXPERIMENTS:
        cfg, runs = plan(experiment)
        hours = disk = 0.0
        for run in runs.values():
            data, arch = run.data.name, run.model.name
            family = "imagenet" if data == "imagenet_subset" else "cifar"
            epochs_factor = run.trainer.max_epochs / (100 if family == "imagenet" else 60)
            hours += TABLE_V_HOURS[family][run.method.name] * ratios[arch] * epochs_factor
            size = int(run.data.get("image_size") or 32)
            classes = int(run.data.get("num_classes") or (100 if data == "cifar100" else 10))
            key = (arch, classes, size)
            if key not in seen_params:
                seen_params[key] = parameters(arch, classes, size)
            disk += 3 * 4 * seen_params[key]  # bundle (1x) + last.ckpt (weights and momentum, ~2x)
        surrogates = len(all_surrogate_entries(cfg)) if cfg.pipeline.get("attacks") else 0
        banks = surrogates * len(cfg.pipeline.get("attacks") or [])
        first = next(iter(runs.values()))
        side = int(first.data.get("image_size") or 32)
        disk += banks * 2 * TEST_IMAGES.get(first.data.name, 10_000) * 3 * side * side  # uint8 adv + clean
        print(f"| {experiment} | {len(runs)} | {hours:.0f} | {banks} | {disk / 1e9:.1f} |")
    print("\nRuns and banks shared between tables (same data root and paths.root_dir) are counted in each.")


if __name__ == "__main__":
    main()
