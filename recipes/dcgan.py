"""DCGAN with context normalization in the generator: BN vs MixtureNorm vs ACN, the paper's image-generation experiment.

The generator is a linear layer and four transposed convolutions; the first
three layers (the linear one and the first two transposed convolutions) are
followed by the normalization under test and a ReLU:

    z (128) -> linear -> 4w x 4 x 4 -> norm -> ReLU
            -> tconv 4x4 /2 -> 2w x 8 x 8   -> norm -> ReLU
            -> tconv 4x4 /2 -> w x 16 x 16  -> norm -> ReLU
            -> tconv 4x4 /2 -> w x 32 x 32  -> ReLU
            -> tconv 3x3 /1 -> C x 32 x 32  -> tanh

with norm = nn.BatchNorm2d ("bn"), MixtureNorm ("mixnorm", K components fitted
by EM on each batch) or AdaptiveContextNorm ("acn", a K-component Gaussian
mixture learned by backpropagation); K = --contexts (3 in the paper). ModeNorm
("modenorm") can be compared too; CN and CN-X cannot, since generated samples
have no context ids. The discriminator is the standard DCGAN one (strided 4x4
convolutions, BatchNorm from the second one, LeakyReLU 0.2) and keeps its
BatchNorm. Both networks train with Adam (lr 2e-4, betas (0, 0.9)) on the
non-saturating GAN loss, one discriminator step and one generator step per batch.

Every --fid-every epochs (and after the last one) the generator, in eval mode,
draws --fd-samples images from fixed latents and the Frechet distance between
their features and those of the real training images is recorded:

- FID, when an Inception-v3 can be loaded (pytorch-fid or torch-fidelity with
  their TF-FID weights, else torchvision's ImageNet weights; see ctxnorm_hf.frechet);
- otherwise "FD (feature space of a classifier trained on the data, not
  Inception)": the pooled features of a small convnet trained by this recipe
  on the same real training images (cached in --output-dir/fd_classifier).
  The report says which one was used; the two are not comparable.

The report also gives the distance of as many real test images as a floor:
what a generator matching the data distribution would score at that sample size.

Writes into --output-dir: metrics.json (every run: final / best distance, losses
and distance per epoch; mean ± std over seeds per norm), report.md, curves.png
(discriminator and generator losses and the distance per epoch, mean over
seeds, one line per norm), samples/real.png and
samples/<norm>-seed<seed>/epoch-<n>.png (8 x 8 grids from fixed latents every
--sample-every epochs), and with --checkpoint-every resumable checkpoints in
runs/<norm>-seed<seed>/checkpoints.

Main job (offline, about 5 minutes on a 2-core CPU): 3072 Fashion-MNIST
training images (Debian's dataset-fashion-mnist files) at 1 x 32 x 32, width 32,
batch 32, 4 epochs of 96 steps, distance on 1000 samples every epoch, seeds 0 and 1:

    python recipes/dcgan.py
    python recipes/dcgan.py --dataset digits --norms bn,acn      # the tiny embedded fallback

On a CPU shared with other jobs, OMP_NUM_THREADS=1 can be several times faster
than PyTorch's default of one thread per core (its threads wait on each other).

The paper's setting (CIFAR-100 from the Hugging Face Hub, 32 x 32 RGB, all
50000 training images, K = 3, FID with Inception on 10000 samples; batch size
and epochs are those we run, the paper does not state them all):

    accelerate launch recipes/dcgan.py --dataset cifar100 --train-subset 0 --norms bn,mixnorm,acn \\
        --contexts 3 --width 128 --batch-size 64 --epochs 200 --lr 2e-4 --beta1 0 --beta2 0.9 \\
        --fd-features inception --fd-samples 10000 --fid-every 10 --sample-every 10 \\
        --checkpoint-every 10 --seeds 0,1,2 --output-dir outputs/dcgan_cifar100

(--fd-features inception fails with its reason instead of falling back when no
Inception can be loaded; pip install pytorch-fid to get the standard FID weights.)

Multi-process: ``accelerate launch`` (or ``ACCELERATE_USE_CPU=1 torchrun
--nproc_per_node 2``) trains data-parallel replicas; --batch-size is per
process, and the features of the generated and real images are gathered from
every process before the distance is computed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctxnorm_hf import AdaptiveContextNorm, MixtureNorm, ModeNorm
from ctxnorm_hf.experiment import check_at_least, end_distributed, parse_norms, parse_seeds, set_seed
from ctxnorm_hf.frechet import FeatureSpace, GaussianStats, frechet_distance, gaussian_stats, load_inception
from ctxnorm_hf.image_data import LOADERS, ImageData, load_image_data
from ctxnorm_hf.models import SmallConvNet
from ctxnorm_hf.reporting import format_mean_spread, markdown_table, mean_and_spread, plot_curves, write_json
from ctxnorm_hf.runs import History, RunProgress, RunResult, latest_checkpoint, mean_curves, save_checkpoint

IMAGE_SIZE = 32
HUB_DATASETS = ("cifar10", "cifar100", "oxford_pets")
CLASSIFIER_LABEL = "FD (feature space of a classifier trained on the data, not Inception)"

NormLayer = Callable[[int, int], nn.Module]
GENERATOR_NORMS: Dict[str, NormLayer] = {
    "bn": lambda channels, num_contexts: nn.BatchNorm2d(channels),
    "mixnorm": MixtureNorm,
    "acn": AdaptiveContextNorm,
    "modenorm": ModeNorm,
}
"""Norm name -> layer(num_features, num_contexts) for the generator; CN / CN-X need ids a generator does not have."""


# --- the two networks ------------------------------------------------------------------------------


class Generator(nn.Module):
    """DCGAN generator: latents (N, latent_dim) -> images (N, channels, 32, 32) in [-1, 1].

    ``norm_layer(num_features, num_contexts)`` builds the three normalizations (after the linear
    layer and the first two transposed convolutions).
    """

    def __init__(self, latent_dim: int, width: int, channels: int, norm_layer: NormLayer, num_contexts: int) -> None:
        super().__init__()
        self.width = width
        self.project = nn.Linear(latent_dim, 4 * width * 4 * 4)
        self.norm0 = norm_layer(4 * width, num_contexts)
        self.up1 = nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1)
        self.norm1 = norm_layer(2 * width, num_contexts)
        self.up2 = nn.ConvTranspose2d(2 * width, width, 4, 2, 1)
        self.norm2 = norm_layer(width, num_contexts)
        self.up3 = nn.ConvTranspose2d(width, width, 4, 2, 1)
        self.to_image = nn.ConvTranspose2d(width, channels, 3, 1, 1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.project(latents).view(-1, 4 * self.width, 4, 4)
        x = F.relu(self.norm0(x))
        x = F.relu(self.norm1(self.up1(x)))
        x = F.relu(self.norm2(self.up2(x)))
        x = F.relu(self.up3(x))
        return torch.tanh(self.to_image(x))


class Discriminator(nn.Module):
    """Standard DCGAN discriminator: images (N, channels, 32, 32) -> logits (N,)."""

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * width, 1, 4, 1, 0),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))), batch means. Logits (n,), (m,) -> ()."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss -log D(G(z)), batch mean. Logits (m,) -> ()."""
    return F.softplus(-fake_logits).mean()


