"""The plots of a run's report and of an experiment's results, drawn once here (matplotlib, Agg).

:class:`Figures` writes PNGs into a folder and remembers (title, file name) of each, for Markdown and HTML.
The drawing functions take plain data: lines over labelled points, stacked bucket bars, a flow matrix between
buckets, per-step series.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from stagewise_pl.buckets import BUCKET_ORDER

BUCKET_COLORS = {"easy": "#4caf50", "medium": "#ffb300", "hard": "#e53935"}


class PlotError(ValueError):
    """Plots cannot be drawn (matplotlib is missing)."""


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("the plots need matplotlib: pip install -e '.[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Figures:
    """PNG files written into ``out``: ``made`` lists (title, file name) in order."""

    def __init__(self, out: Path):
        self.out, self.plt, self.made = Path(out), pyplot(), []

    def figure(self, width: float, height: float, rows: int = 1, cols: int = 1):
        return self.plt.subplots(rows, cols, figsize=(width, height), squeeze=False)

    def save(self, fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(self.out / name, dpi=90)
        self.plt.close(fig)
        self.made.append((title, name))

    def grid(self, count: int, cell_w: float = 3.1, cell_h: float = 2.8):
        """A figure of ``count`` panels, at most four a row; unused panels hidden."""
        cols = min(4, max(1, count))
        rows = -(-count // cols) if count else 1
        fig, axes = self.figure(cell_w * cols, cell_h * rows, rows, cols)
        for ax in axes.flat[count:]:
            ax.set_visible(False)
        return fig, list(axes.flat)


def bucket_bars(ax, labels: Sequence[str], values: dict[str, Sequence[float]], rotate: bool = False) -> None:
    """Stacked bars of the buckets at each label; ``values[bucket]`` per label."""
    bottom = [0.0] * len(labels)
    for bucket in BUCKET_ORDER:
        heights = [v or 0.0 for v in values[bucket]]
        ax.bar(range(len(labels)), heights, bottom=bottom, color=BUCKET_COLORS[bucket], label=bucket)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(labels)), labels, rotation=60 if rotate else 0, fontsize=6 if rotate else 8)


def flow_matrix(ax, matrix: dict, xlabel: str, ylabel: str, title: str, fontsize: int = 10) -> None:
    """``matrix[from][to]`` counts of problems between buckets, as a heat map with the counts written in."""
    grid = [[matrix[x][y] for y in BUCKET_ORDER] for x in BUCKET_ORDER]
    ax.imshow(grid, cmap="Blues")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=fontsize)
    ax.set_xticks(range(3), BUCKET_ORDER, fontsize=7)
    ax.set_yticks(range(3), BUCKET_ORDER, fontsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)


def series(ax, values: Sequence[Optional[float]], xlabel: str, ylabel: str, title: str, smooth: int = 1,
           label: Optional[str] = None) -> None:
    """A per-step series (None where a step has no value), optionally as a running mean of ``smooth`` steps."""
    points = [(i + 1, v) for i, v in enumerate(values) if v is not None]
    ys = [p[1] for p in points]
    if smooth > 1:
        ys = [sum(ys[max(0, i - smooth + 1):i + 1]) / len(ys[max(0, i - smooth + 1):i + 1]) for i in range(len(ys))]
    ax.plot([p[0] for p in points], ys, marker="." if smooth == 1 else None, linewidth=1.2, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
