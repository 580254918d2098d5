"""ContextCollator: any collator, plus the context ids of the batch."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from transformers import default_data_collator

from .contexts import ContextSource
from .routing import CONTEXT_IDS_KWARG

Collator = Callable[[List[Any]], Dict[str, Any]]


class ContextCollator:
    """Wraps a collator and adds ``context_ids`` (N,) int64 to every batch.

    Args:
        context_source: a fitted source; its ``assign`` reads ``source_key`` of the collated
            batch (labels for superclasses, pixel values for k-means, a domain column for
            domains). May be None when the examples already carry a ``context_ids`` column.
        collate_fn: the collator to wrap (default: transformers' default_data_collator, which
            also renames ``label`` to ``labels``).
        source_key: the batch key the source reads; by default the first of the source's
            ``input_keys`` present in the batch.
        output_key: where the ids go (``context_ids``, what converted models take).

    Works with dict examples: a datasets.Dataset (with or without ``with_transform``) in a torch
    DataLoader, or any map-style dataset of dicts.
    """

    def __init__(
        self,
        context_source: Optional[ContextSource] = None,
        collate_fn: Optional[Collator] = None,
        source_key: Optional[str] = None,
        output_key: str = CONTEXT_IDS_KWARG,
    ) -> None:
        self.context_source = context_source
        self.collate_fn = collate_fn or default_data_collator
        self.source_key = source_key
        self.output_key = output_key

    def _key(self, batch: Dict[str, Any]) -> str:
        if self.source_key is not None:
            if self.source_key not in batch:
                raise KeyError(f"ContextCollator: batch has no {self.source_key!r}; its keys are {sorted(batch)}.")
            return self.source_key
        for key in self.context_source.input_keys:
            if key in batch:
                return key
        raise KeyError(
            f"ContextCollator: none of {list(self.context_source.input_keys)} (what {type(self.context_source).__name__} "
            f"reads) is in the batch, whose keys are {sorted(batch)}. Pass source_key=..."
        )

    def __call__(self, examples: List[Any]) -> Dict[str, Any]:
        batch = self.collate_fn(examples)
        if not isinstance(batch, dict):
            raise TypeError(
                f"ContextCollator needs dict batches (dataset examples as dicts), got {type(batch).__name__}."
            )
        if self.output_key in batch:
            batch[self.output_key] = torch.as_tensor(batch[self.output_key]).long()
            return batch
        if self.context_source is None:
            raise ValueError(
                f"ContextCollator has no context_source and the examples carry no {self.output_key!r} column."
            )
        batch[self.output_key] = self.context_source.assign(batch[self._key(batch)])
        return batch
