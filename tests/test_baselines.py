"""MixtureNorm (Kalayeh & Shah 2019) and ModeNorm (Deecke et al. 2019), checked against their papers."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal

from ctxnorm_hf import MixtureNorm, ModeNorm
from ctxnorm_hf.norms.mixture_norm import fit_diagonal_mixture
from ctxnorm_hf.norms.statistics import diagonal_gaussian_log_joint

from ._reference import LAYOUT_IDS, LAYOUTS, channels_first


@pytest.mark.parametrize("cls", [MixtureNorm, ModeNorm])
@pytest.mark.parametrize(
    "batch_norm,shape", [(nn.BatchNorm1d, (16, 5)), (nn.BatchNorm2d, (8, 5, 4, 3))], ids=["1d", "2d"]
)
def test_one_component_is_batch_norm(cls, batch_norm, shape):
    bn, layer = batch_norm(5), cls(5, 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        layer.weight.copy_(bn.weight)
        layer.bias.copy_(bn.bias)
    for _ in range(3):
        x = torch.randn(shape) * 2 + 1
        grad = torch.randn(shape)
        x_bn, x_layer = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_bn, out_layer = bn(x_bn), layer(x_layer)
        out_bn.backward(grad)
        out_layer.backward(grad)
        torch.testing.assert_close(out_layer, out_bn, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_layer.grad, x_bn.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_mean[0], bn.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.running_var[0], bn.running_var, atol=1e-6, rtol=1e-6)
    x = torch.randn(shape)
    torch.testing.assert_close(layer.eval()(x), bn.eval()(x), atol=1e-5, rtol=1e-5)


# --- MixtureNorm ---------------------------------------------------------------------------


def _bimodal(n: int, channels: int = 3) -> torch.Tensor:
    """Position vectors from two well separated Gaussians, one per half of the channels' range."""
    centres = torch.stack([torch.full((channels,), -3.0), torch.full((channels,), 3.0)])
    return torch.randn(n, channels) * 0.5 + centres[torch.randint(0, 2, (n,))]


def test_em_recovers_two_clusters_and_never_lowers_the_likelihood():
    points = _bimodal(2000)
    means = points[:2].clone() * 0.1
    log_vars, log_priors = torch.zeros(2, 3), torch.full((2,), -math.log(2))
    previous = -math.inf
    for _ in range(6):
        means, log_vars, log_priors = fit_diagonal_mixture(points, means, log_vars, log_priors, 1, 1e-5)
        likelihood = diagonal_gaussian_log_joint(points, means, log_vars, log_priors).logsumexp(1).mean().item()
        assert likelihood >= previous - 1e-4
        previous = likelihood
    order = means[:, 0].argsort()
    torch.testing.assert_close(means[order], torch.tensor([[-3.0] * 3, [3.0] * 3]), atol=0.1, rtol=0)
    torch.testing.assert_close(log_vars.exp(), torch.full((2, 3), 0.25), atol=0.05, rtol=0)


def test_mixture_norm_separates_modes_in_its_running_statistics():
    layer = MixtureNorm(3, 2, momentum=0.5, channel_dim=-1)
    for _ in range(10):
        layer(_bimodal(512).view(64, 8, 3))
    order = layer.running_mean[:, 0].argsort()
    torch.testing.assert_close(layer.running_mean[order], torch.tensor([[-3.0] * 3, [3.0] * 3]), atol=0.2, rtol=0)
    torch.testing.assert_close(layer.running_prior, torch.full((2,), 0.5), atol=0.1, rtol=0)


@pytest.mark.parametrize("shape,channel_dim", LAYOUTS, ids=LAYOUT_IDS)
def test_mixture_norm_eval_matches_paper_formula(shape, channel_dim):
    channels = shape[channel_dim]
    layer = MixtureNorm(channels, 3, channel_dim=channel_dim).eval()
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
        layer.running_prior.copy_(torch.tensor([0.2, 0.3, 0.5]))
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(shape)
    points = channels_first(x, channel_dim).movedim(1, -1).unsqueeze(-2)  # (..., 1, C)
    log_joint = Normal(layer.running_mean, layer.running_var.sqrt()).log_prob(points).sum(-1) + layer.running_prior.log()
    tau = log_joint.softmax(-1).unsqueeze(-1)
    normed = (points - layer.running_mean) / torch.sqrt(layer.running_var + layer.eps)
    mixed = (tau / layer.running_prior.sqrt().unsqueeze(1) * normed).sum(-2)
    expected = (layer.weight * mixed + layer.bias).movedim(-1, 1)
    expected = expected if channel_dim == 1 else expected.movedim(1, -1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_mixture_norm_buffers_and_copies():
    layer = MixtureNorm(4, 3)
    layer(torch.randn(8, 4, 5, 5))
    assert set(dict(layer.named_buffers())) == {"running_mean", "running_var", "running_prior", "num_batches_tracked"}
    twin = MixtureNorm(4, 3)
    twin.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(twin.eval()(x), layer.eval()(x), atol=0, rtol=0)
    torch.testing.assert_close(copy.deepcopy(layer)(x), layer(x), atol=0, rtol=0)


# --- ModeNorm ------------------------------------------------------------------------------


def _mode_norm_reference(layer: ModeNorm, x: torch.Tensor) -> torch.Tensor:
    """Deecke et al. eq. (4)-(6) with an explicit loop over modes, train mode."""
    xf = channels_first(x, layer.channel_dim)
    reduce = [0] + list(range(2, xf.dim()))
    positions = xf[0, 0].numel()
    gates = layer.gate(xf.reshape(xf.shape[0], xf.shape[1], -1).mean(2)).softmax(1)  # (N, K)
    out = torch.zeros_like(xf)
    for k in range(layer.num_contexts):
        g = gates[:, k].view(-1, *([1] * (xf.dim() - 1)))
        total = g.sum() * positions
        mean = (g * xf).sum(reduce, keepdim=True) / total
        var = (g * (xf - mean) ** 2).sum(reduce, keepdim=True) / total
        out = out + g * (xf - mean) / torch.sqrt(var + layer.eps)
    shape = (1, -1) + (1,) * (xf.dim() - 2)
    out = layer.weight.view(shape) * out + layer.bias.view(shape)
    return out if layer.channel_dim == 1 else out.movedim(1, -1)


@pytest.mark.parametrize("shape,channel_dim", LAYOUTS, ids=LAYOUT_IDS)
def test_mode_norm_matches_paper_in_training(shape, channel_dim):
    channels = shape[channel_dim]
    layer = ModeNorm(channels, 3, channel_dim=channel_dim)
    with torch.no_grad():
        layer.gate.weight.normal_(std=2.0)
        layer.weight.normal_()
        layer.bias.normal_()
    x = (torch.randn(shape) * 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    reference_layer = copy.deepcopy(layer)
    grad = torch.randn(shape)
    out, expected = layer(x), _mode_norm_reference(reference_layer, x_ref)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.gate.weight.grad, reference_layer.gate.weight.grad, atol=1e-5, rtol=1e-5)


def test_mode_norm_gates_and_running_statistics():
    layer = ModeNorm(4, 3)
    x = torch.randn(6, 4, 3, 3)
    gates = layer.gates(x)
    assert gates.shape == (6, 3)
    torch.testing.assert_close(gates.sum(1), torch.ones(6))
    layer(x)
    assert set(dict(layer.named_buffers())) == {"running_mean", "running_var", "num_batches_tracked"}
    assert (layer.num_batches_tracked == 1).all()
    layer.eval()
    before = layer.running_mean.clone()
    layer(x)
    assert torch.equal(layer.running_mean, before)
