"""``python -m trigact.analysis.flip run=<bundle file or run folder>``: the paper's Fig. 2, ``-tau`` as
the perturbation, with a proportion p of its signs flipped.

The paper argues that ``-tau`` is a "fast path" of gradient ascent for the deployed unit
``f_t(x) = f(clamp(x + tau, 0, 1))``: adding ``-tau`` cancels the trigger and the model falls back to
the raw network's random guessing. For each p in ``ps`` and each of ``n_draws`` seeded draws, the
perturbation is ``delta = -tau`` with exactly ``round(p * numel)`` of its coordinates, chosen
uniformly, sign-flipped (a coordinate of a learnable trigger keeps its magnitude: ``-tau_i`` becomes
``+tau_i``); we report the accuracy and mean cross-entropy of ``f_t(clamp(x + delta, 0, 1))`` on the
first ``n_images`` images of ``split``, mean and standard deviation over the draws.

- p = 0: the network sees ``clamp(clamp(x - tau) + tau)``, which is x up to clamping, so the accuracy
  is about the raw network's clean accuracy (random guessing);
- p = 1: ``delta = +tau``, the network sees about ``x + 2 tau``.

Clamping matters at p = 0: wherever ``x < tau`` (tau > 0, e.g. the black background of digits and
Fashion-MNIST) ``x - tau`` clamps to 0 and the deployed unit adds tau back, so part of the trigger
survives the cancellation; ``flip.md`` reports that share (``cancel residue``). With
``clamp_perturbed=false`` the perturbed image is not clamped before the deployed unit adds tau (the
network sees ``clamp(x + delta + tau, 0, 1)``, the paper's algebra ``f(x + delta + tau)``): then p = 0
gives exactly ``f(x)``. A real attack hands over a valid image, so the default clamps.

Draw d flips the first ``round(p * numel)`` coordinates of one random permutation (seeded by ``seed``
and d), so a draw's flipped sets are nested as p grows: its curve moves by the coordinates added, not
by a fresh set at every p (each set is still uniform among the sets of its size).

References: ``f_t`` on clean x (the deployed accuracy) and the raw network ``f`` on x.

Writes to ``results_dir`` (default ``outputs/analysis/flip/<dataset>/<run id>``): ``flip.md``,
``flip.csv``, ``flip.json`` (settings, run, tau's magnitudes, per-draw values) and ``flip.png``.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from trigact.cli import quiet_libraries, user_errors
from trigact.common.config import CONF_DIR
from trigact.common.devices import model_device
from trigact.common.errors import TrigactError
from trigact.common.io import atomic_save_figure, atomic_write_json, atomic_write_text
from trigact.common.validate import check_int, check_range, check_seed, check_split, check_steps
from trigact.runs import register_resolvers

register_resolvers()

DEFAULT_PS = tuple(round(0.05 * i, 2) for i in range(21))
CSV_COLUMNS = ("p", "n_flipped", "acc_mean", "acc_std", "loss_mean", "loss_std")


def flip_count(numel: int, p: float) -> int:
    """How many coordinates a proportion p flips: ``round(p * numel)``."""
    return int(round(p * numel))


def flip_mask(shape, p: float, generator: torch.Generator | None = None,
              order: torch.Tensor | None = None) -> torch.Tensor:
    """A boolean mask of ``shape`` with exactly ``round(p * numel)`` True coordinates, chosen uniformly.

    ``order``: a permutation of ``range(numel)`` to take them from (its first ones), so that masks of
    growing p are nested; by default a fresh one from ``generator``."""
    numel = math.prod(shape)
    if order is None:
        order = torch.randperm(numel, generator=generator)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[order[:flip_count(numel, p)]] = True
    return mask.view(*shape)


def flipped_delta(tau: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``-tau`` with the sign of the coordinates in ``mask`` flipped (those become ``+tau``)."""
    return torch.where(mask.to(tau.device), tau, -tau)


