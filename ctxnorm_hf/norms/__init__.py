"""Context-aware normalization layers (CN, CN-X, ACN) and the multi-mode baselines (MixtureNorm, ModeNorm)."""

from .adaptive_context_norm import AdaptiveContextNorm
from .context_norm import ContextNorm
from .context_norm_x import ContextNormX
from .mixture_norm import MixtureNorm
from .mode_norm import ModeNorm

__all__ = ["AdaptiveContextNorm", "ContextNorm", "ContextNormX", "MixtureNorm", "ModeNorm"]
