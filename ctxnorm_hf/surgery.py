"""One-line model surgery: swap the BatchNorm / LayerNorm layers of a model for context layers.

    model = convert_norms(model, "cn", 20)
    logits = model(x, context_ids=ids)
    plain = export_context(model, k)

Conversion is function preserving: a converted pretrained model in eval
mode computes what the original computed, for every context id (CN, CN-X,
and LayerNorm sites in "token" mode exactly; ACN up to the symmetry-breaking
perturbation of its means, see :func:`convert_norms`).
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .norms import AdaptiveContextNorm, ContextNorm, ContextNormX, MixtureNorm, ModeNorm
from .norms._validation import PriorsLike, check_num_contexts, check_priors
from .norms.base import IdConditionedNorm
from .norms.norm_act import WITH_ACTIVATION
from .norms.token_norm import AdaptiveContextLayerNorm, ContextLayerNorm
from .routing import ROUTER_ATTRIBUTE, get_router, install_router, uninstall_router
from .sites import SITE_READERS, NormSite, OriginalNorm, looks_like_norm, qualified_name

logger = logging.getLogger(__name__)

STRATEGIES = ("cn", "cnx", "acn", "mixnorm", "modenorm")
LAYER_NORM_MODES = ("token", "batch")
REPORT_ATTRIBUTE = "ctxnorm_conversion"
ORIGIN_ATTRIBUTE = "ctxnorm_origin"

ModuleFilter = Union[str, Sequence[str], None]


@dataclass
class ConversionSpec:
    """The options of one convert_norms call, validated."""

    strategy: str
    num_contexts: int
    priors: torch.Tensor
    layer_norm: str = "token"
    eps: Optional[float] = None
    momentum: Optional[float] = 0.1
    sync_stats: bool = False
    acn_mean_perturbation: float = 1e-3


@dataclass
class ConversionReport:
    """What convert_norms did: converted sites (name -> (original class, new class)) and the
    norm-like modules it left alone (name -> why)."""

    strategy: str
    num_contexts: int
    layer_norm: str
    converted: Dict[str, Tuple[str, str]] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"convert_norms(strategy={self.strategy!r}, K={self.num_contexts}, layer_norm={self.layer_norm!r}): "
            f"{len(self.converted)} converted, {len(self.skipped)} left alone"
        ]
        for (original, new), count in sorted(Counter(self.converted.values()).items()):
            lines.append(f"  converted {count} x {original} -> {new}")
        for reason, count in sorted(Counter(self.skipped.values()).items()):
            lines.append(f"  left alone {count}: {reason}")
        return "\n".join(lines)


# --- building the replacement of one site -------------------------------------------------------


def _ones_like_features(site: NormSite) -> torch.Tensor:
    return torch.ones(site.num_features)


def _site_weight(site: NormSite) -> torch.Tensor:
    return site.weight if site.weight is not None else _ones_like_features(site)


def _site_bias(site: NormSite) -> torch.Tensor:
    return site.bias if site.bias is not None else torch.zeros(site.num_features)


@torch.no_grad()
def _set_context_affine(layer: nn.Module, site: NormSite, priors: torch.Tensor) -> None:
    """weight_k = gamma * sqrt(lambda_k), bias_k = beta: the 1/sqrt(lambda_k) of the layer cancels."""
    layer.weight.copy_(_site_weight(site).unsqueeze(0) * priors.sqrt().unsqueeze(1))
    layer.bias.copy_(_site_bias(site).unsqueeze(0).expand_as(layer.bias))


def _with_statistics(site: NormSite) -> bool:
    return site.kind == "batch"


def _new_layer(cls: type, site: NormSite, spec: ConversionSpec, **options: Any) -> nn.Module:
    """``cls`` sized for the site (C, K, eps, channel_dim), or its variant keeping the site's drop and act."""
    cls = cls if site.act is None else WITH_ACTIVATION[cls]
    layer = cls(site.num_features, spec.num_contexts, eps=spec.eps or site.eps, channel_dim=site.channel_dim, **options)
    if site.act is not None:
        layer.set_activation(site.drop, site.act)
    return layer


