"""TAE bank: uint8 storage, reuse without recomputation, recovery from interrupted writes, and a
folder per request (attack config, seed, n_eval, data, split, surrogate)."""

import hashlib
import io
import json
import os
import time

import pytest
import safetensors.torch
import torch
from torch.utils.data import DataLoader, TensorDataset

from trigact.attacks import build_attack
from trigact.common.errors import TrigactError
from trigact.evaluation.bank import (
    BANK_FILE,
    FORMAT_VERSION,
    LEGACY_BANK_FILE,
    META_FILE,
    Bank,
    bank_dir,
    bank_key,
    bank_path,
    dequantize,
    ensure_bank,
    eps_tag,
    file_sha256,
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

    raw = safetensors.torch.load_file(path / BANK_FILE)
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
    raw = safetensors.torch.load_file(bank.path / BANK_FILE)
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

    Another writer's file lands under bank.safetensors right after ours (what two unlocked crafters
    did): the sha256 must then disagree with the file, so the bank reads as corrupt instead of as ours.
    """
    real_replace = os.replace
    foreign = safetensors.torch.save({"x_adv": torch.zeros(20, 1, 16, 16, dtype=torch.uint8),
                                      "x_clean": torch.zeros(20, 1, 16, 16, dtype=torch.uint8),
                                      "y": torch.zeros(20, dtype=torch.int64)})

    def replace_then_overwrite(src, dst):
        real_replace(src, dst)
        if os.path.basename(dst) == BANK_FILE:
            with open(dst, "wb") as f:
                f.write(foreign)

    monkeypatch.setattr(os, "replace", replace_then_overwrite)
    bank = make(tmp_path, setup)
    monkeypatch.undo()
    written = safetensors.torch.save({"x_adv": bank.q_adv, "x_clean": bank.q_clean, "y": bank.y})
    assert bank.meta["file"]["sha256"] == hashlib.sha256(written).hexdigest()
    assert bank.meta["file"]["sha256"] != hashlib.sha256(foreign).hexdigest()
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
    old_legacy = path / f".{LEGACY_BANK_FILE}.abc456.tmp"  # from a writer of format 2
    fresh = path / f".{META_FILE}.def456.tmp"
    old.write_bytes(b"half a bank")
    old_legacy.write_bytes(b"half an old bank")
    fresh.write_bytes(b"{")
    for stale in (old, old_legacy):
        os.utime(stale, (time.time() - 7200, time.time() - 7200))
    bank = _recomputes(tmp_path, setup)
    assert not old.exists() and not old_legacy.exists()  # a killed writer's leftovers are cleaned up
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


# --------------------------------------------- format 3 (safetensors, memory-mapped) and format 2


def _mapped_from(tensor, file) -> bool:
    """Whether ``tensor``'s data lies in a memory mapping of ``file`` (Linux: /proc/self/maps)."""
    ptr, ino = tensor.data_ptr(), os.stat(file).st_ino
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            low, high = (int(v, 16) for v in parts[0].split("-"))
            if low <= ptr < high:
                return int(parts[4]) == ino and parts[-1] == str(file)
    return False


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")


def test_a_new_bank_is_uint8_safetensors_and_batches_dequantize_it(tmp_path, setup):
    made = make(tmp_path, setup)
    path = made.path
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == [BANK_FILE, META_FILE]
    assert BANK_FILE == "bank.safetensors" and FORMAT_VERSION == 3
    meta = json.loads((path / META_FILE).read_text())
    assert meta["format_version"] == 3 and meta["file"]["name"] == BANK_FILE
    raw = safetensors.torch.load_file(path / BANK_FILE)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in raw.items()} == {
        "x_adv": (torch.uint8, (20, 1, 16, 16)), "x_clean": (torch.uint8, (20, 1, 16, 16)), "y": (torch.int64, (20,))}

    loaded = load_bank(path)
    for bank in (made, loaded):  # the crafted bank keeps uint8 too: nothing is dequantized as a whole
        assert bank.q_adv.dtype == torch.uint8 and bank.q_clean.dtype == torch.uint8 and bank.y.dtype == torch.int64
        assert torch.equal(bank.q_adv, raw["x_adv"]) and torch.equal(bank.q_clean, raw["x_clean"])
    for clean, q in ((False, raw["x_adv"]), (True, raw["x_clean"])):
        batches = list(loaded.batches(8, clean=clean))
        assert [len(y) for _, y in batches] == [8, 8, 4]
        x = torch.cat([b[0] for b in batches])
        assert x.dtype == torch.float32 and x.device.type == "cpu"
        assert torch.equal(x, dequantize(q)) and torch.equal(x, q.float() / 255)  # exactly, not approximately
        assert torch.equal(torch.cat([b[1] for b in batches]), raw["y"])
    assert torch.equal(next(iter(loaded.batches(4, device="cpu")))[0], dequantize(raw["x_adv"][:4]))
    # x_adv / x_clean: whole float copies, for the callers that want them.
    assert torch.equal(loaded.x_adv, dequantize(raw["x_adv"]))
    assert torch.equal(loaded.x_clean, dequantize(raw["x_clean"]))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(TrigactError, match="batch_size"):
            loaded.batches(bad)