# --- where the Frechet distance is measured ------------------------------------------------------------


class PooledFeatures(nn.Module):
    """The globally pooled last feature map of a SmallConvNet: images (N, C, H, W) in [0, 1] -> (N, 4 x width)."""

    def __init__(self, classifier: SmallConvNet) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images).mean((2, 3))


def _cache_key(data: ImageData, args: argparse.Namespace) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", data.name)
    channels, height, width = data.image_shape
    return f"{name}-{channels}x{height}x{width}-n{len(data.train_labels)}-e{args.classifier_epochs}"


def train_feature_classifier(data: ImageData, epochs: int, seed: int = 0) -> Tuple[SmallConvNet, float]:
    """A SmallConvNet trained on the real training images (Adam lr 3e-3, batch 128); returns it and its test accuracy."""
    set_seed(seed)
    model = SmallConvNet(data.image_shape[0], data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    dataset = torch.utils.data.TensorDataset(data.train_images, data.train_labels)
    for _ in range(epochs):
        for images, labels in torch.utils.data.DataLoader(dataset, batch_size=128, shuffle=True):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(batch).argmax(1) for batch in data.test_images.split(512)])
    return model, float((predictions == data.test_labels).float().mean())


def classifier_space(data: ImageData, args: argparse.Namespace, accelerator: Any) -> Tuple[Optional[FeatureSpace], List[str]]:
    """The classifier feature space, trained once by the main process and cached under --output-dir/fd_classifier."""
    path = os.path.join(args.output_dir, "fd_classifier", _cache_key(data, args) + ".pt")
    if accelerator.is_main_process and not os.path.isfile(path):
        model, accuracy = train_feature_classifier(data, args.classifier_epochs)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "test_accuracy": accuracy}, path)
    accelerator.wait_for_everyone()
    saved = torch.load(path, map_location="cpu")
    model = SmallConvNet(data.image_shape[0], data.num_classes)
    model.load_state_dict(saved["state_dict"])
    note = f"feature classifier: SmallConvNet, {args.classifier_epochs} epochs on the training images, test accuracy {saved['test_accuracy']:.3f} (cached in {path})"
    return FeatureSpace("classifier", CLASSIFIER_LABEL, PooledFeatures(model).eval()), [note]


