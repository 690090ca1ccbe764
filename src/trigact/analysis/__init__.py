"""Figures and tables drawn from finished results (sweeps over eps_t or alpha)."""

from trigact.analysis.sweep import SweepPoint, plot_sweep, sweep_points, sweep_table

__all__ = ["SweepPoint", "plot_sweep", "sweep_points", "sweep_table"]
