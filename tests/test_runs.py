"""Run folders: a pure function of what a config trains, so finished runs are found, not redone."""

import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator
from omegaconf import OmegaConf

from helpers_hydra import CONF_DIR, compose_config
from trigact.runs.naming import HASHED, NOT_HASHED, run_name, world_size

BASE = ["data=digits", "model=small_cnn", "trigger=fixed", "trigger.eps=16/255"]


def name(tmp_path, *extra):
    return run_name(compose_config("train", BASE + list(extra), tmp_path))


def test_name_is_readable_and_stable(tmp_path):
    first = name(tmp_path)
    assert first.startswith("digits/trigger_activation/small_cnn/fixed-eps16-") and first.endswith("/s0")
    assert name(tmp_path) == first
    assert name(tmp_path, "trigger.eps=0.07") != first  # a different value, a different run
    assert name(tmp_path, f"trigger.eps={16 / 255!r}") == first  # the same value, written otherwise


def test_seeds_of_one_config_are_sibling_folders(tmp_path):
    assert name(tmp_path, "seed=3") == name(tmp_path).replace("/s0", "/s3")


def test_training_settings_change_the_name(tmp_path):
    first = name(tmp_path)
    for override in ("trainer.max_epochs=3", "optimizer.lr=0.01", "method.module.kl_weight=2",
                     "data.image_size=8", "trainer.devices=2", "data.batch_size=64"):
        assert name(tmp_path, override) != first, override
    learnable = ["data=digits", "trigger=learnable"]
    assert run_name(compose_config("train", learnable, tmp_path)) != run_name(
        compose_config("train", learnable + ["trigger.update.source=train_step"], tmp_path)
    )


def test_where_and_how_it_runs_does_not(tmp_path):
    first = name(tmp_path)
    for override in ("data.num_workers=3", "logger=wandb", "trainer.enable_progress_bar=false",
                     "callbacks=none", "ckpt_path=last", "trainer.deterministic=false"):
        assert name(tmp_path, override) == first, override
    assert name(tmp_path / "elsewhere") == first
    # trainer=gpu's profile: channels_last, TF32 and cuDNN autotuning leave the run where it is; its
    # bf16-mixed precision rounds the forward pass and so names another run (tests/test_performance.py).
    assert name(tmp_path, "trainer=gpu", "trainer.precision=32-true") == first
    assert name(tmp_path, "trainer=gpu") != first


def test_the_world_size_not_its_spelling_names_the_run(tmp_path, monkeypatch):
    """devices=auto counts as what Lightning resolves it to; devices x num_nodes counts, not its factors."""
    cpu_ddp = ["trainer=ddp", "trainer.accelerator=cpu"]
    assert name(tmp_path, *cpu_ddp) == name(tmp_path, *cpu_ddp, "trainer.devices=1")  # auto is 1 CPU process here
    monkeypatch.setattr(CPUAccelerator, "auto_device_count", staticmethod(lambda: 2))
    two = name(tmp_path, *cpu_ddp, "trainer.devices=2")
    assert name(tmp_path, *cpu_ddp) == two
    assert name(tmp_path, *cpu_ddp, "trainer.devices=1", "trainer.num_nodes=2") == two

    # GPUs (none needed: an explicit count is taken as written, auto and -1 ask the accelerator)
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(CUDAAccelerator, "auto_device_count", staticmethod(lambda: 2))
    gpu_ddp = ["trainer=ddp", "trainer.accelerator=gpu"]
    for devices in ("auto", "-1", "2", "[0,1]", "'0,1'"):
        assert name(tmp_path, *gpu_ddp, f"trainer.devices={devices}") == two, devices


def test_one_and_two_processes_are_two_runs(tmp_path):
    cpu_ddp = ["trainer=ddp", "trainer.accelerator=cpu"]
    assert name(tmp_path, *cpu_ddp, "trainer.devices=1") != name(tmp_path, *cpu_ddp, "trainer.devices=2")
    assert name(tmp_path, *cpu_ddp, "trainer.devices=2") != name(tmp_path, *cpu_ddp, "trainer.devices=4")
    # One DDP process trains what a plain one does: sync_batchnorm acts only across processes.
    assert name(tmp_path, *cpu_ddp, "trainer.devices=1") == name(tmp_path)


def test_only_settings_that_change_the_model_are_hashed(tmp_path):
    first = name(tmp_path)
    for override in ("+trainer.benchmark=true", "+trainer.foo=1", "+data.foo=1", "trainer.limit_val_batches=2",
                     "+trainer.num_sanity_val_steps=0", "+trainer.check_val_every_n_epoch=2",
                     "data.eval_batch_size=7", "+trainer.strategy=ddp", "+trainer.accumulate_grad_batches=1",
                     "+trainer.gradient_clip_val=null", "+trainer.fast_dev_run=false", "trainer.precision=32"):
        assert name(tmp_path, override) == first, override  # unrelated, or a default written out
    for override in ("+trainer.accumulate_grad_batches=2", "+trainer.gradient_clip_val=1.0",
                     "trainer.precision=bf16-mixed", "trainer.limit_train_batches=1", "+trainer.max_steps=5",
                     "+trainer.fast_dev_run=true", "++data.val_size=0.2", "++data.split_seed=1"):
        assert name(tmp_path, override) != first, override
    assert name(tmp_path, "trainer.limit_train_batches=1") != name(tmp_path, "trainer.limit_train_batches=1.0")


