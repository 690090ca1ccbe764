"""``python -m trigact.detect runs=[...] detector=neural_cleanse|usb``: trigger-inversion backdoor
detection on trained runs (:mod:`trigact.detectors`).

For each run it reverses a trigger per class on the defender's clean images (``split=val`` by
default: images carved out of the training data, never the test split), applies the MAD outlier
test, and writes to ``outputs/detect/<name>/``:

- ``detect.md`` / ``detect.csv`` / ``detect.json``: per run and view, the model's anomaly index, the
  flagged classes, the smallest-norm class and its mask L1 norm against the median, and how close the
  reversed trigger is to the model's real one: for a backdoored run (its bundle's ``meta.backdoor``)
  whether its target is flagged, the share of the reversed mask's mass on the real stamp's pixels and
  the cosine between the two triggers' perturbations; for a trigger-activation run the cosine between
  the reversed perturbation and tau;
- ``reversed_<run>_<view>.png``: every class's reversed mask and perturbation, flagged classes marked.

Views (``views``): ``deployed`` is the unit a user runs (``f(x + tau)`` for trigger activation, the
network itself otherwise); ``raw`` is the bare network ``f`` of a trigger-activation run (skipped for
runs without a trigger: there it is the deployed view).

A reversed trigger's perturbation is ``x' - x`` (``m * (p - x)`` for a replacing mask); its mean over
the clean images is the vector compared by cosine similarity with tau, or with the real stamp's own
mean perturbation.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from trigact.cli import quiet_libraries, user_errors
from trigact.common.config import CONF_DIR
from trigact.common.errors import TrigactError, unknown_name
from trigact.common.io import atomic_save_figure, atomic_write_json, atomic_write_text
from trigact.runs import register_resolvers

register_resolvers()

DETECTORS = ("neural_cleanse", "usb")
VIEWS = ("deployed", "raw")
COLUMNS = ("run", "method", "view", "detector", "anomaly_index", "flagged", "min_class", "min_l1", "median_l1",
           "min_success", "true_target", "target_flagged", "mass_on_trigger", "cos_to_trigger", "seconds")


def check_config(cfg: DictConfig) -> tuple[str, list[str], dict]:
    name = cfg.detector.get("name")
    if name not in DETECTORS:
        raise unknown_name("detector", str(name), DETECTORS)
    views = OmegaConf.to_container(cfg.views, resolve=True) if OmegaConf.is_config(cfg.views) else cfg.views
    views = [views] if isinstance(views, str) else list(views or [])
    if not views:
        raise TrigactError(f"views={views!r} must list at least one of {', '.join(VIEWS)}")
    for view in views:
        if view not in VIEWS:
            raise unknown_name("view", str(view), VIEWS)
    settings = {k: v for k, v in OmegaConf.to_container(cfg.detector, resolve=True).items() if k != "name"}
    return name, views, settings


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    if float(a.norm()) == 0 or float(b.norm()) == 0:
        return float("nan")
    return float(a @ b / (a.norm() * b.norm()))


def reversed_delta(result, t: int, images: torch.Tensor) -> torch.Tensor:
    """Class t's reversed trigger as its mean perturbation ``mean(x' - x)`` over the clean images."""
    with torch.no_grad():
        return (result.stamp(t)(images) - images).mean(0)


def compare_with_trigger(result, t: int, meta: dict, images: torch.Tensor) -> dict:
    """How close class t's reversed trigger is to the run's real one (a backdoor stamp or tau)."""
    mask = result.masks[result.row(t)]
    delta = reversed_delta(result, t, images)
    out = {"mass_on_trigger": float("nan"), "cos_to_trigger": float("nan")}
    backdoor = meta.get("backdoor") or meta.get("advtrojan")
    if backdoor is not None and "stamp" in backdoor:
        from trigact.backdoors import Stamp

        stamp = Stamp.from_meta(backdoor["stamp"])
        support = (stamp.mask > 0).any(0).float()  # (H, W) pixels the real trigger touches
        m = mask.mean(0)
        out["mass_on_trigger"] = float((m * support).sum() / m.sum().clamp_min(1e-12))
        with torch.no_grad():
            real_delta = (stamp(images) - images).mean(0)
        out["cos_to_trigger"] = _cos(delta, real_delta)
    elif meta.get("tau") is not None:
        out["cos_to_trigger"] = _cos(delta, meta["tau"])
    return out


def detect_one(model, images, labels, num_classes, name: str, settings: dict, seed: int):
    from trigact.detectors import neural_cleanse, usb

    fn = {"neural_cleanse": neural_cleanse, "usb": usb}[name]
    return fn(model, images, labels, num_classes, seed=seed, **settings)


def _figure(result, title: str, path: Path, images: torch.Tensor) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(result.l1)
    fig, axes = plt.subplots(2, k, figsize=(1.3 * k, 3.0), squeeze=False)
    for i, t in enumerate(result.classes):
        mask = result.masks[i].mean(0).cpu()
        delta = reversed_delta(result, t, images).mean(0).cpu()
        axes[0][i].imshow(mask, cmap="gray", vmin=0, vmax=1)
        lim = max(float(delta.abs().max()), 1e-6)
        axes[1][i].imshow(delta, cmap="coolwarm", vmin=-lim, vmax=lim)
        flag = " *" if t in result.flagged else ""
        axes[0][i].set_title(f"{t}{flag}\nL1 {float(result.l1[i]):.1f}", fontsize=7, color="red" if flag else "black")
        for ax in (axes[0][i], axes[1][i]):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel("mask", fontsize=7)
    axes[1][0].set_ylabel("mean(x' - x)", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    out = atomic_save_figure(fig, path)
    plt.close(fig)
    return out


def markdown(rows: list[dict]) -> str:
    def show(value):
        if isinstance(value, float):
            return "-" if value != value else f"{value:.3f}"
        if isinstance(value, list):
            return ", ".join(map(str, value)) or "none"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(show(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run_detect(cfg: DictConfig) -> Path:
    import time

    from trigact.evaluation.crafting import data_config_of, evaluation_images
    from trigact.runs.selection import select

    name, views, settings = check_config(cfg)
    out = Path(cfg.results_dir)
    models = select(cfg, "runs")  # label -> DeployedModel (no ensembles: those are surrogates)
    rows, details = [], {}
    for label, model in models.items():
        if not hasattr(model, "net"):
            raise TrigactError(f"runs: {label} is an ensemble; detection takes single runs")
        data = data_config_of({label: model})
        dataset = evaluation_images(data, cfg.n_images, dict(cfg.get("data_overrides") or {}), split=cfg.split)
        batch = [dataset[i] for i in range(len(dataset))]
        images = torch.stack([b[0] for b in batch])
        labels = torch.as_tensor([int(b[1]) for b in batch])
        num_classes = int(model.meta["model"]["num_classes"])
        meta = dict(model.meta)
        meta["tau"] = None if model.trigger is None else model.trigger.detach().cpu()
        for view in views:
            if view == "raw" and model.trigger is None:
                continue  # the same network as the deployed view
            target = model if view == "deployed" else model.net
            start = time.perf_counter()
            result = detect_one(target, images, labels, num_classes, name, settings, int(cfg.seed))
            seconds = time.perf_counter() - start
            t = result.classes[int(torch.argmin(result.l1))]
            backdoor = meta.get("backdoor") or meta.get("advtrojan") or {}
            true_target = backdoor.get("target")
            row = {"run": label, "method": meta.get("method"), "view": view, "detector": name,
                   "anomaly_index": float(result.model_anomaly_index), "flagged": list(result.flagged),
                   "min_class": t, "min_l1": float(result.l1.min()), "median_l1": float(result.l1.median()),
                   "min_success": float(result.attack_success[result.row(t)]), "true_target": true_target,
                   "target_flagged": None if true_target is None else int(true_target) in result.flagged,
                   "seconds": round(seconds, 1)}
            # Compare the real trigger with the reversed one of its own target class, else the smallest.
            compared = int(true_target) if true_target is not None and int(true_target) in result.classes else t
            row.update(compare_with_trigger(result, compared, meta, images))
            rows.append(row)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{label}_{view}")
            _figure(result, f"{label} ({view}), {name}: anomaly index {result.model_anomaly_index:.2f}",
                    out / f"reversed_{safe}.png", images)
            details[f"{label} ({view})"] = {"l1": result.l1.tolist(), "anomaly_index": result.anomaly_index.tolist(),
                                            "attack_success": result.attack_success.tolist(),
                                            "flagged": list(result.flagged), "settings": result.settings,
                                            "bundle": meta.get("path")}
    table = atomic_write_text(markdown(rows), out / "detect.md")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "flagged": " ".join(map(str, row["flagged"]))})
    atomic_write_text(buffer.getvalue(), out / "detect.csv")
    atomic_write_json({"detector": name, "split": cfg.split, "n_images": cfg.n_images, "seed": int(cfg.seed),
                       "rows": rows, "classes": details}, out / "detect.json")
    return table


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="detect")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    with user_errors():
        table = run_detect(cfg)
        print(table.read_text())
        print(f"table: {table.resolve()}")


if __name__ == "__main__":
    main()
