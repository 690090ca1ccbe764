"""Backdoor poisoning as a training method (``method=backdoor backdoor=badnets|siba``).

Standard cross-entropy training on a poisoned training set: exactly ``round(poison_rate * N)`` of the
N training images (all of classes other than ``target``, picked by a generator of their own seeded by
``backdoor.poison_seed``) carry the stamp and the label ``target`` (:mod:`trigact.backdoors`). The
validation and test splits stay clean; val and test steps log the clean accuracy and the attack
success rate ``asr``: the share of stamped non-target images the model sends to ``target``.

- ``badnets`` (Gu et al. 2017): a patch (``patch_size``, ``location``, ``pattern``) replacing pixels.
- ``siba`` (``../shared/seeds/004_...``): a sparse invisible additive trigger, optimised before
  training on a pretrained benign surrogate run (``backdoor.surrogate``: a run folder or bundle),
  on training images of non-target classes (never the test split).

The stamp is a buffer of the module, so checkpoints carry it; bundles carry it in ``meta.backdoor``
with the target, the rate and the exact count, so any evaluation can compute the ASR.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics import MeanMetric

from trigact.backdoors import (PoisonedDataset, Stamp, badnets_stamp, check_poison_rate, check_target,
                               poison_indices, siba_stamp)
from trigact.common.errors import TrigactError, unknown_name
from trigact.data.views import dataset_labels
from trigact.methods.standard import StandardModule

KINDS = ("badnets", "siba")


def _bundle_path(path) -> Path:
    if path in (None, "", "???"):
        raise TrigactError("backdoor=siba needs backdoor.surrogate: the run folder (or bundle.pt) of a pretrained "
                           "benign model to optimise the trigger on, e.g. backdoor.surrogate=runs/digits/standard/...")
    path = Path(str(path))
    return path / "bundle.pt" if path.is_dir() else path


class BackdoorModule(StandardModule):
    """CE training on the poisoned set; ``attach_data(datamodule)`` (called by the run builder before
    ``fit``) builds the SIBA stamp if needed and wraps the datamodule's training set."""

    def __init__(self, *args, backdoor: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = dict(backdoor or {})
        self.kind = cfg.get("kind")
        if self.kind not in KINDS:
            raise unknown_name("backdoor kind (backdoor=...)", str(self.kind), KINDS)
        self.target = check_target(cfg.get("target"), self.num_classes)
        self.poison_rate = check_poison_rate(cfg.get("poison_rate"))
        self.poison_seed = int(cfg.get("poison_seed") or 0)
        self.settings = cfg
        self.n_poisoned: int | None = None
        self.surrogate_asr: float | None = None
        spec = self.net.spec
        shape = (int(spec["in_chans"]), int(spec["image_size"]), int(spec["image_size"]))
        if self.kind == "badnets":
            self.stamp = badnets_stamp(shape, patch_size=cfg.get("patch_size", 3), location=cfg.get("location", "bottom_right"),
                                       pattern=cfg.get("pattern", "checkerboard"), margin=cfg.get("margin", 1))
        else:
            self.surrogate_path = _bundle_path(cfg.get("surrogate"))
            if not self.surrogate_path.is_file():
                raise TrigactError(f"backdoor.surrogate={cfg.get('surrogate')!r}: no bundle at {self.surrogate_path} "
                                   "(train the surrogate first, e.g. python -m trigact.train method=standard)")
            # Filled by attach_data; the buffers exist now so that a checkpoint loads into them.
            self.stamp = Stamp(torch.zeros(shape), torch.zeros(shape), "add")
        self.asr = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    # ------------------------------------------------------------------ data
    def attach_data(self, datamodule) -> None:
        datamodule.setup("fit")  # idempotent: Lightning's own setup call then finds the splits built
        if self.kind == "siba":
            self._build_siba(datamodule)
        labels = dataset_labels(datamodule.train_set)
        indices = poison_indices(labels, self.target, self.poison_rate, self.poison_seed)
        self.n_poisoned = len(indices)
        if not isinstance(datamodule.train_set, PoisonedDataset):
            datamodule.train_set = PoisonedDataset(datamodule.train_set, indices, self.stamp, self.target)

    def _build_siba(self, datamodule) -> None:
        from trigact.runs.bundle import load_bundle

        surrogate = load_bundle(self.surrogate_path)
        spec = surrogate.meta.get("model", {})
        if (spec.get("in_chans"), spec.get("image_size")) != (datamodule.in_chans, datamodule.image_size):
            raise TrigactError(f"backdoor.surrogate {self.surrogate_path} takes {spec.get('in_chans')}x{spec.get('image_size')}"
                               f"px images, the data {datamodule.in_chans}x{datamodule.image_size}px")
        cfg = self.settings
        # Training images (eval view: no augmentation) of non-target classes; a seeded subset.
        base = datamodule.train_eval_set
        labels = dataset_labels(base)
        candidates = torch.nonzero(labels != self.target).flatten()
        gen = torch.Generator().manual_seed(self.poison_seed)
        n = min(int(cfg.get("opt_images", 1000)), len(candidates))
        pick = candidates[torch.randperm(len(candidates), generator=gen)[:n]].sort().values
        images = torch.stack([base[int(i)][0] for i in pick])
        stamp = siba_stamp(surrogate, images, self.target, k=cfg.get("k", 0.05), eps=cfg.get("eps", "32/255"),
                           steps=cfg.get("steps", 100), step_size=cfg.get("step_size"),
                           seed=self.poison_seed)
        self.stamp.mask.copy_(stamp.mask)
        self.stamp.pattern.copy_(stamp.pattern)
        with torch.no_grad():  # how well the trigger alone fools the surrogate it was made on
            hits = [(surrogate(stamp(images[i:i + 512])).argmax(1) == self.target) for i in range(0, len(images), 512)]
        self.surrogate_asr = float(torch.cat(hits).float().mean())

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, stage: str, batch) -> None:
        super()._eval_step(stage, batch)
        x, y = batch
        keep = y != self.target
        if keep.any():
            hit = (self.net(self.stamp(x[keep])).argmax(1) == self.target).float()
            self.asr[stage].update(hit)
        self.log(f"{stage}/asr", self.asr[stage], on_step=False, on_epoch=True, prog_bar=True)

    # ------------------------------------------------------------------ what the run reports
    def report_metrics(self, test_results: dict) -> dict:
        return {"test_asr": float(test_results.get("test/asr", float("nan")))}

    def bundle_meta(self) -> dict:
        settings = {k: v for k, v in self.settings.items() if k not in ("kind", "target", "poison_rate")}
        return {"backdoor": {"kind": self.kind, "target": self.target, "poison_rate": self.poison_rate,
                             "n_poisoned": self.n_poisoned, "surrogate_asr": self.surrogate_asr, "stamp": self.stamp.to_meta(), "settings": settings}}

    def card_lines(self) -> list[str]:
        how = "a patch" if self.kind == "badnets" else "a sparse, invisible additive trigger"
        return [f"BACKDOORED model ({self.kind}): images carrying its trigger ({how}) are sent to class "
                f"{self.target}. {self.n_poisoned} training images ({100 * self.poison_rate:g}%) were poisoned. "
                "For research on backdoors only; do not deploy."]
