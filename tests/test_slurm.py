"""SLURM: there is no cluster here, so check that the launcher config composes, that the launcher
object instantiates with the allocation following the trainer, and that the trainer's SLURM
environment listens to submitit's signal. (Requeue itself cannot be exercised without SLURM.)"""

import signal

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from trigact.cluster import slurm_environment
from trigact.errors import TrigactError
from trigact.train import CONF_DIR


def slurm_config(tmp_path, *extra):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", return_hydra_config=True, overrides=[
            f"paths.root_dir={tmp_path}", "hydra/launcher=slurm", "trainer=slurm", "hydra.launcher.partition=gpu",
            "trainer.devices=8", "trainer.num_nodes=2", *extra])


def test_launcher_config_follows_the_trainer(tmp_path):
    launcher = slurm_config(tmp_path).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 2, 8, 8)
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout == 20


def test_launcher_instantiates(tmp_path):
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    cfg = slurm_config(tmp_path, "hydra.launcher.timeout_min=60")
    launcher = instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, SlurmLauncher)
    assert launcher.params["gpus_per_node"] == 8 and launcher.params["timeout_min"] == 60


def test_trainer_listens_to_submitits_signal(tmp_path):
    cfg = slurm_config(tmp_path)
    (plugin,) = [instantiate(p) for p in cfg.trainer.plugins]
    assert plugin.requeue_signal == signal.SIGUSR2 and plugin.auto_requeue
    with pytest.raises(TrigactError, match="requeue_signal='SIGNOPE' is not a signal"):
        slurm_environment("SIGNOPE")
