"""Vectorised statistics shared by the normalization layers.

All statistics are computed in float32 (float64 for float64 inputs) with
autocast disabled, from per-sample moments combined with Chan's parallel
formula, so a context's statistics cost O(N * C) on top of one pass over the
input whatever the number of contexts K, and inputs with a large offset
(mean 1e4, std 1) keep their precision.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from .layout import ChannelLayout

LOG_2PI = math.log(2.0 * math.pi)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float64 stays, everything else goes to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Moments(NamedTuple):
    count: torch.Tensor  # (E,): number of elements pooled in each entry
    mean: torch.Tensor  # (E, C)
    m2: Optional[torch.Tensor]  # (E, C): sum of squared deviations from mean; None for single elements

    def variance(self) -> torch.Tensor:
        """Biased variance (E, C); 0 for empty entries."""
        return self.m2 / self.count.clamp_min(1.0).unsqueeze(1)

    def unbiased_variance(self) -> torch.Tensor:
        """Unbiased variance (E, C), as BatchNorm keeps in running_var; 0 for entries of at most one element."""
        return self.m2 / (self.count - 1.0).clamp_min(1.0).unsqueeze(1)


class StandardizedRows(NamedTuple):
    """The input rewritten per (sample, channel) row as x = values * row_scale + row_offset.

    ``values`` is a fresh buffer in the stats dtype with rows of small
    magnitude (standardised or centred), so later affine maps written into it
    in place keep their precision whatever the offset of the input.
    """

    values: torch.Tensor  # 3-D, shape of the input
    row_offset: torch.Tensor  # (N, C)
    row_scale: torch.Tensor  # (N, C)
    moments: Moments  # per-sample moments over the M positions


def _centre_rows(x3: torch.Tensor, layout: ChannelLayout) -> StandardizedRows:
    """Subtract each row's first value and take the moments from the centred sums."""
    x3 = x3.to(stats_dtype(x3.dtype))
    batch, positions = x3.shape[0], layout.positions(x3)
    shift = x3.narrow(layout.position_axis, 0, 1).detach()
    centred = x3 - shift
    shift = shift.squeeze(layout.position_axis)
    total = layout.sum_over_positions(centred)
    mean_offset = total / positions
    m2 = (layout.sum_of_squares_over_positions(centred) - total * mean_offset).clamp_min(0.0)
    count = torch.full((batch,), float(positions), dtype=x3.dtype, device=x3.device)
    return StandardizedRows(centred, shift, torch.ones_like(shift), Moments(count, shift + mean_offset, m2))


def sample_moments(x3: torch.Tensor, layout: ChannelLayout) -> Moments:
    """Per-sample, per-channel moments over the M positions: count (N,), mean (N, C), m2 (N, C).

    Differentiable. The sums are taken around a per-row shift from the data
    (the row's first value), which keeps them small whatever the offset.
    """
    return _centre_rows(x3, layout).moments


def standardize_rows(x3: torch.Tensor, layout: ChannelLayout) -> StandardizedRows:
    """Per-sample moments plus a reusable buffer of the standardised input; not differentiable.

    Channels-first rows are contiguous and go through LayerNorm's row-moments
    kernel: one stable pass whose output is the buffer. Channels-last rows
    are centred on their first value.
    """
    if layout.channels_last:
        return _centre_rows(x3, layout)
    x3 = x3.to(stats_dtype(x3.dtype))
    batch, positions = x3.shape[0], layout.positions(x3)
    # A tiny eps keeps constant rows finite (values 0) while leaving the variance recoverable.
    tiny = torch.finfo(x3.dtype).tiny ** 0.5
    # Normalising the last dim of (N, C, M) gives a fresh (N, C, M) tensor, not a view: the CN
    # autograd function returns it, and outputs that are views would forbid in-place activations.
    values, mean, inv_std = torch.native_layer_norm(x3, [positions], None, None, tiny)
    row_scale = inv_std.reciprocal().view(batch, -1)
    m2 = (row_scale.square() - tiny).clamp_min(0.0) * positions
    count = torch.full((batch,), float(positions), dtype=x3.dtype, device=x3.device)
    mean = mean.view(batch, -1)
    return StandardizedRows(values, mean, row_scale, Moments(count, mean, m2))