def _momentum(site: NormSite, spec: ConversionSpec) -> Optional[float]:
    return spec.momentum if site.momentum is None else site.momentum


def _log_running_var(site: NormSite) -> torch.Tensor:
    return site.running_var.clamp_min(torch.finfo(torch.float32).tiny).log()


@torch.no_grad()
def _copy_running_stats(layer: nn.Module, site: NormSite) -> None:
    """Every context / component starts with the site's running statistics."""
    if _with_statistics(site):
        layer.running_mean.copy_(site.running_mean.expand_as(layer.running_mean))
        layer.running_var.copy_(site.running_var.expand_as(layer.running_var))


def _build_cn(site: NormSite, spec: ConversionSpec, token_mode: bool) -> nn.Module:
    if token_mode:
        layer = _new_layer(ContextLayerNorm, site, spec, priors=spec.priors)
    else:
        layer = _new_layer(
            ContextNorm, site, spec, momentum=_momentum(site, spec), priors=spec.priors, sync_stats=spec.sync_stats
        )
        _copy_running_stats(layer, site)
    _set_context_affine(layer, site, spec.priors)
    return layer


def _build_cnx(site: NormSite, spec: ConversionSpec, token_mode: bool) -> nn.Module:
    if token_mode:
        return _build_cn(site, spec, token_mode)
    layer = _new_layer(ContextNormX, site, spec, priors=spec.priors)
    if _with_statistics(site):
        with torch.no_grad():
            layer.mean.copy_(site.running_mean.expand_as(layer.mean))
            layer.log_var.copy_(_log_running_var(site).expand_as(layer.log_var))
    _set_context_affine(layer, site, spec.priors)
    return layer


def _build_acn(site: NormSite, spec: ConversionSpec, token_mode: bool) -> nn.Module:
    layer = _new_layer(AdaptiveContextLayerNorm if token_mode else AdaptiveContextNorm, site, spec)
    _set_context_affine(layer, site, torch.full((spec.num_contexts,), 1.0 / spec.num_contexts))
    if _with_statistics(site) and not token_mode:
        # Identical components would get identical gradients forever. A zero-sum perturbation of the
        # means breaks the tie while keeping the output change second order in its size.
        perturbation = torch.randn(spec.num_contexts, site.num_features)
        perturbation = (perturbation - perturbation.mean(0)) * spec.acn_mean_perturbation * site.running_var.sqrt()
        with torch.no_grad():
            layer.mean.copy_(site.running_mean + perturbation)
            layer.log_var.copy_(_log_running_var(site).expand_as(layer.log_var))
    return layer


def _build_mixture_or_mode(cls: type) -> Callable[[NormSite, ConversionSpec, bool], nn.Module]:
    def build(site: NormSite, spec: ConversionSpec, token_mode: bool) -> nn.Module:
        layer = _new_layer(cls, site, spec, momentum=_momentum(site, spec))
        # MixtureNorm divides by sqrt(lambda_k): with K identical components the sum carries sqrt(K).
        gain_correction = 1.0 / math.sqrt(spec.num_contexts) if cls is MixtureNorm else 1.0
        with torch.no_grad():
            layer.weight.copy_(_site_weight(site) * gain_correction)
            layer.bias.copy_(_site_bias(site))
        _copy_running_stats(layer, site)
        return layer

    return build


_BUILDERS: Dict[str, Callable[[NormSite, ConversionSpec, bool], nn.Module]] = {
    "cn": _build_cn,
    "cnx": _build_cnx,
    "acn": _build_acn,
    "mixnorm": _build_mixture_or_mode(MixtureNorm),
    "modenorm": _build_mixture_or_mode(ModeNorm),
}
_WITHOUT_TOKEN_MODE = {"mixnorm", "modenorm"}