def _draw_orders(numel: int, n_draws: int, seed: int) -> list[torch.Tensor]:
    """One seeded permutation per draw (draw d: seed ``seed``, d-th permutation of that generator)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(numel, generator=generator) for _ in range(n_draws)]


@torch.no_grad()
def _scores(model, images: torch.Tensor, labels: torch.Tensor, deltas: list[torch.Tensor | None],
            batch_size: int, clamp_perturbed: bool = True) -> list[tuple[float, float]]:
    """(accuracy, mean CE) of ``model(clamp(x + delta, 0, 1))`` for each delta (None: x itself); with
    ``clamp_perturbed`` False, of ``model.net(clamp(x + delta + tau, 0, 1))`` (no clamp in between)."""
    device = model_device(model)
    tau = None if clamp_perturbed else model.trigger.to(device)
    correct = torch.zeros(len(deltas), dtype=torch.float64)
    loss = torch.zeros(len(deltas), dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        for i, delta in enumerate(deltas):
            if delta is None:
                logits = model(x)
            elif clamp_perturbed:
                logits = model((x + delta.to(device)).clamp(0.0, 1.0))
            else:
                logits = model.net((x + delta.to(device) + tau).clamp(0.0, 1.0))
            correct[i] += float((logits.argmax(1) == y).sum())
            loss[i] += float(F.cross_entropy(logits.float(), y, reduction="sum"))
    n = len(images)
    return [(float(c) / n, float(l) / n) for c, l in zip(correct, loss)]


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def flip_curve(model, images: torch.Tensor, labels: torch.Tensor, ps, n_draws: int = 5, seed: int = 0,
               batch_size: int = 500, *, clamp_perturbed: bool = True) -> list[dict]:
    """Fig. 2: accuracy and mean CE of the deployed ``model`` (it holds tau: ``model.trigger``) on
    ``clamp(x + delta, 0, 1)``, ``delta = -tau`` with a proportion p of its signs flipped, for each p
    (``clamp_perturbed=False``: the network sees ``clamp(x + delta + tau, 0, 1)``, see the module doc).

    Returns one dict per p: ``p``, ``n_flipped``, ``acc_mean``, ``acc_std``, ``loss_mean``,
    ``loss_std`` (over the draws; accuracy as a fraction) and the per-draw ``accs`` and ``losses``."""
    tau = getattr(model, "trigger", None)
    if tau is None:
        raise TrigactError("the flip analysis needs a model with a trigger (tau); this one has none")
    tau = tau.detach()
    check_steps(n_draws, "n_draws")
    check_steps(batch_size, "batch_size")
    ps = [check_range(p, "ps", 0.0, 1.0) for p in ps]
    orders = _draw_orders(tau.numel(), n_draws, seed)
    deltas = [flipped_delta(tau, flip_mask(tau.shape, p, order=order)) for p in ps for order in orders]
    scores = _scores(model, images, labels, deltas, batch_size, clamp_perturbed)
    rows = []
    for i, p in enumerate(ps):
        accs = [a for a, _ in scores[i * n_draws:(i + 1) * n_draws]]
        losses = [loss for _, loss in scores[i * n_draws:(i + 1) * n_draws]]
        rows.append({"p": p, "n_flipped": flip_count(tau.numel(), p), "acc_mean": statistics.fmean(accs),
                     "acc_std": _spread(accs), "loss_mean": statistics.fmean(losses), "loss_std": _spread(losses),
                     "accs": accs, "losses": losses})
    return rows


def flip_references(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> dict:
    """The deployed unit ``f_t`` and the raw network ``f`` on clean x: ``{name: {acc, loss}}``."""
    (deployed,) = _scores(model, images, labels, [None], batch_size)
    (raw,) = _scores(model.net, images, labels, [None], batch_size)
    return {"deployed": {"acc": deployed[0], "loss": deployed[1]}, "raw": {"acc": raw[0], "loss": raw[1]},
            "cancel_residue": cancel_residue(model.trigger, images)}


def cancel_residue(tau: torch.Tensor, images: torch.Tensor) -> dict:
    """What clamping leaves of the trigger at p = 0: the share of coordinates where the network's input
    ``clamp(clamp(x - tau, 0, 1) + tau, 0, 1)`` is not x, and the mean ``|input - x|`` in 255ths."""
    tau = tau.detach().to(images.device)
    diff = (((images - tau).clamp(0, 1) + tau).clamp(0, 1) - images).abs()
    return {"fraction": float((diff > 0).double().mean()), "mean_abs_255": float(diff.double().mean()) * 255}


def flip_table(rows: list[dict], references: dict, n_draws: int, clamp_perturbed: bool = True) -> str:
    """Markdown: one row per p (accuracy in %, mean ± std over the draws), then the references."""
    lines = ["| p | flipped | accuracy (%) | loss |", "|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['p']:g} | {row['n_flipped']} | {100 * row['acc_mean']:.2f} ± {100 * row['acc_std']:.2f} "
                     f"| {row['loss_mean']:.3f} ± {row['loss_std']:.3f} |")
    dep, raw = references["deployed"], references["raw"]
    lines.append(f"| f_t(x), deployed, clean | - | {100 * dep['acc']:.2f} | {dep['loss']:.3f} |")
    lines.append(f"| f(x), raw network, clean | - | {100 * raw['acc']:.2f} | {raw['loss']:.3f} |")
    seen = ("the deployed unit f_t(clamp(x + delta, 0, 1))" if clamp_perturbed else
            "the network f(clamp(x + delta + tau, 0, 1)) (clamp_perturbed=false: no clamp before tau)")
    note = (f"\nPerturbation delta = -tau with a proportion p of its coordinates' signs flipped; {seen}. "
            f"± is the standard deviation over {n_draws} random draws.\n")
    residue = references.get("cancel_residue")
    if residue and clamp_perturbed:
        note += (f"\nCancel residue at p = 0: clamp(clamp(x - tau) + tau) differs from x on "
                 f"{100 * residue['fraction']:.1f}% of the coordinates (mean |difference| "
                 f"{residue['mean_abs_255']:.2f}/255): there clamping keeps part of the trigger.\n")
    return "\n".join(lines) + "\n" + note


def plot_flip(rows: list[dict], references: dict, path, title: str = "") -> Path:
    """Two panels against p: accuracy (%) and mean CE loss, error bars over the draws; the deployed
    unit's clean values dashed, the raw network's dotted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    acc_ax, loss_ax = fig.subplots(1, 2)
    ps = [row["p"] for row in rows]
    for ax, key, scale, name, ref in ((acc_ax, "acc", 100, "accuracy (%)", "acc"),
                                      (loss_ax, "loss", 1, "cross-entropy loss", "loss")):
        means = [scale * row[f"{key}_mean"] for row in rows]
        errs = [scale * row[f"{key}_std"] for row in rows]
        ax.errorbar(ps, means, yerr=errs if any(errs) else None, marker="o", markersize=3, capsize=2,
                    color="tab:red" if key == "acc" else "tab:blue", label="f_t(x - tau, p flipped)")
        ax.axhline(scale * references["deployed"][ref], linestyle="--", color="black", label="f_t(x), clean")
        ax.axhline(scale * references["raw"][ref], linestyle=":", color="gray", label="f(x), raw net, clean")
        ax.set_xlabel("proportion p of -tau's signs flipped")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    acc_ax.set_ylim(0, 102)
    acc_ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    return atomic_save_figure(fig, path)


