"""Small real timm and transformers models for the surgery tests, built offline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import timm
import torch
import transformers
from torch import nn

NUM_CLASSES = 5


@dataclass
class ModelCase:
    build: Callable[[], nn.Module]
    inputs: Callable[[int], Dict[str, torch.Tensor]]
    transformers: bool = False

    def output(self, model: nn.Module, batch: Dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        if not self.transformers:
            return model(batch["x"], **kwargs)
        out = model(**batch, **kwargs)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _timm(name: str, size: int, **kwargs) -> ModelCase:
    return ModelCase(
        build=lambda: timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs),
        inputs=lambda n: {"x": torch.randn(n, 3, size, size)},
    )


def _pixels(size: int) -> Callable[[int], Dict[str, torch.Tensor]]:
    return lambda n: {"pixel_values": torch.randn(n, 3, size, size)}


TIMM_CASES: Dict[str, ModelCase] = {
    "resnet18": _timm("resnet18", 32),
    "densenet121": _timm("densenet121", 32),
    "efficientnet_b0": _timm("efficientnet_b0", 32),
    "mobilenetv3_small_100": _timm("mobilenetv3_small_100", 32),
    "vit_tiny_patch16_224": _timm("vit_tiny_patch16_224", 32, img_size=32),
    "deit_tiny_patch16_224": _timm("deit_tiny_patch16_224", 32, img_size=32),
    "convnext_atto": _timm("convnext_atto", 32),
    "levit_128s": _timm("levit_128s", 64, img_size=64),
}

TRANSFORMERS_CASES: Dict[str, ModelCase] = {
    "hf_vit": ModelCase(
        build=lambda: transformers.ViTForImageClassification(
            transformers.ViTConfig(
                image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, num_labels=NUM_CLASSES,
            )
        ),
        inputs=_pixels(32),
        transformers=True,
    ),
    "hf_convnext": ModelCase(
        build=lambda: transformers.ConvNextForImageClassification(
            transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=NUM_CLASSES)
        ),
        inputs=_pixels(32),
        transformers=True,
    ),
    "hf_resnet": ModelCase(
        build=lambda: transformers.ResNetForImageClassification(
            transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=NUM_CLASSES)
        ),
        inputs=_pixels(32),
        transformers=True,
    ),
    "hf_bert": ModelCase(
        build=lambda: transformers.BertModel(
            transformers.BertConfig(
                vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
            )
        ),
        inputs=lambda n: {"input_ids": torch.randint(0, 50, (n, 7))},
        transformers=True,
    ),
}

ALL_CASES: Dict[str, ModelCase] = {**TIMM_CASES, **TRANSFORMERS_CASES}


@torch.no_grad()
def randomise_norms(model: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters in every norm, so preservation tests mean something."""
    for module in model.modules():
        running_mean = getattr(module, "running_mean", None)
        if isinstance(running_mean, torch.Tensor) and running_mean.dim() == 1:
            module.running_mean.normal_(0.0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, nn.Parameter):
            weight.uniform_(0.5, 1.5)
            if getattr(module, "bias", None) is not None:
                module.bias.normal_(0.0, 0.2)
    return model
