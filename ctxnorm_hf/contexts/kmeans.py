"""Contexts from k-means clusters of the inputs (raw pixels or backbone embeddings)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from sklearn.cluster import KMeans, MiniBatchKMeans
from tqdm.auto import tqdm

from .base import ContextSource
from .features import ArrayLike, BackboneFeatures, Featurizer, PixelFeatures

MINIBATCH_THRESHOLD = 10_000


class KMeansContexts(ContextSource):
    """Context = the nearest of K k-means centroids, fitted on the training inputs.

    Args:
        num_contexts: K clusters.
        features: "pixels" (flattened input), or a :class:`BackboneFeatures` / any nn.Module
            backbone (wrapped in BackboneFeatures) whose embeddings are clustered.
        seed: random_state of scikit-learn's k-means; the same seed gives the same clusters.
        minibatch: use MiniBatchKMeans; by default when fitting more than 10 000 samples.
        n_init: k-means restarts (full k-means only).

    Ids come from the input alone, so the same assignment serves training and test.
    """

    kind = "kmeans"
    input_keys = ("pixel_values", "x", "image", "img")

    def __init__(
        self,
        num_contexts: int,
        features: Union[str, Featurizer, torch.nn.Module] = "pixels",
        seed: int = 0,
        minibatch: Optional[bool] = None,
        n_init: int = 3,
    ) -> None:
        super().__init__()
        if isinstance(num_contexts, bool) or not isinstance(num_contexts, int) or num_contexts < 1:
            raise ValueError(f"num_contexts must be an integer >= 1, got {num_contexts!r}.")
        self._num_contexts = num_contexts
        if features == "pixels":
            features = PixelFeatures()
        elif isinstance(features, torch.nn.Module):
            features = BackboneFeatures(features)
        elif not isinstance(features, Featurizer):
            raise ValueError(f"features must be 'pixels', a Featurizer or a backbone nn.Module, got {features!r}.")
        self.features: Featurizer = features
        self.seed = seed
        self.minibatch = minibatch
        self.n_init = n_init
        self.centroids: Optional[torch.Tensor] = None
        self.algorithm: Optional[str] = None

    @property
    def num_contexts(self) -> int:
        return self._num_contexts

    def fit(self, data: ArrayLike) -> "KMeansContexts":
        """Cluster the training inputs (N, ...); priors are the cluster shares."""
        features = self.features(data)
        count = features.shape[0]
        if count < self.num_contexts:
            raise ValueError(
                f"k-means asked for {self.num_contexts} clusters but got only {count} samples; "
                "fit on more data or lower num_contexts."
            )
        minibatch = self.minibatch if self.minibatch is not None else count > MINIBATCH_THRESHOLD
        array = features.numpy()
        if minibatch:
            kmeans = MiniBatchKMeans(self.num_contexts, random_state=self.seed, batch_size=4096, n_init=self.n_init)
            generator = torch.Generator().manual_seed(self.seed)
            for _ in tqdm(range(3), desc="k-means epochs", leave=False):
                for chunk in torch.randperm(count, generator=generator).split(4096):
                    kmeans.partial_fit(array[chunk.numpy()])
        else:
            kmeans = KMeans(self.num_contexts, random_state=self.seed, n_init=self.n_init).fit(array)
        self.centroids = torch.as_tensor(kmeans.cluster_centers_, dtype=torch.float32)
        self.algorithm = type(kmeans).__name__
        self._set_priors_from_ids(self._nearest(features))
        return self

    def _nearest(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cdist(features, self.centroids).argmin(1)

    def assign(self, data: ArrayLike) -> torch.Tensor:
        """Nearest centroid of every sample, from the input alone: (N,) int64."""
        self._check_fitted()
        return self._nearest(self.features(data))

    def _config(self) -> Dict[str, Any]:
        return {
            "features": self.features.config(),
            "seed": self.seed,
            "minibatch": self.minibatch,
            "n_init": self.n_init,
            "algorithm": self.algorithm,
        }

    def _tensors(self) -> Dict[str, torch.Tensor]:
        backbone = {f"features.{name}": tensor for name, tensor in self.features.tensors().items()}
        return {"centroids": self.centroids, **backbone}

    @classmethod
    def _from_saved(cls, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> "KMeansContexts":
        backbone = {name[len("features.") :]: t for name, t in tensors.items() if name.startswith("features.")}
        features = Featurizer.from_saved(config["features"], backbone)
        source = cls(config["num_contexts"], features, config["seed"], config["minibatch"], config["n_init"])
        source.centroids = tensors["centroids"]
        source.algorithm = config.get("algorithm")
        return source
