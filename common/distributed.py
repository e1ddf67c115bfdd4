"""Process-group plumbing for `common.train.fit` under torchrun (one process per device).

One machine, N processes (gloo on CPU, nccl on CUDA)::

    torchrun --nproc_per_node=4 -m common train --data dataset_full --task all14 --out runs/all14

Several machines: run the same command on each node with torchrun's rendezvous options; every node
names the same endpoint (any free port on the first node) and job id::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=node0.example.org:29400 --rdzv_id=medimaging-all14 \\
        -m common train --data /shared/nih --task all14 --out /shared/runs/all14

The run directory must be on storage all nodes see (rank 0 writes it; every rank reads
checkpoints/last.pt on resume), and the image cache ($MEDIMAGING_CACHE) should be node-local or
shared; each node's local rank 0 fills a node-local cache before the other ranks read it.
Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits: rank, world size, local rank, and whether we own the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda when available else cpu; a bare 'cuda' under torchrun -> this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={name!r}: CUDA is not available on this machine; use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; return (info, this process's device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), resolve_device(device_name)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # rank 0 may decode a whole NIH download into the cache while the others wait at a barrier
        dist.init_process_group(backend=backend, timeout=timedelta(hours=3),
                                device_id=device if device.type == "cuda" else None)
        owns = True
    return DistInfo(rank, world_size, local_rank, owns), device


def cleanup(info: DistInfo) -> None:
    """Leave the process group if `setup` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list for one process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(info: DistInfo, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of a list of floats across ranks (float64, so counts stay exact)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def place_model(model: torch.nn.Module, device: torch.device, info: DistInfo, *, channels_last: bool, bf16: bool,
                state: dict | None = None, sync_batchnorm: bool = False):
    """A model ready to train on its device: (raw_model, model, amp).

    raw_model is the model itself (what is saved and scored), with `state` (a checkpoint's weights)
    loaded; `model` is what trains on the batches: raw_model, or its DDP wrapper across processes
    (with BatchNorm over the global batch when `sync_batchnorm` and on CUDA); `amp` is bf16
    autocast on CUDA when asked, else a no-op context.
    """
    cuda = device.type == "cuda"
    if sync_batchnorm and info.enabled and cuda:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    raw_model = model
    if state is not None:
        raw_model.load_state_dict(state)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel  # only multi-process runs need it

        model = DistributedDataParallel(raw_model, device_ids=[device.index] if cuda else None)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and bf16 else contextlib.nullcontext()
    return raw_model, model, amp
