"""Adaptive Context Normalization (ACN): contexts discovered by a learnable Gaussian mixture.

    y = sum_k p(k | x) * [ gamma_k * (x - mu_k) / sqrt((var_k + eps) * lambda_k) + beta_k ]

p(k | x) is the posterior of a diagonal Gaussian mixture over the C channels
of one position (one pixel of a feature map, one token, or one sample of a
(N, C) input), with mixing weights lambda = softmax(prior_logits), means mu_k
and variances var_k = exp(log_var_k). Everything is learned by
backpropagation (no EM), and train and eval modes compute the same thing.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .base import NormBase
from .posterior_affine import posterior_affine
from .statistics import GaussianQuadratics, context_affine, inverse_std, stats_dtype


class AdaptiveContextNorm(NormBase):
    """ACN (Faye et al.): normalization weighted by a learned Gaussian-mixture posterior.

    Args:
        num_features: C.
        num_contexts: K, mixture components.
        eps: added to the variance in the normalization (not in the density).
        affine: learn per-component gamma_k, beta_k (``weight``, ``bias``, shape (K, C)).
        channel_dim: 1 for (N, C, *), -1 for (N, *, C).
        init_spread: standard deviation of the random initial means; distinct
            means break the symmetry between components.

    Parameters: ``mean`` (K, C), ``log_var`` (K, C), ``prior_logits`` (K,).

    Shape:
        x: (N, C, *) or (N, *, C). Output: shape of x.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        channel_dim: int = 1,
        init_spread: float = 1.0,
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
        self.init_spread = init_spread
        factory = {"device": device, "dtype": dtype}
        self.mean = nn.Parameter(torch.empty(num_contexts, num_features, **factory))
        self.log_var = nn.Parameter(torch.zeros(num_contexts, num_features, **factory))
        self.prior_logits = nn.Parameter(torch.zeros(num_contexts, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if not hasattr(self, "mean"):
            return
        nn.init.normal_(self.mean, std=self.init_spread)
        nn.init.zeros_(self.log_var)
        nn.init.zeros_(self.prior_logits)

    @property
    def priors(self) -> torch.Tensor:
        """lambda_k = softmax(prior_logits): (K,), on the simplex."""
        return self.prior_logits.softmax(0)

    def _mixture(self, dtype: torch.dtype) -> GaussianQuadratics:
        return GaussianQuadratics.from_gaussians(
            self.mean.to(dtype), self.log_var.to(dtype), self.prior_logits.to(dtype).log_softmax(0)
        )

    def _log_posterior3(self, x3: torch.Tensor) -> torch.Tensor:
        """log p(k | x) for every position of the 3-D view: C replaced by K."""
        return self._mixture(x3.dtype).log_joint(x3, self.layout).log_softmax(self.layout.channel_axis)

    def context_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """p(k | x) for every position: x's shape with the channel dim of size K, float32."""
        x3 = self._view3d(x)
        with torch.autocast(x.device.type, enabled=False):
            posterior3 = self._log_posterior3(x3.to(stats_dtype(x.dtype))).exp()
        shape = list(x.shape)
        shape[self.channel_dim] = self.num_contexts
        return posterior3.reshape(shape)

    def _component_affine(self, dtype: torch.dtype, normalise: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Component k's map as x * scale_k + shift_k, both (K, C).

        normalise=True: gamma_k (x - mu_k) / sqrt((var_k + eps) lambda_k) + beta_k;
        normalise=False (input already standardised): gamma_k x / sqrt(lambda_k) + beta_k.
        """
        gain = torch.exp(-0.5 * self.prior_logits.to(dtype).log_softmax(0)).unsqueeze(1)
        if self.weight is not None:
            gain = gain * self.weight.to(dtype)
        gain = gain.expand(self.num_contexts, self.num_features)
        bias = None if self.bias is None else self.bias.to(dtype)
        if not normalise:
            return gain, torch.zeros_like(gain) if bias is None else bias
        return context_affine(self.mean.to(dtype), inverse_std(self.log_var.to(dtype), self.eps), gain, bias)

    def forward(self, x: torch.Tensor, context_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalise x; ``context_ids`` is ignored (this layer infers its contexts) and accepted for a uniform call."""
        x3 = self._view3d(x)
        dtype = stats_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            scale, shift = self._component_affine(dtype)
            y3 = posterior_affine(x3.to(dtype), self._mixture(dtype), scale, shift, self.layout)
        return y3.to(x.dtype).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init_spread={self.init_spread}"
