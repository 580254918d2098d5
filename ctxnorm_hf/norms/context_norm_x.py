"""Context Normalization Extended (CN-X): per-context statistics learned as parameters.

    y = gamma_k * (x - mu_k) / sqrt((var_k + eps) * lambda_k) + beta_k,   k = context of the sample

mu_k and log(var_k) are parameters learned by backpropagation, so the layer
computes the same thing in train and eval mode and needs no batch statistics.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ._validation import PriorsLike
from .base import IdConditionedNorm
from .statistics import inverse_std


class ContextNormX(IdConditionedNorm):
    """CN-X (Faye et al.): context normalization with learned per-context mean and variance.

    Args:
        num_features: C.
        num_contexts: K.
        eps: added to the variance.
        momentum: accepted for signature parity with :class:`ContextNorm`; unused
            (CN-X keeps no running statistics).
        affine: learn per-context gamma_k, beta_k (``weight``, ``bias``, shape (K, C)).
        priors: lambda_k, shape (K,), positive, summing to 1; uniform by default.
        channel_dim: 1 for (N, C, *), -1 for (N, *, C).

    Parameters ``mean`` (K, C) and ``log_var`` (K, C) hold mu_k and log(var_k);
    the variance exp(log_var) is positive for any parameter value.

    Shape:
        x: (N, C, *) or (N, *, C); context_ids: (N,) integers in [0, K). Output: shape of x.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        *,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        priors: PriorsLike = None,
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
            priors=priors,
            device=device,
            dtype=dtype,
        )
        del momentum  # CN-X has no running statistics
        self.mean = nn.Parameter(torch.zeros(num_contexts, num_features, device=device, dtype=dtype))
        self.log_var = nn.Parameter(torch.zeros(num_contexts, num_features, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.mean)
        nn.init.zeros_(self.log_var)

    @property
    def variance(self) -> torch.Tensor:
        """var_k = exp(log_var_k), (K, C)."""
        return self.log_var.exp()

    def forward(self, x: torch.Tensor, context_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._view3d(x)
        context_ids = self._check_ids(x, context_ids)
        return self._normalize_with(x, context_ids, self.mean, inverse_std(self.log_var, self.eps))

    def context_state(self, context: int) -> Dict[str, torch.Tensor]:
        state = super().context_state(context)
        with torch.no_grad():
            state["running_mean"] = self.mean[context].detach().clone()
            state["running_var"] = self.variance[context].detach().clone()
        return state
