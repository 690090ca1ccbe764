"""TAE bank: uint8 storage, reuse without recomputation, recovery from interrupted writes, and a
folder per request (attack config, seed, n_eval, data, split, surrogate)."""

import hashlib
import io
import json
import os
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from trigact.attacks import build_attack
from trigact.common.errors import TrigactError
from trigact.evaluation.bank import (
    BANK_FILE,
    META_FILE,
    bank_dir,
    bank_key,
    bank_path,
    ensure_bank,
    eps_tag,
    key_hash,
    load_bank,
)
from trigact.models import build_model

EPS = 8 / 255


class CountingAttack:
    """Wraps an attack and counts its calls (one per batch)."""

    def __init__(self, attack):
        self.attack = attack
        self.calls = 0

    def __call__(self, x, y):
        self.calls += 1
        return self.attack(x, y)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 16, [0.3], [0.3])
    attack = build_attack("pgd", model, eps="8/255", steps=2)
    # Off the 1/255 grid on purpose: the bank quantizes the clean images too.
    x = torch.rand(20, 1, 16, 16)
    y = torch.randint(0, 10, (20,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    return model, attack, loader


def make(root, setup, attack_fn=None, **kwargs):
    model, attack, loader = setup
    args = dict(
        root=root,
        dataset="digits",
        surrogate_name="small_cnn-s0",
        surrogate_bundle="runs/x/bundle.pt",
        surrogate_model=model,
        attack_name="pgd",
        attack_fn=attack_fn or CountingAttack(attack),
        attack_config=attack.config,
        eps="8/255",
        steps=2,
        loader=loader,
        progress=False,
    )
    args.update(kwargs)
    return ensure_bank(**args)


def default_key(setup):
    """The key :func:`make` crafts under (no data, split, n_eval or seed given)."""
    return bank_key("digits", "small_cnn-s0", "pgd", setup[1].config, "8/255", 2)


def test_bank_dir_and_eps_tag(tmp_path):
    assert eps_tag(8 / 255) == "8"
    assert eps_tag(0.5 / 255) == "0.5" and eps_tag("16/255") == "16"
    assert bank_dir(tmp_path, "digits", "s", "pgd", "8/255", 20) == tmp_path / "advbank/digits/s/pgd-eps8-s20"
    with pytest.raises(TrigactError):
        bank_dir(tmp_path, "digits", "../x", "pgd", EPS, 20)
    key = bank_key("digits", "s", "pgd", {"name": "pgd", "eps": "8/255"}, "8/255", 20, seed=0)
    assert len(key_hash(key)) == 10 and key_hash(key) != key_hash({**key, "seed": 1})
    assert bank_path(tmp_path, key) == tmp_path / f"advbank/digits/s/pgd-eps8-s20-{key_hash(key)}"
    # One budget, however it is written.
    assert key == bank_key("digits", "s", "pgd", {"name": "pgd", "eps": 8 / 255}, 8 / 255, 20, seed=0)


def test_round_trip(tmp_path, setup):
    counter = CountingAttack(setup[1])
    bank = make(tmp_path, setup, attack_fn=counter)
    assert counter.calls == 3  # batched: 20 images in batches of 8
    path = bank_path(tmp_path, default_key(setup))
    assert bank.path == path and len(bank) == 20

    raw = torch.load(path / BANK_FILE, weights_only=True)
    assert raw["x_adv"].dtype == torch.uint8 and raw["x_clean"].dtype == torch.uint8
    assert raw["y"].dtype == torch.int64 and raw["x_adv"].shape == (20, 1, 16, 16)
    assert torch.equal(raw["y"], torch.cat([b[1] for b in setup[2]]))

    loaded = load_bank(path)
    for b in (bank, loaded):
        assert b.x_adv.dtype == torch.float32 and 0 <= b.x_adv.min() and b.x_adv.max() <= 1
        assert torch.equal(b.x_adv, raw["x_adv"].float() / 255)
        assert torch.equal(b.x_clean, raw["x_clean"].float() / 255)
        assert torch.equal(b.y, raw["y"])
        assert (b.x_adv - b.x_clean).abs().max() <= EPS + 1 / 255 + 1e-6
    assert (bank.x_adv != bank.x_clean).any()  # the attack did something

    meta = json.loads((path / META_FILE).read_text())
    assert meta == loaded.meta
    for key in (
        "dataset", "surrogate", "attack", "attack_config", "eps", "steps", "n", "whitebox_success_rate",
        "surrogate_clean_acc", "wall_time_s", "torch_version", "created", "file",
    ):
        assert key in meta, key
    assert meta["surrogate"] == {"name": "small_cnn-s0", "bundle": "runs/x/bundle.pt"}
    assert meta["attack_config"]["name"] == "pgd" and meta["n"] == 20
    assert meta["file"]["bytes"] == (path / BANK_FILE).stat().st_size
    assert meta["key"] == default_key(setup) and meta["key_hash"] == key_hash(meta["key"])

    batches = list(loaded.loader(batch_size=8))
    assert [len(b[1]) for b in batches] == [8, 8, 4]
    assert torch.equal(torch.cat([b[0] for b in batches]), loaded.x_adv)
    assert torch.equal(torch.cat([b[0] for b in loaded.loader(8, clean=True)]), loaded.x_clean)


def test_whitebox_rate_matches_stored_images(tmp_path, setup):
    model = setup[0]
    model.train()  # the bank must evaluate in eval mode and restore the mode
    bank = make(tmp_path, setup)
    assert model.training
    raw = torch.load(bank.path / BANK_FILE, weights_only=True)
    model.eval()
    with torch.no_grad():
        pred_adv = model(raw["x_adv"].float() / 255).argmax(1)
        pred_clean = model(raw["x_clean"].float() / 255).argmax(1)
    assert bank.meta["whitebox_success_rate"] == pytest.approx((pred_adv != raw["y"]).float().mean().item())
    assert bank.meta["surrogate_clean_acc"] == pytest.approx((pred_clean == raw["y"]).float().mean().item())


def test_reuse_does_not_recompute_or_rewrite(tmp_path, setup, capsys):
    first = make(tmp_path, setup)
    files = [first.path / BANK_FILE, first.path / META_FILE]
    mtimes = [f.stat().st_mtime_ns for f in files]
    time.sleep(0.01)
    counter = CountingAttack(setup[1])
    second = make(tmp_path, setup, attack_fn=counter)
    assert counter.calls == 0
    assert "reusing" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert torch.equal(second.x_adv, first.x_adv) and second.meta == first.meta


def test_different_config_gives_a_new_bank(tmp_path, setup):
    first = make(tmp_path, setup)
    counter = CountingAttack(setup[1])
    other = make(tmp_path, setup, attack_fn=counter, attack_config={"name": "pgd", "alpha": 0.5})
    assert counter.calls == 3 and other.path != first.path
    assert load_bank(first.path).meta == first.meta  # the first bank is left as it was


def test_a_folder_whose_meta_has_another_key_is_an_error(tmp_path, setup):
    """Never reuse a bank whose recorded request differs from the one asked for (a hash collision,
    or a hand-edited or copied folder): one line naming what differs."""
    bank = make(tmp_path, setup)
    meta = json.loads((bank.path / META_FILE).read_text())
    meta["key"]["seed"] = 7
    (bank.path / META_FILE).write_text(json.dumps(meta))
    for call in (lambda: make(tmp_path, setup), lambda: load_bank(bank.path, default_key(setup))):
        with pytest.raises(TrigactError, match="different request") as err:
            call()
        assert "differs in: seed" in str(err.value) and "\n" not in str(err.value)


def test_sha256_is_of_the_bytes_written(tmp_path, setup, monkeypatch):
    """The meta vouches for the data this process wrote, not for whatever the file holds later.

    Another writer's file lands under bank.pt right after ours (what two unlocked crafters did):
    the sha256 must then disagree with the file, so the bank reads as corrupt instead of as ours.
    """
    real_replace = os.replace
    foreign = io.BytesIO()
    torch.save({"x_adv": torch.zeros(20, 1, 16, 16, dtype=torch.uint8),
                "x_clean": torch.zeros(20, 1, 16, 16, dtype=torch.uint8),
                "y": torch.zeros(20, dtype=torch.int64)}, foreign)

    def replace_then_overwrite(src, dst):
        real_replace(src, dst)
        if os.path.basename(dst) == BANK_FILE:
            with open(dst, "wb") as f:
                f.write(foreign.getvalue())

    monkeypatch.setattr(os, "replace", replace_then_overwrite)
    bank = make(tmp_path, setup)
    monkeypatch.undo()
    written = io.BytesIO()
    torch.save({"x_adv": (bank.x_adv * 255).round().to(torch.uint8),
                "x_clean": (bank.x_clean * 255).round().to(torch.uint8), "y": bank.y}, written)
    assert bank.meta["file"]["sha256"] == hashlib.sha256(written.getvalue()).hexdigest()
    assert bank.meta["file"]["sha256"] != hashlib.sha256(foreign.getvalue()).hexdigest()
    with pytest.raises(TrigactError, match="sha256|truncated"):
        load_bank(bank.path)


def test_sha256_in_meta_matches_the_file(tmp_path, setup):
    bank = make(tmp_path, setup)
    raw = (bank.path / BANK_FILE).read_bytes()
    assert bank.meta["file"] == {"name": BANK_FILE, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}


def _recomputes(tmp_path, setup):
    counter = CountingAttack(setup[1])
    bank = make(tmp_path, setup, attack_fn=counter)
    assert counter.calls == 3
    assert load_bank(bank.path).meta == bank.meta  # complete and consistent again
    return bank


def test_truncated_bank_is_recomputed(tmp_path, setup):
    bank = make(tmp_path, setup)
    data = bank.path / BANK_FILE
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TrigactError, match="truncated") as err:
        load_bank(bank.path)
    assert "\n" not in str(err.value) and str(data) in str(err.value)
    _recomputes(tmp_path, setup)


def test_same_size_corruption_is_recomputed(tmp_path, setup):
    bank = make(tmp_path, setup)
    data = bank.path / BANK_FILE
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(TrigactError, match="sha256"):
        load_bank(bank.path)
    _recomputes(tmp_path, setup)


def test_missing_meta_is_recomputed(tmp_path, setup):
    bank = make(tmp_path, setup)
    (bank.path / META_FILE).unlink()
    with pytest.raises(TrigactError, match="missing"):
        load_bank(bank.path)
    _recomputes(tmp_path, setup)


def test_corrupt_meta_is_recomputed(tmp_path, setup):
    bank = make(tmp_path, setup)
    (bank.path / META_FILE).write_text("{not json")
    with pytest.raises(TrigactError, match="corrupt"):
        load_bank(bank.path)
    _recomputes(tmp_path, setup)


def test_leftover_temp_files(tmp_path, setup):
    path = bank_path(tmp_path, default_key(setup))
    path.mkdir(parents=True)
    old = path / f".{BANK_FILE}.abc123.tmp"
    fresh = path / f".{META_FILE}.def456.tmp"
    old.write_bytes(b"half a bank")
    fresh.write_bytes(b"{")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    bank = _recomputes(tmp_path, setup)
    assert not old.exists()  # a killed writer's leftover is cleaned up
    assert fresh.exists()  # a recent one may belong to a live writer
    # A complete bank beside a temp file is still reused.
    counter = CountingAttack(setup[1])
    again = make(tmp_path, setup, attack_fn=counter)
    assert counter.calls == 0 and torch.equal(again.x_adv, bank.x_adv)


def test_budget_violation_is_an_error(tmp_path, setup):
    def too_strong(x, y):
        return torch.where(x > 0.5, x - 0.2, x + 0.2)

    with pytest.raises(TrigactError, match="exceeds eps"):
        make(tmp_path, setup, attack_fn=too_strong)
    assert not (bank_path(tmp_path, default_key(setup)) / META_FILE).exists()


def test_load_missing_bank(tmp_path):
    with pytest.raises(TrigactError) as err:
        load_bank(tmp_path / "nowhere")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message


def test_progress_bar_counts_images_to_the_total(tmp_path, setup, monkeypatch):
    """The bar is advanced by images, batch by batch, up to the number of images, and says what runs."""
    import rich.progress
    from rich.console import Console

    bars = []

    class RecordingProgress(rich.progress.Progress):
        def __init__(self, *columns, **kwargs):
            kwargs["console"] = Console(file=io.StringIO(), force_terminal=False, width=120)
            super().__init__(*columns, **kwargs)
            self.advances = []
            bars.append(self)

        def advance(self, task_id, advance=1):
            self.advances.append(advance)
            super().advance(task_id, advance)

    monkeypatch.setattr(rich.progress, "Progress", RecordingProgress)
    bank = make(tmp_path, setup, progress=True)
    assert len(bank) == 20 and len(bars) == 1
    bar = bars[0]
    (task,) = bar.tasks
    assert bar.advances == [8, 8, 4]
    assert task.total == 20 and task.completed == 20 and task.finished
    assert task.description == "pgd eps=8/255 on small_cnn-s0"
    shown = bar.console.file.getvalue()
    assert "20/20" in shown and "pgd eps=8/255 on small_cnn-s0" in shown

    # progress=False: nothing is shown (the bar is disabled, the work is the same).
    bars.clear()
    make(tmp_path / "quiet", setup, progress=False)
    assert bars[0].disable and bars[0].console.file.getvalue() == ""


# ------------------------------------------------------------------ one bank per request (transfer)


@pytest.fixture
def surrogate(tmp_path):
    """A tiny surrogate loaded from a bundle that records its data config."""
    from trigact.runs.bundle import load_bundle, save_bundle

    torch.manual_seed(0)
    net = build_model("small_cnn", 10, 1, 8, [0.3], [0.3])
    data = {"name": "digits", "_target_": "trigact.data.DigitsDataModule", "image_size": 8, "root": "/data",
            "batch_size": 64}
    return load_bundle(save_bundle(tmp_path / "runs" / "bundle.pt", net, None, {"config": {"data": data}}))


@pytest.fixture
def images():
    torch.manual_seed(1)
    return TensorDataset(torch.rand(12, 1, 8, 8), torch.randint(0, 10, (12,)))


def craft(tmp_path, surrogate, images, **kwargs):
    from trigact.evaluation.crafting import craft_banks
    from trigact.common.config import CONF_DIR

    banks = craft_banks(tmp_path / "out", "digits", images, {"s": surrogate}, ["pgd"], CONF_DIR,
                        overrides={"steps": 1}, batch_size=4, progress=False, **kwargs)
    return banks[("s", "pgd")]


def load(tmp_path, surrogate, **kwargs):
    from trigact.evaluation.crafting import load_banks
    from trigact.common.config import CONF_DIR

    banks = load_banks(tmp_path / "out", "digits", {"s": surrogate}, ["pgd"], CONF_DIR, {"steps": 1}, **kwargs)
    return banks[("s", "pgd")]


def test_a_changed_seed_gives_a_new_bank(tmp_path, surrogate, images, capsys):
    first = craft(tmp_path, surrogate, images, seed=0)
    second = craft(tmp_path, surrogate, images, seed=1)
    assert second.path != first.path and second.path.name.startswith("pgd-eps8-s1-")
    assert (first.meta["key"]["seed"], second.meta["key"]["seed"]) == (0, 1)
    assert torch.equal(second.x_clean, first.x_clean)
    assert not torch.equal(second.x_adv, first.x_adv)  # PGD's random start follows the seed
    capsys.readouterr()
    again = craft(tmp_path, surrogate, images, seed=0)
    assert again.path == first.path and "reusing" in capsys.readouterr().out


def test_a_changed_n_eval_gives_a_new_bank(tmp_path, surrogate, images):
    """Another n_eval is another request: a new bank (no longer an error), the first one kept."""
    all12 = craft(tmp_path, surrogate, images, n_eval=12)
    first8 = craft(tmp_path, surrogate, images, n_eval=8)
    assert first8.path != all12.path and (len(all12), len(first8)) == (12, 8)
    assert torch.equal(first8.x_clean, all12.x_clean[:8])
    assert first8.meta["key"]["n_eval"] == 8 and load_bank(all12.path).meta == all12.meta


def test_load_banks_finds_what_craft_banks_made_and_only_that(tmp_path, surrogate, images):
    made = craft(tmp_path, surrogate, images, seed=3, n_eval=8, data_overrides={"root": "/scratch/moved"})
    found = load(tmp_path, surrogate, seed=3, n_eval=8)  # where the files are is not part of the key
    assert found.path == made.path and torch.equal(found.x_adv, made.x_adv) and found.meta == made.meta
    for other, named in (({"seed": 4, "n_eval": 8}, "seed=4"), ({"seed": 3}, "n_eval=None"),
                         ({"seed": 3, "n_eval": 8, "split": "val"}, "split=val"),
                         ({"seed": 3, "n_eval": 8, "data_overrides": {"image_size": 16}}, "no TAE bank")):
        with pytest.raises(TrigactError, match="no TAE bank") as err:
            load(tmp_path, surrogate, **other)
        assert named in str(err.value) and "\n" not in str(err.value)


def test_split_is_part_of_the_key(tmp_path, surrogate, images):
    test = craft(tmp_path, surrogate, images)
    val = craft(tmp_path, surrogate, images, split="val")
    assert val.path != test.path and (test.meta["key"]["split"], val.meta["key"]["split"]) == ("test", "val")
    with pytest.raises(TrigactError, match="split='train'.*allowed: test, val"):
        craft(tmp_path, surrogate, images, split="train")


def test_a_retrained_surrogate_gets_a_new_bank(tmp_path, surrogate, images):
    """Same run name, other weights (the run was deleted and trained again): the bundle hash differs."""
    from trigact.runs.bundle import load_bundle, save_bundle

    first = craft(tmp_path, surrogate, images)
    with torch.no_grad():
        for p in surrogate.net.parameters():
            p.add_(0.01)
    path = surrogate.meta["path"]
    retrained = load_bundle(save_bundle(path, surrogate.net, None, {"config": surrogate.meta["config"]}))
    second = craft(tmp_path, retrained, images)
    assert second.path.parent == first.path.parent and second.path != first.path
    assert second.meta["key"]["surrogate"]["sha256"] != first.meta["key"]["surrogate"]["sha256"]


def test_evaluation_images_reads_the_asked_split(monkeypatch):
    import trigact.common.config
    from trigact.evaluation.crafting import evaluation_images

    class FakeData:
        def setup(self):
            self.test_set = TensorDataset(torch.zeros(6, 1, 2, 2), torch.arange(6))
            self.val_set = TensorDataset(torch.ones(6, 1, 2, 2), torch.arange(6) + 10)

    monkeypatch.setattr(trigact.common.config, "instantiate_named", lambda node: FakeData())
    cfg = {"name": "fake"}
    assert [int(evaluation_images(cfg, 3)[i][1]) for i in range(3)] == [0, 1, 2]
    assert [int(evaluation_images(cfg, 3, split="val")[i][1]) for i in range(3)] == [10, 11, 12]
    assert len(evaluation_images(cfg, None, split="val")) == 6
    for bad, message in ((dict(split="train"), "split='train'"), (dict(n_eval="abc"), "n_eval='abc'"),
                         (dict(n_eval=10.7), "n_eval=10.7"), (dict(n_eval=0), "n_eval=0")):
        args = {"n_eval": 3, **bad}
        with pytest.raises(TrigactError, match=message):
            evaluation_images(cfg, args.pop("n_eval"), **args)
    FakeData.setup = lambda self: setattr(self, "val_set", TensorDataset(torch.zeros(0, 1, 2, 2), torch.arange(0)))
    with pytest.raises(TrigactError, match="split='val': the val split of fake is empty"):
        evaluation_images(cfg, 3, split="val")
