"""Mixture Normalization (Kalayeh & Shah, CVPR 2019), re-implemented from the paper as a baseline.

Each mini-batch, a diagonal Gaussian mixture with K components is fitted by
EM to the position vectors (the C channels at one position), without
backpropagation through EM. With the posteriors tau_k(x) of that fit, each
component has the posterior-weighted moments of the batch

    lambda_k = mean_i tau_ik,  mu_k = sum_i tau_ik x_i / sum_i tau_ik,  var_k likewise,

and the output is  gamma * sum_k tau_k(x) / sqrt(lambda_k) * (x - mu_k) / sqrt(var_k + eps) + beta
with one shared affine. Gradients flow through the weighted moments, as in
BatchNorm. The moments are averaged into running buffers (momentum) which
give both the posteriors and the statistics in eval mode; each EM starts
from them, which keeps component identities stable across batches.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .base import NormBase
from .layout import ChannelLayout
from .statistics import (
    Moments,
    diagonal_gaussian_log_joint,
    mixture_affine,
    pool_moments_by_weight,
    stats_dtype,
    update_running_stats_,
)

_ROWS = ChannelLayout(channels_last=True)


def _weighted_row_moments(points: torch.Tensor, posterior: torch.Tensor) -> Moments:
    """Posterior-weighted moments of rows (S, C) under weights (S, K): count (K,), mean, m2 (K, C)."""
    single = torch.ones(points.shape[0], dtype=points.dtype, device=points.device)
    return pool_moments_by_weight(Moments(single, points, None), posterior)


@torch.no_grad()
def fit_diagonal_mixture(
    points: torch.Tensor,
    means: torch.Tensor,
    log_vars: torch.Tensor,
    log_priors: torch.Tensor,
    iterations: int,
    var_floor: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EM for a diagonal Gaussian mixture, started from the given parameters.

    Args:
        points: (P, C). means, log_vars: (K, C). log_priors: (K,).
    Returns:
        means, log_vars, log_priors after ``iterations`` EM steps; a component
        that receives no mass keeps its previous parameters.
    """
    for _ in range(iterations):
        posterior = diagonal_gaussian_log_joint(points, means, log_vars, log_priors).softmax(1)
        fitted = _weighted_row_moments(points, posterior)
        alive = (fitted.count > 1e-6).unsqueeze(1)
        means = torch.where(alive, fitted.mean, means)
        log_vars = torch.where(alive, fitted.variance().clamp_min(var_floor).log(), log_vars)
        log_priors = (fitted.count / points.shape[0]).clamp_min(torch.finfo(points.dtype).tiny).log()
    return means, log_vars, log_priors