def _replacement(module: nn.Module, site: NormSite, spec: ConversionSpec) -> Union[nn.Module, str]:
    """The converted layer for one site, or why there is none."""
    if site.unsupported:
        return f"cannot convert: {site.unsupported}"
    token_mode = site.kind == "layer" and spec.layer_norm == "token"
    if token_mode and spec.strategy in _WITHOUT_TOKEN_MODE:
        return f"{spec.strategy} has no per-token mode; pass layer_norm='batch' to convert LayerNorm sites"
    layer = _BUILDERS[spec.strategy](site, spec, token_mode)
    parameter = next(module.parameters(), None)
    if parameter is not None:
        layer = layer.to(device=parameter.device, dtype=parameter.dtype if parameter.is_floating_point() else None)
    layer.train(module.training)
    mode = "batch_norm" if site.kind == "batch" else f"layer_norm_{spec.layer_norm}"
    setattr(layer, ORIGIN_ATTRIBUTE, OriginalNorm.of(module, mode))
    return layer


# --- choosing the sites (PEFT's target_modules semantics) -------------------------------------


def _matches(name: str, pattern: ModuleFilter) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def _check_spec(
    strategy: str,
    num_contexts: int,
    priors: PriorsLike,
    layer_norm: str,
    eps: Optional[float],
    momentum: Optional[float],
    sync_stats: bool,
) -> ConversionSpec:
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    check_num_contexts(num_contexts)
    if layer_norm not in LAYER_NORM_MODES:
        raise ValueError(f"layer_norm must be 'token' (function preserving) or 'batch' (the paper's), got {layer_norm!r}.")
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be > 0 or None (keep each layer's own), got {eps!r}.")
    return ConversionSpec(strategy, num_contexts, check_priors(priors, num_contexts), layer_norm, eps, momentum, sync_stats)


def convert_norms(
    model: nn.Module,
    strategy: str,
    num_contexts: int,
    *,
    priors: PriorsLike = None,
    target_modules: ModuleFilter = None,
    exclude_modules: ModuleFilter = None,
    layer_norm: str = "token",
    eps: Optional[float] = None,
    momentum: Optional[float] = 0.1,
    sync_stats: bool = False,
) -> nn.Module:
    """Replace the normalization layers of ``model`` by context layers, in place; returns ``model``.

    Args:
        model: any timm or transformers model (or nn.Module).
        strategy: "cn", "cnx", "acn", "mixnorm" or "modenorm".
        num_contexts: K.
        priors: lambda_k (K,), the share of the data in each context; uniform by default.
        target_modules: only convert these sites: a regex (full match on the module name) or a
            list of names / name suffixes, as PEFT's target_modules.
        exclude_modules: never convert these sites (same semantics).
        layer_norm: for LayerNorm sites, "token" (per-token statistics, context through the
            affine map; function preserving) or "batch" (per-context batch statistics over samples
            x tokens, as in the paper's ViT trained from scratch).
        eps: overrides every layer's eps; by default each keeps its own.
        momentum: running-statistics momentum for sites that have none of their own.
        sync_stats: CN layers use the statistics of the global batch when torch.distributed runs
            more than one rank (see ctxnorm_hf.distributed; switch later with set_sync_stats).

    Converted layers start as the original: BatchNorm running statistics are copied into every
    context and sqrt(lambda_k) is folded into gamma_k, so eval outputs are unchanged for every
    context id. ACN means get a zero-sum perturbation of 1e-3 running standard deviations to
    break the symmetry between components, which changes eval outputs by O(1e-6) relative.

    After conversion, call ``model(x, context_ids=ids)`` (or use :func:`use_contexts`); the
    report of what was converted and what was left alone is ``model.ctxnorm_conversion``.
    """
    if hasattr(model, ROUTER_ATTRIBUTE):
        raise ValueError(
            "This model is already converted (it has context routing). Convert the original model, "
            "or use export_context(model, k) to get a plain model back."
        )
    spec = _check_spec(strategy, num_contexts, priors, layer_norm, eps, momentum, sync_stats)
    report = ConversionReport(strategy, num_contexts, layer_norm)
    plan: List[Tuple[str, nn.Module]] = []
    found: Counter = Counter()
    for name, module in model.named_modules():
        if not name:
            continue
        class_name = qualified_name(type(module))
        reader = SITE_READERS.get(class_name)
        if reader is None:
            if looks_like_norm(module):
                found[class_name] += 1
                report.skipped[name] = f"unsupported norm class {class_name}"
            continue
        found[class_name] += 1
        if target_modules is not None and not _matches(name, target_modules):
            report.skipped[name] = "not in target_modules"
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            report.skipped[name] = "in exclude_modules"
            continue
        replacement = _replacement(module, reader(module), spec)
        if isinstance(replacement, str):
            report.skipped[name] = replacement
            continue
        plan.append((name, replacement))
        report.converted[name] = (class_name, type(replacement).__name__)

    if not plan:
        found_text = ", ".join(f"{count} x {cls}" for cls, count in sorted(found.items())) or "none"
        reasons = sorted(set(report.skipped.values()))
        raise ValueError(
            f"convert_norms found nothing to convert in {type(model).__name__}. Norm classes found: {found_text}."
            + (f" Reasons: {'; '.join(reasons)}." if reasons else "")
        )

    router = install_router(model)
    for name, replacement in plan:
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacement)
        for layer in replacement.modules():
            if isinstance(layer, IdConditionedNorm):
                layer.router = router
    setattr(model, REPORT_ATTRIBUTE, report)
    logger.info("%s", report)
    return model


