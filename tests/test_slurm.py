"""SLURM: there is no cluster here, so drive hydra-submitit-launcher up to the sbatch script it would
submit (nothing is submitted) and check that the allocation follows the trainer and that the signal
SLURM is told to send is the one Lightning's SLURM environment listens to, and that trigact defers the
requeue checkpoint to a step boundary. (The resume from a signal received mid-step is in
tests/test_device_data.py; the requeue itself cannot be exercised without SLURM.)"""

import os
import re
import signal
from types import SimpleNamespace

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from trigact.cli import user_errors
from trigact.common.config import CONF_DIR


def slurm_config(tmp_path, devices=8, num_nodes=2, *extra):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", return_hydra_config=True, overrides=[
            f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep", "hydra/launcher=slurm",
            "trainer=slurm", "hydra.launcher.partition=gpu", f"trainer.devices={devices}",
            f"trainer.num_nodes={num_nodes}", *extra])


@pytest.fixture
def sbatch_script(tmp_path, monkeypatch):
    """``sbatch_script(cfg)``: the script the configured launcher would hand to sbatch for one job."""
    import submitit

    # submitit's SLURM executor refuses to start where there is no srun; this one is never run.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    scripts = []

    class RecordingExecutor(submitit.AutoExecutor):
        def map_array(self, fn, *iterables):  # instead of writing pickles and calling sbatch
            scripts.append(self._executor._make_submission_file_text("<job command>", "0"))
            return [SimpleNamespace(results=lambda: [None]) for _ in zip(*iterables)]

    monkeypatch.setattr(submitit, "AutoExecutor", RecordingExecutor)

    def script(cfg) -> str:
        launcher = instantiate(cfg.hydra.launcher)
        launcher.setup(hydra_context=None, task_function=None, config=cfg)
        launcher.launch([["seed=0"]], initial_job_idx=0)
        return scripts[-1]

    return script


def sbatch_option(script: str, name: str) -> str:
    (value,) = re.findall(rf"^#SBATCH --{name}=(\S+)$", script, flags=re.M)
    return value


@pytest.mark.parametrize("devices,num_nodes", [(8, 2), (4, 3)])
def test_the_allocation_slurm_sees_follows_the_trainer(tmp_path, sbatch_script, devices, num_nodes):
    script = sbatch_script(slurm_config(tmp_path, devices, num_nodes, "hydra.launcher.timeout_min=60"))
    assert sbatch_option(script, "nodes") == str(num_nodes)
    assert sbatch_option(script, "gpus-per-node") == str(devices)
    # One task per GPU: Lightning's DDP expects SLURM to start every rank.
    assert sbatch_option(script, "ntasks-per-node") == str(devices)
    assert (sbatch_option(script, "partition"), sbatch_option(script, "time")) == ("gpu", "60")


def test_slurm_sends_the_signal_the_trainer_requeues_on(tmp_path, sbatch_script):
    cfg = slurm_config(tmp_path)
    sent, _, delay = sbatch_option(sbatch_script(cfg), "signal").partition("@")
    (plugin,) = [instantiate(p) for p in cfg.trainer.plugins]
    assert plugin.requeue_signal == getattr(signal, f"SIG{sent}") and plugin.auto_requeue
    assert int(delay) == cfg.hydra.launcher.signal_delay_s > 0  # time left to checkpoint


