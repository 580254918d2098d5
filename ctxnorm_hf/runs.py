"""Bookkeeping the recipes share: one (norm, seed) run's result, its resumable progress, checkpoints, mean curves."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import numpy as np

from .reporting import History


@dataclass
class RunResult:
    """What one (norm, seed) run leaves: final metrics, per-epoch curves and its wall-clock seconds."""

    norm: str
    seed: int
    metrics: Dict[str, float]
    history: History = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class RunProgress:
    """What a checkpoint holds besides networks, optimizers and RNG states: epochs done and the curves so far.

    accelerate saves it with ``accelerator.register_for_checkpointing(progress)``.
    """

    epoch: int = 0
    history: History = field(default_factory=dict)

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "history": self.history}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch, self.history = int(state["epoch"]), {k: list(v) for k, v in state["history"].items()}


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest ``run_dir``/checkpoints/epoch-NNNN folder, or None."""
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted(name for name in os.listdir(folder) if name.startswith("epoch-")) if os.path.isdir(folder) else []
    return os.path.join(folder, names[-1]) if names else None


def save_checkpoint(accelerator: Any, run_dir: str, epoch: int) -> None:
    """accelerate state (prepared models, optimizers, registered objects, RNGs) after ``epoch``; only the latest is kept."""
    previous = latest_checkpoint(run_dir)
    accelerator.save_state(os.path.join(run_dir, "checkpoints", f"epoch-{epoch:04d}"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and previous is not None:
        shutil.rmtree(previous)


def mean_curves(results: Sequence[RunResult], norms: Sequence[str]) -> Dict[str, History]:
    """norm -> metric -> per-epoch mean over seeds, for the metrics every seed recorded at the same epochs."""
    curves = {}
    for norm in norms:
        histories = [result.history for result in results if result.norm == norm]
        curves[norm] = {
            metric: list(np.mean([history[metric] for history in histories], axis=0))
            for metric in histories[0]
            if all(len(history.get(metric, ())) == len(histories[0][metric]) for history in histories)
        }
    return curves
