"""Multi-process training: CN statistics of the global batch.

``convert_norms(..., sync_stats=True)``, or :func:`set_sync_stats` on a
converted model, makes every ContextNorm normalise with the per-context
statistics of the batch concatenated over all ranks when torch.distributed
runs more than one (see :mod:`ctxnorm_hf.norms.sync` for the collectives).
Off by default, as for BatchNorm: switch it on for small per-device batches,
where a context may have a handful of samples on each device.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .norms import ContextNorm
from .norms.sync import is_distributed

__all__ = ["is_distributed", "set_sync_stats"]


def set_sync_stats(model: nn.Module, enabled: bool = True, process_group: Optional[Any] = None) -> int:
    """Switch global-batch statistics on or off for every ContextNorm of ``model``; returns how many."""
    layers = [module for module in model.modules() if isinstance(module, ContextNorm)]
    for layer in layers:
        layer.sync_stats = enabled
        layer.process_group = process_group
    return len(layers)
