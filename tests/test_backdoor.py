"""Backdoor poisoning (method=backdoor backdoor=badnets|siba): exact poisoning, ASR, bundles, errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers_hydra import QUIET, compose_config
from trigact import load_bundle
from trigact.backdoors import PoisonedDataset, Stamp, badnets_stamp, poison_indices, siba_stamp
from trigact.common.errors import TrigactError
from trigact.data.digits import DigitsDataModule
from trigact.data.views import TransformedDataset, dataset_labels
from trigact.training.build import build_datamodule, build_run
from trigact.training.run import train


def run(tmp_path, *overrides):
    return train(compose_config("train", [*QUIET, *overrides], tmp_path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A standard digits model and BadNets and SIBA models poisoned at 10% (default data and model,
    10 epochs each; about 40 s together on 2 cores)."""
    root = tmp_path_factory.mktemp("backdoor")
    standard = run(root, "method=standard")
    badnets = run(root, "method=backdoor")
    siba = run(root, "method=backdoor", "backdoor=siba", f"backdoor.surrogate={Path(standard['run_dir'])}")
    return {"root": root, "standard": standard, "badnets": badnets, "siba": siba}


# ------------------------------------------------------------------------------------ stamps


def test_badnets_stamp_is_the_hand_computed_patch():
    stamp = badnets_stamp((1, 8, 8), patch_size=2, location="top_left", pattern="checkerboard", margin=1)
    x = torch.full((1, 8, 8), 0.5)
    want = x.clone()
    want[0, 1:3, 1:3] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(stamp(x), want)
    white = badnets_stamp((3, 8, 8), patch_size=3, location="bottom_right", pattern="white", margin=0)
    y = white(torch.zeros(2, 3, 8, 8))
    assert y[:, :, 5:, 5:].eq(1).all() and y.sum() == 2 * 3 * 9
    at = badnets_stamp((1, 8, 8), patch_size=2, location=[4, 1], pattern="white")
    assert torch.nonzero(at.mask[0]).tolist() == [[4, 1], [4, 2], [5, 1], [5, 2]]