def converted_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The layers convert_norms put in ``model``, by module name."""
    return {name: module for name, module in model.named_modules() if hasattr(module, ORIGIN_ATTRIBUTE)}


@torch.no_grad()
def export_context(model: nn.Module, context: int) -> nn.Module:
    """A copy of ``model`` whose converted layers are the original norm classes, set to context ``context``.

    The copy has no context routing and needs no ids; in eval mode it computes what the
    converted model computes for context ``context``. ``model`` is untouched. Supports
    strategies "cn" and "cnx" with BatchNorm sites and LayerNorm sites in token mode; for
    K = 1 this is a full unconvert.
    """
    get_router(model)
    layers = converted_layers(model)
    for name, layer in layers.items():
        origin: OriginalNorm = getattr(layer, ORIGIN_ATTRIBUTE)
        if not isinstance(layer, IdConditionedNorm):
            raise ValueError(
                f"export_context needs layers told their context (strategies 'cn', 'cnx'); {name} is a "
                f"{type(layer).__name__}, which mixes contexts per input."
            )
        if origin.mode == "layer_norm_batch":
            raise ValueError(
                f"{name} replaced a LayerNorm with per-context batch statistics (layer_norm='batch'), "
                "which no plain LayerNorm computes; export_context supports token-mode LayerNorm sites."
            )
    plain = copy.deepcopy(model)
    uninstall_router(plain)
    if hasattr(plain, REPORT_ATTRIBUTE):
        delattr(plain, REPORT_ATTRIBUTE)
    for name, layer in converted_layers(plain).items():
        origin = getattr(layer, ORIGIN_ATTRIBUTE)
        restored = copy.deepcopy(origin.template)
        _load_context_state(restored, layer, context)
        if hasattr(layer, "act"):
            restored.drop, restored.act = layer.drop, layer.act
        parent_name, _, child_name = name.rpartition(".")
        setattr(plain.get_submodule(parent_name), child_name, restored)
    return plain


def _load_context_state(restored: nn.Module, layer: IdConditionedNorm, context: int) -> None:
    reference = layer.weight if layer.weight is not None else layer.priors
    restored.to(device=reference.device, dtype=reference.dtype)
    state = layer.context_state(context)
    restored.weight = nn.Parameter(state["weight"].to(reference.dtype))
    restored.bias = nn.Parameter(state["bias"].to(reference.dtype))
    if "running_mean" in state and getattr(restored, "running_mean", None) is not None:
        restored.running_mean.copy_(state["running_mean"])
        restored.running_var.copy_(state["running_var"])
    restored.eps = layer.eps
    restored.train(layer.training)
