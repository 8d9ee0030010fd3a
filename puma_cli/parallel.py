"""Several processes under `torchrun`: which rows each one takes, and the sums they share.

`torchrun --nproc-per-node K -m puma_cli remove ...` starts K copies of the command with
RANK, WORLD_SIZE and the rendezvous address in their environment. `join` sets up
`torch.distributed` from it (gloo on the CPU, nccl on a GPU, one GPU per process). Each
process then takes one contiguous block of the work (`block`): the engine's chunks of
rows, the K-FAC fitting batches, the shadow models. Sums over rows are all-reduced
(`all_reduce`), per-row results gathered back in row order (`gather`), so every process
holds the same numbers as a single process would, to the order of float additions;
only rank 0 writes files and reports (`leader`).

Outside torchrun (no WORLD_SIZE, or 1) every function here is a no-op: a world of one.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from puma_cli.errors import PumaError

TIMEOUT = datetime.timedelta(minutes=30)  # one process waiting for another at a sum


def requested_size() -> int:
    """The world size torchrun asked for (1 outside torchrun)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(raw)
    except ValueError:
        raise PumaError(
            f"WORLD_SIZE={raw!r} is not a whole number; start puma with torchrun"
        ) from None
    if size < 1:
        raise PumaError(f"WORLD_SIZE={size}: give torchrun --nproc-per-node 1 or more")
    return size


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def size() -> int:
    return dist.get_world_size() if active() else 1


def leader() -> bool:
    """Whether this process writes the files and the report (rank 0, or the only one)."""
    return rank() == 0


def join(device: torch.device) -> torch.device:
    """Join the process group torchrun describes, once; returns the device this process
    computes on (its own GPU under nccl). A no-op outside torchrun."""
    world = requested_size()
    if world == 1 or active():
        return _local_device(device)
    if not dist.is_available():
        raise PumaError("this torch build has no torch.distributed; run puma without torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise PumaError(
                f"torchrun started {world} processes per node but this machine has "
                f"{torch.cuda.device_count()} GPUs: give --nproc-per-node at most "
                f"{torch.cuda.device_count()}, or --device cpu"
            )
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=TIMEOUT)
    return _local_device(device)


def _local_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None and active():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def block(count: int, what: str, idle_ok: bool = False) -> range:
    """This process's contiguous share of `count` units of work (chunks, batches, models).

    Every process needs at least one: a world larger than the work is refused, since the
    extra processes would only wait; with `idle_ok` (one short pass of a longer job, such
    as the gradient of a few marked rows) they get an empty share instead."""
    world, me = size(), rank()
    if world == 1:
        return range(count)
    if count < world and not idle_ok:
        raise PumaError(
            f"torchrun started {world} processes, but the {what} split into only {count} "
            f"parts: give --nproc-per-node at most {count}"
        )
    base, extra = divmod(count, world)
    start = me * base + min(me, extra)
    return range(start, start + base + (1 if me < extra else 0))


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over every process, in place (returned for chaining). nccl
    reduces GPU tensors only: a CPU one goes through this process's GPU and back."""
    if not active():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        moved = tensor.cuda()
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        tensor.copy_(moved.cpu())
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather(local: torch.Tensor) -> torch.Tensor:
    """Every process's rows (n_r, ...) joined in rank order: the blocks of `block` back in
    their original order. The blocks may differ in length."""
    if not active():
        return local
    if dist.get_backend() == "nccl" and local.device.type != "cuda":
        return gather(local.cuda()).to(local.device)
    counts = torch.zeros(size(), dtype=torch.long, device=local.device)
    counts[rank()] = local.shape[0]
    all_reduce(counts)
    longest = int(counts.max())
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts, strict=True)])
