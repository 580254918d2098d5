"""Contexts from a fine-label -> group map (superclasses). Label-derived: unknown at test time."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .base import ContextSource

# CIFAR-100 fine label (index in the dataset's alphabetical fine_label_names) -> coarse label
# (index in coarse_label_names), as distributed with the data set.
CIFAR100_COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]
CIFAR100_COARSE_NAMES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]
# Oxford-IIIT Pet: the 37 breeds in the order of the data set's class ids (list.txt, 0-based);
# cat breeds are the capitalised names, species 1 = cat, 2 = dog in list.txt.
OXFORD_PETS_BREEDS = [
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal",
    "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau", "english_cocker_spaniel",
    "english_setter", "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond",
    "leonberger", "Maine_Coon", "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug",
    "Ragdoll", "Russian_Blue", "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "Siamese",
    "Sphynx", "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
]
# Fashion-MNIST classes 0..9: T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot.
# Grouped by the garment's place on the body: tops, footwear, other (trouser, dress, bag).
FASHION_MNIST_GROUPS = [0, 2, 0, 2, 0, 1, 0, 1, 2, 1]

LabelsLike = Union[torch.Tensor, np.ndarray, Sequence[int]]


def _as_labels(labels: LabelsLike) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {tensor.dtype}.")
    return tensor.long().flatten()


class SuperclassContexts(ContextSource):
    """Context = the group of the sample's fine label.

    Args:
        mapping: fine label -> group, as a sequence indexed by fine label or a dict.
        num_contexts: K; by default max(group) + 1.
        group_names: optional names of the K groups.
        name: what the map is (saved with the source, shown in model cards).

    Ids come from labels, so at test time they must be estimated from the input
    (see ContextTrainer's "inferred" protocol) or taken from labels ("oracle").
    """

    kind = "superclass"
    input_keys = ("labels", "label", "fine_label")
    label_derived = True

    def __init__(
        self,
        mapping: Union[Sequence[int], Mapping[int, int]],
        num_contexts: Optional[int] = None,
        group_names: Optional[Sequence[str]] = None,
        name: str = "custom",
    ) -> None:
        super().__init__()
        table = dict(mapping) if isinstance(mapping, Mapping) else dict(enumerate(mapping))
        if not table:
            raise ValueError("mapping is empty: pass fine label -> group for every fine label.")
        self.mapping: Dict[int, int] = {int(k): int(v) for k, v in table.items()}
        groups = sorted(set(self.mapping.values()))
        self._num_contexts = int(num_contexts) if num_contexts is not None else groups[-1] + 1
        if groups[0] < 0 or groups[-1] >= self._num_contexts:
            bad = [g for g in groups if not 0 <= g < self._num_contexts]
            raise ValueError(
                f"mapping sends labels to groups {bad}, outside [0, {self._num_contexts}). "
                "Number groups 0..K-1 or pass a larger num_contexts."
            )
        if group_names is not None and len(group_names) != self._num_contexts:
            raise ValueError(f"group_names has {len(group_names)} names for {self._num_contexts} groups.")
        self.group_names: Optional[List[str]] = list(group_names) if group_names is not None else None
        self.name = name
        size = max(self.mapping) + 1
        self._lookup = torch.full((size,), -1, dtype=torch.long)
        for fine, group in self.mapping.items():
            if fine < 0:
                raise ValueError(f"fine labels must be >= 0, got {fine}.")
            self._lookup[fine] = group

    @classmethod
    def cifar100(cls) -> "SuperclassContexts":
        """The 20 CIFAR-100 superclasses (coarse labels) of the 100 fine labels."""
        return cls(CIFAR100_COARSE, 20, CIFAR100_COARSE_NAMES, name="cifar100-coarse")

    @classmethod
    def oxford_pets(cls) -> "SuperclassContexts":
        """Oxford-IIIT Pet: 37 breeds -> cat (0) / dog (1)."""
        return cls([0 if breed[0].isupper() else 1 for breed in OXFORD_PETS_BREEDS], 2, ["cat", "dog"], name="oxford-pets-species")

    @classmethod
    def fashion_mnist(cls) -> "SuperclassContexts":
        """Fashion-MNIST: tops (T-shirt, pullover, coat, shirt), footwear (sandal, sneaker, ankle boot), other."""
        return cls(FASHION_MNIST_GROUPS, 3, ["tops", "footwear", "other"], name="fashion-mnist-groups")

    @property
    def num_contexts(self) -> int:
        return self._num_contexts

    def groups_of(self, labels: LabelsLike) -> torch.Tensor:
        """Group of every fine label, without needing a fit: (N,) int64."""
        labels = _as_labels(labels)
        if labels.numel() == 0:
            return labels
        outside = (labels < 0) | (labels >= self._lookup.numel())
        groups = self._lookup[labels.clamp(0, self._lookup.numel() - 1)]
        missing = outside | (groups < 0)
        if missing.any():
            raise ValueError(
                f"The superclass map covers no group for labels {sorted(set(labels[missing].tolist()))[:10]}; "
                "extend the mapping to every fine label of the data."
            )
        return groups

    def fit(self, labels: LabelsLike) -> "SuperclassContexts":
        """Priors lambda_k = the frequency of each group among the training labels."""
        self._set_priors_from_ids(self.groups_of(labels))
        return self

    def assign(self, labels: LabelsLike) -> torch.Tensor:
        self._check_fitted()
        return self.groups_of(labels)

    def _config(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "mapping": {str(k): v for k, v in sorted(self.mapping.items())},
            "group_names": self.group_names,
        }

    @classmethod
    def _from_saved(cls, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> "SuperclassContexts":
        mapping = {int(k): int(v) for k, v in config["mapping"].items()}
        return cls(mapping, config["num_contexts"], config.get("group_names"), name=config.get("name", "custom"))
