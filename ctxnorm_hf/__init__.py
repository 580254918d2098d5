"""ctxnorm_hf: context normalization (CN, CN-X, ACN) for timm and Hugging Face models."""

from .norms import AdaptiveContextNorm, ContextNorm, ContextNormX, MixtureNorm, ModeNorm

__version__ = "0.1.0"

__all__ = ["AdaptiveContextNorm", "ContextNorm", "ContextNormX", "MixtureNorm", "ModeNorm", "__version__"]
