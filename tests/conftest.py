"""Shared test fixtures: small digits data and a tiny Trainer, sized for 2 CPU cores."""

import os

import lightning as L
import pytest

os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    """``requires_gpu`` tests are skipped, with the reason shown, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs these on a GPU)")
    for item in items:
        if "requires_gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def digits8():
    """Digits at 8x8: 1293 train / 144 val / 360 test images, a few ms per batch with a small network."""
    from trigact.data import DigitsDataModule

    dm = DigitsDataModule(image_size=8, batch_size=128, seed=0)
    dm.setup()
    return dm


def make_trainer(tmp_path, max_epochs, callbacks=(), **kwargs) -> L.Trainer:
    """A quiet CPU trainer writing only under tmp_path."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        deterministic=True,
        **kwargs,
    )


# The main job shrunk for tests: 2 epochs, PGD and MI-FGSM with 3 steps, 60 images (about 30 s).
DEMO_SHRINK = ["data=digits", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none"]
DEMO_OVERRIDES = [
    "experiment=demo",
    "pipeline.train_overrides=[" + ",".join(f"'{o}'" for o in DEMO_SHRINK) + "]",
    "pipeline.attacks=[pgd,mifgsm]",
    "pipeline.attack_overrides.steps=3",
    "pipeline.n_eval=60",
]


@pytest.fixture(scope="session")
def shrunk_demo(tmp_path_factory):
    """One shrunken demo pipeline run shared by the tests that read its runs and banks.

    Returns ``(root, rows)``: the paths.root_dir it wrote into and the pipeline's run summaries.
    Tests must not modify what is under ``root``; they write their own outputs elsewhere.
    """
    from hydra import compose, initialize_config_dir

    from trigact.cli.pipeline import run_pipeline
    from trigact.common.config import CONF_DIR

    root = tmp_path_factory.mktemp("demo")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=[f"paths.root_dir={root}", *DEMO_OVERRIDES])
        rows = run_pipeline(cfg)
    return root, rows
