"""Cost of defenses (the paper's Table V) as ratios, measured in one run.

    python benchmarks/defense_cost.py [--model small_cnn] [--data digits] [--steps 10] [--rounds 7]

1. **Training.** One epoch of ``--steps`` batches (the same batches for every method: same seed, same
   sampler) of ``standard``, ``trigger_activation`` with a fixed and with a learnable trigger, ``pgd_at``,
   ``trades``, ``rat`` and ``tdat``, each built from its Hydra configs exactly as ``python -m
   trigact.train method=... trigger=...`` builds it (``conf/method/*.yaml`` defaults: 10-step inner
   attacks; the paper's SGD and cosine schedule), timed through the same Lightning loop as
   ``train_cost.py``. The learnable trigger includes its epoch-end trigger-gradient pass
   (``TriggerUpdateCallback`` from ``conf/trigger/learnable.yaml``, ``source=epoch``) over as many
   batches as the epoch trained on, taken after every epoch (``update_fraction=1``) so that its cost is
   in every measured epoch. The first epoch of each fit is a warm-up and is dropped.
2. **Test time.** One forward of a test batch through each preprocessing defense (the paper's settings,
   ``conf/defense/*.yaml``) followed by the network, under ``torch.no_grad()``, against the bare network's
   forward on the same batch. NRP and DiffPure are randomly initialised (no pretrained weights can be
   downloaded here), so their figures are the cost of the stated architecture, nothing more; the
   configured sizes too slow for one thread (NRP's 23 RRDB blocks, DiffPure's 100 reverse steps) are
   measured smaller and scaled up linearly in extra rows marked "extrapolated".

Items are interleaved over ``--rounds`` (each round measures every item once) and each round's ratio is
taken against that round's baseline (standard training, bare forward), so the slow drift of a shared
machine cancels; medians and the min-max over rounds are printed as markdown tables. One torch thread
by default (``--threads``), so as to disturb other jobs on the machine least; ``--clock cpu`` times this
process's CPU time instead of wall time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from _epoch_timing import fit_epoch_times, sync
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from trigact.cli import quiet_libraries
from trigact.defenses import DiffPure, build_defense_from_config, defended
from trigact.models import build_model
from trigact.common.config import CONF_DIR
from trigact.training.build import build_datamodule, build_run

# name -> (method config, trigger config); the first is the baseline.
TRAINING = {
    "standard": ("standard", "none"),
    "trigger activation, fixed trigger": ("trigger_activation", "fixed"),
    "trigger activation, learnable trigger (epoch pass)": ("trigger_activation", "learnable"),
    "pgd_at": ("pgd_at", "none"),
    "trades": ("trades", "none"),
    "rat": ("rat", "none"),
    "tdat": ("tdat", "none"),
}
# Compute per training step in batch forwards F, counting a backward that builds weight gradients as
# 2F and an input-only one (attack steps, the trigger pass) as 1F: a standard step is 3F. The estimate
# of a ratio is that count / 3F; per-step overheads (optimizer, logging) are left out.
FORWARDS = {
    "standard": (3, "fwd + bwd"),
    "trigger activation, fixed trigger": (6, "fwd + bwd of a doubled batch"),
    "trigger activation, learnable trigger (epoch pass)": (8, "6F + the pass: fwd + input-only bwd"),
    "pgd_at": (23, "10 x (fwd + input-only bwd) + 3F"),
    "trades": (27, "1 no-grad fwd + 10 x 2F + 2 fwd + their bwd"),
    "rat": (27, "as TRADES; the head-only gradients are ~0"),
    "tdat": (7, "2 fwd + 1 input-only bwd + bwd through both"),
}

# The paper's CIFAR-10 test-time defense settings, as conf/defense/<name>.yaml.
PAPER_DEFENSES = ("jpeg_q50", "bdr_d2", "gaussian_s06", "rp_s12")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
DEFENSE_CONF = Path(CONF_DIR) / "defense"


def small_unet(image_size: int, channels: tuple[int, int]) -> dict:
    """A small ``UNet2DModel`` (two resolutions, no attention) at the data's image size, RGB."""
    return {
        "sample_size": image_size, "in_channels": 3, "out_channels": 3, "block_out_channels": list(channels),
        "layers_per_block": 1, "down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2,
        "norm_num_groups": 8,
    }


# --------------------------------------------------------------------------------------------- training

def training_configs(args) -> dict:
    """The composed Hydra config of every training item, as ``python -m trigact.train`` would build it."""
    common = [f"data={args.data}", f"model={args.model}", f"data.batch_size={args.batch_size}", "seed=0",
              f"trainer.max_epochs={args.epochs}", "logger=none", f"paths.root_dir={tempfile.gettempdir()}"]
    if args.image_size is not None:
        common.append(f"data.image_size={args.image_size}")
    if args.data_root is not None:
        common.append(f"data.root={args.data_root}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return {name: compose(config_name="train", overrides=[f"method={method}", f"trigger={trigger}", *common])
                for name, (method, trigger) in TRAINING.items()}


