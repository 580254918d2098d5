"""ctxnorm_hf: context normalization (CN, CN-X, ACN) for timm and Hugging Face models."""

from .norms import AdaptiveContextNorm, ContextNorm, ContextNormX, MixtureNorm, ModeNorm
from .routing import use_contexts
from .surgery import ConversionReport, convert_norms, export_context

__version__ = "0.1.0"

__all__ = [
    "AdaptiveContextNorm",
    "ContextNorm",
    "ContextNormX",
    "ConversionReport",
    "MixtureNorm",
    "ModeNorm",
    "__version__",
    "convert_norms",
    "export_context",
    "use_contexts",
]