def test_the_trainer_handles_the_requeue_signal(tmp_path):
    (plugin,) = [instantiate(p) for p in slurm_config(tmp_path).trainer.plugins]
    trainer = L.Trainer(accelerator="cpu", devices=1, plugins=[plugin], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    connector = trainer._signal_connector
    connector.register_signal_handlers()
    try:
        handler = signal.getsignal(plugin.requeue_signal)
        assert connector._slurm_sigusr_handler_fn in getattr(handler, "signal_handlers", [])
    finally:
        connector.teardown()


def test_a_bad_signal_name_is_one_line(tmp_path, capsys):
    cfg = slurm_config(tmp_path)
    with pytest.raises(SystemExit) as exit_info, user_errors():
        instantiate(cfg.trainer.plugins[0], requeue_signal="SIGNOPE")  # as train.py builds the plugins
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "trigact: error: requeue_signal='SIGNOPE' is not a signal; e.g. SIGUSR1 or SIGUSR2\n"


def test_trainer_slurm_defers_the_requeue_checkpoint_to_a_step_boundary(tmp_path):
    from trigact.callbacks import DeferredRequeue
    from trigact.callbacks.requeue import with_deferred_requeue

    plugins = [instantiate(p) for p in slurm_config(tmp_path).trainer.plugins]
    added = with_deferred_requeue([], plugins)
    assert [type(c) for c in added] == [DeferredRequeue]
    assert with_deferred_requeue([], []) == []  # no SLURM requeue, nothing to defer
    (plugin,) = plugins
    trainer = L.Trainer(accelerator="cpu", devices=1, plugins=[plugin], callbacks=added, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    connector = trainer._signal_connector
    added[0].setup(trainer, None, "fit")
    connector.register_signal_handlers()
    try:
        handlers = getattr(signal.getsignal(plugin.requeue_signal), "signal_handlers", [])
        assert added[0]._note_signal in handlers and connector._slurm_sigusr_handler_fn == added[0]._note_signal
    finally:
        connector.teardown()
        added[0].teardown(trainer, None, "fit")
    assert "_slurm_sigusr_handler_fn" not in vars(connector)  # Lightning's own method again


def test_under_ddp_every_rank_saves_the_requeue_checkpoint_at_the_same_step(monkeypatch):
    """A rank that has not seen the signal yet still saves when another rank has (any-reduce), so
    the ranks never wait on each other in save_checkpoint's barrier at different steps."""
    from trigact.callbacks import DeferredRequeue

    saved, asked = [], []

    class Connector:
        def _slurm_sigusr_handler_fn(self, signum, frame):
            saved.append(signum)

    class Strategy:
        def reduce_boolean_decision(self, decision, all=True):
            asked.append((decision, all))
            return True  # another rank was signalled

    accumulating = [False]
    epoch_loop = SimpleNamespace(_should_accumulate=lambda: accumulating[0])
    trainer = SimpleNamespace(world_size=2, strategy=Strategy(), fit_loop=SimpleNamespace(epoch_loop=epoch_loop))
    callback = DeferredRequeue()
    callback._connector, callback._signal = Connector(), int(signal.SIGUSR2)
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert asked == [(False, False)] and saved == [int(signal.SIGUSR2)]
    trainer.world_size = 1  # one process: no collective; and a requeue was started: later signals ignored
    callback._note_signal(int(signal.SIGUSR2), None)
    callback.on_train_batch_end(trainer, None, None, None, 1)
    assert len(asked) == 1 and len(saved) == 1 and callback.pending is None


def test_the_requeue_checkpoint_waits_for_the_end_of_gradient_accumulation():
    """A micro-batch that only accumulates is no step boundary: its partial .grad is in no checkpoint."""
    from trigact.callbacks import DeferredRequeue

    saved, accumulating = [], [True]

    class Connector:
        def _slurm_sigusr_handler_fn(self, signum, frame):
            saved.append(signum)

    epoch_loop = SimpleNamespace(_should_accumulate=lambda: accumulating[0])
    trainer = SimpleNamespace(world_size=1, fit_loop=SimpleNamespace(epoch_loop=epoch_loop))
    callback = DeferredRequeue()
    callback._connector, callback._signal = Connector(), int(signal.SIGUSR2)
    callback._note_signal(int(signal.SIGUSR2), None)
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert saved == [] and callback.pending == int(signal.SIGUSR2)
    accumulating[0] = False  # the micro-batch that steps
    callback.on_train_batch_end(trainer, None, None, None, 1)
    assert saved == [int(signal.SIGUSR2)]


def test_a_finished_fit_discards_its_requeue_checkpoints_so_that_test_uses_the_final_weights(tmp_path, monkeypatch):
    """Where Lightning detects SLURM, trainer.test(ckpt_path=None) loads the newest hpc_ckpt_N.ckpt in
    default_root_dir: after a resumed run, the attempt before's weights. train() discards them first."""
    import torch

    from trigact.callbacks.requeue import discard_requeue_checkpoints

    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "trigact", "SLURM_JOB_ID": "1", "SLURM_NODEID": "0",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(name, value)

    class Linear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)
            self.tested_weight = None

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def test_step(self, batch, batch_idx):
            self.tested_weight = self.layer.weight.detach().clone()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 4)), batch_size=4)

    def run(discard):
        root = tmp_path / f"discard{discard}"
        stale = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=root, enable_checkpointing=False)
        torch.manual_seed(0)
        stale.fit(Linear(), data)
        stale.save_checkpoint(root / "hpc_ckpt_1.ckpt")  # an earlier attempt's requeue checkpoint
        trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=root, enable_checkpointing=False)
        model = Linear()
        trainer.fit(model, data, ckpt_path=str(root / "hpc_ckpt_1.ckpt"))
        final = model.layer.weight.detach().clone()
        if discard:
            discard_requeue_checkpoints(trainer, root)
        trainer.test(model, data, verbose=False)
        return torch.equal(model.tested_weight, final)

    assert run(discard=True)
    assert not run(discard=False)  # Lightning's own behaviour, which the discard avoids
