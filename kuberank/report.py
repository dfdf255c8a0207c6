"""Tables and plots for the CLI and the demo report (Markdown + PNG)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

QUALITY_COLUMNS = ("ndcg@10", "mrr@10", "recall@100", "hit@10", "queries")


def format_table(rows: Sequence[dict], columns: Sequence[str], first: str = "model") -> str:
    """A Markdown table (also readable in a terminal)."""
    header = [first, *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [str(row.get(first, ""))]
        for col in columns:
            value = row.get(col, "")
            cells.append(f"{value:.4f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_plot(rows: Sequence[dict], metrics: Sequence[str], path: str | Path, title: str) -> Path:
    """Grouped bars: one group per metric, one bar per row (model)."""
    import matplotlib  # local: heavy, only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(metrics))
    for i, row in enumerate(rows):
        values = [float(row.get(m, 0.0)) for m in metrics]
        bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, label=str(row.get("model")))
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    ax.set_xticks(x, metrics)
    ax.set_ylabel("score")
    return _finish(fig, ax, path, title)


def _finish(fig, ax, path: Path, title: str) -> Path:
    """Title, legend and frame of a plot, then written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    ax.set_title("\n".join(textwrap.wrap(title, 60)))  # a long title wraps, never cut off
    ax.legend(fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def curve_plot(
    curves: dict[str, Sequence[dict]], x: str, y: str, label: str, path: str | Path, title: str
) -> Path:
    """One line per curve (name -> rows), ``y`` against ``x``, each point labelled with the
    row's ``label`` (e.g. an accuracy-diversity curve over MMR's lambda)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for name, rows in curves.items():
        xs, ys = [float(r[x]) for r in rows], [float(r[y]) for r in rows]
        ax.plot(xs, ys, marker="o", label=name)
        for r, px, py in zip(rows, xs, ys, strict=True):
            ax.annotate(
                f"{r[label]:g}", (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    return _finish(fig, ax, path, title)
