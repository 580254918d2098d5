"""Canonical 3-D views of the input layouts the layers accept.

Every layer works on a view ``x3`` of the input with one batch dim, one
channel dim and one dim that gathers all other positions:

- channels-first (``channel_dim=1``): (N, C, *) -> (N, C, M)
- channels-last (``channel_dim=-1``): (N, *, C) -> (N, M, C)

M is the number of positions per sample (1 for (N, C) inputs). Per-sample,
per-channel quantities of shape (N, C) broadcast against ``x3`` with
:meth:`ChannelLayout.expand`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

CHUNK_ELEMENTS = 1 << 20
"""Elements per input-sized temporary in the passes that go a few samples at a time (4 MiB in float32):
small enough to stay in cache between the ops of one chunk and to keep the peak memory near the input's."""


def sample_chunks(x3: torch.Tensor) -> List[slice]:
    """Slices of the batch dim holding about :data:`CHUNK_ELEMENTS` elements each (at least one sample).

    One slice under torch.compile: inductor fuses the elementwise products into
    their consumers and plans its own buffers, and a Python loop over chunks
    would only unroll into a longer graph of slice copies.
    """
    if torch.compiler.is_compiling():
        return [slice(None)]
    rows = max(1, CHUNK_ELEMENTS // max(1, x3[0].numel()))
    return [slice(start, start + rows) for start in range(0, x3.shape[0], rows)]


@dataclass(frozen=True)
class ChannelLayout:
    channels_last: bool

    @classmethod
    def from_channel_dim(cls, channel_dim: int) -> "ChannelLayout":
        return cls(channels_last=channel_dim == -1)

    @property
    def channel_axis(self) -> int:
        """Axis of C in the 3-D view."""
        return 2 if self.channels_last else 1

    @property
    def position_axis(self) -> int:
        """Axis of M in the 3-D view."""
        return 1 if self.channels_last else 2

    def view3d(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *) -> (N, C, M) or (N, *, C) -> (N, M, C)."""
        n = x.shape[0]
        if self.channels_last:
            return x.reshape(n, -1, x.shape[-1])
        return x.reshape(n, x.shape[1], -1)

    def positions(self, x3: torch.Tensor) -> int:
        return x3.shape[self.position_axis]

    def expand(self, per_sample: torch.Tensor) -> torch.Tensor:
        """(N, C) -> a view that broadcasts against the 3-D input."""
        return per_sample.unsqueeze(self.position_axis)

    def sum_over_positions(self, x3: torch.Tensor) -> torch.Tensor:
        """(N, C): sum over the M positions."""
        return x3.sum(self.position_axis)

    def sum_of_squares_over_positions(self, x3: torch.Tensor) -> torch.Tensor:
        """(N, C): sum of squares over the M positions, without materialising x3 ** 2.

        A norm reduction over the contiguous last axis is one fast pass; over
        the strided middle axis it is not, so channels-last uses a dot product.
        """
        if self.channels_last:
            return torch.linalg.vecdot(x3, x3, dim=1)
        return torch.linalg.vector_norm(x3, dim=2).square()

    def affine_rows(self, x3: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """x3 * scale + shift with scale, shift of shape (N, C): one value per (sample, channel) row.

        Channels-first rows are contiguous, so this is BatchNorm's inference
        kernel over (1, N * C, M) with mean 0, variance 1 and eps 0, which is
        exact and faster than a broadcast addcmul.
        """
        if self.channels_last:
            return _ChannelsLastRowAffine.apply(x3, scale, shift)
        rows = x3.reshape(1, -1, x3.shape[2])
        flat_scale = scale.reshape(-1)
        zeros, ones = torch.zeros_like(flat_scale), torch.ones_like(flat_scale)
        return torch.batch_norm(rows, flat_scale, shift.reshape(-1), zeros, ones, False, 0.0, 0.0, False).view_as(x3)

    def along_channels(self, vector: torch.Tensor) -> torch.Tensor:
        """(C,) or (K,) -> a view that broadcasts along the channel axis of a 3-D view."""
        return vector if self.channels_last else vector.unsqueeze(-1)

    def project(self, x3: torch.Tensor, matrix: torch.Tensor, *, add_to: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Contract the channel axis with ``matrix`` of shape (K, C).

        Returns (N, K, M) for channels-first and (N, M, K) for channels-last,
        i.e. the channel axis of ``x3`` replaced by K. With ``add_to`` (a
        contiguous tensor of that shape), the product is added to it in place
        inside the GEMM and ``add_to`` is returned.
        """
        if self.channels_last:
            rows = x3.reshape(-1, x3.shape[-1])
            if add_to is None:
                return (rows @ matrix.transpose(0, 1)).view(*x3.shape[:-1], -1)
            add_to.view(rows.shape[0], -1).addmm_(rows, matrix.transpose(0, 1))
            return add_to
        # bmm, not matmul: for inputs that require grad, matmul folds the batch into one GEMM by
        # copying the transposed input and transposing the result back, two input-sized copies.
        left = matrix.expand(x3.shape[0], *matrix.shape)
        return torch.bmm(left, x3) if add_to is None else add_to.baddbmm_(left, x3)

    def unproject(
        self,
        weights3: torch.Tensor,
        matrix: torch.Tensor,
        *,
        add_to: Optional[torch.Tensor] = None,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Inverse direction of :meth:`project`: (N, K, M) / (N, M, K) with (K, C) -> C on the channel axis.

        ``add_to`` accumulates in place as in :meth:`project`; ``out`` (contiguous,
        the result's shape) receives the product instead of a new tensor.
        """
        if self.channels_last:
            rows = weights3.reshape(-1, weights3.shape[-1])
            if add_to is not None:
                add_to.view(rows.shape[0], -1).addmm_(rows, matrix)
                return add_to
            if out is not None:
                torch.mm(rows, matrix, out=out.view(rows.shape[0], -1))
                return out
            return (rows @ matrix).view(*weights3.shape[:-1], -1)
        left = matrix.transpose(0, 1).expand(weights3.shape[0], -1, -1)
        if add_to is not None:
            return add_to.baddbmm_(left, weights3)
        return torch.bmm(left, weights3, out=out)

    def contract(self, weights3: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        """(K, C): sum over samples and positions of weights3[k] * x3[c]; the gradient of
        :meth:`project` / :meth:`unproject` with respect to their matrix."""
        if self.channels_last:
            return weights3.reshape(-1, weights3.shape[-1]).transpose(0, 1) @ x3.reshape(-1, x3.shape[-1])
        return torch.bmm(weights3, x3.transpose(1, 2)).sum(0)

    def position_vectors(self, x3: torch.Tensor) -> torch.Tensor:
        """All position vectors as rows: (N * M, C). Copies for channels-first."""
        if self.channels_last:
            return x3.reshape(-1, x3.shape[-1])
        return x3.transpose(1, 2).reshape(-1, x3.shape[1])

    def from_position_vectors(self, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Inverse of :meth:`position_vectors`: (N * M, C) -> the 3-D view."""
        as_channels_last = rows.view(batch_size, -1, rows.shape[-1])
        return as_channels_last if self.channels_last else as_channels_last.transpose(1, 2)


class _ChannelsLastRowAffine(torch.autograd.Function):
    """y = x3 * scale + shift for (N, M, C) views and (N, C) scale, shift, with the per-sample gradient
    sum over positions of grad * x computed a few samples at a time: autograd's addcmul backward
    materialises that product whole, an input-sized temporary."""

    @staticmethod
    def forward(ctx: Any, x3: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x3, scale)
        return torch.addcmul(shift.unsqueeze(1), x3, scale.unsqueeze(1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y3: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x3, scale = ctx.saved_tensors
        grad_x3 = grad_y3 * scale.unsqueeze(1) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = torch.cat([(grad_y3[chunk] * x3[chunk]).sum(1) for chunk in sample_chunks(x3)])
        grad_shift = grad_y3.sum(1) if ctx.needs_input_grad[2] else None
        return grad_x3, grad_scale, grad_shift
