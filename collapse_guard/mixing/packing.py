"""Packing one mixed micro-batch back into rows of at most `capacity` tokens (`unit="tokens"` with packing).

Segments in, packed rows out, together with the carried real segments that did not fit (they stay
carried). Real top-ups are drawn through a callable, so the packing itself holds no state between
micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from collapse_guard.mixing.segments import join_segments, pack_first_fit, supervised_tokens

Row = dict[str, Any]
TopUp = Callable[..., Row | None]  # (like, fit=free tokens) -> a real segment that carries loss, or None


def min_fill(capacity: int) -> int:
    """The least free space worth a top-up: an eighth of a row, between 2 and 16 tokens. A shorter fragment
    carries almost no loss signal (its first token is never predicted) and costs a segment boundary."""
    return max(2, min(16, capacity // 8))


@dataclass
class PackedRows:
    """Rows being packed: their segments (`bins`) and token counts (`loads`); the first `own` are the rows
    the micro-batch came with (kept full), any after them were opened for the floor."""

    capacity: int
    own: int
    bins: list[list[Row]]
    loads: list[int]

    @classmethod
    def empty(cls, own: int, capacity: int) -> PackedRows:
        return cls(capacity, own, [[] for _ in range(own)], [0] * own)

    def add(self, i: int, segment: Row) -> None:
        self.bins[i].append(segment)
        self.loads[i] += len(segment["input_ids"])

    def first_fit(self, n: int) -> int | None:
        """The first row with room for `n` more tokens."""
        return next((i for i, load in enumerate(self.loads) if load + n <= self.capacity), None)

    def joined(self) -> list[Row]:
        return [join_segments(b) for b in self.bins if b]


@dataclass
class Packed:
    """What `pack_micro_batch` made: the packed rows, the top-ups drawn, the real (supervised) tokens they
    hold, and the carried real segments that found no room (to carry on)."""

    rows: list[Row]
    top_up: int
    real_tokens: int
    unplaced: list[Row] = field(default_factory=list)


def pack_micro_batch(fixed: list[Row], real: list[Row], real_target: int, rows: PackedRows,
                     top_up: Callable[[int], Row | None]) -> Packed:
    """Packs a micro-batch: the segments that must go in (`fixed`: synthetic ones and passengers) first,
    first fit decreasing; then carried real segments where they fit; then real top-ups cut to each row's
    free space (`top_up(fit)`), so a mixed batch carries at least the tokens of the packed batch it
    replaced. A row is added only while the floor still needs real tokens (`real_target`)."""
    pack_first_fit(fixed, rows.capacity, rows.bins, rows.loads)
    real_tokens = 0  # supervised, as the floor counts them; rows are filled by input tokens
    unplaced = []
    for seg in sorted(real, key=lambda s: -len(s["input_ids"])):  # longest first: first fit decreasing
        slot = rows.first_fit(len(seg["input_ids"]))
        if slot is None:
            unplaced.append(seg)
            continue
        rows.add(slot, seg)
        real_tokens += supervised_tokens(seg)
    smallest = min_fill(rows.capacity)
    drawn, i = 0, 0
    while i < len(rows.bins):
        # the micro-batch's own rows are always filled (the batch keeps its tokens); rows opened for the
        # floor only until it is met
        while rows.capacity - rows.loads[i] >= smallest and (i < rows.own or real_tokens < real_target):
            seg = top_up(rows.capacity - rows.loads[i])
            if seg is None:  # no top-up carries loss: the floor goes short (said once, with the fix)
                return Packed(rows.joined(), drawn, real_tokens, unplaced)
            rows.add(i, seg)
            real_tokens += supervised_tokens(seg)
            drawn += 1
        i += 1
        if i == len(rows.bins) and real_tokens < real_target:  # the floor needs another row of real tokens
            rows.bins.append([])
            rows.loads.append(0)
    return Packed(rows.joined(), drawn, real_tokens, unplaced)
