"""``python -m trigact.analysis.triggers runs=[...]``: the triggers of trained runs side by side (the
paper's Fig. 3) and their magnitudes (its Table XI).

``runs`` is anything :func:`trigact.runs.selection.select` takes (bundle files, run folders, globs,
sweep folders); every run must have a trigger (the ones that do not are refused, named in one line).
Writes to ``results_dir`` (default ``outputs/analysis/triggers/<name>``):

- ``triggers.png``: one panel per run, tau amplified for visibility as ``0.5 + tau * (0.5 / max|tau|)``
  (grey is 0; grayscale for 1 channel, RGB for 3), titled with the run's label and the scale; with
  ``show_example`` (default) a second row with the run's first clean test image beside the same image
  with tau added, unamplified (``clamp(x + tau, 0, 1)``, what the network sees).
- ``triggers.md`` / ``triggers.json``: per run its kind, eps_t or alpha, ``max|tau|`` and ``mean|tau|``
  in 255ths, ``MSE(0, tau)`` in units of 1e-2 (Table XI; :func:`trigact.triggers.trigger_stats`) and the fraction of
  nonzero coordinates.

A fixed trigger of bound eps_t is ``+-eps_t`` everywhere, so its MSE is eps_t^2: Table XI's 6.30e-2
for "Ours (fixed)" is ``(64/255)^2``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from trigact.cli import quiet_libraries, user_errors
from trigact.common.config import CONF_DIR
from trigact.common.errors import TrigactError
from trigact.common.io import atomic_save_figure, atomic_write_json, atomic_write_text
from trigact.runs import in_255ths, register_resolvers
from trigact.triggers import trigger_stats

register_resolvers()  # ${trigact_launch:...} in the default results folder's name

COLUMNS = ("run", "method", "kind", "eps/alpha", "max abs(tau) (/255)", "mean abs(tau) (/255)", "MSE(0, tau) (1e-2)",
           "nonzero")


def trigger_magnitudes(tau: torch.Tensor) -> dict:
    """:func:`trigact.triggers.trigger_stats` (what every summary reports) in this table's units: max
    and mean ``|tau|`` in 255ths, ``MSE(0, tau)`` as is and in 1e-2 (Table XI), the nonzero fraction."""
    stats = trigger_stats(tau)
    return {"shape": list(tau.shape), "max_abs_255": stats["trigger_linf"] * 255,
            "mean_abs_255": float(tau.detach().double().abs().mean()) * 255, "mse": stats["trigger_mse"],
            "mse_1e-2": 100 * stats["trigger_mse"], "nonzero_fraction": stats["trigger_nonzero"]}


def trigger_budget(meta: dict) -> str:
    """The trigger's bound as its config gives it: ``eps 64/255``, ``alpha 16/255``, ``k 0.05 eps 64/255``."""
    trigger = (meta.get("config") or {}).get("trigger") or {}
    parts = []
    if trigger.get("k") is not None:
        parts.append(f"k {trigger['k']}")
    for key in ("eps", "alpha"):
        if trigger.get(key) is not None:
            parts.append(f"{key} {in_255ths(trigger[key])}/255")
    return " ".join(parts) or "-"


def trigger_kind(meta: dict) -> str:
    return str(meta.get("trigger_kind") or ((meta.get("config") or {}).get("trigger") or {}).get("kind") or "-")


