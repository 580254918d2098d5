"""Argument and input checks shared by the normalization layers.

Every check raises with a message that says what was wrong and what to pass
instead, because these layers are usually reached through a converted model
where the call site is far from the layer.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

PriorsLike = Union[torch.Tensor, Sequence[float], None]

_PRIOR_SUM_TOLERANCE = 1e-4


def check_num_contexts(num_contexts: int) -> int:
    if isinstance(num_contexts, bool) or not isinstance(num_contexts, int) or num_contexts < 1:
        raise ValueError(
            f"num_contexts must be an integer >= 1, got {num_contexts!r}. "
            "Pass the number of contexts K (e.g. 20 CIFAR-100 superclasses)."
        )
    return num_contexts


def check_num_features(num_features: int) -> int:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be an integer >= 1 (the channel count C), got {num_features!r}.")
    return num_features


def check_priors(priors: PriorsLike, num_contexts: int) -> torch.Tensor:
    """Return the context priors lambda_k as a float32 tensor of shape (K,).

    ``None`` gives the uniform prior 1/K.
    """
    if priors is None:
        return torch.full((num_contexts,), 1.0 / num_contexts)
    tensor = torch.as_tensor(priors, dtype=torch.float64).detach().cpu()
    if tensor.shape != (num_contexts,):
        raise ValueError(
            f"priors must have shape ({num_contexts},), one share per context, got shape {tuple(tensor.shape)}."
        )
    if not torch.isfinite(tensor).all() or (tensor < 0).any():
        raise ValueError(f"priors must be finite and non-negative, got {tensor.tolist()}.")
    total = float(tensor.sum())
    if abs(total - 1.0) > _PRIOR_SUM_TOLERANCE:
        raise ValueError(
            f"priors must sum to 1 (they are the share of the data in each context), got sum {total:.6g}. "
            "Pass counts / counts.sum(), or None for uniform priors."
        )
    if (tensor == 0).any():
        raise ValueError(
            "priors must be strictly positive: a context with prior 0 would divide by zero. "
            f"Got {tensor.tolist()}; drop the empty context or give it a small share."
        )
    return tensor.float()


def check_channel_dim(channel_dim: int) -> int:
    if channel_dim not in (1, -1):
        raise ValueError(
            f"channel_dim must be 1 (channels-first: (N, C), (N, C, L), (N, C, H, W), ...) "
            f"or -1 (channels-last: (N, L, C), (N, H, W, C)), got {channel_dim!r}."
        )
    return channel_dim


def check_context_ids(
    context_ids: Optional[torch.Tensor],
    batch_size: int,
    num_contexts: int,
    layer_name: str,
) -> torch.Tensor:
    """Validate context ids of shape (N,) and return them as int64."""
    if context_ids is None:
        raise ValueError(
            f"{layer_name} needs context ids. Call layer(x, context_ids) with an integer tensor of shape (N,); "
            "for a converted model call model(x, context_ids=ids) or use `with use_contexts(model, ids): model(x)`."
        )
    if not isinstance(context_ids, torch.Tensor):
        raise ValueError(
            f"{layer_name}: context_ids must be a torch integer tensor of shape (N,), got {type(context_ids).__name__}. "
            "Pass torch.as_tensor(ids, dtype=torch.long)."
        )
    if context_ids.is_floating_point() or context_ids.is_complex() or context_ids.dtype == torch.bool:
        raise ValueError(
            f"{layer_name}: context_ids must be an integer tensor, got dtype {context_ids.dtype}. "
            "Pass ids.long() (context ids are indices in [0, K))."
        )
    if context_ids.dim() != 1 or context_ids.shape[0] != batch_size:
        raise ValueError(
            f"{layer_name}: context_ids must have shape ({batch_size},), one id per sample of the input, "
            f"got shape {tuple(context_ids.shape)}."
        )
    if not torch.compiler.is_compiling() and context_ids.numel() > 0:
        low, high = int(context_ids.min()), int(context_ids.max())
        if low < 0 or high >= num_contexts:
            raise ValueError(
                f"{layer_name}: context ids must lie in [0, {num_contexts}), got values in [{low}, {high}]. "
                f"The layer was built with K={num_contexts} contexts; remap the ids or convert with a larger K."
            )
    return context_ids.long()


def check_input(x: torch.Tensor, num_features: int, channel_dim: int, layer_name: str) -> None:
    if x.dim() < 2:
        raise ValueError(f"{layer_name} expects at least 2 dimensions (N, C, ...), got shape {tuple(x.shape)}.")
    if x.shape[channel_dim] != num_features:
        where = "dim 1" if channel_dim == 1 else "the last dim"
        raise ValueError(
            f"{layer_name} was built for {num_features} channels on {where}, got input of shape {tuple(x.shape)}. "
            "Check num_features and channel_dim (1 for (N, C, ...), -1 for (N, ..., C))."
        )
    if not x.is_floating_point():
        raise ValueError(f"{layer_name} expects a floating point input, got dtype {x.dtype}.")