@needs_proc
def test_a_loaded_bank_is_memory_mapped_and_copy_on_write(tmp_path, setup):
    bank = make(tmp_path, setup)
    for name in ("q_adv", "q_clean", "y"):
        assert _mapped_from(getattr(load_bank(bank.path), name), bank.path / BANK_FILE), name
    assert not _mapped_from(bank.q_adv, bank.path / BANK_FILE)  # the check does tell the two apart
    loaded = load_bank(bank.path)
    loaded.q_adv[0] += 1  # a private mapping: the caller's change never reaches the file
    assert file_sha256(bank.path / BANK_FILE) == bank.meta["file"]["sha256"]
    assert torch.equal(load_bank(bank.path).q_adv, bank.q_adv)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@needs_proc
def test_loading_a_big_bank_costs_far_less_memory_than_its_size(tmp_path):
    """A 200 MB bank: hashing streams it and mapping reads no pixels, so the process grows by a few
    MB (the old load held the bytes, the tensors and a float copy: over 1 GB here)."""
    import gc

    n = 1000  # 2 x 1000 x 3 x 184 x 184 bytes = 203 MB
    path = tmp_path / "big"
    path.mkdir()
    q = torch.arange(184 * 184 * 3, dtype=torch.int32).remainder(251).to(torch.uint8).reshape(1, 3, 184, 184)
    tensors = {"x_adv": q.expand(n, -1, -1, -1).contiguous(), "x_clean": q.expand(n, -1, -1, -1).contiguous(),
               "y": torch.arange(n, dtype=torch.int64)}
    safetensors.torch.save_file(tensors, path / BANK_FILE)
    del tensors
    gc.collect()
    size = (path / BANK_FILE).stat().st_size
    assert size > 200e6
    (path / META_FILE).write_text(json.dumps(
        {"format_version": 3, "file": {"name": BANK_FILE, "sha256": file_sha256(path / BANK_FILE), "bytes": size}}))
    before = _rss_mb()
    bank = load_bank(path)
    grown = _rss_mb() - before
    assert grown < 40, f"loading a {size / 1e6:.0f} MB bank grew RSS by {grown:.0f} MB"
    assert _mapped_from(bank.q_adv, path / BANK_FILE)
    x, y = next(iter(bank.batches(2)))  # the pixels are there when read
    assert torch.equal(x, dequantize(q.expand(2, -1, -1, -1))) and y.tolist() == [0, 1]


def _write_legacy_bank(path, key, q_adv, q_clean, y, **file_extra) -> dict:
    """A format-2 bank exactly as the old code wrote it: torch.save of the uint8 tensors to bank.pt,
    then meta.json with the sha256 and size of bank.pt."""
    buffer = io.BytesIO()
    torch.save({"x_adv": q_adv, "x_clean": q_clean, "y": y}, buffer)
    raw = buffer.getvalue()
    path.mkdir(parents=True, exist_ok=True)
    (path / LEGACY_BANK_FILE).write_bytes(raw)
    meta = {"key": key, "key_hash": key_hash(key), "format_version": 2, "n": len(y), "eps": EPS,
            "file": {"name": LEGACY_BANK_FILE, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw),
                     **file_extra}}
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return meta


