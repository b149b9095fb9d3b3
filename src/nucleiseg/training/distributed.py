"""Several processes training one fold: torchrun's environment, the process group, rank 0.

``torchrun --nproc-per-node N scripts/train.py ...`` starts N copies of the
script, each with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in its
environment. :func:`launch` joins them in one process group (NCCL on GPUs, one
GPU per process; gloo on CPU), and the engine then wraps the model in
``DistributedDataParallel`` and gives each process its share of every global
batch (:func:`sampler`). The gradients are averaged over the processes in every
step, so every process holds the same weights after every step; only rank 0
validates and writes (checkpoints, the epoch CSV, weights and OOF predictions).
Started as one process (``python scripts/train.py``), nothing here changes
anything.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

# Rank 0 validates alone while the other ranks wait in their next collective
# call; a Mask R-CNN validation of a fold takes minutes on a CPU.
TIMEOUT = datetime.timedelta(hours=2)


def launched_processes(environ: Mapping[str, str] = os.environ) -> int:
    """How many processes torchrun started for this command (its ``WORLD_SIZE``; 1 without it)."""
    return int(environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    """Processes training together: 1 outside a process group."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank: 0 outside a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process validates and writes (rank 0, or the only process)."""
    return rank() == 0


def backend(device: torch.device) -> str:
    """The process group backend for a device: NCCL on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def launch(device: torch.device, environ: Mapping[str, str] = os.environ) -> Iterator[torch.device]:
    """Join the process group torchrun's environment describes, for the ``with`` block.

    Without torchrun's ``WORLD_SIZE`` (or with 1), nothing is set up and
    ``device`` is given back as it is. Otherwise each process takes the GPU of
    its ``LOCAL_RANK`` (on CUDA), the group is initialized from the
    environment and destroyed at the end, and ranks other than 0 log
    warnings only, so that the log is rank 0's.

    Args:
        device: The device asked for (``cpu`` or ``cuda``).
        environ: Where to read torchrun's variables.

    Yields:
        This process's device.
    """
    if launched_processes(environ) == 1:
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend(device), timeout=TIMEOUT)
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def batch_problem(batch_size: int, processes: int) -> str | None:
    """Why ``processes`` cannot share batches of ``batch_size`` equally, or None if they can."""
    if batch_size % processes:
        return f"batch_size {batch_size} cannot be shared equally by {processes} processes"
    return None


def local_batch_size(batch_size: int) -> int:
    """Each process's share of a global batch.

    Raises:
        ValueError: If the processes cannot share the batch equally.
    """
    if problem := batch_problem(batch_size, world_size()):
        raise ValueError(problem)
    return batch_size // world_size()


def sampler(dataset: Dataset) -> DistributedSampler | None:
    """This process's items of every epoch; None (every item, in order) in one process.

    Items are not shuffled: the dataset's items are random draws already. With
    a local batch of ``batch_size / N``, rank r takes items r, r + N, ... of
    each step's run of ``batch_size`` consecutive items, so step s of the N
    processes together sees exactly the items of step s of one process.
    """
    if world_size() == 1:
        return None
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=False)


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sums of the values over the processes (the values, in one process)."""
    if world_size() == 1:
        return list(values)
    # NCCL reduces CUDA tensors only.
    device = torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def gather(value: Any) -> list[Any]:
    """Every process's ``value`` (picklable), by rank; ``[value]`` in one process."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values
