"""Train a small convnet on scikit-learn's digits with each normalization layer; print test accuracies.

A short, fully offline demonstration of the five layers against BatchNorm.
CN and CN-X get their context ids from k-means on the raw pixels, fitted on
the training split; test images get the id of their nearest centroid, so the
protocol is honest (no label is used to pick a context).

    python recipes/digits_demo.py [--epochs 15] [--contexts 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, Optional

import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from ctxnorm_hf import AdaptiveContextNorm, ContextNorm, ContextNormX, MixtureNorm, ModeNorm

NormFactory = Callable[[int, int], nn.Module]

NORMS: Dict[str, NormFactory] = {
    "bn": lambda channels, k: nn.BatchNorm2d(channels),
    "cn": lambda channels, k: ContextNorm(channels, k),
    "cnx": lambda channels, k: ContextNormX(channels, k),
    "acn": lambda channels, k: AdaptiveContextNorm(channels, k),
    "mixnorm": lambda channels, k: MixtureNorm(channels, k),
    "modenorm": lambda channels, k: ModeNorm(channels, k),
}
USES_IDS = {"cn", "cnx"}


class DigitsNet(nn.Module):
    """Two conv blocks with a normalization layer each, on 1 x 8 x 8 images."""

    def __init__(self, norm: str, num_contexts: int) -> None:
        super().__init__()
        self.uses_ids = norm in USES_IDS
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.norm1 = NORMS[norm](32, num_contexts)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.norm2 = NORMS[norm](64, num_contexts)
        self.head = nn.Linear(64, 10)

    def _norm(self, layer: nn.Module, x: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        return layer(x, ids) if self.uses_ids else layer(x)

    def forward(self, x: torch.Tensor, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (N, 1, 8, 8); ids: (N,) context ids for CN / CN-X. Returns logits (N, 10)."""
        x = torch.relu(self._norm(self.norm1, self.conv1(x), ids))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self._norm(self.norm2, self.conv2(x), ids))
        return self.head(x.mean((2, 3)))


def train_and_evaluate(norm: str, data: Dict[str, torch.Tensor], args: argparse.Namespace) -> float:
    torch.manual_seed(args.seed)
    model = DigitsNet(norm, args.contexts)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y, ids = data["x_train"], data["y_train"], data["ids_train"]
    for _ in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(args.batch_size):
            if len(batch) < 2:
                continue
            loss = nn.functional.cross_entropy(model(x[batch], ids[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = model(data["x_test"], data["ids_test"]).argmax(1)
    return (predictions == data["y_test"]).float().mean().item()


def load_data(num_contexts: int, seed: int) -> Dict[str, torch.Tensor]:
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    # Contexts from the input alone: k-means on training pixels, nearest centroid for test images.
    kmeans = KMeans(num_contexts, n_init=10, random_state=seed).fit(x_train)
    as_images = lambda a: torch.tensor(a, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0  # noqa: E731
    return {
        "x_train": as_images(x_train),
        "x_test": as_images(x_test),
        "y_train": torch.tensor(y_train),
        "y_test": torch.tensor(y_test),
        "ids_train": torch.tensor(kmeans.labels_, dtype=torch.long),
        "ids_test": torch.tensor(kmeans.predict(x_test), dtype=torch.long),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--contexts", type=int, default=4, help="K: k-means contexts / mixture components / modes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--norms", default=",".join(NORMS), help=f"comma-separated subset of {','.join(NORMS)}")
    args = parser.parse_args()
    norms = args.norms.split(",")
    unknown = sorted(set(norms) - set(NORMS))
    if unknown or args.contexts < 1:
        parser.error(f"unknown norms {unknown}" if unknown else "--contexts must be >= 1")
    data = load_data(args.contexts, args.seed)
    print(f"digits: {len(data['x_train'])} train / {len(data['x_test'])} test images, K={args.contexts}")
    print("| norm | test accuracy | seconds |\n|---|---|---|")
    for norm in norms:
        start = time.perf_counter()
        accuracy = train_and_evaluate(norm, data, args)
        print(f"| {norm} | {accuracy:.4f} | {time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main()
