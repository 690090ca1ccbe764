"""Validation and test metrics under DDP count every image exactly once.

Lightning gives an eval DataLoader without a DistributedSampler torch's DistributedSampler, which
pads the last shard with repeated images, so accuracy over an odd-sized split would count one image
twice. Our eval loaders carry their own unpadded sampler (`EvalShardSampler`), which Lightning keeps,
and the torchmetrics states (counts) are summed over the ranks.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from trigact import load_bundle
from trigact.data import DigitsDataModule
from trigact.data.base import EvalShardSampler
from trigact.common.errors import TrigactError

TESTS_DIR = Path(__file__).resolve().parent


def test_eval_shards_are_disjoint_unpadded_and_cover_the_set():
    dataset = TensorDataset(torch.arange(7))
    shards = [list(EvalShardSampler(dataset, num_replicas=3, rank=rank)) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(EvalShardSampler(dataset, 3, rank)) for rank in range(3)] == [3, 2, 2]
    # A DistributedSampler, so that Lightning keeps it instead of putting its padding one in its place.
    assert isinstance(EvalShardSampler(dataset, 3, 0), DistributedSampler)
    with pytest.raises(TrigactError) as excinfo:  # a rank without a batch would never reach the metric sync
        EvalShardSampler(TensorDataset(torch.arange(1)), num_replicas=2, rank=1, what="the validation split")
    assert "\n" not in str(excinfo.value) and "the validation split has 1 images for 2 DDP processes" in str(excinfo.value)


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_loaders_of_two_ranks_serve_each_image_once(split):
    dm = DigitsDataModule(image_size=8, test_fraction=0.35, eval_batch_size=100)  # 629 test, 117 val images
    dm.setup()
    dataset = getattr(dm, f"{split}_set")
    assert len(dataset) % 2 == 1  # torch's DistributedSampler would repeat one image
    loaders = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # what the loaders read of a DDP trainer
        loaders.append(getattr(dm, f"{split}_dataloader")())
    served = [x for loader in loaders for batch, _ in loader for x in batch]
    assert len(served) == len(dataset)
    assert sorted(x.numpy().tobytes() for x in served) == sorted(x.numpy().tobytes() for x in dataset.tensors[0])
    # Lightning keeps these samplers (a DistributedSampler is never replaced): what DDP runs is the above.
    assert all(isinstance(loader.sampler, EvalShardSampler) for loader in loaders)


# 629 test images (test_fraction 0.35) and 315 validation images, both odd; with eval batches of 157,
# rank 0 runs one batch more than rank 1 on each split (3 vs 2 test, 2 vs 1 val batches).
DDP_EVAL = ["data=digits", "data.image_size=8", "data.test_fraction=0.35", "data.val_size=315",
            "data.batch_size=64", "data.eval_batch_size=157", "model=mlp", "trigger=fixed",
            "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.enable_progress_bar=false"]


def counts(model, x, y):
    """(number of correct predictions, summed softmax probability of the true class)."""
    with torch.no_grad():
        logits = model(x)
    return int((logits.argmax(1) == y).sum()), float(logits.softmax(1).gather(1, y[:, None]).sum())


@pytest.mark.slow
def test_ddp_val_and_test_metrics_equal_one_process_on_the_same_weights(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "trigact.train", *DDP_EVAL, "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.devices=2", "logger=csv", f"paths.root_dir={tmp_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr + proc.stdout
    (bundle_path,) = tmp_path.glob("outputs/runs/**/bundle.pt")
    deployed = load_bundle(bundle_path)
    (metrics_csv,) = bundle_path.parent.glob("csv/version_0/metrics.csv")
    (val_row,) = [row for row in csv.DictReader(metrics_csv.open()) if row.get("val/acc_clean")]

    # The same weights and trigger on one process, over the same splits.
    dm = DigitsDataModule(image_size=8, test_fraction=0.35, val_size=315)
    dm.setup()
    for split, logged in (("test", {k: deployed.meta["metrics"][f"test_{k}"] for k in
                                    ("acc_clean", "acc_trigger", "guess_acc_clean")}),
                          ("val", {k: float(val_row[f"val/{k}"]) for k in ("acc_clean", "acc_trigger", "guess_acc_clean")})):
        x, y = getattr(dm, f"{split}_set").tensors
        n = len(y)
        clean, p_true = counts(deployed.net, x, y)
        triggered, _ = counts(deployed, x, y)
        assert 0 < clean < n and 0 < triggered < n  # so that a repeated image would change the ratio
        # Exact counts: one repeated image moves the ratio by >= 1/(n (n+1)) > 2e-6; float32 rounding is < 1e-7.
        assert logged["acc_clean"] == pytest.approx(clean / n, rel=0, abs=1e-7), split
        assert logged["acc_trigger"] == pytest.approx(triggered / n, rel=0, abs=1e-7), split
        assert logged["guess_acc_clean"] == pytest.approx(p_true / n, rel=0, abs=1e-6), split
