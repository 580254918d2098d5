"""Context layers that keep the dropout and activation of timm's BatchNormAct2d.

timm fuses "norm -> drop -> act" in BatchNormAct2d; a converted site must keep
``.drop`` and ``.act`` (as submodules of the same names) or the model would
lose its non-linearities.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .adaptive_context_norm import AdaptiveContextNorm
from .context_norm import ContextNorm
from .context_norm_x import ContextNormX
from .mixture_norm import MixtureNorm
from .mode_norm import ModeNorm


class ActivationMixin:
    """Adds ``drop`` and ``act`` after the normalization, as timm's BatchNormAct2d does."""

    drop: nn.Module
    act: nn.Module

    def set_activation(self, drop: nn.Module, act: nn.Module) -> None:
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor, context_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.act(self.drop(super().forward(x, context_ids)))


class ContextNormAct2d(ActivationMixin, ContextNorm):
    """:class:`ContextNorm` followed by ``drop`` and ``act``."""


class ContextNormXAct2d(ActivationMixin, ContextNormX):
    """:class:`ContextNormX` followed by ``drop`` and ``act``."""


class AdaptiveContextNormAct2d(ActivationMixin, AdaptiveContextNorm):
    """:class:`AdaptiveContextNorm` followed by ``drop`` and ``act``."""


class MixtureNormAct2d(ActivationMixin, MixtureNorm):
    """:class:`MixtureNorm` followed by ``drop`` and ``act``."""


class ModeNormAct2d(ActivationMixin, ModeNorm):
    """:class:`ModeNorm` followed by ``drop`` and ``act``."""


WITH_ACTIVATION = {
    ContextNorm: ContextNormAct2d,
    ContextNormX: ContextNormXAct2d,
    AdaptiveContextNorm: AdaptiveContextNormAct2d,
    MixtureNorm: MixtureNormAct2d,
    ModeNorm: ModeNormAct2d,
}
