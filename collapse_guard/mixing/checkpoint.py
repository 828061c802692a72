"""The collator's checkpoint: one JSON file per rank, as of the last micro-batch the trainer consumed.

The dataloader prefetches, so the collator runs ahead of training; `SnapshotRing` keeps the state after
each of the last micro-batches (references only, cheap per batch) and `MixingCheckpoint` is that state's
format, written and read in one place. The keys are those of every earlier version, so old checkpoints
still resume.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collapse_guard.distributed import rank_world
from collapse_guard.io import atomic_write_json, read_json
from collapse_guard.mixing.carry import CarryOver
from collapse_guard.mixing.counts import MixingCounts
from collapse_guard.mixing.segments import as_list

STATE_DIRNAME = "collapse_guard"
# Micro-batches of look-ahead a dataloader may prefetch beyond one optimizer step's accumulation.
PREFETCH = 8


def state_path(directory: str | os.PathLike) -> str:
    """This rank's state file in a checkpoint directory."""
    return os.path.join(directory, STATE_DIRNAME, f"mixing_collator_rank{rank_world()[0]}.json")


@dataclass
class MixingCheckpoint:
    """The collator's state after a micro-batch: position, real-stream draws, carry-over, counters, floor."""

    calls: int
    stream: dict[str, int]
    carry: CarryOver
    counts: MixingCounts
    dropped: Counter
    min_real_fraction: float | None

    def snapshot(self) -> dict[str, Any]:
        """The state as a dict that shares the rows (they are never mutated once queued)."""
        return {
            "calls": self.calls,
            "stream": self.stream,
            "synthetic_buffer": list(self.carry.synthetic),
            "real_carry": list(self.carry.real),
            "credit": dict(self.carry.credit),
            "step": [self.carry.step_units, self.carry.step_real],
            "counts": self.counts.as_dict(),
            "dropped": dict(self.dropped),
            "min_real_fraction": self.min_real_fraction,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> MixingCheckpoint:
        """From `state_dict()` (or a checkpoint file of any earlier version: a missing floor is None)."""
        step_units, step_real = state["step"]
        carry = CarryOver(deque(state["synthetic_buffer"]), deque(state["real_carry"]), dict(state["credit"]),
                          step_units, step_real)
        return cls(int(state["calls"]), state["stream"], carry, MixingCounts.from_dict(state["counts"]),
                   Counter(state["dropped"]), state.get("min_real_fraction"))


def serializable(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A snapshot as plain JSON: token arrays (tensors, numpy) of the queued rows become lists."""
    def plain(rows):
        return [{k: (v if isinstance(v, (str, int, float, dict, type(None))) else as_list(v))
                 for k, v in row.items()} for row in rows]

    return {**snapshot, "synthetic_buffer": plain(snapshot["synthetic_buffer"]),
            "real_carry": plain(snapshot["real_carry"])}


class SnapshotRing:
    """The snapshots after the last few micro-batches, by call count (`state_at`)."""

    def __init__(self, accumulation: int = 0):
        self.items: deque[tuple[int, dict[str, Any]]] = deque(maxlen=accumulation + PREFETCH)

    def resize(self, accumulation: int) -> None:
        """Keeps an optimizer step's micro-batches plus the prefetch (`plan` knows the accumulation)."""
        self.items = deque(self.items, maxlen=accumulation + PREFETCH)

    def add(self, calls: int, snapshot: dict[str, Any]) -> None:
        self.items.append((calls, snapshot))

    def clear(self) -> None:
        self.items.clear()

    def find(self, calls: int) -> dict[str, Any] | None:
        return next((snapshot for n, snapshot in reversed(self.items) if n == calls), None)

    def calls(self) -> list[int]:
        return [n for n, _ in self.items]

    def state_at(self, calls: int, now: int, current: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The serializable state after micro-batch `calls`; `current()` if that is the latest (`now`)."""
        snapshot = self.find(calls)
        if snapshot is not None:
            return serializable(snapshot)
        if calls == now:
            return current()
        raise KeyError(f"no MixingCollator snapshot after micro-batch {calls} (have {self.calls()}).")


def write(directory: str | os.PathLike, state: dict[str, Any]) -> str:
    path = state_path(directory)
    atomic_write_json(path, state, indent=None)  # strict JSON: a NaN counter is written as null
    return path


def read(directory: str | os.PathLike) -> dict[str, Any] | None:
    path = state_path(directory)
    return read_json(path) if os.path.exists(path) else None
