"""Run folders: a pure function of what a config trains, so finished runs are found, not redone."""

from helpers_hydra import compose_config
from trigact.runs import run_name

BASE = ["data=digits", "model=small_cnn", "trigger=fixed", "trigger.eps=16/255"]


def name(tmp_path, *extra):
    return run_name(compose_config("train", BASE + list(extra), tmp_path))


def test_name_is_readable_and_stable(tmp_path):
    first = name(tmp_path)
    assert first.startswith("digits/trigger_activation/small_cnn/fixed-eps16-") and first.endswith("/s0")
    assert name(tmp_path) == first
    assert name(tmp_path, "trigger.eps=0.07") != first  # a different value, a different run
    assert name(tmp_path, f"trigger.eps={16 / 255!r}") == first  # the same value, written otherwise


def test_seeds_of_one_config_are_sibling_folders(tmp_path):
    assert name(tmp_path, "seed=3") == name(tmp_path).replace("/s0", "/s3")


def test_training_settings_change_the_name(tmp_path):
    first = name(tmp_path)
    for override in ("trainer.max_epochs=3", "optimizer.lr=0.01", "method.module.kl_weight=2",
                     "data.image_size=8", "trainer.devices=2", "data.batch_size=64"):
        assert name(tmp_path, override) != first, override
    learnable = ["data=digits", "trigger=learnable"]
    assert run_name(compose_config("train", learnable, tmp_path)) != run_name(
        compose_config("train", learnable + ["trigger.update.source=train_step"], tmp_path)
    )


def test_where_and_how_it_runs_does_not(tmp_path):
    first = name(tmp_path)
    for override in ("trainer=gpu", "data.num_workers=3", "logger=wandb", "trainer.enable_progress_bar=false",
                     "callbacks=none", "ckpt_path=last", "trainer.deterministic=false"):
        assert name(tmp_path, override) == first, override
    assert name(tmp_path / "elsewhere") == first
