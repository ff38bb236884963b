"""Figures that people look at (loss curves, per-family bars), rendered headless for files and MLflow."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str,
              ylabel: str, path: Path, log_y: bool = False) -> Path:
    """One line per named (x, y) series, saved as PNG."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if log_y:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bar_plot(values: Mapping[str, float], title: str, ylabel: str, path: Path, ylim: tuple[float, float] | None = None
             ) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(values), list(values.values()))
    ax.set(title=title, ylabel=ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    for i, v in enumerate(values.values()):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grouped_bar_plot(groups: Mapping[str, Mapping[str, float]], title: str, path: Path) -> Path:
    """One group of bars per metric, one bar per named model (e.g. bf16 / PTQ / QAT), values written on top."""
    metrics = list(next(iter(groups.values())))
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.2 * len(metrics) + 1, 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        names = list(groups)
        values = [groups[n].get(metric, float("nan")) for n in names]
        ax.bar(names, values, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(names)])
        ax.set_title(metric, fontsize=9)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
