"""One place for rank / world size / collective helpers.

Everything that reduces a metric or takes a decision must give the same answer on every rank, so the
rest of the package asks these functions instead of `torch.distributed` directly. Without an
initialised process group they are the identity (one process). `torch` is imported lazily so that
importing this module (and the CLI) stays cheap.
"""

from __future__ import annotations

import logging
from typing import Any


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def is_main() -> bool:
    return rank_world()[0] == 0


def init_process_group():
    """Joins the process group started by `accelerate launch` / `torchrun` (a no-op for one process).

    Returns accelerate's `PartialState`; `cpu=True` without CUDA makes `--multi_gpu` on a CPU machine
    start a gloo group.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank."""
    dist = _dist()
    if not dist:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    dist = _dist()
    if not dist:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor):
    """In-place sum over ranks of a tensor (float64 sums keep reductions exact enough to compare ranks)."""
    dist = _dist()
    if dist:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value: float) -> float:
    """The largest of every rank's `value`."""
    return max(gather(value))


class MainProcessFilter(logging.Filter):
    """Lets records through on rank 0 only, so a 2-process run logs every line once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_main()
