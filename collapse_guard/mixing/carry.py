"""`CarryOver`: the rows (segments) a micro-batch could not train yet, and where the optimizer step stands.

Synthetic rows the floor displaces wait in `synthetic` (FIFO: every one is fed once, in the order the
sampler gave them); real rows beyond what the floor asked for wait in `real` and count before any top-up is
drawn. `credit` keeps the fractions of `policy.spread`, and `step_units`/`step_real` what the current
optimizer step already holds. All of it is checkpointed (`mixing.checkpoint`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]
Measure = Callable[[Row], int]

# How many too-long synthetic segments `take_synthetic` steps over before it gives up on the allowance: a
# bound on the work per micro-batch, not on correctness (the skipped ones stay at the front).
LOOK_AHEAD = 64


@dataclass
class CarryOver:
    """The carry-over queues, the spreading credit and the optimizer step's running totals."""

    synthetic: deque[Row] = field(default_factory=deque)
    real: deque[Row] = field(default_factory=deque)
    credit: dict[str, float] = field(default_factory=lambda: {"synthetic": 0.0, "real": 0.0})
    step_units: int = 0
    step_real: int = 0

    def begin(self, new_step: bool) -> tuple[int, int]:
        """(units, real units) the optimizer step already holds; a new step (or the micro-batch scope)
        starts from zero."""
        if new_step:
            self.step_units, self.step_real = 0, 0
        return self.step_units, self.step_real

    def add(self, units: int, real: int) -> None:
        self.step_units += units
        self.step_real += real

    def queue(self, real: list[Row], synthetic: list[Row]) -> None:
        self.synthetic.extend(synthetic)
        self.real.extend(real)

    def take_synthetic(self, allowance: float, measure: Measure) -> list[Row]:
        """Synthetic items in FIFO order whose units fit the allowance. One too long for what is left is
        stepped over (it must not block the short ones behind it) and stays at the front for a later
        micro-batch, so the queue's order is kept."""
        chosen, kept, used = [], deque(), 0
        while self.synthetic:
            item = self.synthetic.popleft()
            n = measure(item)
            if used + n <= allowance:
                chosen.append(item)
                used += n
            else:
                kept.append(item)
                if used >= allowance or len(kept) > LOOK_AHEAD:
                    break
        self.synthetic.extendleft(reversed(kept))
        return chosen

    def take_real(self, target: int, measure: Measure) -> tuple[list[Row], int]:
        """Carried real items, oldest first, until they reach `target` units: (items, their units)."""
        taken, units = [], 0
        while self.real and units < target:
            item = self.real.popleft()
            taken.append(item)
            units += measure(item)
        return taken, units

    def give_back_real(self, items: list[Row]) -> None:
        """Carried real items that did not fit after all (a packed row was full) go back to the front, one
        by one in the order given, as packing returned them."""
        for item in items:
            self.real.appendleft(item)
