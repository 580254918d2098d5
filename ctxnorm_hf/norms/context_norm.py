"""Context Normalization (CN): batch statistics per context, running statistics per context.

    y = gamma_k * (x - mu_k) / sqrt((var_k + eps) * lambda_k) + beta_k,   k = context of the sample

mu_k, var_k are the mean and (biased) variance of the activations of the
samples of context k in the mini-batch, per channel, over the samples and all
non-channel positions. With K = 1 and lambda = 1 this is nn.BatchNorm.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from .sync import all_gather_moments, all_reduce_sum, is_distributed
from ._validation import PriorsLike
from .base import IdConditionedNorm
from .layout import ChannelLayout
from .statistics import (
    context_affine,
    gathered_affine,
    index_sum,
    pool_moments_by_id,
    sample_gradient_sums,
    standardize_rows,
    stats_dtype,
    update_running_stats_,
)


class _ContextBatchNormFunction(torch.autograd.Function):
    """Training-mode CN with a hand-written backward.

    Autograd through the per-sample moments would cost several passes over
    the input; this backward costs one reduction pass and two fused updates,
    about what BatchNorm's costs. Contexts with at most one element in the
    batch use the running statistics given, which then act as constants.

    Inputs: x3 (3-D view), context_ids (N,), gain (K, C) = gamma/sqrt(lambda),
    bias (K, C) or None, running_mean / running_var (K, C).
    Outputs: y3, and the batch count (K,), mean and unbiased variance (K, C)
    for the running statistics (non-differentiable).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x3: torch.Tensor,
        context_ids: torch.Tensor,
        gain: torch.Tensor,
        bias: Optional[torch.Tensor],
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        eps: float,
        layout: ChannelLayout,
        group: Optional[Any],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(x3.device.type, enabled=False):
            rows = standardize_rows(x3, layout)
            pooled = pool_moments_by_id(rows.moments, context_ids, gain.shape[0])
            if group is not None:
                pooled = all_gather_moments(pooled, group)
            from_batch = (pooled.count > 1).unsqueeze(1)
            mean = torch.where(from_batch, pooled.mean, running_mean)
            var = torch.where(from_batch, pooled.variance(), running_var)
            inv_std = torch.rsqrt(var + eps)
            context_scale, context_shift = context_affine(mean, inv_std, gain, bias)
            # y = x * scale_k + shift_k with x = values * row_scale + row_offset, written in the buffer of values
            scale = context_scale.index_select(0, context_ids)
            shift = torch.addcmul(context_shift.index_select(0, context_ids), rows.row_offset, scale)
            y3 = rows.values.mul_(layout.expand(scale * rows.row_scale)).add_(layout.expand(shift))
        ctx.layout = layout
        ctx.group = group
        ctx.has_bias = bias is not None
        # The statistics outputs get no gradient; materialising zeros for them would cost time.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x3, context_ids, gain, pooled.count, rows.moments.mean, mean, inv_std)
        batch_var = pooled.unbiased_variance()
        ctx.mark_non_differentiable(pooled.count, pooled.mean, batch_var)
        return y3.to(x3.dtype), pooled.count, pooled.mean, batch_var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y3: Optional[torch.Tensor], *_: Any) -> Tuple[Optional[torch.Tensor], ...]:
        if grad_y3 is None:
            return (None,) * 9
        x3, context_ids, gain, count, sample_mean, mean, inv_std = ctx.saved_tensors
        layout: ChannelLayout = ctx.layout
        with torch.autocast(x3.device.type, enabled=False):
            x3 = x3.to(mean.dtype)
            grad = grad_y3.to(mean.dtype)
            sample_grad_sum, sample_grad_dot = sample_gradient_sums(grad, x3, sample_mean, layout)
            # sums over each sample's positions of grad and of grad * (x - mu_k), pooled per context
            sample_grad_dot = torch.addcmul(
                sample_grad_dot, sample_mean - mean.index_select(0, context_ids), sample_grad_sum
            )
            local_grads = index_sum(torch.cat([sample_grad_sum, sample_grad_dot], dim=1), context_ids, mean.shape[0])
            # Parameter gradients stay local (DDP averages them); the input gradient needs the global sums.
            local_grad_sum, local_grad_dot = local_grads.chunk(2, dim=1)
            global_grads = local_grads if ctx.group is None else all_reduce_sum(local_grads.clone(), ctx.group)
            grad_sum, grad_dot = global_grads.chunk(2, dim=1)

            # Contexts normalised with running statistics get no gradient through mu_k, var_k.
            inv_count = (torch.where(count > 1, count, torch.inf).reciprocal()).unsqueeze(1)
            scale = inv_std * gain
            # grad_x = scale * grad + x_coef * (x - mu_k) + constant, per context and channel
            x_coef = -scale * inv_std * inv_std * grad_dot * inv_count
            constant = -scale * grad_sum * inv_count - x_coef * mean
            grad_x3 = gathered_affine(grad, context_ids, scale, constant, layout)
            grad_x3.addcmul_(x3, layout.expand(x_coef.index_select(0, context_ids)))
        return (
            grad_x3.to(grad_y3.dtype) if ctx.needs_input_grad[0] else None,
            None,
            inv_std * local_grad_dot if ctx.needs_input_grad[2] else None,
            local_grad_sum if ctx.has_bias and ctx.needs_input_grad[3] else None,
            None,
            None,
            None,
            None,
            None,
        )