def inception_space(data: ImageData, args: argparse.Namespace, accelerator: Any) -> Tuple[Optional[FeatureSpace], List[str]]:
    space, failures = load_inception()
    return space, [f"Inception not loaded ({failure})" for failure in failures]


FEATURE_SPACES: Dict[str, Callable[[ImageData, argparse.Namespace, Any], Tuple[Optional[FeatureSpace], List[str]]]] = {
    "inception": inception_space,
    "classifier": classifier_space,
}
"""Feature space name -> loader(data, args, accelerator) -> (space or None, notes for the report)."""
FEATURE_CHOICES: Dict[str, Tuple[str, ...]] = {
    "auto": ("inception", "classifier"),
    "inception": ("inception",),
    "classifier": ("classifier",),
}
"""--fd-features -> the feature spaces tried, in order."""


def resolve_feature_space(args: argparse.Namespace, data: ImageData, accelerator: Any, parser: argparse.ArgumentParser) -> Tuple[FeatureSpace, List[str]]:
    """The first feature space of --fd-features that loads, on the device, with the notes of the ones tried;
    when none loads the program ends with their reasons."""
    notes: List[str] = []
    for name in FEATURE_CHOICES[args.fd_features]:
        space, found = FEATURE_SPACES[name](data, args, accelerator)
        notes += found
        if space is not None:
            space.extractor.to(accelerator.device)
            return space, notes
    parser.error("; ".join(notes))


def distance_name(space: FeatureSpace) -> str:
    """'FID' in an Inception space, 'FD' elsewhere."""
    return "FD" if space.name == "classifier" else "FID"


@torch.no_grad()
def gathered_features(loader: Any, to_images: Callable[[torch.Tensor], torch.Tensor], space: FeatureSpace, accelerator: Any) -> torch.Tensor:
    """Features (N, D) of every batch of ``loader`` (each process its shard), gathered on every process.

    ``to_images`` maps a batch to images (n, C, H, W) in [0, 1].
    """
    features = []
    for (batch,) in loader:
        features.append(accelerator.gather_for_metrics(space.extractor(to_images(batch).clamp(0.0, 1.0))).cpu())
    return torch.cat(features)


def _loader(tensors: Sequence[torch.Tensor], batch_size: int, train: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=batch_size, shuffle=train, drop_last=train)


@dataclass
class Reference:
    """What every run is compared with: the feature space, the real training images' Gaussian, the real floor."""

    space: FeatureSpace
    real: GaussianStats
    floor: float
    notes: List[str]


def build_reference(args: argparse.Namespace, data: ImageData, parser: argparse.ArgumentParser) -> Reference:
    """Feature space, statistics of the real training images, and the distance of real test images to them."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    space, notes = resolve_feature_space(args, data, accelerator, parser)
    train, test = (
        accelerator.prepare(_loader([images], args.eval_batch_size, train=False))
        for images in (data.train_images, data.test_images[: args.fd_samples])
    )
    real = gaussian_stats(gathered_features(train, nn.Identity(), space, accelerator))  # real images are in [0, 1]
    floor = frechet_distance(gaussian_stats(gathered_features(test, nn.Identity(), space, accelerator)), real)
    return Reference(space, real, floor, notes)


# --- one run ---------------------------------------------------------------------------------------------


def fixed_latents(count: int, latent_dim: int) -> torch.Tensor:
    """The same (count, latent_dim) standard normal latents for every run and evaluation."""
    return torch.randn(count, latent_dim, generator=torch.Generator().manual_seed(1234))


@torch.no_grad()
def sample_images(generator: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Images (n, C, 32, 32) in [0, 1] from latents (n, latent_dim), generator in eval mode."""
    generator.eval()
    images = (generator(latents) + 1.0) / 2.0
    generator.train()
    return images


