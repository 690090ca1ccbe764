"""Finished adaptive (L4-L6) results are kept per (victim, level) and reused by a relaunch, never redone;
a changed request, a corrupt or half-written result, or a victim without a bundle are each handled in
their own way (:mod:`trigact.threats.store`). On the shrunk demo's bundles, a few seconds on one thread."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from _helpers_torch import one_thread  # noqa: F401  (a module fixture)
from trigact.common.errors import TrigactError
from trigact.common.io import folder_lock
from trigact.models.deployed import DeployedModel
from trigact.threats import evaluate as threat_evaluate
from trigact.threats.evaluate import evaluate_adaptive
from trigact.threats.store import DATA_FILE, LOCK_FILE, META_FILE

LEVEL = {"level": "L6", "eps": "16/255",
         "attacks": {"pgd": {"kind": "pgd_restarts", "steps": 3, "restarts": 1},
                     "trigger_flip": {"kind": "trigger_flip"}}}


@pytest.fixture(scope="module")
def victims_and_images(shrunk_demo):
    from trigact.data import DigitsDataModule
    from trigact.runs.bundle import load_bundle

    root, _ = shrunk_demo
    runs = root / "outputs" / "runs" / "digits"
    standard = load_bundle(next(runs.glob("standard/small_cnn/*/s0/bundle.pt")))
    fixed = load_bundle(next(runs.glob("trigger_activation/small_cnn/fixed-eps32-*/s0/bundle.pt")))
    dm = DigitsDataModule(image_size=standard.meta["config"]["data"]["image_size"], batch_size=32, seed=0)
    dm.setup()
    x, y = next(iter(dm.test_dataloader()))
    return {"standard": standard, "fixed": fixed}, x[:24], y[:24]


class Counter:
    """Counts the victims actually attacked (each call of the computing function)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = threat_evaluate._attack_victim

        def counted(level, name, *args, **kwargs):
            self.calls.append(name)
            return real(level, name, *args, **kwargs)

        monkeypatch.setattr(threat_evaluate, "_attack_victim", counted)


def run(victims, x, y, store, **kwargs):
    return evaluate_adaptive(victims, x, y, kwargs.pop("level", LEVEL), seed=kwargs.pop("seed", 0), batch_size=8,
                             sanity=kwargs.pop("sanity", False), store=store)


def same(a, b):
    assert a.clean == b.clean and a.clean_n == b.clean_n
    assert sorted(a.cells, key=str) == sorted(b.cells, key=str)
    assert a.per_image.keys() == b.per_image.keys()
    assert all(torch.equal(a.per_image[k], b.per_image[k]) for k in a.per_image)


def test_a_relaunch_reuses_every_finished_victim_and_computes_only_what_changed(victims_and_images, tmp_path,
                                                                                 monkeypatch, capsys):
    victims, x, y = victims_and_images
    counter = Counter(monkeypatch)
    first, _ = run(victims, x, y, tmp_path)
    assert counter.calls == ["standard", "fixed"]
    folders = sorted(p.parent for p in tmp_path.rglob(META_FILE))
    assert len(folders) == 2 and all(f.name.startswith("L6-") and (f / DATA_FILE).is_file() for f in folders)
    meta = json.loads((folders[0] / META_FILE).read_text())
    assert meta["key"]["level"] == "L6" and meta["key"]["victim"]["sha256"] and meta["key"]["images"]["n"] == 24

    capsys.readouterr()
    again, _ = run({"renamed": victims["standard"], "fixed": victims["fixed"]}, x, y, tmp_path)
    assert counter.calls == ["standard", "fixed"]  # nothing attacked again, whatever the victim is called
    assert capsys.readouterr().out.count("reusing adaptive result") == 2
    assert again.clean["renamed"] == first.clean["standard"]
    assert torch.equal(again.per_image[("renamed", "L6 white box, tau known", "pgd")],
                       first.per_image[("standard", "L6 white box, tau known", "pgd")])
    uncached, _ = run(victims, x, y, None)  # no store: computed, and equal to what was stored
    same(uncached, first)
    assert counter.calls == ["standard", "fixed", "standard", "fixed"]

    # Each part of the request makes its own result: eps, the attacks' settings, the seed, the images.
    counter.calls.clear()
    run(victims, x, y, tmp_path, level={**LEVEL, "eps": "8/255"})
    run(victims, x, y, tmp_path, level={**LEVEL, "attacks": {"pgd": {"kind": "pgd_restarts", "steps": 4, "restarts": 1}}})
    run(victims, x, y, tmp_path, seed=1)
    run(victims, x[:20], y[:20], tmp_path)
    assert counter.calls == ["standard", "fixed"] * 4
    assert len(list(tmp_path.rglob(META_FILE))) == 10


def test_the_sanity_report_is_stored_with_the_result_and_said_again(victims_and_images, tmp_path, monkeypatch):
    victims, x, y = victims_and_images
    one = {"fixed": victims["fixed"]}
    _, computed = run(one, x, y, tmp_path, sanity=True)
    counter = Counter(monkeypatch)
    _, reused = run(one, x, y, tmp_path, sanity=True)
    assert counter.calls == [] and reused == json.loads(json.dumps(computed))
    assert "zero_gradient_share" in reused["fixed"]["checks"]
    run(one, x, y, tmp_path)  # without the checks: another result (its report has none)
    assert counter.calls == ["fixed"]


