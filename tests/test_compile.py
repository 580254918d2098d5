"""torch.compile(fullgraph=True) of models using CN, CN-X and ACN: no graph break, eager results."""

import copy
from typing import Optional

import pytest
import torch
from torch import nn

from ctxnorm_hf import AdaptiveContextNorm, ContextNorm, ContextNormX

FACTORIES = {
    "cn": lambda c, cd: ContextNorm(c, 3, priors=[0.2, 0.3, 0.5], channel_dim=cd),
    "cnx": lambda c, cd: ContextNormX(c, 3, channel_dim=cd),
    "acn": lambda c, cd: AdaptiveContextNorm(c, 3, channel_dim=cd),
}


class _TinyNet(nn.Module):
    """conv -> norm -> relu -> tokens -> norm (channels-last) -> head."""

    def __init__(self, strategy: str) -> None:
        super().__init__()
        self.takes_ids = strategy != "acn"
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm_map = FACTORIES[strategy](8, 1)
        self.norm_tokens = FACTORIES[strategy](8, -1)
        self.head = nn.Linear(8, 5)

    def _norm(self, layer: nn.Module, x: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        return layer(x, ids) if self.takes_ids else layer(x)

    def forward(self, x: torch.Tensor, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = torch.relu(self._norm(self.norm_map, self.conv(x), ids))
        tokens = h.flatten(2).transpose(1, 2)
        return self.head(self._norm(self.norm_tokens, tokens, ids).mean(1))


@pytest.mark.parametrize("strategy", list(FACTORIES))
def test_compiled_fullgraph_matches_eager(strategy):
    torch._dynamo.reset()
    eager = _TinyNet(strategy)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = torch.randn(6, 3, 5, 5)
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(2):
        out_eager, out_compiled = eager(x, ids), compiled(x, ids)
        torch.testing.assert_close(out_compiled, out_eager, atol=1e-5, rtol=1e-5)
        out_eager.square().sum().backward()
        out_compiled.square().sum().backward()
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_module.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, atol=1e-4, rtol=1e-4, msg=name)
    for (name, b_eager), b_compiled in zip(eager.named_buffers(), compiled_module.buffers()):
        torch.testing.assert_close(b_compiled, b_eager, atol=1e-6, rtol=1e-6, msg=name)
    eager.eval()
    compiled_module.eval()
    torch.testing.assert_close(compiled(x, ids), eager(x, ids), atol=1e-5, rtol=1e-5)
