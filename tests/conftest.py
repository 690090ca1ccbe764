"""Shared test fixtures: small digits data and a tiny Trainer, sized for 2 CPU cores."""

import os

import lightning as L
import pytest

os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture
def digits8():
    """Digits at 8x8: 1437 train / 360 test images, a few ms per batch with a small network."""
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
