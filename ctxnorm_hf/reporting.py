"""Reports of the recipes: metrics as JSON, markdown tables, mean and spread over seeds, curves as PNG."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

History = Dict[str, List[float]]  # metric name -> one value per epoch


def write_json(path: str, payload: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)


def mean_and_spread(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for a single value) of per-seed results."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": spread, "n": len(values)}


def format_mean_spread(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """'91.3 ± 0.4' for per-seed accuracies in [0, 1] (scale 100: percent)."""
    summary = mean_and_spread(values)
    if summary["n"] == 1:
        return f"{summary['mean'] * scale:.{digits}f}"
    return f"{summary['mean'] * scale:.{digits}f} ± {summary['std'] * scale:.{digits}f}"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts), columns in the given order (default: first row's keys)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def plot_curves(histories: Mapping[str, History], path: str, title: str = "") -> None:
    """One panel per metric, one line per run (e.g. per norm): the paper's training / validation curves.

    Args:
        histories: run name -> {metric name -> per-epoch values}.
        path: where the PNG goes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = sorted({metric for history in histories.values() for metric in history})
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    colors = {run: f"C{index % 10}" for index, run in enumerate(histories)}  # a run keeps its colour in every panel
    for axis, metric in zip(axes[0], metrics):
        for run, history in histories.items():
            values = history.get(metric)
            if values:
                axis.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=run, color=colors[run])
        axis.set_title(metric)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
