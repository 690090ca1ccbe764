"""From trained surrogates to TAE banks: the evaluation images, one bank per (surrogate, attack), and
finding those banks again.

A bank is keyed by everything that makes it (:func:`trigact.evaluation.bank.bank_key`): the attack
config after overrides, the surrogate's run and bundle hash, the data, the split, ``n_eval`` and the
crafting seed. An ensemble surrogate (:class:`~trigact.models.ensemble.EnsembleModel`) is keyed by
its identity (the hash of its fusion and members' weights) and lists its fusion and members in the
key; its banks live in ``advbank/<dataset>/ensemble-<hash8>/``. :func:`craft_banks` and :func:`load_banks` derive the key the same way from the same
arguments, so ``evaluate`` finds what ``attack`` or the pipeline crafted only when it is asked for
the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset

from trigact.attacks import attack_from_config, attack_spec
from trigact.attacks.config import attack_config
from trigact.models.deployed import DeployedModel, run_id
from trigact.models.ensemble import EnsembleModel
from trigact.common.errors import TrigactError
from trigact.common.validate import check_n_eval, check_split
from trigact.evaluation.bank import Bank, bank_key, bank_path, ensure_bank, file_sha256, load_bank, stored_images


# Data-config keys that say where the files are or how training batches are drawn; none of them
# changes an evaluation image, so banks are shared across them (e.g. when the data moved). A
# deny-list, not an allow-list: a new key that does define the images (like val_size) then makes
# new banks instead of silently reusing banks of other images.
NOT_IMAGE_KEYS = frozenset({
    "_target_", "root", "download", "batch_size", "eval_batch_size", "num_workers", "pin_memory",
    "persistent_workers", "seed", "augment", "placement",
})


def evaluation_subset(dataset, n: int | None):
    """The first ``n`` images (all when None): fixed, so every bank holds the same images."""
    n = check_n_eval(n)
    return dataset if n is None or n >= len(dataset) else Subset(dataset, range(n))


def data_identity(data_cfg: Mapping, data_overrides: Mapping | None = None) -> dict:
    """The keys of a data config (with ``data_overrides`` on top) that define its images."""
    merged = {**dict(data_cfg), **dict(data_overrides or {})}
    return {k: v for k, v in sorted(merged.items()) if k not in NOT_IMAGE_KEYS}


def surrogate_sha256(model: DeployedModel) -> str | None:
    """sha256 of the surrogate's bundle file (None for a model not loaded from one); for an ensemble,
    its identity (the hash of its fusion and its members' weights, :mod:`trigact.models.ensemble`)."""
    if isinstance(model, EnsembleModel):
        return model.identity
    path = getattr(model, "meta", {}).get("path")
    return file_sha256(path) if path and Path(path).is_file() else None


def bank_id(model: DeployedModel) -> str:
    """A bank-folder name unique to a surrogate's run: its registry path below the dataset, flattened
    (``standard__lenet__none-15b738de__s0``, :func:`trigact.models.deployed.run_id`); an ensemble's
    ``ensemble-<hash8>``. The pipeline and ``trigact.attack`` use the same name, so each reuses the
    other's banks."""
    if isinstance(model, EnsembleModel):
        return model.name
    return run_id(model.meta)


def unfit_reason(attack_name: str, cfg: Mapping, conf_dir, ensemble: bool) -> str | None:
    """Why an attack cannot run on a surrogate (None when it can): a feature-level attack (its config has
    ``params.feature_layer``) or one that hooks a vision transformer's blocks, on an ensemble."""
    if not ensemble:
        return None
    if "feature_layer" in (cfg.get("params") or {}):
        return f"attack {attack_name!r} is feature-level (it needs one network's intermediate layer)"
    if getattr(attack_spec(attack_name, conf_dir), "surrogate", "any") == "vit":
        return f"attack {attack_name!r} hooks one vision transformer's blocks"
    return None


def check_attack_fits(surrogate_name: str, model, attack_name: str, cfg: Mapping, conf_dir) -> None:
    """Refuse, in one line, an attack that cannot run on this surrogate (:func:`unfit_reason`)."""
    reason = unfit_reason(attack_name, cfg, conf_dir, isinstance(model, EnsembleModel))
    if reason:
        raise TrigactError(
            f"{reason} and cannot run on ensemble surrogate {surrogate_name} ({model.name}): drop it, attack the "
            "members one by one, or (pipeline) set pipeline.skip_inapplicable=true to leave out such pairs"
        )


def unfit_pairs(surrogates: Mapping[str, DeployedModel], attacks: list[str], conf_dir,
                overrides: Mapping | None = None) -> dict[tuple[str, str], str]:
    """``(surrogate, attack) -> reason`` for every pair that cannot run (:func:`unfit_reason`)."""
    cfgs = {name: attack_config(conf_dir, name, overrides) for name in attacks}
    return {(s, a): reason for s, model in surrogates.items() for a, cfg in cfgs.items()
            if (reason := unfit_reason(a, cfg, conf_dir, isinstance(model, EnsembleModel)))}


def data_config_of(models: Mapping[str, DeployedModel]) -> dict:
    """The data config the runs were trained on; all of them must share the dataset and image shape."""
    seen = {}
    for name, model in models.items():
        config = model.meta.get("config") or {}
        data = config.get("data")
        if not data:
            raise TrigactError(f"run {name} ({model.meta.get('path')}) records no data config in its bundle")
        spec = model.meta.get("model") or {}
        seen[name] = (data.get("name"), spec.get("in_chans"), spec.get("image_size"), data)
    first_name, first = next(iter(seen.items()))
    for name, entry in seen.items():
        if entry[:3] != first[:3]:
            raise TrigactError(
                f"runs {first_name} and {name} were trained on different data "
                f"({first[0]} {first[1]}x{first[2]} vs {entry[0]} {entry[1]}x{entry[2]}); evaluate one dataset at a time"
            )
    return dict(first[3])


def evaluation_images(data_cfg: Mapping, n_eval: int | None, data_overrides: Mapping | None = None,
                      split: str = "test"):
    """The first ``n_eval`` images of ``split`` (``test``, or ``val``: carved out of the training data)
    of the dataset a run was trained on (``data_overrides``, e.g. ``{root: /scratch/fashion-mnist}``,
    when the data moved since training)."""
    from trigact.common.config import instantiate_named

    check_split(split)
    check_n_eval(n_eval)
    datamodule = instantiate_named(OmegaConf.create({**dict(data_cfg), **dict(data_overrides or {})}))
    datamodule.setup()
    images = getattr(datamodule, f"{split}_set", None)
    if images is None:
        raise TrigactError(f"split={split!r}: {type(datamodule).__name__} has no {split} split")
    if len(images) == 0:  # e.g. data.val_size=0: say so here, not as "the loader yielded no images"
        raise TrigactError(f"split={split!r}: the {split} split of {data_cfg.get('name')} is empty (data.val_size=0?)")
    return evaluation_subset(images, n_eval)


def _bank_keys(dataset_name, surrogates, attacks, conf_dir, overrides, seed, n_eval, split, data_overrides,
               skip=()):
    """(surrogate, attack) -> (attack config, bank key), derived alike for crafting and loading; the
    ``skip`` pairs are left out."""
    skip = set(skip)
    check_split(split)
    n_eval = check_n_eval(n_eval)
    # Every attack config first: a bad override is reported before anything reads a bundle.
    cfgs = {name: attack_config(conf_dir, name, overrides) for name in attacks}
    data = data_identity(data_config_of(surrogates), data_overrides)
    for surrogate_name, model in surrogates.items():  # before any bank is crafted
        for attack_name, cfg in cfgs.items():
            if (surrogate_name, attack_name) not in skip:
                check_attack_fits(surrogate_name, model, attack_name, cfg, conf_dir)
    keys = {}
    for surrogate_name, model in surrogates.items():
        sha = surrogate_sha256(model)
        ensemble = model.key_detail() if isinstance(model, EnsembleModel) else None
        for attack_name, cfg in cfgs.items():
            if (surrogate_name, attack_name) in skip:
                continue
            keys[(surrogate_name, attack_name)] = cfg, bank_key(
                dataset_name, bank_id(model), attack_name, cfg, cfg["eps"], cfg["steps"],
                data=data, split=split, n_eval=n_eval, seed=seed, surrogate_sha256=sha,
                surrogate_ensemble=ensemble,
            )
    return keys


def craft_banks(
    root, dataset_name: str, dataset, surrogates: Mapping[str, DeployedModel], attacks: list[str],
    conf_dir, overrides: Mapping | None = None, batch_size: int = 128, progress: bool = True, seed: int = 0,
    *, n_eval: int | None = None, split: str = "test", data_overrides: Mapping | None = None, skip=(),
) -> dict[tuple[str, str], Bank]:
    """One bank per (surrogate, attack); existing complete banks are reused, never redone.

    ``surrogates``: table name -> deployed model; a bank's folder is named by the surrogate's run
    (:func:`bank_id`), so every entry point finds the same banks whatever the table calls them.
    ``dataset``: the images of ``split`` of the surrogates' data config with ``data_overrides`` on
    top (:func:`evaluation_images`); its first ``n_eval`` are used. The key records these settings,
    so :func:`load_banks` with the same arguments finds the banks. ``skip``: ``(surrogate, attack)``
    pairs to leave out (e.g. :func:`unfit_pairs`); without it such a pair is refused in one line.

    Random starts and input diversity draw from the global RNGs, which are re-seeded with ``seed``
    before each bank, so a bank does not depend on what ran before it in the process.
    """
    keys = _bank_keys(dataset_name, surrogates, attacks, conf_dir, overrides, seed, n_eval, split, data_overrides,
                      skip)
    dataset = evaluation_subset(dataset, n_eval)
    banks = {}
    for (surrogate_name, attack_name), (cfg, key) in keys.items():
        model = surrogates[surrogate_name]
        L.seed_everything(seed, verbose=False)
        attack = attack_from_config(cfg, model)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        banks[(surrogate_name, attack_name)] = ensure_bank(
            root, dataset_name, bank_id(model), None if isinstance(model, EnsembleModel) else model.meta.get("path"),
            model, attack_name, attack,
            attack.config, cfg["eps"], cfg["steps"], loader, progress=progress, key=key,
        )
    return banks


def load_banks(root, dataset_name: str, surrogates: Mapping[str, DeployedModel], attacks: list[str], conf_dir,
               overrides: Mapping | None = None, *, seed: int = 0, n_eval: int | None = None, split: str = "test",
               data_overrides: Mapping | None = None, skip=()) -> dict[tuple[str, str], Bank]:
    """The existing complete banks of every (surrogate, attack), found by the key :func:`craft_banks`
    gives the same arguments; a missing one is a one-line error saying how to make it
    (``trigact.evaluate`` scores, it never crafts)."""
    banks = {}
    keys = _bank_keys(dataset_name, surrogates, attacks, conf_dir, overrides, seed, n_eval, split, data_overrides,
                      skip)
    for (surrogate_name, attack_name), (_, key) in keys.items():
        path = bank_path(root, key)
        if not (path / "meta.json").is_file():
            raise TrigactError(
                f"no TAE bank for surrogate {surrogate_name} and attack {attack_name} at {path}: craft it first "
                f"with python -m trigact.attack (same surrogates, attacks, overrides, seed={seed}, "
                f"n_eval={n_eval}, split={split})"
            )
        banks[(surrogate_name, attack_name)] = load_bank(path, key)
    check_same_images(banks)
    return banks


def check_same_images(banks: Mapping[tuple[str, str], Bank]) -> None:
    """Every bank must hold the same clean images, or the cells of one table would not compare."""
    items = list(banks.items())
    if not items:
        return
    (first_key, first), rest = items[0], items[1:]
    first_clean = stored_images(first, clean=True)  # uint8 as stored: compared without a float copy
    for key, bank in rest:
        clean = stored_images(bank, clean=True)
        if (len(bank) != len(first) or not torch.equal(bank.y, first.y) or clean.shape != first_clean.shape
                or clean.dtype != first_clean.dtype or not torch.equal(clean, first_clean)):
            raise TrigactError(
                f"TAE banks {first_key} and {key} hold different clean images ({len(first)} vs {len(bank)}): "
                "they were crafted with different n_eval or data; craft them again with one setting"
            )
