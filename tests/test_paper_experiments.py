"""Every ``paper_*`` experiment (the paper's tables, one command each) runs end to end on tiny datasets
written in the real on-disk formats (CIFAR pickles, ImageFolder JPEGs): 1 epoch, a handful of images,
fewer architectures per column, ``allow_cpu=true``. The paper-scale settings themselves (60-100
epochs, 5-6 architectures, the full test sets) are what the configs hold; these tests check that
every config composes into a plan that trains, attacks, scores and writes its tables.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from _datasets_on_disk import write_cifar, write_image_folder
from trigact.cli.pipeline import run_pipeline
from trigact.common.config import CONF_DIR
from trigact.common.errors import TrigactError
from trigact.data import CIFAR10DataModule, CIFAR100DataModule

TINY_TRAIN = ["trainer.max_epochs=1", "data.val_size=0", "data.batch_size=8", "data.num_workers=0",
              "logger=none", "trainer.enable_progress_bar=false", "callbacks=none"]
IMAGENET_TINY = ["data.num_classes=3", "data.image_size=32"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """One results root for all tables (runs shared between tables are trained once, as on a cluster)
    and the three tiny datasets."""
    import torchvision.datasets.cifar as tv_cifar

    base = tmp_path_factory.mktemp("paper")
    write_cifar(base / "cifar10", CIFAR10DataModule, per_file=4)
    write_cifar(base / "cifar100", CIFAR100DataModule, per_file=20)
    write_image_folder(base / "imagenet", ["n01", "n02", "n03"], per_class=4)
    # Tiny files cannot match the real archives' md5 sums: skip only the checksum (as tests/test_data.py).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
        yield base


def smoke(roots: Path, experiment: str, archs=None, extra_train=(), overrides=(), edit=None):
    data = next((d for d in ("cifar100", "cifar10", "imagenet") if d in experiment), None)
    if data is not None:
        overrides = [f"data.root={roots / data}", *overrides]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=[
            f"experiment={experiment}", f"paths.root_dir={roots / 'out'}", "allow_cpu=true",
            "pipeline.n_eval=4", "pipeline.attack_overrides.steps=2", *overrides])
        with open_dict(cfg):
            cfg.pipeline.train_overrides = [*cfg.pipeline.train_overrides, *TINY_TRAIN, *extra_train]
            if archs is not None:
                cfg.pipeline.grid.archs = list(archs)
            if edit is not None:
                edit(cfg)
        assert cfg.require_accelerator is True  # every paper table is sized for a GPU
        rows = run_pipeline(cfg)  # composes every run's train config: inside the Hydra context
    return Path(cfg.paths.results_dir), rows


def table_columns(results: Path) -> list[str]:
    header = (results / "table.md").read_text().splitlines()[0]
    return [c.strip() for c in header.strip("|").split("|")][1:]


def test_paper_tables_refuse_to_start_without_a_gpu(roots):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=["experiment=paper_table1_cifar10",
                                                        f"paths.root_dir={roots / 'refused'}"])
        with pytest.raises(TrigactError, match="allow_cpu=true"):
            run_pipeline(cfg)
    assert not (roots / "refused" / "outputs" / "runs").exists()  # refused before any training


def test_table1_cifar10(roots):
    results, rows = smoke(roots, "paper_table1_cifar10", archs=["resnet18"])
    assert table_columns(results) == ["w/o", "AT", *(f"Ours (fixed {k}/255)" for k in (1, 2, 4, 8, 16, 32, 64))]
    victims = json.loads((results / "victims.json").read_text())
    assert {v["name"] for v in victims} >= {"standard_resnet18", "fixed_eps64_resnet18", "pgd_at_resnet18"}
    fixed = {v["name"]: v for v in victims}["fixed_eps64_resnet18"]
    assert fixed["trigger_mse"] == pytest.approx((64 / 255) ** 2, rel=1e-5)  # Table XI's measure
    paper = (results / "paper.md").read_text()  # a smoke run is never read as a reproduction
    assert "Settings that differ from the paper's" in paper and "`trainer.max_epochs` = 1 (paper: 60)" in paper


def test_table2_cifar10_every_baseline(roots):
    results, _ = smoke(roots, "paper_table2_cifar10", archs=["mobilenet_v2"])
    columns = table_columns(results)
    assert columns[:7] == ["w/o", "JPEG (q=50)", "JPEG (q=75)", "BDR (d=2)", "Gaussian (s=0.6)",
                           "Gaussian (s=0.7)", "R&P (s=1.2)"]
    assert "NRP" not in columns and "DiffPure" not in columns  # no weights given: left out, and said so
    assert columns[-5:] == ["AT (PGD)", "RAT (TRADES)", "TDAT", "Ours (f) 64/255", "Ours (l) 4/255"]
    table = (results / "table.md").read_text()
    for attack in ("naa", "rpa", "l2t"):
        assert f"| {attack} |" in table


def test_table3_cifar100(roots):
    results, _ = smoke(roots, "paper_table3_cifar100", archs=["resnet18"],
                       edit=lambda cfg: cfg.pipeline.update(attacks=["pgd", "naa"]))
    assert "Ours (l) 4/255" in table_columns(results)


def test_table4_imagenet100(roots):
    results, _ = smoke(roots, "paper_table4_imagenet100", archs=["tv_mobilenet_v2"], extra_train=IMAGENET_TINY,
                       edit=lambda cfg: cfg.pipeline.update(attacks=["pgd", "bsr", "gra", "diff_pgd"]))
    table = (results / "table.md").read_text()
    assert "| bsr |" in table and "| gra |" in table
    assert "diff_pgd" not in table  # no diffusion weights: left out
    assert "R&P (s=1.1)" in table_columns(results)


def test_table7_alpha_cifar10(roots):
    results, _ = smoke(roots, "paper_table7_alpha_cifar10", archs=["resnet18"])
    assert table_columns(results) == [f"Ours (l) {a}/255" for a in ("0.5", "1", "2", "4", "8", "16")]


@pytest.mark.parametrize("experiment,data", [("paper_table8_cifar10", ()), ("paper_table9_cifar100", ()),
                                             ("paper_table10_imagenet100", IMAGENET_TINY)])
def test_same_paradigm_tables_use_each_columns_own_surrogates(roots, experiment, data):
    arch = "tv_resnet18" if data else "resnet18"
    results, _ = smoke(roots, experiment, archs=[arch], extra_train=data,
                       edit=lambda cfg: cfg.pipeline.update(attacks=["pgd"]))
    cells = (results / "matrix.csv").read_text().splitlines()[1:]
    pairs = {tuple(line.split(",")[:2]) for line in cells}
    assert pairs == {(f"standard_{arch}", f"surrogate_{arch}"), (f"pgd_at_{arch}", f"surrogate_at_{arch}"),
                     (f"fixed_eps16_{arch}", f"surrogate_fixed_eps16_{arch}"),
                     (f"learnable_alpha4_{arch}", f"surrogate_learnable_alpha4_{arch}")}


def test_table11_trigger_mse(roots):
    keep = ["cifar10_fixed_eps64", "cifar10_learnable_alpha4_resnet18", "imagenet100_learnable_alpha4_tv_resnet18"]

    def edit(cfg):
        runs = {name: list(cfg.pipeline.runs[name]) for name in keep}
        runs["imagenet100_learnable_alpha4_tv_resnet18"] += IMAGENET_TINY
        cfg.pipeline.runs = runs

    results, rows = smoke(roots, "paper_table11_trigger_mse", edit=edit, overrides=[
        f"data_roots.cifar10={roots / 'cifar10'}", f"data_roots.imagenet={roots / 'imagenet'}"])
    mse = {row["name"]: row["trigger_mse"] for row in rows}
    assert mse["cifar10_fixed_eps64"] == pytest.approx((64 / 255) ** 2, rel=1e-5)
    assert 0 < mse["cifar10_learnable_alpha4_resnet18"] < (4 * 4 / 255) ** 2  # at most 3 steps beyond the init
    assert "MSE(0, tau) (1e-2)" in (results / "accuracy.md").read_text()
    paper = (results / "paper.md").read_text()
    assert "(paper: 60) in cifar10_" in paper and "(paper: 100) in imagenet100_" in paper  # per data set


def test_paper_training_configs_refuse_without_a_gpu(tmp_path):
    from trigact.training.run import train

    for experiment in ("paper_cifar10", "paper_cifar100", "paper_imagenet100"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"experiment={experiment}", f"paths.root_dir={tmp_path}"])
        assert cfg.trainer.accelerator == "gpu"
        with pytest.raises(TrigactError, match="allow_cpu=true"):
            train(cfg)


@pytest.mark.parametrize("override,message", [
    ("pipeline.grid.archs=[]", "pipeline.grid.archs"),
    ("+pipeline.grid.victims.extra=nosuchvariant", "nosuchvariant"),
    ("+pipeline.grid.variants.bad=['model=lenet']", "sets model="),
])
def test_a_bad_grid_is_refused_in_one_line(tmp_path, override, message):
    from trigact.cli.grid import expand_grid

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=["experiment=paper_table1_cifar10",
                                                        f"paths.root_dir={tmp_path}", override])
    with pytest.raises(TrigactError, match=message):
        expand_grid(cfg)
