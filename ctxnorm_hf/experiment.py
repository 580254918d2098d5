"""What the recipes share: the norm choices, applying one to a model, argument checks, seeding."""

from __future__ import annotations

import argparse
import random
from typing import Any, List, Sequence

import numpy as np
import torch
from torch import nn

from .surgery import STRATEGIES, convert_norms

UNCHANGED = ("bn", "ln")
"""Baselines that keep the model's own BatchNorm / LayerNorm."""
NORM_CHOICES = UNCHANGED + STRATEGIES
WITH_CONTEXT_IDS = ("cn", "cnx")
"""Norms that need context ids at every call; the others find their contexts themselves."""


def apply_norm(model: nn.Module, norm: str, num_contexts: int, **options: Any) -> nn.Module:
    """Return ``model`` with its norms replaced according to ``norm`` ("bn"/"ln" leave it as it is).

    ``options`` go to :func:`convert_norms` (priors, target_modules, layer_norm, sync_stats, ...).
    """
    if norm in UNCHANGED:
        return model
    return convert_norms(model, norm, num_contexts, **options)


def parse_norms(text: str, parser: argparse.ArgumentParser) -> List[str]:
    """Comma-separated norm names, checked; bad input ends the program with a one-line reason."""
    norms = [norm.strip() for norm in text.split(",") if norm.strip()]
    unknown = [norm for norm in norms if norm not in NORM_CHOICES]
    if unknown or not norms:
        parser.error(f"unknown norm(s) {unknown or [text]}; choose from {', '.join(NORM_CHOICES)}")
    return norms


def check_at_least(parser: argparse.ArgumentParser, name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        parser.error(f"{name} must be >= {minimum}, got {value}")


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_seeds(text: str) -> Sequence[int]:
    return [int(seed) for seed in text.split(",") if seed.strip()]


def end_distributed() -> None:
    """Destroy the process group that torchrun / accelerate launch set up, if any, once a rank's work is done.

    Left to interpreter exit, the group is torn down while its gloo threads may
    still run: a rank that finished its training then aborted with "terminate
    called without an active exception" (once in seven two-rank test runs).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