def is_due(epoch: int, every: int, last: int) -> bool:
    """Whether something done every ``every`` epochs (and after the last) is due after epoch ``epoch`` (1-based)."""
    return every > 0 and (epoch % every == 0 or epoch == last)


def run_one(norm: str, seed: int, data: ImageData, reference: Reference, args: argparse.Namespace) -> RunResult:
    """Train one DCGAN; the distance of its samples is recorded every --fid-every epochs."""
    from accelerate import Accelerator
    from torchvision.utils import save_image
    from tqdm.auto import tqdm

    started = time.perf_counter()
    accelerator = Accelerator()
    set_seed(seed)
    channels = data.image_shape[0]
    generator = Generator(args.latent_dim, args.width, channels, GENERATOR_NORMS[norm], args.contexts)
    discriminator = Discriminator(args.width, channels)
    betas = (args.beta1, args.beta2)
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=args.lr, betas=betas)
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=args.lr, betas=betas)
    latents = fixed_latents(args.fd_samples, args.latent_dim)
    generator, discriminator, g_optimizer, d_optimizer, train_loader, latent_loader = accelerator.prepare(
        generator, discriminator, g_optimizer, d_optimizer,
        _loader([data.train_images * 2.0 - 1.0], args.batch_size, train=True),
        _loader([latents], args.eval_batch_size, train=False),
    )
    sampler = accelerator.unwrap_model(generator)
    progress = RunProgress()
    accelerator.register_for_checkpointing(progress)
    run_name = f"{norm}-seed{seed}"
    run_dir = os.path.join(args.output_dir, "runs", run_name)
    checkpoint = latest_checkpoint(run_dir) if args.resume else None
    if checkpoint is not None:
        accelerator.load_state(checkpoint)
    metric = distance_name(reference.space)
    steps = len(train_loader)
    bar = tqdm(total=args.epochs * steps, initial=progress.epoch * steps, desc=run_name, disable=not accelerator.is_local_main_process)
    for epoch in range(progress.epoch + 1, args.epochs + 1):
        sums = torch.zeros(2, device=accelerator.device)
        for (real,) in train_loader:
            fake = generator(torch.randn(len(real), args.latent_dim, device=real.device))
            d_optimizer.zero_grad(set_to_none=True)
            d_loss = discriminator_loss(discriminator(real), discriminator(fake.detach()))
            accelerator.backward(d_loss)
            d_optimizer.step()
            g_optimizer.zero_grad(set_to_none=True)
            g_loss = generator_loss(discriminator(fake))
            accelerator.backward(g_loss)
            g_optimizer.step()
            sums += torch.stack([d_loss.detach(), g_loss.detach()])
            bar.update(1)
        means = accelerator.reduce(sums, "mean") / steps
        progress.history.setdefault("D loss", []).append(means[0].item())
        progress.history.setdefault("G loss", []).append(means[1].item())
        if is_due(epoch, args.fid_every, args.epochs):
            features = gathered_features(latent_loader, lambda z: sample_images(sampler, z), reference.space, accelerator)
            progress.history.setdefault(metric, []).append(frechet_distance(gaussian_stats(features), reference.real))
            progress.history.setdefault(f"{metric} epoch", []).append(epoch)
        if accelerator.is_main_process and is_due(epoch, args.sample_every, args.epochs):
            path = os.path.join(args.output_dir, "samples", run_name, f"epoch-{epoch:04d}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_image(sample_images(sampler, latents[:64].to(accelerator.device)), path, nrow=8)
        bar.set_postfix({key: f"{values[-1]:.3f}" for key, values in progress.history.items() if "epoch" not in key})
        progress.epoch = epoch
        if is_due(epoch, args.checkpoint_every, args.epochs):
            save_checkpoint(accelerator, run_dir, epoch)
    bar.close()
    distances = progress.history[metric]
    metrics = {"final": distances[-1], "best": min(distances)}
    return RunResult(norm, seed, metrics, progress.history, time.perf_counter() - started)


# --- the report ------------------------------------------------------------------------------------------


def per_epoch(history: History, metric: str, epochs: int) -> List[float]:
    """A metric recorded at some epochs as one value per epoch, NaN where it was not measured."""
    values = [math.nan] * epochs
    for epoch, value in zip(history.get(f"{metric} epoch", []), history.get(metric, [])):
        values[int(epoch) - 1] = value
    return values


def with_distance_per_epoch(results: Sequence[RunResult], metric: str, epochs: int) -> List[RunResult]:
    """The runs with their distance curve spread over every epoch (NaN where not measured), for mean_curves."""
    return [
        replace(run, history={"D loss": run.history["D loss"], "G loss": run.history["G loss"], metric: per_epoch(run.history, metric, epochs)})
        for run in results
    ]


def summarise(results: Sequence[RunResult], norms: Sequence[str], label: str) -> List[Dict[str, str]]:
    """One row per norm: final and best distance, mean ± std over seeds."""
    rows = []
    for norm in norms:
        runs = [result for result in results if result.norm == norm]
        rows.append({
            "norm": norm,
            f"final {label}": format_mean_spread([run.metrics["final"] for run in runs], scale=1.0, digits=3),
            f"best {label}": format_mean_spread([run.metrics["best"] for run in runs], scale=1.0, digits=3),
            "seeds": str(len(runs)),
            "seconds / run": f"{np.mean([run.seconds for run in runs]):.0f}",
        })
    return rows


def write_report(args: argparse.Namespace, data: ImageData, reference: Reference, results: Sequence[RunResult]) -> str:
    label = reference.space.label
    metric = distance_name(reference.space)
    lines = [
        f"# DCGAN on {data.name}: {', '.join(args.norms)} in the generator",
        "",
        f"- data: {len(data.train_labels)} training images of shape {data.image_shape}, values scaled to [-1, 1]",
        f"- generator: linear + 4 transposed convolutions, width {args.width}, latent {args.latent_dim}; the norm follows the "
        f"first three layers (K = {args.contexts} for mixnorm / acn / modenorm); discriminator: DCGAN with BatchNorm",
        f"- Adam lr {args.lr}, betas ({args.beta1}, {args.beta2}), non-saturating loss, batch {args.batch_size}, "
        f"{args.epochs} epochs, seeds {list(args.seeds)}; mean ± std over seeds",
        f"- distance: **{label}**, {args.fd_samples} generated images (fixed latents, generator in eval mode) against "
        f"the {reference.real.count} real training images, every {args.fid_every} epoch(s)",
        f"- floor: {len(data.test_labels)} real test images score {reference.floor:.3f}",
        *[f"- {note}" for note in reference.notes],
        "",
        markdown_table(summarise(results, args.norms, label)),
        "",
        f"![{metric} and losses per epoch](curves.png)",
        "",
        "Samples (8 x 8 grids from fixed latents): `samples/<norm>-seed<seed>/epoch-<n>.png`; real images: `samples/real.png`.",
        "",
    ]
    report = "\n".join(lines)
    with open(os.path.join(args.output_dir, "report.md"), "w") as handle:
        handle.write(report)
    return report


def write_outputs(args: argparse.Namespace, data: ImageData, reference: Reference, results: Sequence[RunResult]) -> str:
    """metrics.json, curves.png and report.md in --output-dir; returns the report."""
    metric = distance_name(reference.space)
    write_json(
        os.path.join(args.output_dir, "metrics.json"),
        {
            "config": vars(args),
            "distance": {"name": metric, "label": reference.space.label, "feature_space": reference.space.name, "notes": reference.notes},
            "real_test_floor": reference.floor,
            "runs": [asdict(result) for result in results],
            "summary": {
                norm: {key: mean_and_spread([r.metrics[key] for r in results if r.norm == norm]) for key in ("final", "best")}
                for norm in args.norms
            },
        },
    )
    plot_curves(mean_curves(with_distance_per_epoch(results, metric, args.epochs), args.norms), os.path.join(args.output_dir, "curves.png"), f"DCGAN on {data.name}")
    return write_report(args, data, reference, results)


# --- arguments, data and main ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist", help=f"{', '.join(LOADERS)} or imagefolder:<path>")
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--train-subset", type=int, default=3072, help="at most this many training images (0: all)")
    parser.add_argument("--channels", type=int, default=None, choices=(1, 3), help="image channels (default: the data set's)")
    parser.add_argument("--norms", default="bn,mixnorm,acn", help=f"comma-separated generator norms: {', '.join(GENERATOR_NORMS)}")
    parser.add_argument("--contexts", type=int, default=3, help="K: components of mixnorm / acn / modenorm")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds, one run per norm and seed")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--latent-dim", type=int, default=128)
    parser.add_argument("--width", type=int, default=32, help="base channels of both networks (the widest layer has 4 x width)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--beta1", type=float, default=0.0)
    parser.add_argument("--beta2", type=float, default=0.9)
    parser.add_argument("--fid-every", type=int, default=1, help="measure the distance every N epochs (and after the last)")
    parser.add_argument("--fd-samples", type=int, default=1000, help="generated images per measurement (also the real test images of the floor)")
    parser.add_argument("--fd-features", default="auto", choices=tuple(FEATURE_CHOICES), help="auto: Inception if it loads, else a classifier trained here")
    parser.add_argument("--classifier-epochs", type=int, default=3, help="training epochs of the feature classifier")
    parser.add_argument("--eval-batch-size", type=int, default=500)
    parser.add_argument("--sample-every", type=int, default=1, help="save an 8 x 8 grid of samples every N epochs (and after the last)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N epochs (0: never)")
    parser.add_argument("--resume", action="store_true", help="resume each run from its latest checkpoint")
    parser.add_argument("--output-dir", default="outputs/dcgan")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.norms = parse_norms(args.norms, parser)
    without_ids = [norm for norm in args.norms if norm not in GENERATOR_NORMS]
    if without_ids:
        parser.error(f"{', '.join(without_ids)}: not a generator norm (generated samples have no context ids); choose from {', '.join(GENERATOR_NORMS)}")
    try:
        args.seeds = parse_seeds(args.seeds)
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    if args.dataset not in LOADERS and not args.dataset.startswith("imagefolder:"):
        parser.error(f"unknown dataset {args.dataset!r}; choose from {', '.join(LOADERS)} or imagefolder:<path>")
    for name, minimum in (
        ("contexts", 1), ("epochs", 1), ("batch_size", 2), ("latent_dim", 1), ("width", 1), ("fid_every", 1),
        ("fd_samples", 2), ("classifier_epochs", 1), ("eval_batch_size", 1), ("sample_every", 1),
        ("checkpoint_every", 0), ("train_subset", 0),
    ):
        check_at_least(parser, "--" + name.replace("_", "-"), getattr(args, name), minimum)
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            parser.error(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    return args, parser


def load_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ImageData:
    """The training images (at most --train-subset) and --fd-samples test images at 32 x 32; a loading failure ends the program."""
    options: Dict[str, Any] = {"seed": 0, "image_size": IMAGE_SIZE}
    if args.data_dir:
        options["directory"] = args.data_dir
    try:
        data = load_image_data(args.dataset, **options)
    except Exception as error:  # noqa: BLE001 - any loading failure (offline Hub, missing files) ends with its reason
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = "; offline, use --dataset fashion_mnist or digits" if args.dataset in HUB_DATASETS else ""
        parser.error(f"cannot load {args.dataset}: {reason}{hint}")
    data = data.subset(args.train_subset or None, args.fd_samples, seed=0).resized(IMAGE_SIZE, args.channels)
    if len(data.train_labels) < args.batch_size:
        parser.error(f"{data.name} has {len(data.train_labels)} training images, fewer than the batch size {args.batch_size}")
    return data


def main(argv: Optional[Sequence[str]] = None) -> int:
    from accelerate import PartialState
    from torchvision.utils import save_image

    args, parser = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    data = load_data(args, parser)
    reference = build_reference(args, data, parser)
    main_process = PartialState().is_main_process
    if main_process:
        os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
        save_image(data.train_images[:64], os.path.join(args.output_dir, "samples", "real.png"), nrow=8)
    results = [run_one(norm, seed, data, reference, args) for norm in args.norms for seed in args.seeds]
    end_distributed()
    if main_process:
        print(write_outputs(args, data, reference, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
