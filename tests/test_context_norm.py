import copy
import io
import re

import pytest
import torch
from torch import nn

from ctxnorm_hf import ContextNorm

from ._reference import LAYOUT_IDS, LAYOUTS, reference_context_norm

K = 5
PRIORS = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15])


def _ids(n: int, k: int = K) -> torch.Tensor:
    """Every context present at least twice, the rest random."""
    base = torch.arange(k).repeat(2)
    return torch.cat([base, torch.randint(0, k, (n - base.numel(),))])[torch.randperm(n)]


def _randomised(layer: ContextNorm) -> ContextNorm:
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    return layer


@pytest.mark.parametrize("shape,channel_dim", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_per_context_batch_norm_loop(shape, channel_dim, training):
    channels = shape[channel_dim]
    layer = _randomised(ContextNorm(channels, K, priors=PRIORS, channel_dim=channel_dim)).train(training)
    x = (torch.randn(shape) * 2 + 0.5).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
    ids = _ids(shape[0])
    grad = torch.randn(shape)

    out = layer(x, ids)
    expected = reference_context_norm(
        x_ref, ids, weight, bias, PRIORS, running_mean, running_var, channel_dim, training
    )
    out.backward(grad)
    expected.backward(grad)

    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight.grad, weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, bias.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_mean, running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.running_var, running_var, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "batch_norm,shape",
    [(nn.BatchNorm1d, (16, 6)), (nn.BatchNorm1d, (16, 6, 9)), (nn.BatchNorm2d, (16, 6, 5, 4)), (nn.BatchNorm3d, (16, 6, 3, 4, 2))],
    ids=["1d-NC", "1d-NCL", "2d", "3d"],
)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_single_context_is_batch_norm(batch_norm, shape, momentum):
    bn = batch_norm(6, momentum=momentum)
    cn = ContextNorm(6, 1, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        cn.weight.copy_(bn.weight[None])
        cn.bias.copy_(bn.bias[None])
    ids = torch.zeros(shape[0], dtype=torch.long)
    for _ in range(4):
        x = torch.randn(shape) * 3 + 1
        grad = torch.randn(shape)
        x_bn, x_cn = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_bn, out_cn = bn(x_bn), cn(x_cn, ids)
        out_bn.backward(grad)
        out_cn.backward(grad)
        torch.testing.assert_close(out_cn, out_bn, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_cn.grad, x_bn.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cn.weight.grad[0], bn.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cn.bias.grad[0], bn.bias.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cn.running_mean[0], bn.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cn.running_var[0], bn.running_var, atol=1e-6, rtol=1e-6)
    assert int(cn.num_batches_tracked[0]) == int(bn.num_batches_tracked) == 4
    bn.eval()
    cn.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(cn(x, ids), bn(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape,channel_dim", [((7, 3), 1), ((6, 3, 4), 1), ((6, 4, 3), -1)], ids=["N,C", "N,C,L", "N,L,C"])
def test_gradcheck_float64(shape, channel_dim):
    layer = _randomised(ContextNorm(3, 3, priors=[0.5, 0.3, 0.2], channel_dim=channel_dim)).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    # context 2 has a single sample: for (N, C) it falls back to its running statistics
    ids = torch.tensor([0, 1, 0, 1, 0, 2, 1][: shape[0]])
    assert torch.autograd.gradcheck(lambda x, w, b: layer(x, ids), (x, layer.weight, layer.bias))


def test_absent_context_keeps_running_stats_bit_for_bit():
    layer = _randomised(ContextNorm(4, 3))
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    layer(torch.randn(10, 4, 3), torch.tensor([0, 2] * 5))
    assert torch.equal(layer.running_mean[1], before_mean[1])
    assert torch.equal(layer.running_var[1], before_var[1])
    assert not torch.equal(layer.running_mean[0], before_mean[0])
    assert layer.num_batches_tracked.tolist() == [1, 0, 1]


def test_single_element_context_uses_running_stats_and_leaves_them():
    layer = _randomised(ContextNorm(4, 3, priors=[0.2, 0.3, 0.5]))
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(5, 4)
    ids = torch.tensor([0, 0, 1, 1, 2])  # context 2: one element per channel
    out = layer(x, ids)
    assert torch.isfinite(out).all()
    assert torch.equal(layer.running_mean[2], before_mean[2])
    assert torch.equal(layer.running_var[2], before_var[2])
    assert layer.num_batches_tracked.tolist() == [1, 1, 0]
    layer.eval()
    torch.testing.assert_close(out[4], layer(x[4:], ids[4:])[0])


def test_bf16_autocast_keeps_float32_statistics():
    x = torch.randn(8, 4, 5, 5) * 2 + 3
    ids = torch.tensor([0, 1] * 4)
    reference = ContextNorm(4, 2)
    reference(x.bfloat16().float(), ids)
    layer = ContextNorm(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.bfloat16(), ids)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    assert layer.running_mean.dtype == torch.float32
    # statistics of the same bf16 values computed in float32, not in bf16
    torch.testing.assert_close(layer.running_mean, reference.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.running_var, reference.running_var, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape,channel_dim", [((32, 3, 8, 8), 1), ((32, 10, 3), -1)], ids=["NCHW", "NLC"])
def test_large_offset_normalises(shape, channel_dim):
    layer = ContextNorm(3, 2, priors=[0.5, 0.5], channel_dim=channel_dim)
    x = (torch.randn(shape, dtype=torch.float64) + 1e4).float()
    ids = torch.tensor([0, 1] * 16)
    out = layer(x, ids)
    exact = reference_context_norm(
        x.double(), ids, torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64),
        torch.tensor([0.5, 0.5], dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64),
        torch.ones(2, 3, dtype=torch.float64), channel_dim, True,
    )
    # Float32 spacing at 1e4 is ~1e-3 (scaled by 1/sqrt(0.5) here); nn.BatchNorm2d is off by ~5e-4 on such input.
    torch.testing.assert_close(out.double(), exact, atol=2e-3, rtol=0)
    torch.testing.assert_close(layer.running_mean, torch.full((2, 3), 1e3), atol=0.05, rtol=1e-4)


def test_batch_permutation_permutes_output():
    layer = _randomised(ContextNorm(4, 3))
    x, ids = torch.randn(12, 4, 5), _ids(12, 3)
    perm = torch.randperm(12)
    torch.testing.assert_close(layer(x[perm], ids[perm]), layer(x, ids)[perm], atol=1e-6, rtol=1e-6)


def test_state_dict_round_trip_and_deepcopy():
    layer = _randomised(ContextNorm(4, 3, priors=[0.2, 0.3, 0.5]))
    for _ in range(3):
        layer(torch.randn(12, 4, 5), _ids(12, 3))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    twin = ContextNorm(4, 3)
    twin.load_state_dict(torch.load(buffer), strict=True)
    clone = copy.deepcopy(layer)
    x, ids = torch.randn(6, 4, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    for other in (twin, clone):
        for module in (layer, other):
            module.eval()
        torch.testing.assert_close(other(x, ids), layer(x, ids), atol=0, rtol=0)
        assert torch.equal(other.priors, layer.priors)
    assert set(layer.state_dict()) == {"weight", "bias", "priors", "running_mean", "running_var", "num_batches_tracked"}


@pytest.mark.parametrize(
    "ids,message",
    [
        (torch.tensor([0, 3, 1, 0]), r"in \[0, 3\).*\[0, 3\]"),
        (torch.tensor([0, -1, 1, 0]), r"in \[0, 3\)"),
        (torch.tensor([0.0, 1.0, 1.0, 0.0]), r"integer tensor.*ids\.long\(\)"),
        (torch.tensor([0, 1, 2]), r"shape \(4,\).*one id per sample"),
        (None, r"needs context ids.*context_ids=ids.*use_contexts"),
        ([0, 1, 1, 0], r"torch integer tensor"),
    ],
    ids=["too-large", "negative", "float", "length", "missing", "list"],
)
def test_bad_ids_say_what_to_pass(ids, message):
    layer = ContextNorm(2, 3)
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(4, 2), ids)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_contexts": 0}, r"num_contexts must be an integer >= 1"),
        ({"priors": [0.5, -0.1, 0.6]}, r"non-negative"),
        ({"priors": [0.5, 0.3, 0.3]}, r"sum to 1.*counts / counts.sum\(\)"),
        ({"priors": [0.5, 0.5]}, r"shape \(3,\)"),
        ({"channel_dim": 2}, r"channel_dim must be 1"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\]"),
    ],
)
def test_bad_arguments_say_what_to_pass(kwargs, message):
    arguments = {"num_features": 2, "num_contexts": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        ContextNorm(**arguments)


def test_wrong_channel_count_is_explained():
    with pytest.raises(ValueError, match=re.escape("built for 4 channels on dim 1")):
        ContextNorm(4, 2)(torch.randn(3, 5, 2), torch.zeros(3, dtype=torch.long))


def test_set_priors_validates_and_changes_output():
    layer = ContextNorm(2, 2).eval()
    x, ids = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    before = layer(x, ids)
    layer.set_priors([0.25, 0.75])
    after = layer(x, ids)
    torch.testing.assert_close(after[0], before[0] * (0.5 / 0.25) ** 0.5)
    with pytest.raises(ValueError, match="sum to 1"):
        layer.set_priors([0.5, 0.6])