@pytest.mark.parametrize("kind", ["learnable", "sparse_learnable"])
def test_eval_batch_size_counts_only_for_a_train_mode_trigger_pass(tmp_path, kind):
    """The epoch pass of Algorithm 2 in train mode uses batch statistics over data.eval_batch_size
    images, so there the size changes the trigger; in eval mode (the default) it changes nothing."""
    def name(tmp_path, *extra):
        return run_name(compose_config("train", ["data=digits", "model=small_cnn", f"trigger={kind}", *extra], tmp_path))

    learnable = []
    for mode in ("eval", "train"):
        base = [*learnable, f"trigger.update.mode={mode}"]
        same = name(tmp_path, *base) == name(tmp_path, *base, "data.eval_batch_size=7")
        assert same == (mode == "eval"), mode
    # null means batch_size: writing it out moves no run
    train_mode = [*learnable, "trigger.update.mode=train"]
    assert name(tmp_path, *train_mode) == name(tmp_path, *train_mode, "data.eval_batch_size=${data.batch_size}")
    assert name(tmp_path, *train_mode, "trigger.update.source=train_step") == \
        name(tmp_path, *train_mode, "trigger.update.source=train_step", "data.eval_batch_size=7")


def test_every_trainer_and_datamodule_argument_is_decided_on():
    """A new Lightning Trainer argument or datamodule argument must be put in HASHED or NOT_HASHED."""
    trainer = inspect.signature(L.Trainer.__init__).parameters
    assert set(trainer) - {"self"} == set(HASHED["trainer"]) | set(NOT_HASHED["trainer"])
    for key, default in HASHED["trainer"].items():  # the defaults the hash leaves out are Lightning's
        assert repr(trainer[key].default) == repr(default), key

    decided = set(HASHED["data"]) | set(NOT_HASHED["data"])
    for yaml in sorted(Path(CONF_DIR, "data").glob("*.yaml")):
        data = OmegaConf.load(yaml)
        assert set(data) <= decided, (yaml.name, set(data) - decided)
        for cls in get_class(data._target_).__mro__:
            init = cls.__dict__.get("__init__")
            if init is None or cls.__module__.split(".")[0] != "trigact":
                continue
            arguments = {n for n, p in inspect.signature(init).parameters.items()
                         if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
            assert arguments <= decided, (cls.__name__, arguments - decided)


def test_launches_in_the_same_second_get_their_own_folders(tmp_path):
    def launch():
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", [f"paths.root_dir={tmp_path}", *BASE], return_hydra_config=True)
        return cfg, str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)

    for _ in range(5):  # until both fall in one second
        (first, run_a, sweep_a), (_, run_b, sweep_b) = launch(), launch()
        if run_a.rsplit("/", 1)[1][:19] == run_b.rsplit("/", 1)[1][:19]:
            break
    assert run_a.rsplit("/", 1)[0] == run_b.rsplit("/", 1)[0] == f"{tmp_path}/outputs/runs/{name(tmp_path)}/launches"
    assert run_a != run_b and sweep_a != sweep_b
    # One launch reads one folder every time it asks, and each job of a multirun gets the sweep's:
    # Hydra copies the resolver cache from the sweep's config into every job's.
    assert str(first.hydra.run.dir) == run_a
    job, _, _ = launch()
    OmegaConf.copy_cache(from_config=first, to_config=job)
    assert str(job.hydra.sweep.dir) == sweep_a and str(job.hydra.run.dir) == run_a


def test_the_world_size_is_the_one_lightning_trains_with():
    """world_size agrees with a real Trainer, on this machine's accelerators (GPU specs where there is one)."""
    specs = [("cpu", 1, 1), ("cpu", 2, 1), ("cpu", "2", 1), ("cpu", "auto", 1), ("cpu", 2, 2), ("auto", "auto", 1)]
    if torch.cuda.is_available():
        specs += [("gpu", "auto", 1), ("gpu", -1, 1), ("cuda", 1, 2), ("gpu", "0,", 1), ("auto", -1, 1)]
    for accelerator, devices, num_nodes in specs:
        trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        spec = {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes}
        assert world_size(spec) == trainer.world_size, spec


def test_a_sparse_trigger_names_its_k_eps_and_alpha_in_the_folder(tmp_path):
    cfg = compose_config("train", ["data=digits", "model=small_cnn", "trigger=sparse_learnable",
                                   "trigger.k=13", "trigger.eps=64/255", "trigger.alpha=16/255"], tmp_path)
    assert "sparse-learnable-k13-eps64-alpha16" in run_name(cfg)
    cfg = compose_config("train", ["data=digits", "model=small_cnn", "trigger=sparse", "trigger.k=0.2"], tmp_path)
    assert "sparse-k0.2-eps64" in run_name(cfg) and "alpha" not in run_name(cfg)


def test_the_imagenet_decoder_is_part_of_the_run_hash(tmp_path):
    """Images decoded by PIL or torchvision.io may differ: a model trained on one is another run."""
    def name(*extra):
        return run_name(compose_config("train", ["data=imagenet_subset", "model=small_cnn", *extra], tmp_path))

    assert name() == name("data.decoder=torchvision") != name("data.decoder=pil")
