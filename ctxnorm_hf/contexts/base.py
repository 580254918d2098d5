"""What every context source is: fitted on training data, assigns ids in [0, K), knows lambda_k, saves."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from typing import Any, Dict, Optional, Tuple, Type, Union

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "context_source.json"
TENSORS_NAME = "context_source.safetensors"

PathLike = Union[str, "os.PathLike[str]"]

CONTEXT_SOURCES: Dict[str, Type["ContextSource"]] = {}
"""kind -> class; filled by ``ContextSource.__init_subclass__``; used to load a saved source."""


class ContextSource(ABC):
    """Gives every sample a context id in [0, K) and knows the share of the data in each context.

    Subclasses set ``kind`` (the name they are saved under) and ``label_derived``
    (True when ids are computed from the label, so they are unknown at test time).
    """

    kind: str = ""
    label_derived: bool = False
    input_keys: Tuple[str, ...] = ()
    """Batch keys :meth:`assign` reads, in order of preference (for ContextCollator)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            CONTEXT_SOURCES[cls.kind] = cls

    def __init__(self) -> None:
        self._priors: Optional[torch.Tensor] = None

    @property
    @abstractmethod
    def num_contexts(self) -> int:
        """K."""

    @property
    def is_fitted(self) -> bool:
        return self._priors is not None

    @property
    def priors(self) -> torch.Tensor:
        """lambda_k: (K,) float32, the share of the fitted data in each context, summing to 1."""
        self._check_fitted()
        return self._priors.clone()

    def _set_priors_from_ids(self, ids: torch.Tensor) -> None:
        counts = torch.bincount(ids.long().flatten(), minlength=self.num_contexts).double()
        self._priors = (counts / counts.sum()).float()

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(
                f"{type(self).__name__} is not fitted: call .fit(...) on the training data first, "
                "or load a fitted source with ContextSource.load(path)."
            )

    @abstractmethod
    def assign(self, data: Any) -> torch.Tensor:
        """Context ids (N,) int64 in [0, K) for N samples."""

    # --- persistence -------------------------------------------------------------------------

    @abstractmethod
    def _config(self) -> Dict[str, Any]:
        """JSON-serialisable constructor state."""

    def _tensors(self) -> Dict[str, torch.Tensor]:
        """Fitted tensors to store next to the config."""
        return {}

    @classmethod
    @abstractmethod
    def _from_saved(cls, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> "ContextSource":
        """Rebuild a fitted source from what :meth:`save` wrote."""

    def to_dict(self) -> Dict[str, Any]:
        """Summary for ctxnorm_config.json and model cards."""
        return {
            "kind": self.kind,
            "num_contexts": self.num_contexts,
            "label_derived": self.label_derived,
            "priors": self.priors.tolist() if self.is_fitted else None,
            **self._config(),
        }

    def save(self, directory: PathLike) -> None:
        """Write context_source.json (and context_source.safetensors when there are tensors) into ``directory``."""
        self._check_fitted()
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as handle:
            json.dump(self.to_dict(), handle, indent=2)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self._tensors().items()}
        tensors["priors"] = self._priors
        save_file(tensors, os.path.join(directory, TENSORS_NAME))

    @staticmethod
    def load(directory: PathLike) -> "ContextSource":
        """Load a source saved by :meth:`save`, whatever its kind."""
        config_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}: it holds no saved context source.")
        with open(config_path) as handle:
            config = json.load(handle)
        kind = config.get("kind")
        if kind not in CONTEXT_SOURCES:
            raise ValueError(f"Unknown context source kind {kind!r} in {config_path}; known: {sorted(CONTEXT_SOURCES)}.")
        tensors = load_file(os.path.join(directory, TENSORS_NAME))
        source = CONTEXT_SOURCES[kind]._from_saved(config, tensors)
        source._priors = tensors["priors"]
        return source

    def __repr__(self) -> str:
        return f"{type(self).__name__}(K={self.num_contexts}, fitted={self.is_fitted})"
