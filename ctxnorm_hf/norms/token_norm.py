"""Context layers for LayerNorm sites in "token" mode.

Each position (a token, or a pixel of a channels-first map) is standardised
over its C channels as LayerNorm does; the context enters through the affine
map only. With every context's affine equal to the LayerNorm's, the output is
the LayerNorm's whatever the context, which is what makes converting a
pretrained transformer function preserving.

- :class:`ContextLayerNorm`: y = gamma_k / sqrt(lambda_k) * xhat + beta_k, k the sample's context id
  (the token-mode layer of both "cn" and "cnx": with per-token statistics, learned per-context
  statistics would only reparametrise the affine map).
- :class:`AdaptiveContextLayerNorm`: y = sum_k p(k | xhat) [gamma_k / sqrt(lambda_k) * xhat + beta_k],
  the ACN posterior taken on the standardised token.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .adaptive_context_norm import AdaptiveContextNorm
from .base import IdConditionedNorm
from .layout import ChannelLayout
from .posterior_affine import posterior_affine
from .statistics import gathered_affine, stats_dtype


def standardize_positions(x3: torch.Tensor, layout: ChannelLayout, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the C channels of every position, in the stats dtype."""
    x3 = x3.to(stats_dtype(x3.dtype))
    channels = x3.shape[layout.channel_axis]
    if layout.channels_last:
        return F.layer_norm(x3, (channels,), eps=eps)
    return F.layer_norm(x3.transpose(1, 2), (channels,), eps=eps).transpose(1, 2)


class ContextLayerNorm(IdConditionedNorm):
    """LayerNorm with one affine map per context.

    Args:
        num_features: C.
        num_contexts: K.
        eps: added to every position's variance.
        affine: learn gamma_k, beta_k (``weight``, ``bias``, shape (K, C)).
        priors: lambda_k, shape (K,); uniform by default.
        channel_dim: -1 for tokens (N, *, C) (default), 1 for channels-first maps (N, C, *).

    Shape:
        x: (N, *, C) or (N, C, *); context_ids: (N,). Output: shape of x.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        priors=None,
        channel_dim: int = -1,
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

    def forward(self, x: torch.Tensor, context_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x3 = self._view3d(x)
        context_ids = self._check_ids(x, context_ids)
        dtype = stats_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            standardized = standardize_positions(x3, self.layout, self.eps)
            shift = self._shift(dtype)
            if shift is None:
                shift = torch.zeros(self.num_contexts, self.num_features, dtype=dtype, device=x.device)
            y3 = gathered_affine(standardized, context_ids, self._gain(dtype), shift, self.layout)
        return y3.to(x.dtype).reshape(x.shape)


class AdaptiveContextLayerNorm(AdaptiveContextNorm):
    """LayerNorm whose affine map is mixed by an ACN posterior over the standardised token.

    Same arguments and parameters as :class:`AdaptiveContextNorm`, with
    ``channel_dim=-1`` by default. The mixture lives in the space of
    standardised tokens, so its means start near the origin (``init_spread``).
    """

    def __init__(self, num_features: int, num_contexts: int, *, channel_dim: int = -1, **kwargs) -> None:
        super().__init__(num_features, num_contexts, channel_dim=channel_dim, **kwargs)

    def forward(self, x: torch.Tensor, context_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalise x; ``context_ids`` is ignored (this layer infers its contexts) and accepted for a uniform call."""
        x3 = self._view3d(x)
        dtype = stats_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            standardized = standardize_positions(x3, self.layout, self.eps)
            scale, shift = self._component_affine(dtype, normalise=False)
            y3 = posterior_affine(standardized, self._mixture(dtype), scale, shift, self.layout)
        return y3.to(x.dtype).reshape(x.shape)

    def context_posterior(self, x: torch.Tensor) -> torch.Tensor:
        x3 = self._view3d(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().context_posterior(standardize_positions(x3, self.layout, self.eps).reshape(x.shape))
