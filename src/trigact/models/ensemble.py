"""An ensemble of deployed models as one surrogate: the fused model that ensemble transfer attacks craft on.

``EnsembleModel(members, fusion)`` is a plain ``nn.Module`` over pixels in [0, 1], like a deployed unit,
so every attack and the bank code treat it as any surrogate (Liu et al., ICLR 2017; Dong et al.,
CVPR 2018, "ensemble in logits"). Each member is a :class:`~trigact.models.deployed.DeployedModel`
and applies its own trigger, if it has one.

Fusion (``fusion=``):

- ``logits`` (default): the mean of the members' logits; cross-entropy on it is the ensemble attack
  of Dong et al. (2018).
- ``probs``: the mean of the members' softmax outputs, returned as its log, ``log(mean_i softmax(z_i))``
  (computed stably with logsumexp), so that an attack's cross-entropy on it is ``-log`` of the mean
  probability of the true class (Liu et al., 2017). Its argmax is the argmax of the mean probabilities.

Identity: order-independent. The members are sorted by (run id, weights hash) when the ensemble is
built, and the forward pass sums them in that order, so ``[A, B]`` and ``[B, A]`` are one model, bit for
bit, and share banks. ``identity`` is the sha256 of the fusion and the members' weights hashes (net
spec, weights and trigger); ``name`` (``ensemble-<first 8 hex digits>``) names its bank folder.
A member listed twice (same weights hash) is refused: it would silently weigh double.

Feature-level attacks (FIA, NAA, RPA) need one network's intermediate layer; an ensemble has none, so
:func:`trigact.models.feature_layer` refuses it in one line.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

import torch
from torch import nn

from trigact.common.errors import TrigactError, unknown_name
from trigact.common.io import tree_sha256
from trigact.models.deployed import DeployedModel, run_id

FUSIONS = ("logits", "probs")
NAME_PREFIX = "ensemble-"
NAME_HASH_CHARS = 8


def weights_sha256(model: DeployedModel) -> str:
    """sha256 of what a deployed model computes: its net's spec, its weights and its trigger."""
    spec = getattr(model.net, "spec", None)
    return tree_sha256({"spec": spec if isinstance(spec, dict) else None, "state": model.state_dict()})


def _data_signature(model: DeployedModel) -> tuple:
    data = (model.meta.get("config") or {}).get("data") or {}
    spec = model.meta.get("model") or getattr(model.net, "spec", None) or {}
    return data.get("name"), spec.get("in_chans"), spec.get("image_size"), spec.get("num_classes")


