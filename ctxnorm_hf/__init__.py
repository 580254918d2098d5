"""ctxnorm_hf: context normalization (CN, CN-X, ACN) for timm and Hugging Face models."""

import importlib
from typing import TYPE_CHECKING, Any

from .distributed import set_sync_stats
from .hub import from_pretrained, load_context_source, push_to_hub, save_pretrained
from .norms import AdaptiveContextNorm, ContextNorm, ContextNormX, MixtureNorm, ModeNorm
from .routing import use_contexts
from .surgery import ConversionReport, convert_norms, export_context

if TYPE_CHECKING:
    from .data import ContextCollator
    from .trainer import ContextTrainer

_IMPORTED_ON_USE = {"ContextCollator": "data", "ContextTrainer": "trainer"}
"""Names whose modules import transformers' Trainer (seconds): loaded when first asked for, so
``from ctxnorm_hf import ContextNorm`` in a timm-only script does not pay for it."""


def __getattr__(name: str) -> Any:
    if name in _IMPORTED_ON_USE:
        return getattr(importlib.import_module(f".{_IMPORTED_ON_USE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