class MixtureNorm(NormBase):
    """MixtureNorm baseline: normalization by the components of a per-batch EM-fitted mixture.

    Args:
        num_features: C.
        num_contexts: K, mixture components.
        eps, momentum: as in nn.BatchNorm (momentum ``None``: cumulative average).
        affine: learn the shared gamma, beta (``weight``, ``bias``, shape (C,)).
        channel_dim: 1 for (N, C, *), -1 for (N, *, C).
        em_iterations: EM steps per training batch.
        max_em_points: EM runs on an evenly strided subset of at most this many
            position vectors (the weighted moments use all of them).

    Buffers ``running_mean``, ``running_var`` (K, C), ``running_prior`` (K,)
    and ``num_batches_tracked`` (K,).

    Shape:
        x: (N, C, *) or (N, *, C). Output: shape of x.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        *,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        channel_dim: int = 1,
        em_iterations: int = 2,
        max_em_points: int = 4096,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(
            num_features,
            num_contexts,
            eps=eps,
            channel_dim=channel_dim,
            affine=affine,
            per_context_affine=False,
            device=device,
            dtype=dtype,
        )
        if em_iterations < 1 or max_em_points < num_contexts:
            raise ValueError(
                f"em_iterations must be >= 1 and max_em_points >= num_contexts ({num_contexts}), "
                f"got {em_iterations} and {max_em_points}."
            )
        self.momentum = momentum
        self.em_iterations = em_iterations
        self.max_em_points = max_em_points
        stats = {"device": device, "dtype": stats_dtype(dtype or torch.float32)}
        self.register_buffer("running_mean", torch.zeros(num_contexts, num_features, **stats))
        self.register_buffer("running_var", torch.ones(num_contexts, num_features, **stats))
        self.register_buffer("running_prior", torch.full((num_contexts,), 1.0 / num_contexts, **stats))
        self.register_buffer("num_batches_tracked", torch.zeros(num_contexts, dtype=torch.long, device=device))

    def _initial_mixture(self, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where EM starts: the running mixture, or K random points of the first batch."""
        dtype = points.dtype
        if bool(self.num_batches_tracked.any()):
            return (
                self.running_mean.to(dtype),
                self.running_var.to(dtype).clamp_min(self.eps).log(),
                self.running_prior.to(dtype).log(),
            )
        picks = torch.randperm(points.shape[0], device=points.device)[: self.num_contexts]
        if picks.numel() < self.num_contexts:
            picks = torch.randint(points.shape[0], (self.num_contexts,), device=points.device)
        log_var = points.var(0, correction=0).clamp_min(self.eps).log()
        uniform = torch.full((self.num_contexts,), -math.log(self.num_contexts), dtype=dtype, device=points.device)
        return points[picks].clone(), log_var.expand(self.num_contexts, -1).clone(), uniform

    def forward(self, x: torch.Tensor, context_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalise x; ``context_ids`` is ignored (this layer infers its contexts) and accepted for a uniform call."""
        x3 = self._view3d(x)
        dtype = stats_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            points = self.layout.position_vectors(x3.to(dtype))
            if self.training:
                with torch.no_grad():
                    stride = math.ceil(points.shape[0] / self.max_em_points)
                    subset = points[::stride].detach()
                    mixture = fit_diagonal_mixture(
                        subset, *self._initial_mixture(subset), self.em_iterations, self.eps
                    )
                    posterior = diagonal_gaussian_log_joint(points, *mixture).softmax(1)
                batch = _weighted_row_moments(points, posterior)
                from_batch = (batch.count > 1).unsqueeze(1)
                mean = torch.where(from_batch, batch.mean, self.running_mean.to(dtype))
                var = torch.where(from_batch, batch.variance(), self.running_var.to(dtype))
                prior = batch.count / points.shape[0]
                update_running_stats_(
                    self.num_batches_tracked,
                    self.momentum,
                    batch.count,
                    [
                        (self.running_mean, batch.mean),
                        (self.running_var, batch.unbiased_variance()),
                        (self.running_prior, prior),
                    ],
                )
            else:
                mean, var = self.running_mean.to(dtype), self.running_var.to(dtype)
                prior = self.running_prior.to(dtype)
                log_prior = prior.clamp_min(torch.finfo(dtype).tiny).log()
                posterior = diagonal_gaussian_log_joint(points, mean, var.clamp_min(self.eps).log(), log_prior).softmax(1)
            # tau_k / sqrt(lambda_k) * (x - mu_k) / sqrt(var_k + eps), then the shared affine
            scale = torch.rsqrt(var + self.eps) * prior.clamp_min(torch.finfo(dtype).tiny).rsqrt().unsqueeze(1)
            shift = -mean * scale
            if self.weight is not None:
                scale = scale * self.weight.to(dtype)
                # the posteriors sum to 1, so beta folds into every component's shift
                shift = shift * self.weight.to(dtype) + self.bias.to(dtype)
            rows = mixture_affine(points, posterior, scale, shift, _ROWS)
            y3 = self.layout.from_position_vectors(rows, x.shape[0])
        return y3.to(x.dtype).reshape(x.shape)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, momentum={self.momentum}, em_iterations={self.em_iterations}, "
            f"max_em_points={self.max_em_points}"
        )