class EnsembleModel(nn.Module):
    """The fused model of ``members`` (deployed models): mean logits, or log of the mean softmax.

    ``labels`` (optional, one per member, in the order given): human names of the members for tables
    and ``meta``. All members must share the dataset, image shape and number of classes.

    ``meta`` mirrors a deployed unit's where crafting and evaluation read it:

    - ``name`` / ``identity``: the bank folder name and the full sha256 (see the module docstring);
    - ``fusion``; ``members``: one ``{run, path, label, weights_sha256}`` per member, in forward order;
    - ``member_paths``: the members' bundle paths (for the white-box check: a victim that is a member
      is a white-box case);
    - ``config.data`` (the shared data config, the first member's) and ``model`` (``in_chans``,
      ``image_size``, ``num_classes``), as :func:`trigact.evaluation.crafting.data_config_of` reads;
    - ``path``: the ensemble's ``name``, not a file (an ensemble has no bundle of its own; its
      members' bundles are ``member_paths``).
    """

    def __init__(self, members: Sequence[DeployedModel], fusion: str = "logits", labels: Sequence[str] | None = None):
        super().__init__()
        if fusion not in FUSIONS:
            raise unknown_name("ensemble fusion", fusion, FUSIONS)
        members = list(members)
        labels = list(labels) if labels is not None else [run_id(m.meta) for m in members]
        if len(labels) != len(members):
            raise ValueError(f"{len(labels)} labels for {len(members)} ensemble members")
        for member in members:
            if not isinstance(member, DeployedModel):
                raise TrigactError(f"ensemble members must be deployed models (trained runs), got {type(member).__name__}")
        if len(members) < 2:
            raise TrigactError(f"an ensemble needs at least 2 distinct runs, got {len(members)}"
                               + (f" ({labels[0]})" if labels else ""))
        records = [
            {"run": run_id(m.meta), "path": m.meta.get("path"), "label": str(label), "weights_sha256": weights_sha256(m)}
            for m, label in zip(members, labels)
        ]
        order = sorted(range(len(members)), key=lambda i: (records[i]["run"], records[i]["weights_sha256"]))
        members, records = [members[i] for i in order], [records[i] for i in order]
        for a, b in zip(records, records[1:]):
            if a["weights_sha256"] == b["weights_sha256"]:
                raise TrigactError(f"ensemble member {b['label']} is listed twice (same weights as {a['label']}); "
                                   "name each run once")
        _check_same_data(members, [r["label"] for r in records])

        self.members = nn.ModuleList(members)
        self.fusion = fusion
        digest = json.dumps({"fusion": fusion, "members": sorted(r["weights_sha256"] for r in records)},
                            sort_keys=True, separators=(",", ":"))
        self.identity = hashlib.sha256(digest.encode()).hexdigest()
        self.name = NAME_PREFIX + self.identity[:NAME_HASH_CHARS]
        first = members[0]
        data_name, in_chans, image_size, num_classes = _data_signature(first)
        self.meta = {
            "kind": "ensemble",
            "name": self.name,
            "identity": self.identity,
            "fusion": fusion,
            "method": "ensemble",
            "members": records,
            "member_paths": [r["path"] for r in records if r["path"] is not None],
            "path": self.name,
            "config": {"data": dict((first.meta.get("config") or {}).get("data") or {})},
            "model": {"name": "ensemble", "in_chans": in_chans, "image_size": image_size, "num_classes": num_classes},
        }
        self.eval()  # like a loaded bundle: crafting and scoring restore the mode they found

    @property
    def labels(self) -> list[str]:
        """The members' labels in forward order."""
        return [r["label"] for r in self.meta["members"]]

    def key_detail(self) -> dict:
        """What a bank key records of the ensemble beyond its name and hash: fusion and members."""
        return {"fusion": self.fusion,
                "members": [{"run": r["run"], "weights_sha256": r["weights_sha256"]} for r in self.meta["members"]]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [member(x) for member in self.members]
        if self.fusion == "logits":
            return sum(outputs) / len(outputs)
        log_probs = torch.stack([torch.log_softmax(z, dim=1) for z in outputs])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(outputs))

    def extra_repr(self) -> str:
        return f"name={self.name}, fusion={self.fusion}, members={len(self.members)}"


def _check_same_data(members: Sequence[DeployedModel], labels: Sequence[str]) -> None:
    """Every member trained on one dataset, image shape and number of classes (one line otherwise)."""
    first = _data_signature(members[0])
    for member, label in zip(members[1:], labels[1:]):
        other = _data_signature(member)
        if other != first:
            def show(s):
                return f"{s[0]} {s[1]}x{s[2]}, {s[3]} classes"

            raise TrigactError(
                f"ensemble members {labels[0]} and {label} were trained on different data ({show(first)} vs "
                f"{show(other)}); an ensemble's members must share one dataset"
            )


def is_ensemble(model) -> bool:
    """Whether ``model`` is, or wraps, an :class:`EnsembleModel`."""
    return isinstance(model, nn.Module) and any(isinstance(m, EnsembleModel) for m in model.modules())


def run_paths(model) -> list[str]:
    """The bundle paths of the runs a surrogate is made of: an ensemble's members, a deployed model's own.

    A victim whose bundle is one of these is attacked white-box, not by transfer.
    """
    meta = getattr(model, "meta", None) or {}
    if meta.get("kind") == "ensemble":
        return list(meta.get("member_paths") or [])
    return [meta["path"]] if meta.get("path") else []
