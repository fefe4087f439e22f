"""Which process of a ``torchrun`` launch this is, and its device.

WORLD_SIZE > 1 means a multi-process launch: each process joins the process
group (NCCL on CUDA, gloo on the CPU) and takes GPU LOCAL_RANK; rank 0 writes
the run folder. Without torchrun this is one process on the chosen device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launch_rank() -> int:
    """This process's rank in a torchrun launch (WORLD_SIZE > 1), 0 without one: rank 0 writes the run folder."""
    return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def setup_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns (rank info, this process's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_name)
    rank, local = launch_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    base = resolve_device(device_name)
    if base.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = base
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local), device


def mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over the processes of the launch (itself without one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def barrier() -> None:
    """Wait for every process of the launch (nothing to wait for without one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
