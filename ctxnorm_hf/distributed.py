"""Context statistics of the global batch when it is split across processes.

With ``sync_stats`` a ContextNorm layer all-gathers the per-context count,
mean and sum of squared deviations of every rank (K x (1 + 2C) numbers) and
pools them with Chan's formula, so every rank normalises with the statistics
of the concatenated batch; its backward all-reduces the per-context gradient
sums, as SyncBatchNorm does. Every rank takes part in every collective
whatever contexts it holds, so a context present on one rank only neither
hangs nor needs find_unused_parameters.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .norms.statistics import Moments, pool_moments_by_id

ProcessGroup = Optional["dist.ProcessGroup"]


def is_distributed(group: ProcessGroup = None) -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_gather_moments(local: Moments, group: ProcessGroup) -> Moments:
    """Pool per-context moments (count (K,), mean, m2 (K, C)) over all ranks of ``group``."""
    num_contexts, channels = local.mean.shape
    packed = torch.cat([local.count.unsqueeze(1), local.mean, local.m2], dim=1)
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed.contiguous(), group=group)
    stacked = torch.cat(gathered)
    entries = Moments(stacked[:, 0], stacked[:, 1 : 1 + channels], stacked[:, 1 + channels :])
    ids = torch.arange(num_contexts, device=stacked.device).repeat(len(gathered))
    return pool_moments_by_id(entries, ids, num_contexts)


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def set_sync_stats(model: nn.Module, enabled: bool = True, process_group: ProcessGroup = None) -> int:
    """Switch global-batch statistics on or off for every ContextNorm of ``model``; returns how many."""
    from .norms import ContextNorm

    layers = [module for module in model.modules() if isinstance(module, ContextNorm)]
    for layer in layers:
        layer.sync_stats = enabled
        layer.process_group = process_group
    return len(layers)