def sample_gradient_sums(
    grad3: torch.Tensor, x3: torch.Tensor, sample_mean: torch.Tensor, layout: ChannelLayout
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sums over positions of grad and of grad * (x - sample_mean): two (N, C) tensors.

    What a normalization backward reduces. Channels-first inputs use
    BatchNorm's backward reduction kernel over (sample, channel) rows: one
    pass, double accumulation on CPU, no temporary.
    """
    if not layout.channels_last:
        positions = layout.positions(x3)
        rows, grad_rows = x3.reshape(1, -1, positions), grad3.reshape(1, -1, positions)
        flat_mean = sample_mean.reshape(-1)
        _, grad_dot, grad_sum = torch.ops.aten.native_batch_norm_backward(
            grad_rows, rows, None, flat_mean, torch.ones_like(flat_mean), None, None, False, 0.0, [False, True, True]
        )
        return grad_sum.view_as(sample_mean), grad_dot.view_as(sample_mean)
    grad_sum = layout.sum_over_positions(grad3)
    grad_dot = torch.linalg.vecdot(grad3, x3, dim=layout.position_axis) - sample_mean * grad_sum
    return grad_sum, grad_dot


def pool_moments_by_id(moments: Moments, ids: torch.Tensor, num_contexts: int) -> Moments:
    """Pool per-entry moments into K groups by hard assignment (Chan's formula).

    Args:
        moments: count (E,), mean (E, C), m2 (E, C) of E entries (samples, or
            (rank, context) pairs when combining across processes).
        ids: (E,) int64 group of every entry.
    Returns:
        count (K,), mean (K, C), m2 (K, C). Empty groups get count 0 and m2 0.
    """
    count, mean, m2 = moments
    count_column = count.unsqueeze(1)
    # Means are pooled as offsets from the first entry, which keeps their precision for offset data.
    reference = mean[:1].detach()
    offset = mean - reference
    # count and count-weighted offsets in one scatter: column 0 is the count
    sums = index_sum(torch.cat([count_column, offset * count_column], dim=1), ids, num_contexts)
    pooled_count = sums[:, 0]
    pooled_offset = sums[:, 1:] / pooled_count.clamp_min(1.0).unsqueeze(1)
    deviation = offset - pooled_offset.index_select(0, ids)
    pooled_m2 = index_sum(torch.addcmul(m2, deviation * deviation, count_column), ids, num_contexts)
    return Moments(pooled_count, reference + pooled_offset, pooled_m2)


def index_sum(values: torch.Tensor, ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sum the rows of ``values`` (E, D) by group ``ids`` (E,): (num_groups, D)."""
    return values.new_zeros(num_groups, values.shape[1]).index_add_(0, ids, values)


def pool_moments_by_weight(moments: Moments, weights: torch.Tensor) -> Moments:
    """Pool per-entry moments into K groups by soft assignment.

    Entry e contributes ``weights[e, k]`` of its elements to group k. The
    squared deviations are taken around the weighted global mean, which keeps
    the expansion stable for data with a large common offset.

    Args:
        moments: count (E,), mean (E, C), m2 (E, C) or None (single elements).
        weights: (E, K), non-negative, rows summing to 1.
    Returns:
        count (K,), mean (K, C), m2 (K, C).
    """
    count, mean, m2 = moments
    mass = weights * count.unsqueeze(1)  # (E, K)
    pooled_count = mass.sum(0)
    centre = (mean * count.unsqueeze(1)).sum(0, keepdim=True) / count.sum().clamp_min(1.0)
    offset = mean - centre
    safe_count = pooled_count.clamp_min(torch.finfo(mean.dtype).tiny).unsqueeze(1)
    pooled_offset = mass.transpose(0, 1) @ offset / safe_count
    spread = mass.transpose(0, 1) @ (offset * offset)
    pooled_m2 = spread - pooled_offset * pooled_offset * pooled_count.unsqueeze(1)
    if m2 is not None:
        pooled_m2 = pooled_m2 + weights.transpose(0, 1) @ m2
    return Moments(pooled_count, centre + pooled_offset, pooled_m2.clamp_min(0.0))


@torch.no_grad()
def update_running_stats_(
    num_batches_tracked: torch.Tensor,
    momentum: Optional[float],
    count: torch.Tensor,
    updates: Sequence[Tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Exponential moving average of per-context statistics, in place, BatchNorm semantics.

    Only contexts with more than one element in the batch (``count`` (K,))
    are updated; the others keep their statistics bit for bit.

    Args:
        num_batches_tracked: (K,) int64 buffer, incremented for updated contexts.
        momentum: as in nn.BatchNorm; ``None`` gives the cumulative average.
        updates: (running buffer, batch value) pairs, each of shape (K, ...).
    """
    updated = count.detach() > 1
    num_batches_tracked.add_(updated.long())
    for running, batch in updates:
        if momentum is None:
            rate = 1.0 / num_batches_tracked.clamp_min(1).to(running.dtype)
        else:
            rate = torch.full(updated.shape, float(momentum), dtype=running.dtype, device=running.device)
        rate = (rate * updated).view(-1, *([1] * (running.dim() - 1)))
        running.lerp_(batch.detach().to(running.dtype), rate)


class GaussianQuadratics(NamedTuple):
    """A diagonal Gaussian mixture as quadratic forms of x, the expanded form scikit-learn's diagonal GMM uses:

        log(pi_k N(x; mu_k, diag(var_k))) = const_k + sum_c (linear_kc x_c - precision_kc x_c^2 / 2)

    so evaluating every component costs two C -> K projections and no (positions, K, C) tensor.
    """

    precision: torch.Tensor  # (K, C): 1 / var_k
    linear: torch.Tensor  # (K, C): mu_k / var_k
    const: torch.Tensor  # (K,)

    @classmethod
    def from_gaussians(cls, means: torch.Tensor, log_vars: torch.Tensor, log_priors: torch.Tensor) -> "GaussianQuadratics":
        """means, log_vars: (K, C); log_priors: (K,), normalised log mixing weights."""
        precision = torch.exp(-log_vars)
        linear = means * precision
        const = log_priors - 0.5 * (means.shape[1] * LOG_2PI + log_vars.sum(1) + (means * linear).sum(1))
        return cls(precision, linear, const)

    def log_joint(self, points: torch.Tensor, layout: ChannelLayout) -> torch.Tensor:
        """log(pi_k N(x; mu_k, diag(var_k))) at every position: ``points``' channel axis replaced by K."""
        log_joint = layout.project(points * points, -0.5 * self.precision)
        return layout.project(points, self.linear, add_to=log_joint).add_(layout.along_channels(self.const))


def diagonal_gaussian_log_joint(
    points: torch.Tensor,
    means: torch.Tensor,
    log_vars: torch.Tensor,
    log_priors: torch.Tensor,
    layout: ChannelLayout = ChannelLayout(channels_last=True),
) -> torch.Tensor:
    """log(pi_k N(x; mu_k, diag(var_k))) for every position vector x and component k.

    Args:
        points: (S, C) rows (the default channels-last layout) or a 3-D input view.
        means, log_vars: (K, C). log_priors: (K,), normalised log mixing weights.
    Returns:
        the channel axis of ``points`` replaced by K: (S, K), (N, K, M) or (N, M, K).
    """
    return GaussianQuadratics.from_gaussians(means, log_vars, log_priors).log_joint(points, layout)


def mixture_affine(
    x3: torch.Tensor, weights3: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, layout: ChannelLayout
) -> torch.Tensor:
    """y = sum_k w_k (scale_k * x + shift_k) for soft per-position weights.

    Args:
        x3: 3-D input view. weights3: x3 with C replaced by K (from
            :func:`diagonal_gaussian_log_joint`). scale, shift: (K, C).
    """
    return x3 * layout.unproject(weights3, scale) + layout.unproject(weights3, shift)


def context_affine(
    mean: torch.Tensor, inv_std: torch.Tensor, gain: torch.Tensor, bias: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold (x - mu_k) * inv_std_k * gain_k + beta_k into x * scale_k + shift_k; all (K, C)."""
    scale = inv_std * gain
    shift = -mean * scale if bias is None else bias - mean * scale
    return scale, shift


def gathered_affine(
    x3: torch.Tensor, context_ids: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, layout: ChannelLayout
) -> torch.Tensor:
    """y = scale[k] * x + shift[k] with k the context of each sample.

    Args:
        x3: 3-D input view. context_ids: (N,) int64. scale, shift: (K, C).
    Returns:
        the 3-D output in the dtype of the statistics.
    """
    return layout.affine_rows(
        x3.to(scale.dtype), scale.index_select(0, context_ids), shift.index_select(0, context_ids)
    )


def inverse_std(log_var: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(exp(log_var) + eps), finite with finite gradients for any log_var."""
    return torch.exp(-0.5 * torch.logaddexp(log_var, torch.full_like(log_var, math.log(eps))))
