"""TAE bank: uint8 storage, reuse without recomputation, recovery from interrupted writes."""

import json
import os
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from trigact.attacks import build_attack
from trigact.errors import TrigactError
from trigact.evaluation.bank import (
    BANK_FILE,
    META_FILE,
    bank_dir,
    ensure_bank,
    eps_tag,
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


def test_bank_dir_and_eps_tag(tmp_path):
    assert eps_tag(8 / 255) == "8"
    assert eps_tag(0.5 / 255) == "0.5" and eps_tag("16/255") == "16"
    assert bank_dir(tmp_path, "digits", "s", "pgd", "8/255", 20) == tmp_path / "advbank/digits/s/pgd-eps8-s20"
    with pytest.raises(TrigactError):
        bank_dir(tmp_path, "digits", "../x", "pgd", EPS, 20)


def test_round_trip(tmp_path, setup):
    counter = CountingAttack(setup[1])
    bank = make(tmp_path, setup, attack_fn=counter)
    assert counter.calls == 3  # batched: 20 images in batches of 8
    path = bank_dir(tmp_path, "digits", "small_cnn-s0", "pgd", EPS, 2)
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


def test_reuse_with_different_config_is_an_error(tmp_path, setup):
    make(tmp_path, setup)
    with pytest.raises(TrigactError, match="different request"):
        make(tmp_path, setup, attack_config={"name": "pgd", "alpha": 0.5})


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
    path = bank_dir(tmp_path, "digits", "small_cnn-s0", "pgd", EPS, 2)
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
    assert not (bank_dir(tmp_path, "digits", "small_cnn-s0", "pgd", EPS, 2) / META_FILE).exists()


def test_load_missing_bank(tmp_path):
    with pytest.raises(TrigactError) as err:
        load_bank(tmp_path / "nowhere")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message


def test_progress_bar_runs(tmp_path, setup):
    bank = make(tmp_path, setup, progress=True)
    assert len(bank) == 20
