"""ctxnorm_hf: context normalization (CN, CN-X, ACN) for timm and Hugging Face models."""

from .norms import ContextNorm

__version__ = "0.1.0"

__all__ = ["ContextNorm", "__version__"]
