"""Collectives behind ContextNorm's ``sync_stats``: per-context moments of the global batch.

A layer all-gathers the per-context count, mean and sum of squared deviations
of every rank (K x (1 + 2C) numbers) and pools them with Chan's formula; its
backward all-reduces the per-context gradient sums, as SyncBatchNorm does.
Every rank takes part in every collective whatever contexts it holds, so a
context present on one rank only neither hangs nor needs find_unused_parameters.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from .statistics import Moments, pool_moments_by_id


def is_distributed(group: Optional[Any] = None) -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_gather_moments(local: Moments, group: Any) -> Moments:
    """Pool per-context moments (count (K,), mean, m2 (K, C)) over all ranks of ``group``."""
    num_contexts, channels = local.mean.shape
    packed = torch.cat([local.count.unsqueeze(1), local.mean, local.m2], dim=1)
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed.contiguous(), group=group)
    stacked = torch.cat(gathered)
    entries = Moments(stacked[:, 0], stacked[:, 1 : 1 + channels], stacked[:, 1 + channels :])
    ids = torch.arange(num_contexts, device=stacked.device).repeat(len(gathered))
    return pool_moments_by_id(entries, ids, num_contexts)


def all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
