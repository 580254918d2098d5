"""Affine maps mixed by a Gaussian-mixture posterior, with a hand-written backward (the core of ACN).

    y = sum_k p(k | x) * (scale_k * x + shift_k),   p(k | x) = softmax_k(log(pi_k N(x; mu_k, diag(var_k))))

at every position vector x (C channels) of a 3-D input view. Autograd through
this composition saves and re-reads a dozen input-sized tensors, and the
gradients of the broadcast (K, C) @ (N, C, M) products copy the input. The
backward here recomputes what is cheaper to recompute than to keep (the mixed
scale, x * x), holds at most one input-sized temporary beside the input
gradient, and gets every parameter gradient from a (K, C) contraction.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .layout import ChannelLayout
from .statistics import GaussianQuadratics


class _PosteriorAffineFunction(torch.autograd.Function):
    """Inputs: x3 (3-D view), the mixture as GaussianQuadratics fields (precision, linear (K, C), const (K,)),
    scale and shift (K, C). Output: y3, x3's shape."""

    @staticmethod
    def forward(
        ctx: Any,
        x3: torch.Tensor,
        precision: torch.Tensor,
        linear: torch.Tensor,
        const: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        layout: ChannelLayout,
    ) -> torch.Tensor:
        log_joint = GaussianQuadratics(precision, linear, const).log_joint(x3, layout)
        posterior = log_joint.softmax(layout.channel_axis)
        y3 = layout.unproject(posterior, shift).addcmul_(x3, layout.unproject(posterior, scale))
        ctx.layout = layout
        ctx.save_for_backward(x3, posterior, precision, linear, scale, shift)
        return y3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y3: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x3, posterior, precision, linear, scale, shift = ctx.saved_tensors
        layout: ChannelLayout = ctx.layout
        need = ctx.needs_input_grad
        # Input-sized temporaries are created one at a time and dropped as soon as they are used,
        # so the peak is the output, the input gradient and one temporary.
        grad_x_y = grad_y3 * x3
        # through the posterior: d/d log_joint of softmax, from d/d posterior_k = scale_k . (g x) + shift_k . g
        grad_posterior = layout.project(grad_x_y, scale).add_(layout.project(grad_y3, shift))
        grad_scale = layout.contract(posterior, grad_x_y) if need[4] else None
        del grad_x_y
        grad_shift = layout.contract(posterior, grad_y3) if need[5] else None
        centred = grad_posterior.sub_((grad_posterior * posterior).sum(layout.channel_axis, keepdim=True))
        grad_log_joint = centred.mul_(posterior)

        grad_x3 = None
        if need[0]:
            # d log_joint_k / dx_c = linear_kc - precision_kc x_c
            grad_x3 = layout.unproject(grad_log_joint, linear)
            grad_x3.addcmul_(grad_y3, layout.unproject(posterior, scale))
            grad_x3.addcmul_(x3, layout.unproject(grad_log_joint, precision), value=-1.0)
        grad_precision = -0.5 * layout.contract(grad_log_joint, x3 * x3) if need[1] else None
        grad_linear = layout.contract(grad_log_joint, x3) if need[2] else None
        grad_const = grad_log_joint.sum((0, layout.position_axis)) if need[3] else None
        return grad_x3, grad_precision, grad_linear, grad_const, grad_scale, grad_shift, None


def posterior_affine(
    x3: torch.Tensor, mixture: GaussianQuadratics, scale: torch.Tensor, shift: torch.Tensor, layout: ChannelLayout
) -> torch.Tensor:
    """y = sum_k p(k | x) (scale_k * x + shift_k) at every position of the 3-D view ``x3``.

    Args:
        x3: (N, C, M) or (N, M, C), in the dtype of the statistics.
        mixture: the components' quadratic forms (:class:`GaussianQuadratics`), (K, C) and (K,).
        scale, shift: (K, C), component k's affine map.
    Returns:
        y3, shaped like x3.
    """
    return _PosteriorAffineFunction.apply(x3, *mixture, scale, shift, layout)