def test_a_half_written_or_corrupt_result_is_computed_again_and_a_foreign_one_fails(victims_and_images, tmp_path,
                                                                                    monkeypatch, capsys):
    victims, x, y = victims_and_images
    one = {"standard": victims["standard"]}
    first, _ = run(one, x, y, tmp_path)
    folder = next(tmp_path.rglob(META_FILE)).parent
    counter = Counter(monkeypatch)

    data = (folder / DATA_FILE).read_bytes()
    (folder / DATA_FILE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit
    capsys.readouterr()
    again, _ = run(one, x, y, tmp_path)
    assert counter.calls == ["standard"] and "does not match its sha256 (corrupt)" in capsys.readouterr().out
    same(again, first)

    (folder / META_FILE).unlink()  # killed between the data file and meta.json
    run(one, x, y, tmp_path)
    assert counter.calls == ["standard"] * 2 and "interrupted write" in capsys.readouterr().out
    assert (folder / META_FILE).is_file()

    meta = json.loads((folder / META_FILE).read_text())
    meta["key"]["seed"] = 7  # a result recorded for another request under this folder: never overwritten
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(TrigactError, match=r"was made by a different request \(differs in: seed\).*never overwritten"):
        run(one, x, y, tmp_path)
    assert json.loads((folder / META_FILE).read_text())["key"]["seed"] == 7


def test_a_victim_without_a_bundle_is_computed_and_not_stored(victims_and_images, tmp_path, monkeypatch):
    victims, x, y = victims_and_images
    counter = Counter(monkeypatch)
    loose = DeployedModel(victims["fixed"].net, victims["fixed"].trigger).eval()  # built in memory: no identity
    run({"loose": loose}, x, y, tmp_path)
    run({"loose": loose}, x, y, tmp_path)
    assert counter.calls == ["loose", "loose"] and not any(tmp_path.iterdir())


def test_a_second_launch_waits_for_the_first_and_reuses_its_result(victims_and_images, tmp_path, monkeypatch, capsys):
    """While one launch holds a result's lock, another asking for it waits, then reuses what was written."""
    victims, x, y = victims_and_images
    one = {"standard": victims["standard"]}
    run(one, x, y, tmp_path)
    folder = next(tmp_path.rglob(META_FILE)).parent
    counter = Counter(monkeypatch)
    capsys.readouterr()
    with folder_lock(folder, LOCK_FILE, waiting="-", failing="-"):
        waiter = threading.Thread(target=run, args=(one, x, y, tmp_path))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive()  # blocked on the flock
    waiter.join(timeout=60)
    assert not waiter.is_alive() and counter.calls == []
    out = capsys.readouterr().out
    assert "another process is computing it" in out and "reusing adaptive result" in out


def test_a_defended_victim_is_keyed_by_its_defense_and_the_content_of_its_weight_files(tmp_path):
    """A purifier's weights count by what the file holds: replaced weights are a new victim, moved ones
    the same; the run folder name never leaves the store's root."""
    from torch import nn

    from trigact.threats.store import result_dir, victim_identity

    bundle = tmp_path / "bundle.pt"
    bundle.write_bytes(b"weights of f")
    weights = tmp_path / "nrp.pth"
    weights.write_bytes(b"purifier 1")

    def victim(defense):
        model = nn.Identity()
        model.meta = {"path": str(bundle), "defense": defense}
        return model

    first = victim_identity(victim({"name": "nrp", "weights": str(weights)}))
    assert first["defense"]["weights"] == {"sha256": first["defense"]["weights"]["sha256"]}  # no path in the key
    moved = tmp_path / "moved.pth"
    weights.rename(moved)
    assert victim_identity(victim({"name": "nrp", "weights": str(moved)})) == first
    moved.write_bytes(b"purifier 2")
    assert victim_identity(victim({"name": "nrp", "weights": str(moved)})) != first
    assert victim_identity(victim({"name": "jpeg", "quality": 50}))["defense"] == {"name": "jpeg", "quality": 50}
    assert victim_identity(victim(None))["defense"] is None
    key = {"level": "L6", "victim": {**first, "run": "/__x__bundle", "defense": {"name": "nrp"}}}
    path = result_dir(tmp_path / "root", key)
    assert path.parent.parent == tmp_path / "root" and path.name.startswith("L6-nrp-")


def test_a_victims_files_are_hashed_once_per_process_until_they_change(tmp_path, monkeypatch):
    """Every level asks for each victim's identity: its bundle is read once, and again only once it changes."""
    import os

    from torch import nn

    from trigact.threats import store

    bundle = tmp_path / "bundle.pt"
    bundle.write_bytes(b"weights of f")
    model = nn.Identity()
    model.meta = {"path": str(bundle), "defense": None}
    reads = []
    monkeypatch.setattr(store, "file_sha256", lambda path: reads.append(path) or f"digest{len(reads)}")
    first = [store.victim_identity(model) for _ in range(3)]
    assert len(reads) == 1 and first[0] == first[2]
    bundle.write_bytes(b"weights of g")  # retrained in place: a new digest, not the remembered one
    os.utime(bundle, ns=(1, 1))
    assert store.victim_identity(model)["sha256"] != first[0]["sha256"] and len(reads) == 2