def amplified(tau: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(0.5 + tau * (0.5 / max|tau|), 0.5 / max|tau|)``: tau stretched to fill [0, 1], grey at 0."""
    peak = float(tau.detach().abs().max())
    gain = 0.5 / peak if peak > 0 else 1.0
    return (0.5 + tau.detach().float() * gain).clamp(0, 1), gain


def _image(t: torch.Tensor):
    """(C, H, W) in [0, 1] -> what ``imshow`` takes: (H, W) for one channel, (H, W, 3) for three."""
    t = t.detach().cpu().float().clamp(0, 1)
    if t.shape[0] == 1:
        return t[0].numpy()
    if t.shape[0] == 3:
        return t.permute(1, 2, 0).numpy()
    raise TrigactError(f"a trigger of {t.shape[0]} channels cannot be drawn (1 or 3 only)")


def side_by_side(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``x`` and ``clamp(x + tau, 0, 1)`` (unamplified) in one image, a white gap between them."""
    gap = torch.ones(x.shape[0], x.shape[1], max(1, x.shape[2] // 14))
    return torch.cat([x, gap, (x + tau).clamp(0, 1)], dim=2)


def trigger_runs(models: dict) -> dict:
    """``models`` with each one's trigger; refuses, in one line naming them, runs without one."""
    bad = [label for label, model in models.items() if getattr(model, "trigger", None) is None]
    if bad:
        raise TrigactError(f"runs without a trigger (nothing to draw): {'; '.join(bad)}; "
                           "give trigger-activation runs only")
    return models


def example_image(model, data_overrides: dict | None = None) -> torch.Tensor:
    """The run's first clean test image (C, H, W) in [0, 1]."""
    from trigact.evaluation.crafting import data_config_of, evaluation_images

    dataset = evaluation_images(data_config_of({"run": model}), 1, data_overrides, split="test")
    return dataset[0][0]


def panel_title(label: str, model) -> str:
    """The run's label (architecture, trigger kind and bound, seed), then its method and dataset."""
    meta = model.meta
    data = ((meta.get("config") or {}).get("data") or {}).get("name", "")
    return f"{label}, {meta.get('method', '')}{', ' + data if data else ''}"


def plot_triggers(entries: list[dict], path, title: str = "") -> Path:
    """One column per run: its amplified tau, and (when an entry holds ``example``) below it the clean
    image beside the triggered one. ``entries``: dicts with ``label``, ``title``, ``tau`` and optionally
    ``example``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = 2 if any(e.get("example") is not None for e in entries) else 1
    n = len(entries)
    # The example row is two images wide: about half the height of the trigger row.
    fig = Figure(figsize=(2.6 * n, 3.2 + 1.6 * (rows - 1) + (0.3 if title else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, n, squeeze=False, gridspec_kw={"height_ratios": [1, 0.55][:rows]})
    for i, entry in enumerate(entries):
        tau = entry["tau"]
        shown, gain = amplified(tau)
        ax = axes[0][i]
        ax.imshow(_image(shown), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(entry["title"], 34, break_long_words=False)), fontsize=7)
        peak = float(tau.abs().max()) * 255
        ax.set_xlabel(f"x{gain:.3g}, max|tau| = {peak:.3g}/255", fontsize=7)
        if rows == 2:
            ax2 = axes[1][i]
            if entry.get("example") is not None:
                ax2.imshow(_image(side_by_side(entry["example"], tau)), cmap="gray", vmin=0, vmax=1,
                           interpolation="nearest")
                ax2.set_xlabel("x   |   clamp(x + tau, 0, 1)", fontsize=7)
            else:
                ax2.axis("off")
        for a in axes[:, i]:
            a.set_xticks([])
            a.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return atomic_save_figure(fig, path, dpi=150)


def _row(label: str, model) -> dict:
    stats = trigger_magnitudes(model.trigger)
    return {"run": label, "method": model.meta.get("method"), "kind": trigger_kind(model.meta),
            "eps/alpha": trigger_budget(model.meta), "max abs(tau) (/255)": stats["max_abs_255"],
            "mean abs(tau) (/255)": stats["mean_abs_255"], "MSE(0, tau) (1e-2)": stats["mse_1e-2"],
            "nonzero": stats["nonzero_fraction"], "bundle": model.meta.get("path"), "stats": stats}


def triggers_table(rows: list[dict]) -> str:
    def show(value):
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|---|" + "---:|" * (len(COLUMNS) - 4)]
    lines += ["| " + " | ".join(show(row[c]) for c in COLUMNS) + " |" for row in rows]
    note = ("\nMSE(0, tau) = mean of tau^2 over all coordinates, pixels in [0, 1], in units of 1e-2 "
            "(the paper's Table XI); nonzero: the fraction of tau's coordinates that are not 0.\n")
    return "\n".join(lines) + "\n" + note


def run_triggers(cfg: DictConfig) -> tuple[Path, Path]:
    from trigact.runs.selection import select

    out = Path(cfg.results_dir)
    models = select(cfg, "runs")
    ensembles = [label for label, model in models.items() if not hasattr(model, "net")]
    if ensembles:
        raise TrigactError(f"runs: {'; '.join(ensembles)} is an ensemble; give single runs")
    trigger_runs(models)
    overrides = dict(cfg.get("data_overrides") or {})
    entries, rows = [], []
    for label, model in models.items():
        example = example_image(model, overrides) if cfg.show_example else None
        entries.append({"label": label, "title": panel_title(label, model), "tau": model.trigger.detach().cpu(),
                        "example": example})
        rows.append(_row(label, model))
    figure = plot_triggers(entries, out / "triggers.png", cfg.get("title") or "")
    table = atomic_write_text(triggers_table(rows), out / "triggers.md")
    atomic_write_json({"runs": rows,
                       "show_example": bool(cfg.show_example)}, out / "triggers.json")
    return table, figure


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="triggers")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    with user_errors():
        table, figure = run_triggers(cfg)
        print(table.read_text())
        print(f"figure: {figure.resolve()}\ntable: {table.resolve()}")


if __name__ == "__main__":
    main()