class ContextNorm(IdConditionedNorm):
    """Context Normalization (Faye et al.): BatchNorm with one set of statistics per context.

    Args:
        num_features: C.
        num_contexts: K.
        eps: added to the variance.
        momentum: running-statistics rate, BatchNorm semantics (``None``: cumulative average).
        affine: learn per-context gamma_k, beta_k, parameters ``weight`` and ``bias`` of shape (K, C).
        priors: lambda_k, shape (K,), positive, summing to 1; uniform by default.
        channel_dim: 1 for (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W); -1 for (N, ..., C).
        sync_stats: in training, use the statistics of the global batch when torch.distributed
            runs more than one rank (all-gather of K x (1 + 2C) numbers per layer and step).
        process_group: the group to synchronise over (default: the world).

    Shape:
        x: as above; context_ids: (N,) integers in [0, K). Output: shape of x.

    Buffers ``running_mean`` and ``running_var`` (K, C) hold per-context
    statistics (unbiased variance), ``num_batches_tracked`` (K,) the number of
    batches that updated each context. A context absent from the batch keeps
    its running statistics; a context with a single element per channel is
    normalised with them and does not update them.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int,
        *,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        priors: PriorsLike = None,
        channel_dim: int = 1,
        sync_stats: bool = False,
        process_group: Optional[Any] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(
            num_features,
            num_contexts,
            eps=eps,
            channel_dim=channel_dim,
            affine=affine,
            priors=priors,
            device=device,
            dtype=dtype,
        )
        self.sync_stats = sync_stats
        self.process_group = process_group
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum!r}.")
        self.momentum = momentum
        stats_shape = (num_contexts, num_features)
        self.register_buffer("running_mean", torch.zeros(stats_shape, device=device, dtype=stats_dtype(dtype or torch.float32)))
        self.register_buffer("running_var", torch.ones(stats_shape, device=device, dtype=stats_dtype(dtype or torch.float32)))
        self.register_buffer("num_batches_tracked", torch.zeros(num_contexts, dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        super().reset_parameters()

    def forward(self, x: torch.Tensor, context_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x3 = self._view3d(x)
        context_ids = self._check_ids(x, context_ids)
        if not self.training:
            return self._normalize_with(x, context_ids, self.running_mean, torch.rsqrt(self.running_var + self.eps))
        dtype = stats_dtype(x.dtype)

        y3, count, batch_mean, batch_var = _ContextBatchNormFunction.apply(
            x3,
            context_ids,
            self._gain(dtype),
            self._shift(dtype),
            self.running_mean,
            self.running_var,
            self.eps,
            self.layout,
            self._sync_group(),
        )
        self._update_running_stats(count, batch_mean, batch_var)
        return y3.reshape(x.shape)

    def _sync_group(self) -> Optional[Any]:
        """The process group to pool statistics over, or None to use the local batch."""
        if not self.sync_stats or not is_distributed(self.process_group):
            return None
        return self.process_group if self.process_group is not None else torch.distributed.group.WORLD

    def _update_running_stats(self, count: torch.Tensor, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        update_running_stats_(
            self.num_batches_tracked, self.momentum, count, [(self.running_mean, mean), (self.running_var, unbiased_var)]
        )

    def context_state(self, context: int) -> Dict[str, torch.Tensor]:
        state = super().context_state(context)
        state["running_mean"] = self.running_mean[context].clone()
        state["running_var"] = self.running_var[context].clone()
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}, sync_stats={self.sync_stats}"
