"""W&B (offline) through the train entry point and trigact.common.tracking: config, per-epoch metrics,
the trigger image, tables, groups and the offline notice.

wandb 0.31 offline writes no config.yaml or wandb-summary.json: a run folder holds the record log
``run-<id>.wandb`` (LevelDB-log framing of ``wandb_internal_pb2.Record`` protobufs; the SDK no longer
ships a reader, so a small one is below) and the media files under ``files/media/``.
"""

import json
import time
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_hydra import compose_config
from trigact import load_bundle
from trigact.common import tracking
from trigact.callbacks.trigger_logging import image_to_uint8_hwc, trigger_to_image
from trigact.common.errors import TrigactError
from trigact.training.run import train

LEARNABLE = ["data=digits", "data.image_size=8", "model=mlp", "trigger=learnable", "trigger.alpha=8/255",
             "trigger.update.update_fraction=1.0", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
             "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false"]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """Offline, silent, and every W&B folder inside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in [("WANDB_DIR", "wandb_dir"), ("WANDB_CACHE_DIR", "wandb_cache"),
                     ("WANDB_CONFIG_DIR", "wandb_config"), ("WANDB_DATA_DIR", "wandb_data")]:
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


# ----------------------------------------------------------------------------- reading an offline run
BLOCK, HEADER = 32768, 7  # LevelDB log: 32 KiB blocks; record header = crc32, length (u16), type (u8)


def wandb_records(path):
    """The protobuf Records of an offline ``run-<id>.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    pos, pending = 7, b""  # file header: ':W&B', magic (u16), version (u8)
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_offline_run(run_dir: Path, wait_s: float = 30.0) -> dict:
    """The one offline run under ``run_dir/wandb``: its folder, run record, config and history rows.

    wandb's service writes the record log asynchronously: on a loaded machine ``run.finish()`` can
    return before the records reach the file (seen twice in CI), so wait up to ``wait_s`` for them.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            out = _read_offline_run_once(run_dir)
        except Exception:  # a record caught half-written; read again
            if time.monotonic() > deadline:
                raise
            out = {}
        if out.get("finished") or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def _read_offline_run_once(run_dir: Path) -> dict:
    folders = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 1, folders
    (log,) = folders[0].glob("run-*.wandb")
    out = {"dir": folders[0], "history": [], "config": {}}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "exit":  # the last record of a finished run
            out["finished"] = True
        elif kind == "run":
            out["run"] = record.run
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return out


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ----------------------------------------------------------------------------- train with logger=wandb
def test_training_logs_config_metrics_and_a_trigger_image_per_epoch(offline_wandb, capsys):
    tmp_path = offline_wandb
    cfg = compose_config("train", LEARNABLE + ["logger=[csv,wandb,tensorboard]"], tmp_path)
    summary = train(cfg)
    run_dir = Path(summary["run_dir"])
    tau = load_bundle(summary["bundle"]).trigger
    wb = read_offline_run(run_dir)

    # The run: where and how it was filed.
    assert wb["dir"].parent == run_dir / "wandb"
    assert (wb["run"].run_group, wb["run"].job_type) == ("digits", "train")
    assert wb["run"].display_name == "trigger_activation-mlp-s0"
    # Its config is the whole resolved Hydra config.
    config = wb["config"]
    assert config["trigger"]["kind"] == "learnable" and config["trigger"]["alpha"] == "8/255"
    assert config["trigger"]["update"]["update_fraction"] == 1.0 and config["trigger"]["update"]["source"] == "epoch"
    assert config["method"]["name"] == "trigger_activation" and config["trainer"]["max_epochs"] == 2
    assert config["paths"]["run_dir"] == str(run_dir)

    # Per-epoch metrics with and without the trigger.
    val = [row for row in wb["history"] if "val/acc_clean" in row]
    assert [row["epoch"] for row in val] == [0, 1]
    assert all(0 <= row["val/acc_trigger"] <= 1 and 0 <= row["val/acc_clean"] <= 1 for row in val)

    # One trigger image per epoch, at its epoch's step, showing tau after that epoch's update.
    images = [row for row in wb["history"] if "trigger/image/filenames" in row]
    assert [row["trainer/global_step"] for row in images] == [row["trainer/global_step"] for row in val]
    files = [wb["dir"] / "files" / row["trigger/image/filenames"][0] for row in images]
    assert all(f.is_file() for f in files) and len(files) == 2
    expected = image_to_uint8_hwc(trigger_to_image(tau, min_size=64))
    assert not np.array_equal(png(files[0]), expected)  # the epoch-2 update moved tau
    assert np.array_equal(png(files[1]), expected)
    assert np.array_equal(png(run_dir / "trigger.png"), expected)
    assert not list(run_dir.glob(".trigger.png.*"))  # no temporary left behind

    # TensorBoard got the images too; the CSV logger only its metrics.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard" / "version_0"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("trigger/image")] == [row["trainer/global_step"] for row in val]
    (metrics_csv,) = run_dir.glob("csv/version_0/metrics.csv")
    assert "val/acc_trigger" in metrics_csv.read_text().splitlines()[0]

    # The logger's run is finished: the next run in this process is a run of its own.
    import wandb

    assert wandb.run is None
    out = capsys.readouterr().out
    assert out.count("wandb: logging offline") <= 1


def test_standard_training_logs_no_trigger_image(offline_wandb):
    over = ["data=digits", "data.image_size=8", "model=mlp", "method=standard", "logger=wandb", "debug=limit",
            "trainer.enable_progress_bar=false"]
    summary = train(compose_config("train", over, offline_wandb))
    run_dir = Path(summary["run_dir"])
    wb = read_offline_run(run_dir)
    assert [row["epoch"] for row in wb["history"] if "val/acc_clean" in row] == [0, 1]
    assert not any("trigger/image/filenames" in row for row in wb["history"])
    assert not (run_dir / "trigger.png").exists() and not (wb["dir"] / "files" / "media").exists()
    assert wb["config"]["method"]["name"] == "standard" and wb["config"]["trigger"]["kind"] == "none"


# ----------------------------------------------------------------------------- tracking helpers
def test_log_tables_writes_wandb_tables(offline_wandb):
    cfg = compose_config("train", ["data=digits", "logger=wandb"], offline_wandb)
    assert tracking.wandb_enabled(cfg)
    run = tracking.init_wandb_run(cfg, job_type="eval", name="robustness", dir=offline_wandb / "eval")
    rows = [{"attack": "pgd", "R": 0.25}, {"attack": "mifgsm", "R": float("nan"), "note": "x"}]
    tracking.log_tables(run, {"transfer": rows, "accuracy": (["run", "acc"], [["fixed", 0.9], ["learnable", 0.95]])})
    run.finish()
    tracking.log_tables(None, {"ignored": rows})  # no run (W&B off): nothing happens

    wb = read_offline_run(offline_wandb / "eval")
    assert (wb["run"].job_type, wb["run"].run_group, wb["run"].display_name) == ("eval", "digits", "robustness")
    assert wb["config"]["data"]["name"] == "digits"
    (transfer,) = (wb["dir"] / "files" / "media" / "table").glob("transfer_*.table.json")
    (accuracy,) = (wb["dir"] / "files" / "media" / "table").glob("accuracy_*.table.json")
    table = json.loads(transfer.read_text())
    assert table["columns"] == ["attack", "R", "note"]
    assert table["data"][0][:2] == ["pgd", 0.25] and table["data"][0][2] is None and table["data"][1][2] == "x"
    assert json.loads(accuracy.read_text())["data"] == [["fixed", 0.9], ["learnable", 0.95]]

    with pytest.raises(TrigactError, match="row 0 has 1 values for 2 columns"):
        tracking.log_tables(object(), {"bad": (["a", "b"], [[1]])})
    with pytest.raises(TrigactError, match="list of row dicts"):
        tracking.log_tables(object(), {"bad": "not a table"})


def test_wandb_enabled_only_for_a_wandb_logger(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not tracking.wandb_enabled(compose_config("train", ["logger=csv"], tmp_path))
    wb = compose_config("train", ["logger=wandb"], tmp_path)
    assert tracking.wandb_enabled(wb)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not tracking.wandb_enabled(wb)


def test_group_is_explicit_or_the_sweep_or_the_dataset(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from trigact.common.config import CONF_DIR

    cfg = compose_config("train", ["data=digits", "logger=wandb"], tmp_path)
    assert tracking.run_group(cfg) == "digits"
    assert tracking.run_group(cfg, "ablation-1") == "ablation-1"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hydra_cfg = compose(config_name="train", overrides=[f"paths.root_dir={tmp_path}", "logger=wandb",
                                                            "hydra.sweep.dir=/x/multirun/2026-01-02_03-04-05"],
                            return_hydra_config=True)
    hydra_cfg.hydra.mode = RunMode.MULTIRUN
    try:
        HydraConfig.instance().set_config(hydra_cfg)
        assert tracking.run_group(cfg) == "2026-01-02_03-04-05"
        assert tracking.run_group(cfg, "explicit") == "explicit"
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize(
    "env,expected,reason",
    [
        ({"WANDB_MODE": "offline"}, "offline", "WANDB_MODE=offline"),
        ({}, "offline", "no W&B API key"),
        # A key, but the server does not answer (a closed local port): offline, quickly.
        ({"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}, "offline", "no network (127.0.0.1:9 did not answer)"),
        ({"WANDB_MODE": "online"}, "online", None),
    ],
)
def test_offline_mode_is_decided_once_and_said_once(tmp_path, monkeypatch, capsys, env, expected, reason):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(tracking, "_said_offline", False)
    assert tracking.wandb_mode() == expected
    assert tracking.wandb_mode() == expected
    import os

    assert os.environ["WANDB_MODE"] == expected
    lines = capsys.readouterr().out.splitlines()
    if reason is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith("wandb: logging offline") and reason in lines[0], lines


def test_trigger_image_maps_minus_max_to_black_and_plus_max_to_white():
    tau = torch.tensor([[[-0.1, 0.0], [0.05, 0.1]]])
    image = trigger_to_image(tau)
    assert torch.allclose(image, torch.tensor([[[0.0, 0.5], [0.75, 1.0]]]))
    assert trigger_to_image(tau, min_size=5).shape == (1, 6, 6)  # factor 3: each pixel a 3x3 square
    assert torch.equal(trigger_to_image(torch.zeros(3, 2, 2)), torch.full((3, 2, 2), 0.5))
    assert image_to_uint8_hwc(trigger_to_image(torch.rand(3, 4, 4) - 0.5)).shape == (4, 4, 3)


def test_online_when_the_server_answers(tmp_path, monkeypatch, capsys):
    """With a key and a server that accepts the connection (a local socket standing in for it)."""
    import os
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.delenv("WANDB_MODE", raising=False)
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(tracking, "_said_offline", False)
        assert tracking.wandb_mode() == "online" and os.environ["WANDB_MODE"] == "online"
    assert capsys.readouterr().out == ""


def test_evaluate_logs_its_robustness_tables_as_an_eval_job(offline_wandb, shrunk_demo):
    """``trigact.evaluate wandb.enabled=true``: an eval-job run beside the results, holding the cells,
    the paper-layout table and the victims as wandb.Tables."""
    import shutil

    from hydra import compose, initialize_config_dir

    from trigact.cli.evaluate import run_evaluate
    from trigact.common.config import CONF_DIR

    root, _ = shrunk_demo
    shutil.copytree(root / "outputs", offline_wandb / "outputs")
    over = [f"paths.root_dir={offline_wandb}", "surrogates=[digits/standard/lenet]", "victims=[digits/standard/small_cnn]",
            "attacks=[pgd]", "attack_overrides.eps=32/255", "attack_overrides.steps=3", "n_eval=60", "name=wb", "wandb.enabled=true",
            "wandb.group=sweep-a"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        matrix, groups, out = run_evaluate(compose(config_name="evaluate", overrides=over))
    wb = read_offline_run(out)
    assert (wb["run"].job_type, wb["run"].run_group, wb["run"].display_name) == ("eval", "sweep-a", "eval-wb")
    assert wb["config"]["victims"] == ["digits/standard/small_cnn"]
    tables = {p.name.split("_")[0]: json.loads(p.read_text()) for p in (wb["dir"] / "files" / "media" / "table" / "robustness").glob("*.table.json")}
    assert set(tables) == {"cells", "table", "victims"}
    assert tables["table"]["columns"] == ["row", "small_cnn standard s0"]
    assert [r[0] for r in tables["table"]["data"]] == ["Clean", "pgd", "Mean", "Worst case"]
    cell = tables["cells"]["data"][0]
    assert dict(zip(tables["cells"]["columns"], cell))["accuracy"] == matrix.cells[0]["accuracy"]