def epoch_seconds(cfg, datamodule, args) -> float:
    """Mean time of the measured epochs of one fresh fit of ``cfg``'s method."""
    L.seed_everything(0, verbose=False)
    module = build_run(cfg, datamodule)
    callbacks = []
    update = cfg.trigger.get("update")
    if update:  # every epoch updates, so every measured epoch carries the pass
        callbacks.append(instantiate(update, update_fraction=1.0))
    times = fit_epoch_times(module, datamodule, epochs=args.epochs, callbacks=callbacks,
                            clock=CLOCKS[args.clock], limit_train_batches=args.steps,
                            accelerator="gpu" if args.device == "cuda" else "cpu", precision=args.precision)
    return statistics.mean(times)


# --------------------------------------------------------------------------------------------- test time

def defense_config(name: str, **overrides) -> dict:
    """``conf/defense/<name>.yaml`` as a plain dict, with ``overrides``.

    A plain dict, not a DictConfig: ``build_defense_from_config`` passes a DictConfig's nested mappings
    (DiffPure's ``unet_config``) on as DictConfigs, which the constructors reject.
    """
    return {**OmegaConf.to_container(OmegaConf.load(DEFENSE_CONF / f"{name}.yaml"), resolve=True), **overrides}


def params_note(defense) -> str:
    return f"{sum(p.numel() for p in defense.parameters()) / 1e6:.2f}M params"


def build_defenses(args, image_size: int) -> dict:
    """Label -> (defense module, full-size factor, note) for every defense measured.

    The full-size factor scales the measured purifier up to its configured size (1: measured as
    configured); NRP and DiffPure get random weights instead of the configured pretrained ones.
    """
    defenses = {}
    for name in PAPER_DEFENSES:
        cfg = defense_config(name)
        defenses[cfg["label"]] = (build_defense_from_config(cfg), 1.0, "")
    nrp_cfg = defense_config("nrp", weights=None, allow_random_init=True)
    nrp = build_defense_from_config({**nrp_cfg, "nb": args.nrp_nb})
    generator = {"nrp": "RRDB", "nrp_resg": "ResNet"}.get(nrp_cfg["arch"], nrp_cfg["arch"])
    label = f"NRP ({generator} nf={nrp_cfg['nf']}, nb={args.nrp_nb}, gc={nrp_cfg['gc']}; random weights)"
    defenses[label] = (nrp, nrp_cfg["nb"] / args.nrp_nb, f"{params_note(nrp)}; configured nb={nrp_cfg['nb']}")
    unet = small_unet(image_size, tuple(args.unet_channels))
    full = build_defense_from_config(defense_config("diffpure", weights=None, allow_random_init=True, unet_config=unet))
    steps = min(args.diffpure_steps, len(full.timesteps))
    diffpure = build_defense_from_config(
        defense_config("diffpure", weights=None, allow_random_init=True, unet_config=unet, steps=steps))
    channels = ",".join(map(str, args.unet_channels))
    label = (f"DiffPure (t*={full.params['t_star']}, {len(diffpure.timesteps)} reverse steps; "
             f"UNet ({channels}) at {image_size}x{image_size}; random weights)")
    defenses[label] = (diffpure, len(full.timesteps) / len(diffpure.timesteps),
                       f"{params_note(diffpure)}; configured: {len(full.timesteps)} steps")
    return defenses


def per_call_seconds(fn, x, reps: int, clock=time.perf_counter) -> float:
    sync(x.device)
    start = clock()
    for _ in range(reps):
        fn(x)
    sync(x.device)
    return (clock() - start) / reps


def calibrated_reps(fn, x, min_seconds: float) -> int:
    """Calls per measurement so that one measurement lasts about ``min_seconds`` (at least one call)."""
    fn(x)  # warm-up
    once = per_call_seconds(fn, x, 1)
    return max(1, math.ceil(min_seconds / max(once, 1e-9)))


# --------------------------------------------------------------------------------------------- report