@pytest.mark.parametrize("kwargs, expected", [
    ({"patch_size": 0}, "backdoor.patch_size=0 must be an integer in [1, 8]"),
    ({"patch_size": 9}, "backdoor.patch_size=9"),
    ({"location": "middle"}, "unknown backdoor.location 'middle'"),
    ({"location": [7, 7], "patch_size": 3}, "must fit in the 8x8 image"),
    ({"pattern": "red"}, "unknown backdoor.pattern 'red'"),
])
def test_bad_badnets_settings_are_one_line(kwargs, expected):
    with pytest.raises(TrigactError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        badnets_stamp((1, 8, 8), **kwargs)


def test_an_additive_stamp_clamps_and_round_trips_through_meta():
    delta = torch.zeros(1, 4, 4)
    delta[0, 0, 0], delta[0, 3, 3] = 0.3, -0.3
    stamp = Stamp((delta != 0).float(), delta, "add")
    x = torch.full((1, 4, 4), 0.9)
    y = stamp(x)
    assert y[0, 0, 0] == 1.0 and torch.isclose(y[0, 3, 3], torch.tensor(0.6)) and (y != x).sum() == 2
    again = Stamp.from_meta(stamp.to_meta())
    assert torch.equal(again(x), y) and again.mode == "add"


# ------------------------------------------------------------------------------------ poisoning


def test_poison_indices_are_exact_non_target_and_seeded():
    labels = torch.arange(1000) % 10
    idx = poison_indices(labels, target=3, rate=0.1, seed=0)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100 and not (labels[idx] == 3).any()
    assert torch.equal(idx, poison_indices(labels, 3, 0.1, 0))
    assert not torch.equal(idx, poison_indices(labels, 3, 0.1, 1))
    assert len(poison_indices(labels, 3, 0.0333, 0)) == round(0.0333 * 1000)  # 33
    with pytest.raises(TrigactError, match="asks for 950 poisoned images, but only 900"):
        poison_indices(labels, 3, 0.95, 0)


def test_attach_data_poisons_exactly_rate_times_n_training_images(tmp_path):
    cfg = compose_config("train", ["method=backdoor", "backdoor.poison_rate=0.25", "backdoor.target=7"], tmp_path)
    datamodule = build_datamodule(cfg)
    module = build_run(cfg, datamodule)
    train_set = datamodule.train_set
    assert isinstance(train_set, PoisonedDataset)
    clean = dataset_labels(train_set.base)
    n = round(0.25 * len(clean))
    assert module.n_poisoned == n == len(train_set.poisoned)
    got = torch.stack([train_set[i][1] for i in range(len(train_set))])
    changed = torch.nonzero(got != clean).flatten().tolist()
    assert set(changed) == train_set.poisoned and (got[changed] == 7).all()  # none was a 7 already
    stamped = sum(not torch.equal(train_set[i][0], train_set.base[i][0]) for i in range(len(train_set)))
    assert stamped <= n and stamped >= 0.9 * n  # a patch already matching the image changes nothing
    # val and test stay clean
    assert not isinstance(datamodule.val_set, PoisonedDataset) and not isinstance(datamodule.test_set, PoisonedDataset)


def test_the_stamp_is_applied_after_the_augmentation():
    """A flip in the train transform must not move the patch: it is stamped after the transform."""
    base = TensorDataset(torch.zeros(4, 1, 8, 8), torch.tensor([1, 1, 1, 1]))
    flipped = TransformedDataset(base, lambda img: img.flip(-1))
    stamp = badnets_stamp((1, 8, 8), patch_size=2, location="bottom_right", pattern="white", margin=0)
    image, label = PoisonedDataset(flipped, torch.tensor([0]), stamp, target=0)[0]
    assert image[0, 6:, 6:].eq(1).all() and image.sum() == 4 and int(label) == 0


# ------------------------------------------------------------------------------------ training


def test_badnets_reaches_its_asr_with_clean_accuracy_kept(trained):
    """The issue's bar: ASR > 90% at a 10% poison rate, clean accuracy within 3 points of standard
    training (measured: 97.8% clean and 99.7% ASR against 98.1% for standard training)."""
    standard, badnets = trained["standard"], trained["badnets"]
    assert badnets["test_asr"] > 0.90
    assert badnets["test_acc_clean"] >= standard["test_acc_clean"] - 0.03
    # the control: the same stamp does not send a standard model's images to class 0
    model = load_bundle(standard["bundle"])
    meta = load_bundle(badnets["bundle"]).meta["backdoor"]
    assert control_asr(model, Stamp.from_meta(meta["stamp"]), meta["target"]) < 0.3


def control_asr(model, stamp, target, tmp=None) -> float:
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.test_set.tensors
    keep = y != target
    with torch.no_grad():
        return float((model(stamp(x[keep])).argmax(1) == target).float().mean())


def test_siba_trigger_is_sparse_invisible_and_is_learned_by_the_poisoned_model(trained):
    """SIBA (k = 5% = 13 coordinates, eps 32/255, on the standard model as surrogate): the poisoned
    model's ASR must far exceed what the same trigger does to the unpoisoned surrogate, so the
    backdoor comes from the poisoning, not from the trigger being a universal adversarial
    perturbation. Measured: 92.9% against the surrogate's own ASR in meta."""
    bundle = load_bundle(trained["siba"]["bundle"])
    meta = bundle.meta["backdoor"]
    stamp = Stamp.from_meta(meta["stamp"])
    assert stamp.mode == "add" and int(stamp.pattern.count_nonzero()) <= 13
    assert float(stamp.pattern.abs().max()) <= 32 / 255 + 1e-7
    asr = trained["siba"]["test_asr"]
    on_clean = control_asr(load_bundle(trained["standard"]["bundle"]), stamp, meta["target"])
    assert asr > 0.8 and asr > on_clean + 0.4, (asr, on_clean)
    assert 0.0 <= meta["surrogate_asr"] <= 1.0


def test_siba_optimisation_lowers_the_target_loss_on_the_surrogate(trained):
    surrogate = load_bundle(trained["standard"]["bundle"])
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.train_set.tensors
    x = x[y != 0][:200]
    few = siba_stamp(surrogate, x, target=0, k=13, eps=32 / 255, steps=1, seed=0)
    many = siba_stamp(surrogate, x, target=0, k=13, eps=32 / 255, steps=40, seed=0)

    def loss(stamp):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(surrogate(stamp(x)), torch.zeros(len(x), dtype=torch.long)))
    assert loss(many) < loss(few)
    assert torch.equal(many.pattern, siba_stamp(surrogate, x, target=0, k=13, eps=32 / 255, steps=40, seed=0).pattern)


