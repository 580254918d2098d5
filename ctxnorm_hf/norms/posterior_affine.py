"""Affine maps mixed by a Gaussian-mixture posterior, with a hand-written backward (the core of ACN).

    y = sum_k p(k | x) * (scale_k * x + shift_k),   p(k | x) = softmax_k(log(pi_k N(x; mu_k, diag(var_k))))

at every position vector x (C channels) of a 3-D input view. Forward and
backward are thirteen (K, C) x input GEMMs and a few elementwise products
(x * x, g * x, the mixed scale). Autograd through this composition would keep
a dozen input-sized tensors and stream each through memory several times.
Here both passes go a few samples at a time (:func:`~.layout.sample_chunks`):
the temporaries of a chunk stay in cache from the GEMM that writes them to
the ones that read them, the output and the input gradient are written in
place chunk by chunk, sums of GEMM results are accumulated inside the GEMMs
(baddbmm / addmm), and only the posterior (K per position) is kept for the
backward. The peak is then the output and the input gradient plus chunk-sized
temporaries.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from .layout import ChannelLayout, sample_chunks
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
        mixture = GaussianQuadratics(precision, linear, const)
        chunks = sample_chunks(x3)
        y3 = _output_like(x3, chunks)
        posteriors = []
        for chunk in chunks:
            x_chunk = x3[chunk]
            posterior = mixture.log_joint(x_chunk, layout).softmax(layout.channel_axis)
            posteriors.append(posterior)
            y_chunk = layout.unproject(posterior, scale, out=_part(y3, chunk)).mul_(x_chunk)
            layout.unproject(posterior, shift, add_to=y_chunk)
        ctx.layout = layout
        ctx.save_for_backward(x3, _joined(posteriors), precision, linear, scale, shift)
        return y_chunk if y3 is None else y3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y3: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x3, posterior, precision, linear, scale, shift = ctx.saved_tensors
        layout: ChannelLayout = ctx.layout
        # (K, C) sums over samples and positions: d/d precision (times -2), linear, scale, shift
        grad_params = scale.new_zeros(4, *scale.shape)
        grad_const = scale.new_zeros(scale.shape[0])
        chunks = sample_chunks(x3)
        grad_x3 = _output_like(x3, chunks)
        neg_precision = -precision
        for chunk in chunks:
            x_chunk, g_chunk, p_chunk = x3[chunk], grad_y3[chunk], posterior[chunk]
            grad_times_x = g_chunk * x_chunk
            # d/d posterior_k = scale_k . (g x) + shift_k . g, then through the softmax:
            # p * (d - sum_k p d), without a second (K per position) temporary
            grad_log_joint = layout.project(g_chunk, shift, add_to=layout.project(grad_times_x, scale)).mul_(p_chunk)
            grad_log_joint.addcmul_(p_chunk, grad_log_joint.sum(layout.channel_axis, keepdim=True), value=-1.0)
            grad_params[2] += layout.contract(p_chunk, grad_times_x)
            del grad_times_x
            grad_params[3] += layout.contract(p_chunk, g_chunk)
            grad_params[0] += layout.contract(grad_log_joint, x_chunk * x_chunk)
            grad_params[1] += layout.contract(grad_log_joint, x_chunk)
            grad_const += grad_log_joint.sum((0, layout.position_axis))
            # d log_joint_k / dx = linear_k - precision_k x, so
            # grad_x = sum_k grad_log_joint_k (linear_k - precision_k x) + g * (mixed scale)
            grad_x_chunk = layout.unproject(grad_log_joint, neg_precision, out=_part(grad_x3, chunk)).mul_(x_chunk)
            grad_x_chunk.addcmul_(g_chunk, layout.unproject(p_chunk, scale))
            layout.unproject(grad_log_joint, linear, add_to=grad_x_chunk)
        grad_precision, grad_linear, grad_scale, grad_shift = grad_params.unbind(0)
        grad_x3 = grad_x_chunk if grad_x3 is None else grad_x3
        return grad_x3, grad_precision.mul_(-0.5), grad_linear, grad_const, grad_scale, grad_shift, None


def _output_like(x3: torch.Tensor, chunks: List[slice]) -> Optional[torch.Tensor]:
    """The tensor that chunk results are written into: contiguous, x3's shape, so that every chunk
    along the batch dim is a contiguous GEMM output. None for a single chunk, whose result is the output."""
    return None if len(chunks) == 1 else torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)


def _part(output: Optional[torch.Tensor], chunk: slice) -> Optional[torch.Tensor]:
    return None if output is None else output[chunk]


def _joined(parts: List[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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
