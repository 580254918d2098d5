"""ctxnorm_hf: context normalization (CN, CN-X, ACN) for timm and Hugging Face models."""

from .data import ContextCollator
from .distributed import set_sync_stats
from .hub import from_pretrained, load_context_source, push_to_hub, save_pretrained
from .norms import AdaptiveContextNorm, ContextNorm, ContextNormX, MixtureNorm, ModeNorm
from .routing import use_contexts
from .surgery import ConversionReport, convert_norms, export_context
from .trainer import ContextTrainer

__version__ = "0.1.0"

__all__ = [
    "AdaptiveContextNorm",
    "ContextCollator",
    "ContextNorm",
    "ContextNormX",
    "ContextTrainer",
    "ConversionReport",
    "MixtureNorm",
    "ModeNorm",
    "__version__",
    "convert_norms",
    "export_context",
    "from_pretrained",
    "load_context_source",
    "push_to_hub",
    "save_pretrained",
    "set_sync_stats",
    "use_contexts",
]
