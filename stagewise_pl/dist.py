"""The few collective operations the stage manager needs, no-ops in a single process.

Profiling and rollouts are sharded across ranks (each samples and grades its share); the graded
results are gathered so that every rank holds the same records, rank 0 writes them to the ledger,
and routing is decided on rank 0 and broadcast, so every rank trains on the same buckets.
"""
from __future__ import annotations

from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """This process's global rank (from the environment of a DDP launch before or after the process group)."""
    import os

    d = _dist()
    return d.get_rank() if d else int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share: items rank, rank + world, ... (every item on exactly one rank)."""
    return list(items[rank()::world_size()])


def unshard(parts: list[list[T]]) -> list[T]:
    """Inverse of :func:`shard`: the per-rank lists (rank order) back in the original item order."""
    out: list[T] = []
    longest = max((len(p) for p in parts), default=0)
    for i in range(longest):
        out.extend(p[i] for p in parts if i < len(p))
    return out


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    d = _dist()
    if d is None:
        return [obj]
    out: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    d = _dist()
    if d is None:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()
