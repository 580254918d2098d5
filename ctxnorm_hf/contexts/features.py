"""What k-means clusters: raw pixels, or embeddings from a frozen timm / transformers backbone."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

ArrayLike = Any  # torch.Tensor or np.ndarray of N samples


def as_float_tensor(data: ArrayLike) -> torch.Tensor:
    tensor = data if isinstance(data, torch.Tensor) else torch.as_tensor(np.asarray(data))
    return tensor.detach().float()


class Featurizer(ABC):
    """Maps N samples to N feature vectors (N, D) float32; saved with the context source."""

    kind: str = ""

    @abstractmethod
    def __call__(self, data: ArrayLike) -> torch.Tensor:
        """(N, ...) -> (N, D) float32 on CPU."""

    def config(self) -> Dict[str, Any]:
        return {"kind": self.kind}

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {}

    @staticmethod
    def from_saved(config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> "Featurizer":
        if config["kind"] == PixelFeatures.kind:
            return PixelFeatures()
        if config["kind"] == BackboneFeatures.kind:
            return BackboneFeatures.from_saved(config, tensors)
        raise ValueError(f"Unknown featurizer kind {config['kind']!r}.")


class PixelFeatures(Featurizer):
    """The flattened input."""

    kind = "pixels"

    def __call__(self, data: ArrayLike) -> torch.Tensor:
        tensor = as_float_tensor(data)
        return tensor.reshape(tensor.shape[0], -1)


class BackboneFeatures(Featurizer):
    """Pooled embeddings of a frozen backbone, computed in eval mode under no_grad, in batches.

    Args:
        model: a timm model (pre-logits features: ``forward_head(forward_features(x), pre_logits=True)``)
            or a transformers vision model (``pooler_output``, else the mean of ``last_hidden_state``
            over all non-channel positions).
        batch_size: samples per forward pass.
        device: where to run the backbone (default: where it is).
        model_args: for timm models, the keyword arguments of ``timm.create_model`` beyond the
            name and num_classes (e.g. ``{"in_chans": 1}``), needed to rebuild it when loading.

    Saved with its architecture (timm name and arguments, or the transformers config) and weights,
    so a loaded source assigns the same ids without downloading anything.
    """

    kind = "backbone"

    def __init__(
        self,
        model: nn.Module,
        batch_size: int = 256,
        device: Optional[torch.device] = None,
        model_args: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.model = model.eval()
        self.model_args = dict(model_args or {})
        self.batch_size = batch_size
        self.device = device or next(model.parameters()).device
        self.library = "transformers" if hasattr(model, "config") and hasattr(model.config, "to_dict") else "timm"
        if self.library == "timm" and not hasattr(model, "forward_features"):
            raise ValueError(f"{type(model).__name__} is neither a timm model nor a transformers model.")

    @torch.no_grad()
    def _embed(self, batch: torch.Tensor) -> torch.Tensor:
        if self.library == "timm":
            return self.model.forward_head(self.model.forward_features(batch), pre_logits=True)
        outputs = self.model(pixel_values=batch)
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            hidden = outputs.last_hidden_state
            pooled = hidden.mean(1) if hidden.dim() == 3 else hidden.flatten(2).mean(2)
        return pooled.reshape(pooled.shape[0], -1)

    def __call__(self, data: ArrayLike) -> torch.Tensor:
        tensor = as_float_tensor(data)
        chunks = []
        for start in tqdm(range(0, tensor.shape[0], self.batch_size), desc="embedding", leave=False, unit="batch"):
            batch = tensor[start : start + self.batch_size].to(self.device)
            chunks.append(self._embed(batch).float().cpu())
        return torch.cat(chunks)

    def config(self) -> Dict[str, Any]:
        if self.library == "timm":
            architecture = {
                "name": self.model.default_cfg.get("architecture"),
                "num_classes": self.model.num_classes,
                "model_args": self.model_args,
            }
        else:
            architecture = {"config": self.model.config.to_dict()}
        return {"kind": self.kind, "library": self.library, "batch_size": self.batch_size, **architecture}

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {name: tensor.detach().cpu() for name, tensor in self.model.state_dict().items()}

    @classmethod
    def from_saved(cls, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> "BackboneFeatures":
        if config["library"] == "timm":
            import timm

            model_args = config.get("model_args", {})
            model = timm.create_model(config["name"], pretrained=False, num_classes=config["num_classes"], **model_args)
        else:
            model_args = None
            import transformers

            model_config = transformers.AutoConfig.for_model(**config["config"])
            model = transformers.AutoModel.from_config(model_config)
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"The saved backbone weights do not fit {config.get('name', 'the saved architecture')} rebuilt "
                "from its config; save the source with BackboneFeatures(model, model_args={...}) giving the "
                f"create_model arguments. ({error})"
            ) from error
        return cls(model, batch_size=config["batch_size"], model_args=model_args)