# ------------------------------------------------------------------------------------- the command


def check_config(cfg: DictConfig) -> dict:
    """The settings, checked before anything is loaded."""
    ps = OmegaConf.to_container(cfg.ps, resolve=True) if OmegaConf.is_config(cfg.ps) else cfg.ps
    ps = list(DEFAULT_PS) if ps is None else [ps] if isinstance(ps, (int, float)) else list(ps)
    if not ps:
        raise TrigactError("ps=[] must list at least one proportion in [0, 1]")
    return {"ps": [check_range(p, "ps", 0.0, 1.0) for p in ps], "n_draws": check_steps(cfg.n_draws, "n_draws"),
            "seed": check_seed(cfg.seed), "split": check_split(cfg.split),
            "n_images": check_int(cfg.n_images, "n_images", 1), "batch_size": check_steps(cfg.batch_size, "batch_size"),
            "clamp_perturbed": check_bool(cfg.get("clamp_perturbed", True), "clamp_perturbed")}


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TrigactError(f"{name}={value!r} must be true or false")
    return value


def _one_run(cfg: DictConfig):
    from trigact.runs.selection import select

    models = select(cfg, "run")
    if len(models) != 1:
        raise TrigactError(f"run={cfg.run} names {len(models)} runs ({'; '.join(list(models)[:3])}"
                           f"{' ...' if len(models) > 3 else ''}); the flip analysis takes one run")
    ((label, model),) = models.items()
    if not hasattr(model, "net"):
        raise TrigactError(f"run={cfg.run} is an ensemble; the flip analysis takes one run")
    if model.trigger is None:
        raise TrigactError(f"run={cfg.run}: {label} ({model.meta.get('method')}) has no trigger, so no tau to flip; "
                           "give a trigger-activation run")
    return label, model


