"""How fast a run trains, without changing what it trains (beyond rounding): the execution profile.

``trainer=gpu`` turns it on: bf16-mixed precision (a Trainer argument, and in the run hash: it rounds
the forward pass), cuDNN autotuning when the run is not deterministic, TF32 for fp32 matmuls and
convolutions, and channels_last (NHWC) weights and batches, the layout tensor cores want.
``model.compile=true`` adds ``torch.compile`` of the network.

The three trigact keys below live in ``conf/trainer`` beside Lightning's own, but they are not
``lightning.Trainer`` arguments: :func:`split_trainer_config` takes them out before the Trainer is
built, and the run hash leaves them out (:mod:`trigact.runs.naming`), so switching them on neither
retrains finished runs nor splits one config's runs into two folders.

- ``channels_last``: the network's weights and every 4-D batch go to ``torch.channels_last``.
- ``float32_matmul_precision``: ``torch.set_float32_matmul_precision`` for fp32 matmuls
  (``highest``: full fp32; ``high``: TF32 on Ampere and newer). cuDNN convolutions are another switch,
  ``torch.backends.cudnn.allow_tf32``, which PyTorch leaves on (TF32) by default and we leave alone;
  under bf16-mixed both matter only for the ops autocast keeps in fp32. Process-wide: set when a run
  starts and restored when ``train`` returns.
- ``benchmark: auto``: Lightning's ``benchmark`` (``torch.backends.cudnn.benchmark``) set to
  ``not deterministic``; Lightning itself only accepts true, false or null.

The trigger stays fp32 whatever the precision: it is a float32 buffer, ``clamp(x + tau)`` runs
before the network (outside autocast's op list, so in fp32), its gradient arrives at an fp32 leaf,
and the trigger update sums in fp32 (:mod:`trigact.callbacks.trigger_update`, whose epoch pass runs
outside Lightning's autocast). ``torch.compile`` compiles the network only, never ``training_step``:
the trigger's add-and-clamp and the learnable trigger's leaf stay eager, so the trigger's gradient
path has no graph break of ours; ``nn.Module.compile`` keeps the state-dict keys, so checkpoints and
bundles of compiled and eager runs are interchangeable.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from trigact.common.errors import TrigactError

EXECUTION_KEYS = ("channels_last", "float32_matmul_precision")
MATMUL_PRECISIONS = ("highest", "high", "medium")
COMPILE_OPTIONS = ("mode", "backend", "fullgraph", "dynamic", "options")


def split_trainer_config(trainer_cfg: DictConfig) -> tuple[DictConfig, dict]:
    """(``trainer_cfg`` as ``lightning.Trainer`` takes it, trigact's execution settings), checked.

    ``benchmark: auto`` is resolved to ``not deterministic`` in the returned Trainer config.
    """
    trainer_cfg = trainer_cfg.copy()
    settings = {}
    with open_dict(trainer_cfg):
        for key in EXECUTION_KEYS:
            if key in trainer_cfg:
                settings[key] = trainer_cfg.pop(key)
        if trainer_cfg.get("benchmark") == "auto":
            trainer_cfg.benchmark = not bool(trainer_cfg.get("deterministic", False))
    channels_last = settings.get("channels_last", False)
    if channels_last is None:
        channels_last = False
    if not isinstance(channels_last, bool):
        raise TrigactError(f"trainer.channels_last={channels_last!r}: expected true or false")
    precision = settings.get("float32_matmul_precision") or "highest"
    if precision not in MATMUL_PRECISIONS:
        raise TrigactError(f"trainer.float32_matmul_precision={precision!r}: expected one of "
                           f"{', '.join(MATMUL_PRECISIONS)}")
    benchmark = trainer_cfg.get("benchmark")
    if benchmark is not None and not isinstance(benchmark, bool):
        raise TrigactError(f"trainer.benchmark={benchmark!r}: expected true, false, null or auto")
    return trainer_cfg, {"channels_last": channels_last, "float32_matmul_precision": precision}


def compile_options(value) -> dict | None:
    """``model.compile`` as ``nn.Module.compile`` keyword arguments: false/null -> None (eager),
    true -> ``{}`` (torch's defaults), a mapping -> those of :data:`COMPILE_OPTIONS` (e.g.
    ``{mode: max-autotune}``); anything else is a one-line error."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(COMPILE_OPTIONS))
        if unknown:
            raise TrigactError(f"model.compile: unknown option(s) {', '.join(map(str, unknown))}; "
                               f"allowed: {', '.join(COMPILE_OPTIONS)}")
        return dict(value)
    raise TrigactError(f"model.compile={value!r}: expected true, false or a mapping of "
                       f"{', '.join(COMPILE_OPTIONS)}")


def apply_process_settings(settings: Mapping) -> None:
    """The process-wide part of the profile (TF32), set before the Trainer is built."""
    torch.set_float32_matmul_precision(settings["float32_matmul_precision"])


def prepare_network(module: nn.Module, settings: Mapping, compile_kwargs: dict | None) -> None:
    """Put ``module.net`` (the method's LightningModule's network) in the profile's layout and
    compile it, in place.

    With channels_last, a forward pre-hook also converts every 4-D input to NHWC as it enters the
    network: the training batch ``cat(x, x + tau)``, evaluation batches and the trigger update's
    passes alike (a hook on the network, not a batch-transfer hook of the LightningModule, which
    Lightning warns about whenever a datamodule is used). Bundles rebuild the network without it.
    """
    if settings.get("channels_last"):
        module.net.to(memory_format=torch.channels_last)
        module.net.register_forward_pre_hook(_channels_last_input)
    if compile_kwargs is not None:
        module.net.compile(**compile_kwargs)


def _channels_last_input(net: nn.Module, args: tuple):
    x = args[0] if args else None
    if torch.is_tensor(x) and x.ndim == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def contiguous_network(net: nn.Module) -> nn.Module:
    """``net`` with its weights back in the default layout, as bundles store them (any reader, any layout)."""
    return net.to(memory_format=torch.contiguous_format)
