"""One script for one process or `torchrun --nproc_per_node=N`: NCCL on GPU, gloo on CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank) if requested == "cuda" else torch.device(requested)
    if requested != "cpu":
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {requested!r}")
    return torch.device("cpu")


def init_distributed(requested_device: str = "auto") -> DistInfo:
    """Read torchrun's environment; start the process group when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.distributed:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def broadcast_tensors(tensors: list[torch.Tensor], info: DistInfo, src: int = 0) -> None:
    """Keep state that lives outside the DDP module (e.g. the persistent memory) identical on all ranks."""
    if not info.distributed:
        return
    for tensor in tensors:
        dist.broadcast(tensor, src=src)


def cleanup(info: DistInfo, wait_for_all: bool = False) -> None:
    """Tear the process group down. `wait_for_all` (the normal end of a run): first meet the other ranks at a barrier,
    so no rank closes its connections while a peer still uses them (gloo can abort a peer that sees them vanish).
    Error paths skip it: a rank that failed alone would leave the others waiting at the barrier."""
    if info.distributed and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def replicas_identical(tensors: list[torch.Tensor], info: DistInfo) -> bool:
    """True when `tensors` (e.g. the parameters and the persistent memory) hold the same values on every rank: DDP
    keeps replicas identical, and a run verifies it before its final save. Compares two checksums with rank 0's."""
    with torch.no_grad():
        vector = torch.cat([t.detach().float().flatten() for t in tensors])
        checksum = torch.stack([vector.sum(), (vector * torch.arange(vector.numel(), device=vector.device)).sum()])
        reference = checksum.clone()
        broadcast_tensors([reference], info)
        agree = torch.tensor(float(torch.allclose(checksum, reference, rtol=1e-6, atol=0)), device=info.device)
        agree = all_reduce_mean(agree, info)
    return bool(agree.item() == 1.0)