def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn", help="a registered model (conf/model/<name>.yaml)")
    parser.add_argument("--data", default="digits", help="conf/data/<name>.yaml, e.g. digits or fashion_mnist")
    parser.add_argument("--image-size", type=int, default=None, help="default: the data config's (digits 16, fashion_mnist 28)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="training batches per epoch (the same for every method)")
    parser.add_argument("--epochs", type=int, default=2, help="per fit; the first is dropped as warm-up")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="cpu: this process's CPU time (all threads), less sensitive to other tenants")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: disturb other jobs least)")
    parser.add_argument("--nrp-nb", type=int, default=1, help="RRDB blocks of the NRP measured (conf/defense/nrp.yaml: 23)")
    parser.add_argument("--diffpure-steps", type=int, default=10,
                        help="reverse steps of the DiffPure measured (conf/defense/diffpure.yaml: t*=0.1, all 100)")
    parser.add_argument("--unet-channels", type=int, nargs=2, default=(16, 32), help="DiffPure UNet block widths")
    parser.add_argument("--min-seconds", type=float, default=0.2, help="repeat a test-time call until it lasts this long")
    parser.add_argument("--data-root", default=None, help="data.root, where the data config's default is not it")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="32-true", help="training precision, e.g. bf16-mixed")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-test", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_libraries()

    configs = training_configs(args)
    datamodule = build_datamodule(configs["standard"])  # one datamodule, reused by every fit
    datamodule.setup()
    image_size = datamodule.image_size

    # Test time: the bare network (random init; the cost does not depend on the weights) on a test batch.
    net = build_model(args.model, datamodule.num_classes, datamodule.in_chans, image_size,
                      datamodule.mean, datamodule.std).eval()
    x = torch.stack([datamodule.test_set[i][0] for i in range(min(args.batch_size, len(datamodule.test_set)))])
    defenses = {} if args.skip_test else build_defenses(args, image_size)
    net, x = net.to(args.device), x.to(args.device)
    for defense, _, _ in defenses.values():
        defense.to(args.device)
    calls = {"bare": net, **{label: defended(net, d) for label, (d, _, _) in defenses.items()}}
    with torch.no_grad():
        reps = {label: calibrated_reps(fn, x, args.min_seconds) for label, fn in calls.items()}

    train_s = {name: [] for name in TRAINING}
    test_s = {label: [] for label in calls}
    for r in range(args.rounds):
        if not args.skip_training:
            for name, cfg in configs.items():
                train_s[name].append(epoch_seconds(cfg, datamodule, args))
        with torch.no_grad():
            net(x)  # untimed: the first call after the training fits runs on cold caches
            for label, fn in calls.items():
                test_s[label].append(per_call_seconds(fn, x, reps[label], CLOCKS[args.clock]))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    print(f"\nmodel={args.model} data={args.data} image_size={image_size} batch={x.shape[0]} "
          f"threads={torch.get_num_threads()} rounds={args.rounds} clock={args.clock} device={args.device} "
          f"precision={args.precision}")
    if not args.skip_training:
        print(f"\nTraining: one epoch of {args.steps} batches ({args.epochs} epochs per fit, the first dropped)\n")
        print("| method | s/epoch (median) | ratio to standard (median) | min-max over rounds | estimate (compute only) |")
        print("|---|---:|---:|---:|---|")
        for name in TRAINING:
            ratios = [t / s for t, s in zip(train_s[name], train_s["standard"])]
            forwards, how = FORWARDS[name]
            print(f"| {name} | {statistics.median(train_s[name]):.3f} | {statistics.median(ratios):.2f}x | "
                  f"{spread(ratios) if name != 'standard' else '-'} | {forwards / 3:.1f}x ({forwards}F: {how}) |")
    if not args.skip_test:
        bare = test_s["bare"]
        print(f"\nTest time: defense + network on one batch of {x.shape[0]}, no_grad; "
              f"bare forward {1000 * statistics.median(bare):.2f} ms (median)\n")
        print("| defense in front of the model | ms/batch (median) | ratio to bare forward (median) | min-max over rounds | note |")
        print("|---|---:|---:|---:|---|")
        print(f"| none (bare forward) | {1000 * statistics.median(bare):.2f} | 1.00x | - | - |")
        for label, (defense, scale, note) in defenses.items():
            ratios = [t / b for t, b in zip(test_s[label], bare)]
            print(f"| {label} | {1000 * statistics.median(test_s[label]):.2f} | {statistics.median(ratios):.1f}x | "
                  f"{spread(ratios) if max(ratios) < 100 else f'{min(ratios):.0f}-{max(ratios):.0f}'} | {note} |")
            if scale == 1:
                continue
            # Linear extrapolation to the configured size: the RRDB trunk (or the chain of UNet calls)
            # is all but the whole cost, and it is nb (or steps) identical pieces.
            if isinstance(defense, DiffPure):
                what, unit = f"DiffPure, all {len(defense.timesteps) * scale:.0f} reverse steps", "steps"
            else:
                what, unit = f"NRP configured size, nb={defense.params['nb'] * scale:.0f}", "nb"
            extra = [(t - b) * scale + b for t, b in zip(test_s[label], bare)]
            ratios = [e / b for e, b in zip(extra, bare)]
            print(f"| {what} (extrapolated x{scale:g}, not measured) | ~{1000 * statistics.median(extra):.0f} | "
                  f"~{statistics.median(ratios):.0f}x | - | linear in {unit} |")
        print("\nNRP and DiffPure: random weights; the cost is that of the architecture stated, not of a "
              "trained purifier (which costs the same per call).")


if __name__ == "__main__":
    main()
