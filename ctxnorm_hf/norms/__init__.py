"""Context-aware normalization layers and the multi-mode baselines."""

from .context_norm import ContextNorm

__all__ = ["ContextNorm"]
