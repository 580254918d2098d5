"""Where context ids come from: superclasses, k-means clusters, domains."""

from .base import CONTEXT_SOURCES, ContextSource
from .domain import DomainContexts
from .features import BackboneFeatures, Featurizer, PixelFeatures
from .kmeans import KMeansContexts
from .predictor import ContextPredictor
from .superclass import SuperclassContexts

__all__ = [
    "BackboneFeatures",
    "CONTEXT_SOURCES",
    "ContextPredictor",
    "ContextSource",
    "DomainContexts",
    "Featurizer",
    "KMeansContexts",
    "PixelFeatures",
    "SuperclassContexts",
]