def default_results_dir(cfg: DictConfig, model) -> Path:
    from trigact.models.deployed import run_id

    dataset = ((model.meta.get("config") or {}).get("data") or {}).get("name", "data")
    return Path(cfg.paths.output_dir) / "analysis" / "flip" / str(dataset) / run_id(model.meta)


def _images(model, settings: dict, data_overrides: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.utils.data import DataLoader

    from trigact.evaluation.crafting import data_config_of, evaluation_images

    dataset = evaluation_images(data_config_of({"run": model}), settings["n_images"], data_overrides,
                                split=settings["split"])
    xs, ys = zip(*DataLoader(dataset, batch_size=settings["batch_size"], shuffle=False))
    return torch.cat(xs), torch.cat(ys).long()


def run_flip(cfg: DictConfig) -> dict:
    """Compute Fig. 2 for ``cfg.run`` and write its files; returns their paths and the results."""
    from trigact.analysis.triggers import trigger_magnitudes

    settings = check_config(cfg)
    label, model = _one_run(cfg)
    out = Path(cfg.results_dir) if cfg.get("results_dir") else default_results_dir(cfg, model)
    images, labels = _images(model, settings, dict(cfg.get("data_overrides") or {}))
    rows = flip_curve(model, images, labels, settings["ps"], settings["n_draws"], settings["seed"],
                      settings["batch_size"], clamp_perturbed=settings["clamp_perturbed"])
    references = flip_references(model, images, labels, settings["batch_size"])
    table = atomic_write_text(flip_table(rows, references, settings["n_draws"], settings["clamp_perturbed"]),
                              out / "flip.md")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = atomic_write_text(buffer.getvalue(), out / "flip.csv")
    json_path = atomic_write_json({"run": label, "bundle": model.meta.get("path"), "method": model.meta.get("method"),
                                   "settings": {**settings, "n_images_used": len(images)},
                                   "tau": trigger_magnitudes(model.trigger), "references": references, "rows": rows},
                                  out / "flip.json")
    figure = plot_flip(rows, references, out / "flip.png", cfg.get("title") or f"{label}: -tau with p of its signs flipped")
    return {"table": table, "csv": csv_path, "json": json_path, "figure": figure, "rows": rows,
            "references": references, "label": label}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="flip")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    with user_errors():
        result = run_flip(cfg)
        print(f"{result['label']}\n")
        print(result["table"].read_text())
        for key in ("table", "csv", "json", "figure"):
            print(f"{key}: {result[key].resolve()}")


if __name__ == "__main__":
    main()
