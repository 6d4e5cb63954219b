"""torch.distributed helpers: ranks split shards and eval images; one process needs nothing."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (or without distributed)."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op without distributed)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns the device to use.

    CUDA ranks use NCCL and their LOCAL_RANK GPU; CPU ranks use gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    log.info("rank %d of %d on %s", dist.get_rank(), world, device)
    return device
