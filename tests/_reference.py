"""Straightforward reference implementations the vectorised layers are tested against.

They loop over contexts on purpose: slow and obviously right.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

# (shape, channel_dim) for every input layout the layers accept
LAYOUTS: List[Tuple[Tuple[int, ...], int]] = [
    ((20, 6), 1),
    ((20, 6, 7), 1),
    ((20, 6, 4, 5), 1),
    ((20, 6, 3, 2, 4), 1),
    ((20, 7, 6), -1),
]
LAYOUT_IDS = ["N,C", "N,C,L", "N,C,H,W", "N,C,D,H,W", "N,L,C"]


def channels_first(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return x if channel_dim == 1 else x.movedim(-1, 1)


def reference_context_norm(
    x: torch.Tensor,
    ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    priors: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    channel_dim: int,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """CN as a loop of F.batch_norm over each context's rows, scaled by 1/sqrt(lambda_k).

    Updates running_mean / running_var (K, C) in place in training mode.
    """
    xf = channels_first(x, channel_dim)
    out = torch.zeros_like(xf)
    for k in range(weight.shape[0]):
        rows = (ids == k).nonzero().flatten()
        if rows.numel() == 0:
            continue
        rm, rv = running_mean[k].clone(), running_var[k].clone()
        normed = F.batch_norm(xf[rows], rm, rv, None, None, training, momentum, eps)
        running_mean[k], running_var[k] = rm, rv
        shape = (1, -1) + (1,) * (xf.dim() - 2)
        gain = (weight[k] / priors[k].sqrt()).view(shape)
        out = out.index_put((rows,), normed * gain + bias[k].view(shape))
    return out if channel_dim == 1 else out.movedim(1, -1)
