"""Mode Normalization (Deecke, Murray & Bilen, ICLR 2019), re-implemented from the paper as a baseline.

Every sample n gets soft gates g_k(x_n) = softmax_k(W * avgpool(x_n) + b). Mode
k has the gate-weighted mean and variance of the batch,

    mu_k = sum_n g_nk sum_m x_nm / (M sum_n g_nk),  var_k = same weights on (x - mu_k)^2,

and the output is  gamma * sum_k g_nk (x_n - mu_k) / sqrt(var_k + eps) + beta
with one shared affine. Running mu_k, var_k (momentum average) replace the
batch statistics in eval mode; the gates are always computed from the input.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import NormBase
from .statistics import pool_moments_by_weight, sample_moments, stats_dtype, update_running_stats_


class ModeNorm(NormBase):
    """ModeNorm baseline: K gated batch normalizations with a shared affine.

    Args:
        num_features: C.
        num_contexts: K, the number of modes.
        eps, momentum: as in nn.BatchNorm (momentum ``None``: cumulative average).
        affine: learn the shared gamma, beta (``weight``, ``bias``, shape (C,)).
        channel_dim: 1 for (N, C, *), -1 for (N, *, C).

    The gating map is ``gate`` (nn.Linear(C, K)); buffers ``running_mean``,
    ``running_var`` (K, C) and ``num_batches_tracked`` (K,).

    Shape:
        x: (N, C, *) or (N, *, C). Output: shape of x.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        *,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        channel_dim: int = 1,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(
            num_features,
            num_contexts,
            eps=eps,
            channel_dim=channel_dim,
            affine=affine,
            per_context_affine=False,
            device=device,
            dtype=dtype,
        )
        self.momentum = momentum
        self.gate = nn.Linear(num_features, num_contexts, device=device, dtype=dtype)
        stats = {"device": device, "dtype": stats_dtype(dtype or torch.float32)}
        self.register_buffer("running_mean", torch.zeros(num_contexts, num_features, **stats))
        self.register_buffer("running_var", torch.ones(num_contexts, num_features, **stats))
        self.register_buffer("num_batches_tracked", torch.zeros(num_contexts, dtype=torch.long, device=device))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """g(x): (N, K) mode probabilities of every sample, float32."""
        x3 = self._view3d(x)
        with torch.autocast(x.device.type, enabled=False):
            return self._gates(x3.to(stats_dtype(x.dtype)).mean(self.layout.position_axis))

    def _gates(self, sample_mean: torch.Tensor) -> torch.Tensor:
        """softmax(W avgpool(x) + b) from the per-sample means (N, C): (N, K)."""
        weight, bias = self.gate.weight.to(sample_mean.dtype), self.gate.bias.to(sample_mean.dtype)
        return nn.functional.linear(sample_mean, weight, bias).softmax(1)

    def forward(self, x: torch.Tensor, context_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalise x; ``context_ids`` is ignored (this layer infers its contexts) and accepted for a uniform call."""
        x3 = self._view3d(x)
        dtype = stats_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            x3 = x3.to(dtype)
            per_sample = sample_moments(x3, self.layout)
            gates = self._gates(per_sample.mean)
            if self.training:
                pooled = pool_moments_by_weight(per_sample, gates)
                from_batch = (pooled.count > 1).unsqueeze(1)
                mean = torch.where(from_batch, pooled.mean, self.running_mean.to(dtype))
                var = torch.where(from_batch, pooled.variance(), self.running_var.to(dtype))
                update_running_stats_(
                    self.num_batches_tracked,
                    self.momentum,
                    pooled.count,
                    [(self.running_mean, pooled.mean), (self.running_var, pooled.unbiased_variance())],
                )
            else:
                mean, var = self.running_mean.to(dtype), self.running_var.to(dtype)
            inv_std = torch.rsqrt(var + self.eps)
            # sum_k g_nk (x - mu_k) inv_std_k = x * (g @ inv_std) - g @ (mu * inv_std), per (sample, channel)
            scale = gates @ inv_std
            shift = -(gates @ (mean * inv_std))
            if self.weight is not None:
                scale = scale * self.weight.to(dtype)
                shift = shift * self.weight.to(dtype) + self.bias.to(dtype)
            y3 = self.layout.affine_rows(x3, scale, shift)
        return y3.to(x.dtype).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}"
