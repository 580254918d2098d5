"""Global-batch context statistics on two real gloo ranks."""

import timm
import torch
from torch.nn.parallel import DistributedDataParallel

from ctxnorm_hf import ContextNorm, convert_norms

from ._distributed import run_on_two_ranks

N, C = 12, 4
# context 2 lives on rank 1 only; context 3 is absent everywhere
IDS = torch.tensor([0, 1, 0, 1, 0, 0, 2, 1, 2, 2, 0, 1])


def _batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, 5, 3, generator=generator) * 2 + 1
    grad = torch.randn(N, C, 5, 3, generator=generator)
    return x, grad


def _layer(sync: bool) -> ContextNorm:
    layer = ContextNorm(C, 4, priors=[0.1, 0.2, 0.3, 0.4], sync_stats=sync)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(4, C, generator=generator) + 0.5)
        layer.bias.copy_(torch.randn(4, C, generator=generator))
    return layer


def _synced_step(rank: int, world_size: int):
    x, grad = _batch()
    rows = slice(0, 6) if rank == 0 else slice(6, 12)
    layer = _layer(sync=True)
    x_local = x[rows].clone().requires_grad_()
    out = layer(x_local, IDS[rows])
    out.backward(grad[rows])
    return {
        "out": out.detach(),
        "grad_x": x_local.grad,
        "grad_weight": layer.weight.grad,
        "running_mean": layer.running_mean,
        "running_var": layer.running_var,
    }


def test_synced_statistics_equal_single_process_on_the_concatenated_batch(tmp_path):
    x, grad = _batch()
    reference = _layer(sync=False)
    x_ref = x.clone().requires_grad_()
    expected = reference(x_ref, IDS)
    expected.backward(grad)
    rank0, rank1 = run_on_two_ranks(_synced_step, tmp_path)
    torch.testing.assert_close(torch.cat([rank0["out"], rank1["out"]]), expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([rank0["grad_x"], rank1["grad_x"]]), x_ref.grad, atol=1e-5, rtol=1e-5)
    # parameter gradients are per-rank partial sums, as under DDP before its all-reduce
    torch.testing.assert_close(rank0["grad_weight"] + rank1["grad_weight"], reference.weight.grad, atol=1e-5, rtol=1e-5)
    for rank in (rank0, rank1):
        torch.testing.assert_close(rank["running_mean"], reference.running_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rank["running_var"], reference.running_var, atol=1e-6, rtol=1e-6)


def _ddp_resnet_step(rank: int, world_size: int):
    torch.manual_seed(0)
    model = convert_norms(timm.create_model("resnet18", pretrained=False, num_classes=3), "cn", 3, sync_stats=True)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(10 + rank)
    x = torch.randn(4, 3, 32, 32)
    ids = torch.tensor([0, 0, 1, 1]) if rank == 0 else torch.tensor([2, 2, 2, 0])  # 1 only on rank 0, 2 only on rank 1
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(ddp(x, context_ids=ids), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()} | {
        "running_mean": model.bn1.running_mean.clone()
    }


def test_ddp_training_step_with_contexts_on_one_rank_only(tmp_path):
    rank0, rank1 = run_on_two_ranks(_ddp_resnet_step, tmp_path)
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], atol=1e-6, rtol=1e-6, msg=name)
    assert (rank0["running_mean"] != 0).any(1).tolist() == [True, True, True]
