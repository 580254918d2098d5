"""What the five normalization layers have in common."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ._validation import (
    PriorsLike,
    check_channel_dim,
    check_context_ids,
    check_input,
    check_num_contexts,
    check_num_features,
    check_priors,
)
from ..routing import ContextRouter
from .layout import ChannelLayout
from .statistics import context_affine, gathered_affine, stats_dtype


class NormBase(nn.Module):
    """Sizes, layout and affine parameters of a multi-context normalization layer.

    Args:
        num_features: C, the channel count.
        num_contexts: K, contexts (CN, CN-X), components (ACN, MixtureNorm) or modes (ModeNorm).
        eps: added to the variance.
        channel_dim: 1 for channels-first inputs (N, C, *), -1 for channels-last (N, *, C).
        affine: learn gamma and beta.
        per_context_affine: gamma and beta of shape (K, C) (one per context) instead of (C,).
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        *,
        eps: float,
        channel_dim: int,
        affine: bool,
        per_context_affine: bool,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.num_features = check_num_features(num_features)
        self.num_contexts = check_num_contexts(num_contexts)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}.")
        self.eps = float(eps)
        self.channel_dim = check_channel_dim(channel_dim)
        self.layout = ChannelLayout.from_channel_dim(channel_dim)
        self.affine = affine
        factory = {"device": device, "dtype": dtype}
        affine_shape = (num_contexts, num_features) if per_context_affine else (num_features,)
        if affine:
            self.weight = nn.Parameter(torch.ones(affine_shape, **factory))
            self.bias = nn.Parameter(torch.zeros(affine_shape, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _view3d(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_features, self.channel_dim, type(self).__name__)
        return self.layout.view3d(x)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_contexts={self.num_contexts}, eps={self.eps}, "
            f"affine={self.affine}, channel_dim={self.channel_dim}"
        )


class IdConditionedNorm(NormBase):
    """A layer told the context of every sample (CN, CN-X): per-context affine and fixed priors.

    lambda_k lives in the buffer ``priors`` (K,); it is not folded into
    ``weight`` so that priors can be set from a context source later. Ids
    come from the call, or else from ``router`` (set by convert_norms).
    """

    router: Optional[ContextRouter] = None

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        *,
        eps: float,
        channel_dim: int,
        affine: bool,
        priors: PriorsLike,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(
            num_features,
            num_contexts,
            eps=eps,
            channel_dim=channel_dim,
            affine=affine,
            per_context_affine=True,
            device=device,
            dtype=dtype,
        )
        self.register_buffer("priors", check_priors(priors, num_contexts).to(device))

    def set_priors(self, priors: PriorsLike) -> None:
        """Replace lambda_k (shape (K,), positive, summing to 1), e.g. with a context source's priors."""
        with torch.no_grad():
            self.priors.copy_(check_priors(priors, self.num_contexts))

    def _check_ids(self, x: torch.Tensor, context_ids: Optional[torch.Tensor]) -> torch.Tensor:
        batch_size = x.shape[0]
        if context_ids is None and self.router is not None:
            context_ids = self.router.ids_for(batch_size)
        ids = check_context_ids(context_ids, batch_size, self.num_contexts, type(self).__name__)
        return ids.to(x.device)

    def _normalize_with(
        self, x: torch.Tensor, context_ids: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor
    ) -> torch.Tensor:
        """gamma_k * (x - mean_k) * inv_std_k / sqrt(lambda_k) + beta_k for given (K, C) statistics.

        Statistics and the affine map are computed in float32 (float64 for
        float64 inputs) whatever the autocast state; the output has x's dtype.
        """
        dtype = stats_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            scale, shift = context_affine(mean.to(dtype), inv_std.to(dtype), self._gain(dtype), self._shift(dtype))
            y3 = gathered_affine(self.layout.view3d(x), context_ids, scale, shift, self.layout)
        return y3.to(x.dtype).reshape(x.shape)

    def _gain(self, dtype: torch.dtype) -> torch.Tensor:
        """gamma_k / sqrt(lambda_k) as (K, C) in ``dtype``: the factor in front of the normalised input."""
        inv_sqrt_prior = self.priors.to(dtype).rsqrt().unsqueeze(1)
        if self.weight is None:
            return inv_sqrt_prior.expand(self.num_contexts, self.num_features)
        return self.weight.to(dtype) * inv_sqrt_prior

    def context_state(self, context: int) -> Dict[str, torch.Tensor]:
        """The plain normalization this layer applies to context k: weight, bias (C,) and, for
        layers with per-context statistics, running_mean and running_var (C,)."""
        if not 0 <= context < self.num_contexts:
            raise ValueError(f"context must be in [0, {self.num_contexts}), got {context}.")
        with torch.no_grad():
            gain = self._gain(self.priors.dtype)[context]
            bias = torch.zeros_like(gain) if self.bias is None else self.bias[context]
            return {"weight": gain.detach().clone(), "bias": bias.detach().clone()}

    def _shift(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        return None if self.bias is None else self.bias.to(dtype)
