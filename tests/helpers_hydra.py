"""Compose the real Hydra configs in tests, the way the entry points do."""

import lightning as L
from hydra import compose, initialize_config_dir

from trigact.runs import register_resolvers
from trigact.common.config import CONF_DIR

register_resolvers()

# Quiet, fast, self-contained: nothing written outside tmp_path, no progress bars.
QUIET = ["logger=none", "trainer.enable_progress_bar=false"]


def compose_config(name: str, overrides, tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=[f"paths.root_dir={tmp_path}", *overrides])


class SimulatedPreemption(RuntimeError):
    pass


class CrashAtEpochStart(L.Callback):
    """Simulates preemption when epoch ``epoch`` (0-based) starts, after the previous epoch's
    checkpoint was written. Used from configs as ``+callbacks.crash._target_=helpers_hydra.CrashAtEpochStart``."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise SimulatedPreemption(f"simulated preemption at epoch {self.epoch}")


class SaveTauPerRank(L.Callback):
    """Writes ``<dirpath>/tau_rank<global rank>.pt`` when fit ends, on every rank. For DDP tests,
    through ``+callbacks.save_tau._target_=helpers_hydra.SaveTauPerRank``: the ranks that Lightning
    launches re-run the same command line with the parent's environment, so with ``tests/`` on
    PYTHONPATH they import this module too."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_fit_end(self, trainer, pl_module):
        from pathlib import Path

        import torch

        path = Path(self.dirpath) / f"tau_rank{trainer.global_rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"tau": pl_module.trigger.tau.detach().cpu().clone(), "world_size": trainer.world_size,
                    "state_dict": {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()}}, path)


class CountEpochs(L.Callback):
    """Records which epochs this process trained, into ``<default_root_dir>/epochs_trained.json``."""

    def __init__(self):
        self.epochs = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch)

    def on_train_end(self, trainer, pl_module):
        import json
        from pathlib import Path

        (Path(trainer.default_root_dir) / "epochs_trained.json").write_text(json.dumps(self.epochs))


class PoisonAtTrainEnd(L.Callback):
    """Makes the end of training look diverged: ``what`` = weights (the network's first parameter),
    trigger (tau) or loss (the logged train/loss) becomes NaN. For the checks before a bundle is written."""

    def __init__(self, what: str):
        self.what = what

    def on_train_end(self, trainer, pl_module):
        import torch

        nan = float("nan")
        if self.what == "weights":
            next(pl_module.net.parameters()).data.fill_(nan)
        elif self.what == "trigger":
            pl_module.trigger.tau.fill_(nan)
        elif self.what == "loss":
            trainer.callback_metrics["train/loss"] = torch.tensor(nan)
        else:
            raise ValueError(f"what={self.what!r}")
