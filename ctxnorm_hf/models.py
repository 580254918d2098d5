"""Building the classifiers of the recipes: small built-in models, any timm name, any transformers model."""

from __future__ import annotations

import os
from typing import Callable, Dict, Tuple

from torch import nn

ImageShape = Tuple[int, int, int]  # (channels, height, width)


class SmallConvNet(nn.Module):
    """Three conv -> BatchNorm -> ReLU blocks and a linear head; fast on CPU for small images.

    Shape: (N, C, H, W) -> logits (N, num_classes).
    """

    def __init__(self, in_chans: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        layers = []
        channels = in_chans
        for index, out_channels in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]
            if index < 2:
                layers.append(nn.MaxPool2d(2))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _small_convnet(shape: ImageShape, num_classes: int, pretrained: bool) -> nn.Module:
    return SmallConvNet(shape[0], num_classes)


def _small_vit(shape: ImageShape, num_classes: int, pretrained: bool) -> nn.Module:
    """A 4-layer, 64-wide transformers ViT with patches of a quarter of the image side (7 for 28 x 28)."""
    import transformers

    patch = max(shape[1] // 4, 1)
    config = transformers.ViTConfig(
        image_size=shape[1], patch_size=patch, num_channels=shape[0], hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=128, num_labels=num_classes,
    )
    return transformers.ViTForImageClassification(config)


BUILT_IN: Dict[str, Callable[[ImageShape, int, bool], nn.Module]] = {
    "small_convnet": _small_convnet,
    "small_vit": _small_vit,
}


def build_classifier(name: str, shape: ImageShape, num_classes: int, pretrained: bool = False) -> nn.Module:
    """A classifier for images of ``shape`` (C, H, W).

    ``name``: a built-in model (``small_convnet``, ``small_vit``), a timm model name, or a
    transformers model id / local folder (its image-classification head is resized to
    ``num_classes``; ``pretrained`` loads its weights, otherwise it is built from its config).
    """
    if name in BUILT_IN:
        return BUILT_IN[name](shape, num_classes, pretrained)
    if is_timm_name(name):
        import timm

        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **timm_model_args(name, shape))
    return _transformers_classifier(name, shape, num_classes, pretrained)


def is_timm_name(name: str) -> bool:
    import timm

    return name not in BUILT_IN and timm.is_model(name)


def timm_model_args(name: str, shape: ImageShape) -> Dict[str, int]:
    """The ``timm.create_model`` arguments that fit a timm model to images of ``shape``; they are
    also what ``ctxnorm_hf.save_pretrained(..., model_args=...)`` must record to rebuild it."""
    args = {"in_chans": shape[0]}
    if "vit" in name or "deit" in name or "levit" in name:  # position embeddings depend on the image size
        args["img_size"] = shape[1]
    return args


def _transformers_classifier(name: str, shape: ImageShape, num_classes: int, pretrained: bool) -> nn.Module:
    import transformers

    looks_like_hub_id = "/" in name or os.path.isdir(name) or name.endswith(".json")
    if not looks_like_hub_id:
        raise ValueError(f"Unknown model {name!r}: not a built-in ({', '.join(BUILT_IN)}), a timm name, or a transformers id/path.")
    overrides = {"num_labels": num_classes}
    if pretrained:
        return transformers.AutoModelForImageClassification.from_pretrained(name, ignore_mismatched_sizes=True, **overrides)
    config = transformers.AutoConfig.from_pretrained(name, **overrides)
    for attribute, value in (("num_channels", shape[0]), ("image_size", shape[1])):
        if hasattr(config, attribute):
            setattr(config, attribute, value)
    return transformers.AutoModelForImageClassification.from_config(config)
