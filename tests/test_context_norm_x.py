import copy

import pytest
import torch

from ctxnorm_hf import ContextNormX
from ctxnorm_hf.norms import layout

from ._reference import LAYOUT_IDS, LAYOUTS, channels_first


def _randomised(layer: ContextNormX) -> ContextNormX:
    with torch.no_grad():
        for parameter in (layer.weight, layer.bias, layer.mean):
            parameter.normal_()
        layer.log_var.uniform_(-1.0, 1.0)
    return layer


def _reference(layer: ContextNormX, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    xf = channels_first(x, layer.channel_dim)
    shape = (xf.shape[0], -1) + (1,) * (xf.dim() - 2)
    var = layer.log_var.exp()[ids].view(shape)
    out = layer.weight[ids].view(shape) * (xf - layer.mean[ids].view(shape)) / torch.sqrt(
        (var + layer.eps) * layer.priors[ids].view(-1, *([1] * (xf.dim() - 1)))
    ) + layer.bias[ids].view(shape)
    return out if layer.channel_dim == 1 else out.movedim(1, -1)


@pytest.mark.parametrize("shape,channel_dim", LAYOUTS, ids=LAYOUT_IDS)
def test_matches_formula_and_train_equals_eval(shape, channel_dim):
    layer = _randomised(ContextNormX(shape[channel_dim], 4, priors=[0.1, 0.2, 0.3, 0.4], channel_dim=channel_dim))
    x, ids = torch.randn(shape), torch.randint(0, 4, (shape[0],))
    train_out = layer.train()(x, ids)
    torch.testing.assert_close(train_out, _reference(layer, x, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.eval()(x, ids), train_out, atol=0, rtol=0)


def test_gradcheck_float64():
    layer = _randomised(ContextNormX(3, 2, channel_dim=-1)).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 1, 0])
    params = (layer.weight, layer.bias, layer.mean, layer.log_var)
    assert torch.autograd.gradcheck(lambda x, *p: layer(x, ids), (x, *params))


def test_channels_last_backward_by_chunks_of_samples_matches_autograd(monkeypatch):
    monkeypatch.setattr(layout, "CHUNK_ELEMENTS", 40)  # 7 samples of 30 elements: one per chunk
    layer = _randomised(ContextNormX(6, 3, channel_dim=-1))
    x, ids, grad_y = torch.randn(7, 5, 6, requires_grad=True), torch.tensor([0, 2, 1, 2, 0, 0, 1]), torch.randn(7, 5, 6)
    params = [layer.weight, layer.bias, layer.mean, layer.log_var]
    grads = torch.autograd.grad(layer(x, ids), [x, *params], grad_y)
    expected = torch.autograd.grad(_reference(layer, x, ids), [x, *params], grad_y)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("log_var", [-1e4, -80.0, -10.0, 0.0, 10.0, 80.0, 1e4])
def test_variance_positive_and_output_finite_for_any_parameter(log_var):
    layer = ContextNormX(3, 2)
    with torch.no_grad():
        layer.log_var.fill_(log_var)
    x = torch.randn(4, 3, requires_grad=True)
    out = layer(x, torch.tensor([0, 1, 0, 1]))
    out.sum().backward()
    assert (layer.variance + layer.eps > 0).all()
    assert (layer.variance >= 0).all()
    assert torch.isfinite(out).all()
    assert torch.isfinite(layer.log_var.grad).all() and torch.isfinite(x.grad).all()


def test_learns_context_statistics():
    """Minimising the Gaussian NLL through the layer moves mu_k, var_k to each context's statistics."""
    layer = ContextNormX(2, 2, affine=False)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    centres = torch.tensor([[-3.0, 2.0], [4.0, -1.0]])
    for _ in range(400):
        ids = torch.randint(0, 2, (64,))
        x = torch.randn(64, 2) * 0.5 + centres[ids]
        out = layer(x, ids)
        # out^2 * lambda = (x - mu)^2 / (var + eps), lambda = 1/2
        loss = 0.5 * (out.pow(2) * 0.5).mean() + 0.5 * layer.log_var[ids].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.testing.assert_close(layer.mean, centres, atol=0.15, rtol=0)
    torch.testing.assert_close(layer.variance, torch.full((2, 2), 0.25), atol=0.08, rtol=0)


def test_state_dict_and_deepcopy():
    layer = _randomised(ContextNormX(3, 2))
    twin = ContextNormX(3, 2)
    twin.load_state_dict(layer.state_dict(), strict=True)
    x, ids = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    torch.testing.assert_close(twin(x, ids), layer(x, ids), atol=0, rtol=0)
    torch.testing.assert_close(copy.deepcopy(layer)(x, ids), layer(x, ids), atol=0, rtol=0)
    assert set(layer.state_dict()) == {"weight", "bias", "mean", "log_var", "priors"}


def test_missing_ids_explained():
    with pytest.raises(ValueError, match="needs context ids"):
        ContextNormX(3, 2)(torch.randn(2, 3))
