import copy

import pytest
import torch
from torch.distributions import Normal

from ctxnorm_hf import AdaptiveContextNorm
from ctxnorm_hf.norms import layout as layout_module
from ctxnorm_hf.norms.token_norm import AdaptiveContextLayerNorm
from ctxnorm_hf.norms.statistics import diagonal_gaussian_log_joint

from ._reference import LAYOUT_IDS, LAYOUTS, channels_first

# The layer works a few samples at a time; one element per chunk forces one sample per chunk.
CHUNKINGS = pytest.mark.parametrize("chunk_elements", [layout_module.CHUNK_ELEMENTS, 1], ids=["whole", "by-sample"])


def _randomised(layer: AdaptiveContextNorm) -> AdaptiveContextNorm:
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.log_var.uniform_(-0.5, 0.5)
        layer.prior_logits.normal_()
    return layer


def _reference(layer: AdaptiveContextNorm, x: torch.Tensor) -> torch.Tensor:
    """Per position vector: posterior from torch.distributions, then the mixture of normalisations."""
    xf = channels_first(x, layer.channel_dim)
    points = xf.movedim(1, -1).unsqueeze(-2)  # (..., 1, C)
    std = layer.log_var.exp().sqrt()
    log_joint = Normal(layer.mean, std).log_prob(points).sum(-1) + layer.prior_logits.log_softmax(0)
    posterior = log_joint.softmax(-1).unsqueeze(-1)  # (..., K, 1)
    lam = layer.priors.unsqueeze(1)
    normed = layer.weight * (points - layer.mean) / torch.sqrt((layer.log_var.exp() + layer.eps) * lam) + layer.bias
    out = (posterior * normed).sum(-2).movedim(-1, 1)
    return out if layer.channel_dim == 1 else out.movedim(1, -1)


@CHUNKINGS
@pytest.mark.parametrize("shape,channel_dim", LAYOUTS, ids=LAYOUT_IDS)
def test_matches_explicit_mixture(shape, channel_dim, chunk_elements, monkeypatch):
    monkeypatch.setattr(layout_module, "CHUNK_ELEMENTS", chunk_elements)
    layer = _randomised(AdaptiveContextNorm(shape[channel_dim], 4, channel_dim=channel_dim))
    x = torch.randn(shape)
    torch.testing.assert_close(layer(x), _reference(layer, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.eval()(x), layer.train()(x), atol=0, rtol=0)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_posteriors_sum_to_one_and_stay_finite_far_from_the_means(scale):
    layer = AdaptiveContextNorm(8, 5)
    x = torch.full((3, 8, 2, 2), scale) + torch.randn(3, 8, 2, 2)
    posterior = layer.context_posterior(x)
    assert posterior.shape == (3, 5, 2, 2)
    assert torch.isfinite(posterior).all()
    torch.testing.assert_close(posterior.sum(1), torch.ones(3, 2, 2))
    x.requires_grad_()
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_single_component_is_plain_normalisation():
    layer = AdaptiveContextNorm(3, 1)
    with torch.no_grad():
        layer.mean.normal_()
        layer.log_var.uniform_(-1, 1)
        layer.weight.normal_()
        layer.bias.normal_()
        layer.prior_logits.fill_(3.0)
    x = torch.randn(6, 3, 4)
    shape = (1, 3, 1)
    expected = layer.weight.view(shape) * (x - layer.mean.view(shape)) / torch.sqrt(
        layer.log_var.exp().view(shape) + layer.eps
    ) + layer.bias.view(shape)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_mixing_weights_stay_on_the_simplex_under_training():
    layer = AdaptiveContextNorm(4, 3)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.5)
    for _ in range(50):
        loss = (layer(torch.randn(16, 4) * 3) - 5.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert (layer.priors >= 0).all()
        torch.testing.assert_close(layer.priors.sum(), torch.tensor(1.0))
    assert not torch.allclose(layer.priors, torch.full((3,), 1 / 3), atol=1e-3), "priors never moved"


@CHUNKINGS
@pytest.mark.parametrize("shape,channel_dim", LAYOUTS, ids=LAYOUT_IDS)
def test_hand_written_backward_matches_autograd_of_the_reference(shape, channel_dim, chunk_elements, monkeypatch):
    """Gradients of x and of every parameter equal autograd through the explicit mixture."""
    monkeypatch.setattr(layout_module, "CHUNK_ELEMENTS", chunk_elements)
    layer = _randomised(AdaptiveContextNorm(shape[channel_dim], 4, channel_dim=channel_dim))
    with torch.no_grad():
        layer.mean.mul_(0.3)  # components that share the data, so every posterior is far from 0 and 1
    x = (torch.randn(shape) * 1.5 + 0.2).requires_grad_()
    grad_y = torch.randn(shape)
    params = [layer.weight, layer.bias, layer.mean, layer.log_var, layer.prior_logits]
    grads = torch.autograd.grad(layer(x), [x, *params], grad_y)
    expected = torch.autograd.grad(_reference(layer, x), [x, *params], grad_y)
    for name, got, want in zip(["x", "weight", "bias", "mean", "log_var", "prior_logits"], grads, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@CHUNKINGS
@pytest.mark.parametrize("layer_class,channel_dim", [(AdaptiveContextNorm, -1), (AdaptiveContextLayerNorm, -1)])
def test_gradcheck_float64_channels_last(layer_class, channel_dim, chunk_elements, monkeypatch):
    monkeypatch.setattr(layout_module, "CHUNK_ELEMENTS", chunk_elements)
    layer = _randomised(layer_class(3, 2, channel_dim=channel_dim)).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    params = (layer.weight, layer.bias, layer.mean, layer.log_var, layer.prior_logits)
    assert torch.autograd.gradcheck(lambda x, *p: layer(x), (x, *params))


@CHUNKINGS
def test_gradcheck_float64(chunk_elements, monkeypatch):
    monkeypatch.setattr(layout_module, "CHUNK_ELEMENTS", chunk_elements)
    layer = _randomised(AdaptiveContextNorm(3, 2)).double()
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    params = (layer.weight, layer.bias, layer.mean, layer.log_var, layer.prior_logits)
    assert torch.autograd.gradcheck(lambda x, *p: layer(x), (x, *params))


def test_bf16_autocast_output_finite():
    layer = AdaptiveContextNorm(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 4, 3, 3).bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_discovers_two_clusters():
    """Trained to maximise the mixture likelihood by backprop alone, components move to the clusters."""
    layer = AdaptiveContextNorm(2, 2, init_spread=0.1)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    centres = torch.tensor([[-4.0, 0.0], [4.0, 1.0]])
    for _ in range(300):
        x = torch.randn(128, 2) * 0.5 + centres[torch.randint(0, 2, (128,))]
        nll = -diagonal_gaussian_log_joint(x, layer.mean, layer.log_var, layer.prior_logits.log_softmax(0)).logsumexp(1).mean()
        optimizer.zero_grad()
        nll.backward()
        optimizer.step()
    order = layer.mean[:, 0].argsort()
    torch.testing.assert_close(layer.mean[order], centres, atol=0.2, rtol=0)
    posterior = layer.context_posterior(centres)
    assert (posterior.max(1).values > 0.99).all()


def test_state_dict_and_deepcopy():
    layer = _randomised(AdaptiveContextNorm(3, 2))
    twin = AdaptiveContextNorm(3, 2)
    twin.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(5, 3)
    torch.testing.assert_close(twin(x), layer(x), atol=0, rtol=0)
    torch.testing.assert_close(copy.deepcopy(layer)(x), layer(x), atol=0, rtol=0)
