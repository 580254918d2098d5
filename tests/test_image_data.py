"""The recipes' data loaders on files the tests write: the Hub loaders' real path (datasets.load_dataset
of a data set in the Hub's parquet layout), image folders and Fashion-MNIST's IDX files."""

import gzip
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ctxnorm_hf.contexts import SuperclassContexts
from ctxnorm_hf.image_data import LOADERS, load_image_data

HUB_LAYOUTS = {
    # loader name: (Hub id it asks for, image column, label column, number of classes)
    "cifar10": ("uoft-cs/cifar10", "img", "label", 10),
    "cifar100": ("uoft-cs/cifar100", "img", "fine_label", 100),
    "oxford_pets": ("timm/oxford-iiit-pet", "image", "label", 37),
}


def _images(count: int, rng: np.random.Generator, size: int = 12):
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def _hub_layout_dataset(folder: Path, image_key: str, label_key: str, num_classes: int) -> None:
    """A data set as the Hub stores it: data/<split>-*.parquet with image and ClassLabel features."""
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {image_key: datasets.Image(), label_key: datasets.ClassLabel(names=[f"class{i}" for i in range(num_classes)])}
    )
    (folder / "data").mkdir(parents=True)
    for split, count in (("train", 24), ("test", 8)):
        labels = rng.integers(0, num_classes, count).tolist()
        split_data = datasets.Dataset.from_dict({image_key: _images(count, rng), label_key: labels}, features=features)
        split_data.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))


@pytest.mark.parametrize("name", sorted(HUB_LAYOUTS))
def test_hub_loaders_read_the_hub_layout(name, tmp_path, monkeypatch):
    hub_id, image_key, label_key, num_classes = HUB_LAYOUTS[name]
    _hub_layout_dataset(tmp_path / "repo", image_key, label_key, num_classes)
    asked = []
    load_dataset = datasets.load_dataset

    def local_load_dataset(path, *args, **kwargs):  # the Hub is out of reach here: serve the local copy
        asked.append(path)
        return load_dataset(str(tmp_path / "repo"), *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", local_load_dataset)
    data = LOADERS[name](image_size=16)
    assert asked == [hub_id]
    assert data.train_images.shape == (24, 3, 16, 16) and data.test_images.shape == (8, 3, 16, 16)
    assert data.train_images.dtype == torch.float32 and 0 <= data.train_images.min() and data.train_images.max() <= 1
    assert data.num_classes == num_classes and data.train_labels.dtype == torch.int64
    expected = datasets.load_dataset(str(tmp_path / "repo"))["train"][label_key]
    assert data.train_labels.tolist() == expected
    if data.superclasses is not None:  # the built-in map covers every label of the data set
        source = getattr(SuperclassContexts, data.superclasses)().fit(data.train_labels)
        assert source.assign(torch.arange(num_classes)).max() < source.num_contexts


def test_image_folder_reads_class_subfolders(tmp_path):
    rng = np.random.default_rng(1)
    for name, count in (("cat", 10), ("dog", 10)):
        (tmp_path / name).mkdir()
        for index, image in enumerate(_images(count, rng, size=20)):
            image.save(tmp_path / name / f"{index}.png")
    data = load_image_data(f"imagefolder:{tmp_path}", image_size=8, seed=0)
    assert data.class_names == ["cat", "dog"]
    assert len(data.train_labels) + len(data.test_labels) == 20 and data.image_shape == (3, 8, 8)
    assert sorted(torch.cat([data.train_labels, data.test_labels]).bincount().tolist()) == [10, 10]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(2)
    for prefix, count in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, count))
    data = load_image_data("fashion_mnist", directory=str(tmp_path))
    assert data.train_images.shape == (30, 1, 28, 28) and data.test_images.shape == (10, 1, 28, 28)
    assert data.superclasses == "fashion_mnist" and data.num_classes == 10


def test_unknown_data_set_names_the_choices():
    with pytest.raises(ValueError, match="Unknown data set 'svhn'; choose from digits"):
        load_image_data("svhn")
