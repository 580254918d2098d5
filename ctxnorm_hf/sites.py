"""What convert_norms reads off the normalization modules it knows, keyed by exact class.

Dispatch is on the fully qualified class name, never on isinstance: a
subclass of BatchNorm2d with a different forward (timm's SplitBatchNorm2d,
say) is not a BatchNorm2d site, and matching by name avoids importing every
model family of transformers to build the table.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class NormSite:
    """An original normalization module, as convert_norms sees it.

    kind: "batch" (BatchNorm family, statistics over the batch) or "layer"
    (LayerNorm family, statistics over the channels of each position).
    Tensors are detached copies, (C,) each; ``unsupported`` says why the
    module cannot be converted, if it cannot.
    """

    kind: str
    num_features: int
    channel_dim: int
    eps: float
    momentum: Optional[float] = None
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    running_mean: Optional[torch.Tensor] = None
    running_var: Optional[torch.Tensor] = None
    drop: Optional[nn.Module] = None
    act: Optional[nn.Module] = None
    unsupported: Optional[str] = None


@dataclass
class OriginalNorm:
    """Kept on a converted layer (not as a submodule): the class and a copy of the module it replaced."""

    class_name: str
    template: nn.Module
    mode: str  # "batch_norm", "layer_norm_token" or "layer_norm_batch"

    @classmethod
    def of(cls, module: nn.Module, mode: str) -> "OriginalNorm":
        return cls(qualified_name(type(module)), copy.deepcopy(module), mode)


def _detached(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.detach().clone()


def _batch_norm(module: nn.Module) -> NormSite:
    site = NormSite(
        kind="batch",
        num_features=module.num_features,
        channel_dim=1,
        eps=module.eps,
        momentum=module.momentum,
        weight=_detached(module.weight),
        bias=_detached(module.bias),
        running_mean=_detached(module.running_mean),
        running_var=_detached(module.running_var),
    )
    if module.running_mean is None:
        site.unsupported = "track_running_stats=False (it normalises with batch statistics in eval mode too)"
    return site


def _batch_norm_act(module: nn.Module) -> NormSite:
    site = _batch_norm(module)
    site.drop, site.act = module.drop, module.act
    return site


def _layer_norm(channel_dim: int) -> Callable[[nn.Module], NormSite]:
    def read(module: nn.Module) -> NormSite:
        shape = tuple(module.normalized_shape)
        site = NormSite(
            kind="layer",
            num_features=shape[-1],
            channel_dim=channel_dim,
            eps=module.eps,
            weight=_detached(module.weight),
            bias=_detached(module.bias),
        )
        if len(shape) != 1:
            site.unsupported = f"normalized_shape {shape} spans more than the channel dim"
        return site

    return read


def _data_format_layer_norm(module: nn.Module) -> NormSite:
    """transformers' ConvNext-style LayerNorm: data_format is channels_first or channels_last."""
    return _layer_norm(1 if module.data_format == "channels_first" else -1)(module)


_BATCH_NORMS = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"]
_TRANSFORMERS_DATA_FORMAT_LAYER_NORMS = [
    "transformers.models.convnext.modeling_convnext.ConvNextLayerNorm",
    "transformers.models.convnextv2.modeling_convnextv2.ConvNextV2LayerNorm",
    "transformers.models.dinov3_convnext.modeling_dinov3_convnext.DINOv3ConvNextLayerNorm",
]

SITE_READERS: Dict[str, Callable[[nn.Module], NormSite]] = {
    **{f"torch.nn.modules.batchnorm.{name}": _batch_norm for name in _BATCH_NORMS},
    "timm.layers.norm_act.BatchNormAct2d": _batch_norm_act,
    "torch.nn.modules.normalization.LayerNorm": _layer_norm(-1),
    "timm.layers.norm.LayerNorm": _layer_norm(-1),
    "timm.layers.norm.LayerNormFp32": _layer_norm(-1),
    "timm.layers.norm.LayerNorm2d": _layer_norm(1),
    "timm.layers.norm.LayerNorm2dFp32": _layer_norm(1),
    **{name: _data_format_layer_norm for name in _TRANSFORMERS_DATA_FORMAT_LAYER_NORMS},
}
"""Qualified class name -> reader. Register a new norm class here."""


def looks_like_norm(module: nn.Module) -> bool:
    """A module convert_norms should mention when it cannot convert it: a norm class with its own parameters."""
    known_bases = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.modules.normalization.RMSNorm)
    if isinstance(module, known_bases):
        return True
    has_own_state = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
    return "norm" in type(module).__name__.lower() and has_own_state
