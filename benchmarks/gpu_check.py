"""Training throughput on one GPU, and where a training step's time goes: issue 15's figures.

    python benchmarks/gpu_check.py [--out DIR] [--steps 60] [--only train,profile] [--smoke]

``benchmarks/gpu_check.sh`` runs it (with the GPU tests, the Table V ratios, attack throughput and a
paper-layout table); ``--smoke`` runs the same code on the CPU at toy sizes, which is how CI keeps it
working on machines without a GPU (tests/test_gpu_check.py).

**train.** Images per second of one training epoch of ``--steps`` batches (the second epoch of a
fit; the first warms up cuDNN autotuning and ``torch.compile``), built exactly as ``python -m
trigact.train experiment=paper_cifar10`` builds it (Hydra configs, ``build_run``, the trainer
profile of :mod:`trigact.training.performance`), on a synthetic CIFAR-10 (random uint8 pixels and
labels, written in the real on-disk format: the speed does not depend on the pixels) held on the GPU
(``data.placement=device``, batched crop-and-flip on the device). Variants: standard training in fp32,
bf16-mixed, bf16 + channels_last and bf16 + channels_last + ``torch.compile`` at the paper's batch of
128, the best of those at 512; fixed trigger and learnable trigger (``source=train_step`` and the
paper's ``source=epoch`` pass) in the bf16 + channels_last profile, and compiled. Ratios are to the
standard run of the same profile and batch.

**profile.** ``torch.profiler`` over 20 steps of standard bf16 + channels_last training at batch 128:
the share of wall time the GPU spends in kernels, and the ops that take the most device and host time.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from _epoch_timing import EpochTimer, sync
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from trigact.cli import quiet_libraries
from trigact.common.config import CONF_DIR
from trigact.runs import register_resolvers
from trigact.training.build import build_callbacks, build_datamodule, build_run
from trigact.training.performance import apply_process_settings, compile_options, prepare_network, split_trainer_config

PROFILES = {
    "fp32": ["trainer.precision=32-true", "trainer.channels_last=false", "trainer.float32_matmul_precision=highest"],
    "bf16": ["trainer.channels_last=false"],
    "bf16+cl": [],
    "bf16+cl+compile": ["model.compile=true"],
}
METHODS = {
    "standard": ["method=standard", "trigger=none"],
    "fixed": ["method=trigger_activation", "trigger=fixed", "trigger.eps=16/255"],
    "learnable train_step": ["method=trigger_activation", "trigger=learnable", "trigger.alpha=4/255",
                             "trigger.update.source=train_step", "trigger.update.update_fraction=1.0"],
    "learnable epoch": ["method=trigger_activation", "trigger=learnable", "trigger.alpha=4/255",
                        "trigger.update.source=epoch", "trigger.update.update_fraction=1.0"],
}
TARGETS = {"standard": ">= 25,000 img/s at batch 128", "fixed": "<= 2.05x standard",
           "learnable train_step": "<= 2.1x standard", "learnable epoch": "-"}


def write_synthetic_cifar10(root: Path, n_train: int, n_test: int) -> None:
    """A CIFAR-10 ``cifar-10-batches-py`` folder of random pixels and labels, in the real format."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}

    per = -(-n_train // 5)
    for i in range(5):
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump(batch(min(per, n_train - i * per)), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def accept_synthetic_checksums() -> None:
    """torchvision checks the real archive's md5 sums; synthetic files cannot match them."""
    import torchvision.datasets.cifar as tv_cifar

    tv_cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def measure(base: list[str], method: str, profile: str, batch: int, args) -> dict:
    """One fit of 2 epochs of ``args.steps`` batches; the second epoch's images per second."""
    cfg = compose_train([*base, *METHODS[method], *PROFILES[profile], f"data.batch_size={batch}"])
    L.seed_everything(0, verbose=False)
    trainer_cfg, execution = split_trainer_config(cfg.trainer)
    apply_process_settings(execution)
    datamodule = build_datamodule(cfg)
    module = build_run(cfg, datamodule)
    prepare_network(module, execution, compile_options(cfg.model.get("compile")))
    timer = EpochTimer()
    trainer = instantiate(trainer_cfg, max_epochs=2, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, limit_train_batches=args.steps, limit_val_batches=0,
                          num_sanity_val_steps=0, callbacks=[*build_callbacks(cfg), timer])
    trainer.fit(module, datamodule=datamodule)
    seconds = timer.times[-1]
    return {"method": method, "profile": profile, "batch": batch, "seconds": seconds,
            "images_per_s": args.steps * batch / seconds}


def train_section(base: list[str], args, on_row=lambda rows: None) -> list[dict]:
    """Every variant, uncompiled ones first (torch.compile's first call costs tens of seconds per graph)."""
    rows = []

    def run(method, profile, batch):
        try:
            row = measure(base, method, profile, batch, args)
        except Exception as err:  # noqa: BLE001 -- one failed variant (e.g. compile) must not hide the rest
            row = {"method": method, "profile": profile, "batch": batch,
                   "error": " ".join(f"{type(err).__name__}: {err}".split())[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        on_row(rows)
        return row

    # The smoke run leaves torch.compile out: inductor's C++ build takes minutes on 2 CPU cores, and
    # tests/test_performance.py covers the compile path (backend aot_eager).
    profiles = [p for p in PROFILES if not (args.smoke and p.endswith("compile"))]
    eager = [p for p in profiles if not p.endswith("compile")]
    standard = {p: run("standard", p, args.batch) for p in eager}
    for method in ("fixed", "learnable train_step", "learnable epoch"):
        run(method, "bf16+cl", args.batch)
    ok = {p: r for p, r in standard.items() if "images_per_s" in r}
    best = max(ok, key=lambda p: ok[p]["images_per_s"]) if ok else "bf16+cl"
    run("standard", best, 4 * args.batch)
    if "bf16+cl+compile" in profiles:
        run("standard", "bf16+cl+compile", args.batch)
        run("fixed", "bf16+cl+compile", args.batch)
        run("learnable train_step", "bf16+cl+compile", args.batch)
    return rows


def train_table(rows: list[dict]) -> str:
    base = {(r["profile"], r["batch"]): r for r in rows if r["method"] == "standard" and "images_per_s" in r}
    lines = ["| method | profile | batch | images/s | ratio to standard (same profile, batch) | target |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['profile']} | {r['batch']} | failed: {r['error']} | - | - |")
            continue
        ref = base.get((r["profile"], r["batch"]))
        ratio = ref["images_per_s"] / r["images_per_s"] if ref else float("nan")
        lines.append(f"| {r['method']} | {r['profile']} | {r['batch']} | {r['images_per_s']:,.0f} | {ratio:.2f}x "
                     f"| {TARGETS[r['method']]} |")
    return "\n".join(lines)


class StepProfiler(L.Callback):
    """``torch.profiler`` over batches [start, start + steps) of the first epoch."""

    def __init__(self, start: int, steps: int):
        self.start, self.steps, self.prof, self.wall = start, steps, None, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            sync(pl_module.device)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.prof is not None and batch_idx == self.start + self.steps - 1:
            sync(pl_module.device)
            self.wall = time.perf_counter() - self._t0
            self.prof.__exit__(None, None, None)


def profile_section(base: list[str], args) -> str:
    cfg = compose_train([*base, *METHODS["standard"], f"data.batch_size={args.batch}"])
    L.seed_everything(0, verbose=False)
    trainer_cfg, execution = split_trainer_config(cfg.trainer)
    apply_process_settings(execution)
    datamodule = build_datamodule(cfg)
    module = build_run(cfg, datamodule)
    prepare_network(module, execution, None)
    steps = 5 if args.smoke else 20
    profiler = StepProfiler(start=5, steps=steps)
    trainer = instantiate(trainer_cfg, max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          limit_train_batches=5 + steps, limit_val_batches=0, num_sanity_val_steps=0,
                          callbacks=[profiler])
    trainer.fit(module, datamodule=datamodule)
    if profiler.prof is None or not profiler.wall:
        raise RuntimeError(f"the profiled steps did not run (fewer than {5 + steps} batches per epoch?)")
    from torch.autograd import DeviceType

    events = profiler.prof.key_averages()
    device_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    # Kernels only: a CPU op also carries the device time of the kernels it launched, so summing every
    # event would count each kernel twice (torch's own table sums the device events alone).
    kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
    device_us = sum(getattr(e, device_attr, 0) for e in kernels)
    wall_us = profiler.wall * 1e6
    lines = [f"{steps} steps of standard {cfg.model.name} training, batch {args.batch}, "
             f"{'bf16 + channels_last' if execution['channels_last'] else 'fp32'}: {wall_us / steps / 1e3:.2f} ms/step "
             f"wall, GPU kernels {device_us / steps / 1e3:.2f} ms/step ({100 * device_us / max(wall_us, 1):.0f}% of wall)",
             "", "| kernel | device ms/step | launches/step |", "|---|---:|---:|"]
    for e in sorted(kernels, key=lambda e: getattr(e, device_attr, 0), reverse=True)[:12]:
        lines.append(f"| {e.key[:70]} | {getattr(e, device_attr, 0) / steps / 1e3:.3f} | {e.count / steps:g} |")
    host = sorted([e for e in events if e not in kernels], key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    lines += ["", "Most host (CPU) time: " + "; ".join(
        f"{e.key[:40]} {e.self_cpu_time_total / steps / 1e3:.2f} ms" for e in host)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for gpu_train.json and gpu_check.md")
    parser.add_argument("--steps", type=int, default=60, help="batches per timed epoch")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=50000)
    parser.add_argument("--only", default="train,profile")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: checks the code, measures nothing")
    args = parser.parse_args()
    quiet_libraries()
    register_resolvers()
    if args.smoke:
        args.steps, args.batch, args.n_train = 2, 8, 128
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device; --smoke runs the code on the CPU at toy sizes")
    accept_synthetic_checksums()
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(tempfile.mkdtemp(prefix="cifar_synthetic_"))
    write_synthetic_cifar10(data_root, args.n_train, 1000)
    base = ["experiment=paper_cifar10", f"data.root={data_root}", "data.placement=device", "data.val_size=0",
            "logger=none", "callbacks=none", f"paths.root_dir={out / 'root'}", "trainer.enable_progress_bar=false"]
    if args.smoke:
        base += ["allow_cpu=true", "trainer.accelerator=cpu", "model=tiny_resnet", "trainer.precision=bf16-mixed"]

    sections = {s for s in args.only.split(",") if s}
    head = (f"# gpu_check: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU (smoke)'}, "
            f"torch {torch.__version__}, {args.steps} batches per timed epoch")
    parts = {}

    def write():  # after every figure: a run stopped at its time limit keeps what it measured
        text = "\n".join([head, *parts.values()]) + "\n"
        (out / "gpu_check.md").write_text(text)
        return text

    if "profile" in sections:  # first: cheap, and it must not wait behind the compile variants
        try:
            parts["profile"] = "\n".join(["", "## Where a step's time goes (torch.profiler)", "",
                                          profile_section(base, args)])
        except Exception as err:  # noqa: BLE001 -- report it beside the other figures
            import traceback

            traceback.print_exc()
            parts["profile"] = f"\nprofile failed: {type(err).__name__}: {err}"
        write()
    if "train" in sections:
        def on_row(rows):
            (out / "gpu_train.json").write_text(json.dumps(rows, indent=1))
            parts["train"] = "\n".join(["", "## Training throughput (synthetic CIFAR-10 on the device)", "",
                                        train_table(rows)])
            write()

        train_section(base, args, on_row)
    print(write())


if __name__ == "__main__":
    main()
