"""The README's Fashion-MNIST table from the metrics.json files fashion_mnist_results.sh writes.

    python benchmarks/fashion_mnist_table.py [benchmarks/results/fashion_mnist]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List

from ctxnorm_hf.reporting import format_mean_spread, markdown_table

MODELS = ("small_convnet", "small_vit")


def _accuracies(metrics: Dict, norm: str, key: str) -> List[float]:
    runs = [run for run in metrics["runs"] if run["norm"] == norm]
    return [run["metrics"].get(key, run["metrics"]["eval_accuracy"]) for run in runs]


def table(folder: Path) -> str:
    rows: Dict[str, Dict[str, str]] = {}
    for model in MODELS:
        superclass = json.loads((folder / f"{model}-superclass" / "metrics.json").read_text())
        kmeans = json.loads((folder / f"{model}-kmeans" / "metrics.json").read_text())
        for position, norm in enumerate(superclass["config"]["norms"]):
            row = rows.setdefault("bn / ln" if position == 0 else norm, {"norm": "bn / ln" if position == 0 else norm})
            row[f"{model}: superclass, honest"] = format_mean_spread(_accuracies(superclass, norm, "eval_accuracy"))
            row[f"{model}: superclass, oracle"] = format_mean_spread(_accuracies(superclass, norm, "eval_oracle_accuracy"))
            row[f"{model}: k-means"] = format_mean_spread(_accuracies(kmeans, norm, "eval_accuracy"))
    return markdown_table(list(rows.values()))


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/fashion_mnist")))
