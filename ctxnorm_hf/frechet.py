"""Frechet distance between two feature distributions: FID when the features are Inception-v3's.

    FD = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

The Gaussians are fitted to features (mean and unbiased covariance, float64).
The trace of (S_1 S_2)^(1/2) is computed as the trace of the symmetric
positive semi-definite (S_1^(1/2) S_2 S_1^(1/2))^(1/2), which has the same
eigenvalues, from two symmetric eigen-decompositions: no complex arithmetic
and no imaginary part to discard (scipy.linalg.sqrtm of the non-symmetric
S_1 S_2 needs both).

Inception feature extractors, tried in order by :func:`load_inception`:

- ``pytorch_fid``: pytorch-fid's port of the TensorFlow FID Inception (the FID of papers);
- ``torch_fidelity``: torch-fidelity's port of the same network;
- ``torchvision``: torchvision's ImageNet Inception-v3, whose FIDs are not comparable with published ones.

All of them download weights on first use; offline, without a cached copy, they fail and
:func:`load_inception` returns None with the reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass
class GaussianStats:
    """A Gaussian fitted to features: mean (D,), covariance (D, D), number of samples."""

    mean: np.ndarray
    cov: np.ndarray
    count: int


def gaussian_stats(features: ArrayLike) -> GaussianStats:
    """Mean and unbiased covariance of features (N, D), N >= 2, in float64."""
    array = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"features must have shape (N, D) with N >= 2, got {array.shape}.")
    return GaussianStats(array.mean(0), np.atleast_2d(np.cov(array, rowvar=False)), array.shape[0])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The square root of a symmetric positive semi-definite matrix (D, D); round-off negatives are clipped."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (eigenvectors * np.sqrt(eigenvalues.clip(min=0.0))) @ eigenvectors.T


def frechet_distance(first: GaussianStats, second: GaussianStats) -> float:
    """The squared 2-Wasserstein distance between N(mu_1, S_1) and N(mu_2, S_2)."""
    if first.mean.shape != second.mean.shape:
        raise ValueError(f"feature sizes differ: {first.mean.shape} vs {second.mean.shape}.")
    root = _psd_sqrt(first.cov)
    cross = np.linalg.eigvalsh(root @ second.cov @ root).clip(min=0.0)
    difference = first.mean - second.mean
    distance = difference @ difference + np.trace(first.cov) + np.trace(second.cov) - 2.0 * np.sqrt(cross).sum()
    return float(max(distance, 0.0))


# --- Inception-v3 feature extractors: images (N, C, H, W) in [0, 1], C in {1, 3} -> (N, 2048) ---------


def _rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class PytorchFidInception(nn.Module):
    """pytorch-fid's FID Inception, pool features (it resizes to 299 and rescales [0, 1] itself)."""

    def __init__(self) -> None:
        super().__init__()
        from pytorch_fid.inception import InceptionV3

        self.net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(_rgb(images))[0].flatten(1)


class TorchFidelityInception(nn.Module):
    """torch-fidelity's FID Inception, pool features (it takes uint8 images and resizes them itself)."""

    def __init__(self) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((_rgb(images) * 255.0).round().clamp(0, 255).to(torch.uint8))[0]


class TorchvisionInception(nn.Module):
    """torchvision's ImageNet Inception-v3, pool features of images resized to 299 and ImageNet-normalised."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import Inception_V3_Weights, inception_v3

        self.net = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1)
        self.net.fc = nn.Identity()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        resized = F.interpolate(_rgb(images), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((resized - self.mean) / self.std)


INCEPTIONS: Dict[str, Tuple[Callable[[], nn.Module], str]] = {
    "pytorch_fid": (PytorchFidInception, "FID (Inception-v3, pytorch-fid's TF-FID weights)"),
    "torch_fidelity": (TorchFidelityInception, "FID (Inception-v3, torch-fidelity's TF-FID weights)"),
    "torchvision": (TorchvisionInception, "FID (torchvision's ImageNet Inception-v3; not comparable with published FIDs)"),
}
"""name -> (constructor of the feature extractor, how to label the distance it gives), in order of preference."""


@dataclass
class FeatureSpace:
    """Where a Frechet distance is measured: an extractor of features (N, D) from images (N, C, H, W) in [0, 1]."""

    name: str
    label: str
    extractor: nn.Module


def load_inception() -> Tuple[Optional[FeatureSpace], List[str]]:
    """The first Inception of INCEPTIONS that loads (in eval mode), and why the ones before it did not."""
    failures = []
    for name, (build, label) in INCEPTIONS.items():
        try:
            return FeatureSpace(name, label, build().eval()), failures
        except Exception as error:  # noqa: BLE001 - missing package, no network, no cached weights
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            failures.append(f"{name}: {reason}")
    return None, failures
