"""Run a function on two gloo ranks (CPU) with torch.multiprocessing; results come back through files."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable[[int, int], Any], out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_two_ranks(fn: Callable[[int, int], Any], tmp_path: Path) -> List[Any]:
    """fn(rank, world_size) runs in each of two processes; returns [result of rank 0, result of rank 1]."""
    mp.start_processes(_worker, args=(2, _free_port(), fn, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