def _legacy_tensors(n=20):
    g = torch.Generator().manual_seed(5)
    q_clean = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=g)
    q_adv = (q_clean.int() + torch.randint(-8, 9, q_clean.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    return q_adv, q_clean, torch.randint(0, 10, (n,), generator=g)


def test_an_old_format_bank_loads_and_is_reused_without_crafting(tmp_path, setup, capsys):
    key = default_key(setup)
    path = bank_path(tmp_path, key)  # the same folder as before the format change: the key is unchanged
    q_adv, q_clean, y = _legacy_tensors()
    meta = _write_legacy_bank(path, key, q_adv, q_clean, y)
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    loaded = load_bank(path, key)
    assert loaded.meta == meta and len(loaded) == 20
    assert loaded.q_adv.dtype == torch.uint8 and torch.equal(loaded.q_adv, q_adv)
    assert torch.equal(loaded.q_clean, q_clean) and torch.equal(loaded.y, y)
    assert torch.equal(torch.cat([x for x, _ in loaded.batches(8)]), dequantize(q_adv))
    if os.path.exists("/proc/self/maps"):
        assert _mapped_from(loaded.q_adv, path / LEGACY_BANK_FILE)  # mapped as well (torch.load mmap=True)

    def must_not_craft(x, y):
        raise AssertionError("a complete format-2 bank was crafted again")

    capsys.readouterr()
    reused = make(tmp_path, setup, attack_fn=must_not_craft)
    assert "reusing" in capsys.readouterr().out and reused.path == path
    assert torch.equal(reused.q_adv, q_adv) and reused.meta == meta
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes  # nothing written or converted
    assert not (path / BANK_FILE).exists()

    # A format-2 meta without file.name (it only ever named bank.pt) reads the same.
    del meta["file"]["name"]
    (path / META_FILE).write_text(json.dumps(meta))
    assert torch.equal(load_bank(path).q_clean, q_clean)


def test_a_corrupt_old_format_bank_is_crafted_again_in_the_new_format(tmp_path, setup):
    key = default_key(setup)
    path = bank_path(tmp_path, key)
    _write_legacy_bank(path, key, *_legacy_tensors())
    raw = (path / LEGACY_BANK_FILE).read_bytes()
    (path / LEGACY_BANK_FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TrigactError, match="truncated") as err:
        load_bank(path)
    assert "\n" not in str(err.value) and str(path / LEGACY_BANK_FILE) in str(err.value)
    bank = _recomputes(tmp_path, setup)
    assert bank.meta["file"]["name"] == BANK_FILE and not (path / LEGACY_BANK_FILE).exists()


def test_a_stale_data_file_of_either_format_is_removed(tmp_path, setup, capsys):
    path = bank_path(tmp_path, default_key(setup))
    path.mkdir(parents=True)
    (path / LEGACY_BANK_FILE).write_bytes(b"an old bank without its meta")
    (path / BANK_FILE).write_bytes(b"a new bank without its meta")
    _recomputes(tmp_path, setup)
    out = capsys.readouterr().out
    assert f"{path / LEGACY_BANK_FILE} has no {META_FILE}" in out and f"{path / BANK_FILE} has no {META_FILE}" in out
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == [BANK_FILE, META_FILE]


def _rewrite_consistently(path, raw: bytes) -> None:
    """Replace the data file and make meta.json vouch for it (a bad file that passes the sha256)."""
    (path / BANK_FILE).write_bytes(raw)
    meta = json.loads((path / META_FILE).read_text())
    meta["file"].update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    (path / META_FILE).write_text(json.dumps(meta))


def test_bad_data_files_fail_in_one_line(tmp_path, setup):
    bank = make(tmp_path, setup)
    path, data = bank.path, bank.path / BANK_FILE
    good, meta = data.read_bytes(), (path / META_FILE).read_text()
    cases = [
        (good[:-10], "truncated", False),  # truncated: the size disagrees
        (good[:50] + bytes([good[50] ^ 0xFF]) + good[51:], "sha256 does not match", False),  # a flipped header byte
        (b"\xff" * 64, "cannot load", True),  # not a safetensors file, yet the meta vouches for it
        (good[:-10], "cannot load", True),  # truncated, and the meta says so too
        (safetensors.torch.save({"x_adv": bank.q_adv.float(), "x_clean": bank.q_clean, "y": bank.y}),
         "expected uint8", True),
        (safetensors.torch.save({"x_adv": bank.q_adv, "y": bank.y}), "expected a dict with x_adv, x_clean, y", True),
    ]
    for raw, message, consistent in cases:
        (path / META_FILE).write_text(meta)
        if consistent:
            _rewrite_consistently(path, raw)
        else:
            data.write_bytes(raw)
        with pytest.raises(TrigactError, match=message) as err:
            load_bank(path)
        assert "\n" not in str(err.value) and str(data) in str(err.value), message
    # A meta.json naming another file is refused, never followed.
    (path / META_FILE).write_text(meta.replace(f'"name": "{BANK_FILE}"', '"name": "../../elsewhere.pt"'))
    with pytest.raises(TrigactError, match="file.name='../../elsewhere.pt' is not one of"):
        load_bank(path)
    data.unlink()
    (path / META_FILE).write_text(meta)
    with pytest.raises(TrigactError, match=f"{BANK_FILE} is missing"):
        load_bank(path)


def test_a_hand_built_bank_keeps_its_floats():
    x = torch.rand(5, 1, 2, 2, dtype=torch.float64)  # off the 1/255 grid: must not be quantized
    bank = Bank(x_adv=x, x_clean=x / 2, y=torch.arange(5), meta={}, path=None)
    assert bank.q_adv is None and bank.x_adv is x and len(bank) == 5
    assert torch.equal(torch.cat([b for b, _ in bank.batches(2, clean=True)]), x / 2)
    for kwargs, message in ((dict(x_adv=x, q_adv=torch.zeros(5, 1, 2, 2, dtype=torch.uint8), x_clean=x), "exactly one"),
                            (dict(q_adv=x, x_clean=x), "q_adv must be uint8"),
                            (dict(x_adv=(x * 255).to(torch.uint8), x_clean=x), "x_adv must be float")):
        with pytest.raises(TrigactError, match=message):
            Bank(y=torch.arange(5), **kwargs)


def test_scoring_a_bank_never_makes_a_float_copy_of_it(tmp_path, setup, monkeypatch):
    """evaluate_victims / evaluate_matrix score a loaded bank batch by batch from its uint8 images: the
    same numbers as on its float images, without ever touching the whole-bank float properties."""
    from types import SimpleNamespace

    from trigact.evaluation.crafting import check_same_images
    from trigact.evaluation.matrix import check_aligned_banks, evaluate_matrix
    from trigact.evaluation.victims import evaluate_victims

    model = setup[0].eval()
    bank = load_bank(make(tmp_path, setup).path)
    floats = SimpleNamespace(x_adv=bank.x_adv, x_clean=bank.x_clean, y=bank.y)
    clean_floats = [(floats.x_clean[i:i + 8], floats.y[i:i + 8]) for i in range(0, 20, 8)]
    expected = evaluate_matrix({"v": model}, {("s", "pgd"): floats}, clean_batches=clean_floats, batch_size=8)

    def no_float_copy(self):
        raise AssertionError("a float copy of a whole bank was made")

    monkeypatch.setattr(Bank, "x_adv", property(no_float_copy))
    monkeypatch.setattr(Bank, "x_clean", property(no_float_copy))
    banks = {("s", "pgd"): bank, ("s", "other"): load_bank(bank.path)}
    check_same_images(banks)
    got = evaluate_victims({"v": model}, {"s": model}, banks, batch_size=8, victim_runs={})
    assert got.clean == expected.clean and got.clean_n == expected.clean_n
    assert [c["accuracy"] for c in got.cells] == [expected.cells[0]["accuracy"]] * 2
    assert torch.equal(got.per_image[("v", "s", "pgd")], expected.per_image[("v", "s", "pgd")])

    other = load_bank(bank.path)
    other.q_clean = other.q_clean.clone()
    other.q_clean[3, 0, 0, 0] ^= 1  # one pixel of one clean image differs
    for check in (check_aligned_banks, check_same_images):
        with pytest.raises(TrigactError, match="hold different clean images"):
            check({("s", "pgd"): bank, ("s", "other"): other})



@pytest.mark.requires_gpu
def test_batches_on_cuda_are_the_same_pixels_and_the_same_scores(tmp_path, setup):
    """On a GPU: each uint8 batch goes through pinned memory to the device, and is dequantized there
    to exactly the values the CPU gives; a victim on the GPU scores a bank as it does on the CPU."""
    from trigact.evaluation.matrix import evaluate_matrix

    bank = load_bank(make(tmp_path, setup).path)
    batches = list(bank.batches(8, device="cuda"))
    assert all(x.device.type == "cuda" and y.device.type == "cuda" for x, y in batches)
    assert torch.equal(torch.cat([x for x, _ in batches]).cpu(), dequantize(bank.q_adv))
    model = setup[0].eval()
    on_cpu = evaluate_matrix({"v": model}, {("s", "pgd"): bank}, batch_size=8)
    on_gpu = evaluate_matrix({"v": model.cuda()}, {("s", "pgd"): bank}, batch_size=8)
    assert torch.equal(on_gpu.per_image[("v", "s", "pgd")], on_cpu.per_image[("v", "s", "pgd")])

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
