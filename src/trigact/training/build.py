"""Everything ``Trainer.fit`` needs, built from the Hydra config: datamodule, LightningModule (the
network, the trigger and the method), callbacks and loggers."""

from __future__ import annotations

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from trigact.common.config import instantiate_named
from trigact.common.tracking import is_wandb_logger_config, wandb_logger
from trigact.models import build_model
from trigact.triggers import build_trigger


def build_datamodule(cfg: DictConfig):
    return instantiate_named(cfg.data)


def build_run(cfg: DictConfig, datamodule):
    """The network, the trigger and the method's LightningModule for ``cfg``."""
    net = build_model(
        cfg.model.name,
        num_classes=datamodule.num_classes,
        in_chans=datamodule.in_chans,
        image_size=datamodule.image_size,
        mean=datamodule.mean,
        std=datamodule.std,
        **(OmegaConf.to_container(cfg.model, resolve=True).get("kwargs") or {}),
    )
    shape = (datamodule.in_chans, datamodule.image_size, datamodule.image_size)
    trig = cfg.trigger
    trigger = build_trigger(trig.kind, shape, eps=trig.get("eps"), alpha=trig.get("alpha"), seed=trig.get("seed", cfg.seed),
                            k=trig.get("k"))
    module = instantiate(
        cfg.method.module,
        net=net,
        trigger=trigger,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        num_classes=datamodule.num_classes,
    )
    if hasattr(module, "attach_data"):  # a method that changes the training data (backdoor poisoning)
        module.attach_data(datamodule)
    return module


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    update = cfg.trigger.get("update")  # not cfg.trigger.update: that is DictConfig's dict.update
    if update:
        # First: Lightning runs on_train_epoch_end hooks in list order, and the trigger image (and
        # anything else that reads tau at epoch end) must see the epoch's updated trigger.
        # ModelCheckpoint needs no care: Lightning always moves it to the end.
        callbacks.insert(0, instantiate(update))
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, (RichProgressBar, TQDMProgressBar))]
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    """The configured Lightning loggers; a W&B one gets its run from :mod:`trigact.common.tracking`."""
    nodes = [c for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    return [wandb_logger(cfg, c) if is_wandb_logger_config(c) else instantiate(c) for c in nodes]