def test_the_bundle_card_and_summary_say_it_is_backdoored(trained):
    run_dir = Path(trained["badnets"]["run_dir"])
    meta = load_bundle(run_dir / "bundle.pt").meta
    assert meta["method"] == "backdoor" and meta["metrics"]["test_asr"] == trained["badnets"]["test_asr"]
    bd = meta["backdoor"]
    assert bd["kind"] == "badnets" and bd["target"] == 0 and bd["poison_rate"] == 0.1 and bd["n_poisoned"] > 0
    assert bd["stamp"]["mask"].sum() == 9
    card = (run_dir / "card.md").read_text()
    assert "BACKDOORED" in card.splitlines()[2] and "class 0" in card and "test_asr" in card
    assert "/badnets-t0-p0.1-" in str(run_dir)
    # a standard run's card carries no warning
    assert "WARNING" not in (Path(trained["standard"]["run_dir"]) / "card.md").read_text()


def test_a_finished_backdoor_run_is_found_not_retrained(trained):
    again = run(trained["root"], "method=backdoor")
    assert again["skipped"] and again["test_asr"] == trained["badnets"]["test_asr"]


@pytest.mark.parametrize("override, expected", [
    (["backdoor.target=10"], "backdoor.target=10 must be an integer in [0, 9]"),
    (["backdoor.poison_rate=0"], "backdoor.poison_rate=0.0 must be in (0, 1]"),
    (["backdoor.poison_rate=1.5"], "backdoor.poison_rate=1.5 must be in (0, 1]"),
    (["backdoor=siba"], "backdoor=siba needs backdoor.surrogate"),
    (["backdoor=siba", "backdoor.surrogate=/nonexistent/run"], "no bundle at /nonexistent/run"),
    (["backdoor.kind=trojannn"], "unknown backdoor kind (backdoor=...) 'trojannn'; known: badnets, siba"),
])
def test_bad_backdoor_settings_are_one_line(override, expected, tmp_path):
    cfg = compose_config("train", ["method=backdoor", *override], tmp_path)
    with pytest.raises(Exception) as err:  # Hydra's instantiate wraps it; the CLI unwraps it (last test)
        build_run(cfg, build_datamodule(cfg))
    cause = err.value
    while not isinstance(cause, TrigactError):
        cause = cause.__cause__
    assert expected in str(cause) and "\n" not in str(cause)


def test_the_train_entry_point_refuses_a_bad_target_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trigact.train", "method=backdoor", "backdoor.target=-1",
                           f"paths.root_dir={tmp_path}", *QUIET], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("trigact: error:") and "backdoor.target=-1" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_a_pipeline_run_can_name_an_earlier_run_as_its_surrogate(tmp_path):
    from omegaconf import OmegaConf

    from trigact.cli.pipeline import link_runs

    earlier = {"surrogate": OmegaConf.create({"paths": {"run_dir": "/runs/a b/s1"}})}
    assert link_runs("backdoor.surrogate=@run:surrogate", earlier, "siba") == "backdoor.surrogate='/runs/a b/s1'"
    assert link_runs("trainer.max_epochs=5", earlier, "siba") == "trainer.max_epochs=5"
    with pytest.raises(TrigactError, match="@run:later names no run listed before it"):
        link_runs("backdoor.surrogate=@run:later", earlier, "siba")
