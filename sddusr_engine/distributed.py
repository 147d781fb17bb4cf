"""Running one command on every rank under torchrun: the process group from the environment
(gloo on the CPU, nccl on GPUs), each rank's device, gathering objects from every rank, and
tearing the group down so that no rank is left waiting."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank, world size, local rank (its GPU), and whether the
    process group was made here (and so is torn down here)."""

    rank: int
    world: int
    local_rank: int
    initialised_here: bool


def dist_context(device: str = "auto") -> DistContext:
    """Rank, world size and local rank from torchrun's environment; with WORLD_SIZE > 1 the process
    group is initialised (nccl for CUDA devices, gloo otherwise) unless it already is."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world <= 1:
        return DistContext(0, 1, 0, False)
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local, False)
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local if device in ("auto", "cuda") else torch.device(device))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local, True)


def rank_device(device: str, ctx: DistContext) -> str:
    """The device this rank runs on: its own GPU (`cuda:<local rank>`) when several ranks share
    "auto" or "cuda", else `device` as given."""
    if ctx.world > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{ctx.local_rank}"
    return device


def all_gather(ctx: DistContext, obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (`[obj]` when not distributed)."""
    if ctx.world <= 1:
        return [obj]
    import torch.distributed as dist

    parts: list[Any] = [None] * ctx.world
    dist.all_gather_object(parts, obj)
    return parts


def first_error(ctx: DistContext, error: str | None) -> str | None:
    """Every rank says whether it hit `error`; returns the lowest rank's error, or None."""
    return next((p for p in all_gather(ctx, error) if p), None)


def start_on_every_rank(
    ctx: DistContext, start: Callable[[], T], describe: Callable[[BaseException], str]
) -> T:
    """`start()` on this rank, and agreement that it worked everywhere: under torchrun a rank that
    cannot start must not leave the others waiting in a later gather, so every rank learns of the
    first failure and raises (its own error, or an `EngineError` naming the other rank's)."""
    from .errors import EngineError

    try:
        value, problem = start(), None
    except Exception as e:  # noqa: BLE001 - shared with the other ranks below
        if ctx.world <= 1:
            raise
        value, problem, error = None, describe(e), e
    first = first_error(ctx, problem)
    if first is not None:
        if problem is not None:
            raise error
        raise EngineError(f"another rank could not start: {first}")
    return value  # type: ignore[return-value]


def close_dist(ctx: DistContext, finished: bool = True) -> None:
    """Tear down the process group this run made. `finished`: every rank got through the last
    gather, so they wait for each other first; a rank that tears its gloo connections down while
    a peer still uses them can abort that peer ("terminate called without an active exception")
    after all the work is done. On an error path there is no waiting: a peer stuck in a
    collective then fails on the closed connection instead of hanging."""
    if ctx.initialised_here:
        import torch.distributed as dist

        if dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()
