"""p(context | input) for the honest evaluation of label-derived contexts."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .features import ArrayLike, BackboneFeatures, Featurizer, PixelFeatures


class ContextPredictor:
    """Multinomial logistic regression of the context on input features, fitted on training data.

    Label-derived contexts (superclasses) are unknown at test time; the honest protocol
    scores p(y | x) = p(y | x, k = s(y)) p(k = s(y) | x) with p(k | x) from this predictor.

    Args:
        num_contexts: K.
        features: "pixels", a Featurizer, or a backbone nn.Module (its pooled embeddings).
        max_iter: iterations of the solver.
        seed: random_state.
    """

    def __init__(
        self,
        num_contexts: int,
        features: Union[str, Featurizer, torch.nn.Module] = "pixels",
        max_iter: int = 300,
        seed: int = 0,
    ) -> None:
        self.num_contexts = num_contexts
        if features == "pixels":
            features = PixelFeatures()
        elif isinstance(features, torch.nn.Module):
            features = BackboneFeatures(features)
        self.features: Featurizer = features
        self.model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))

    @property
    def is_fitted(self) -> bool:
        return hasattr(self.model, "classes_")

    def fit(self, data: ArrayLike, context_ids: torch.Tensor) -> "ContextPredictor":
        ids = torch.as_tensor(context_ids).long().numpy()
        if len(np.unique(ids)) < 2:
            raise ValueError("ContextPredictor needs training samples of at least two contexts.")
        self.model.fit(self.features(data).numpy(), ids)
        return self

    def predict_proba(self, data: ArrayLike) -> torch.Tensor:
        """(N, K) float32; contexts unseen in training get probability 0."""
        if not self.is_fitted:
            raise RuntimeError("ContextPredictor is not fitted: call .fit(train_inputs, train_context_ids) first.")
        probabilities = self.model.predict_proba(self.features(data).numpy())
        full = np.zeros((probabilities.shape[0], self.num_contexts), dtype=np.float32)
        full[:, self.model.classes_] = probabilities
        return torch.from_numpy(full)
