"""The floor's arithmetic as pure functions: integers in, counts out.

The collator (`MixingCollator`) measures rows, keeps the queues and builds batches; everything it decides
about *how many* rows to take comes from here, and so does the plan's dry run (`attach.dry_run`), which
replays one epoch on counts alone. Units are rows with `unit="examples"` and supervised tokens with
`unit="tokens"`; `f` is the floor (the real share), `done_units`/`done_real` what the optimizer step already
holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MIN_SAFE_REAL_FRACTION = 0.1
# ceil(f * n) on floats: 0.1 * 30 is 3.0000000000000004; without the slack ceil would ask for a 4th real row
EPS = 1e-9


def validate_real_fraction(value: Any, allow_low_real_fraction: bool = False,
                           key: str = "min_real_fraction") -> float:
    """`value` as a float floor in [0, 1]; below `MIN_SAFE_REAL_FRACTION` only when allowed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} must be a number in [0, 1], got {value!r} ({type(value).__name__}).")
    if math.isnan(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{key} must be in [0, 1], got {value}. Use e.g. 0.5 (the default).")
    if value < MIN_SAFE_REAL_FRACTION and not allow_low_real_fraction:
        raise ValueError(
            f"{key}={value} is below {MIN_SAFE_REAL_FRACTION}: with less than 10% real data, models trained "
            "on their own output collapse (Shumailov et al. 2024). Raise it, or pass "
            "allow_low_real_fraction=True if you are studying collapse on purpose."
        )
    return float(value)


@dataclass
class FloorPlan:
    """Where steps and epochs begin and end, in micro-batches of this rank (what `attach` learns)."""

    gradient_accumulation_steps: int = 1
    micro_batches_per_epoch: int | None = None
    total_micro_batches: int | None = None
    batch_size: int | None = None  # rows the sampler hands each micro-batch (a last one may hold fewer)

    def window_end(self, calls: int) -> int | None:
        """The call index at which the current delivery window (epoch, or training) ends."""
        ends = []
        if self.micro_batches_per_epoch:
            ends.append((calls // self.micro_batches_per_epoch + 1) * self.micro_batches_per_epoch)
        if self.total_micro_batches:
            ends.append(self.total_micro_batches)
        return min(ends) if ends else None

    def remaining(self, calls: int) -> int | None:
        """Micro-batches left in the delivery window, this one included (None: unknown)."""
        end = self.window_end(calls)
        return None if end is None else max(end - calls, 1)

    def position_in_step(self, calls: int) -> int:
        within_epoch = calls % self.micro_batches_per_epoch if self.micro_batches_per_epoch else calls
        return within_epoch % self.gradient_accumulation_steps


def real_needed(f: float, done_units: int, done_real: int, units: int) -> int:
    """Real units this micro-batch needs so the step's cumulative real share stays >= f."""
    return max(0, math.ceil(f * (done_units + units) - EPS) - done_real)


def real_for_synthetic(f: float, done_units: int, done_real: int, n_synthetic: int) -> int:
    """The fewest real units r with done_real + r >= f * (done_units + n_synthetic + r)."""
    # solve done_real + r >= f (done_units + n_synthetic) + f r  for r: r (1 - f) >= f (...) - done_real
    return max(0, math.ceil((f * (done_units + n_synthetic) - done_real) / (1.0 - f) - EPS))


def spread(credit: dict[str, float], which: str, excess: float, remaining: int | None) -> float:
    """How much of a carry-over beyond this micro-batch's natural room to serve now: spread evenly over the
    rest of the window, everything in its last micro-batch. `credit[which]` (the carry-over's state) keeps
    the fractions, so 0.4 per batch becomes a whole row every 2-3 batches instead of never."""
    if excess <= 0 or remaining is None:
        return 0
    if remaining <= 1:
        return excess
    credit[which] += excess / remaining
    whole = math.floor(credit[which])
    credit[which] -= whole
    return whole


def expected_share(prior: float, synthetic_units_seen: float, intake_units: float, units: int) -> float:
    """The synthetic share of incoming units: the share seen so far, shrunk toward `prior` (the training
    set's share, or 1 - f) while few batches have been seen (a prior worth 8 micro-batches)."""
    weight = 8.0 * units
    return min(1.0, (synthetic_units_seen + prior * weight) / (intake_units + weight))


def must_serve(pending: float, remaining: int | None, per_call_max: float, units: int, share: float,
               granule: int = 1) -> float:
    """The least to serve now so that, at the growth cap, later micro-batches can still absorb the rest of
    the carry-over and the synthetic rows still to come: their expected number, plus two standard deviations
    (a binomial draw per micro-batch) and one row (`granule`: the longest segment, with tokens), so an
    unlucky end of the epoch does not leave rows behind."""
    if remaining is None or remaining <= 1:
        return 0
    arriving = share * units
    later = remaining - 1
    margin = 2.0 * math.sqrt(later * units * share * (1.0 - share)) + granule
    return pending - later * (per_call_max - arriving) + margin


def decide_examples(f: float, b: int, done: tuple[int, int], queued: tuple[int, int],
                    remaining: int | None, nominal: int, max_growth: float, share: float,
                    credit: dict[str, float]) -> tuple[int, int]:
    """(synthetic rows, real rows) for a micro-batch of `b` incoming rows (the unit `examples`).

    Args:
        done: (rows, real rows) the optimizer step already holds.
        queued: (synthetic rows waiting, real rows carried), this batch's included.
        nominal: the micro-batch size the growth cap `max_growth` refers to.
        share: `expected_share` of synthetic rows among those still to come.
        credit: the carry-overs' spreading state (`spread`), updated.
    """
    done_units, done_real = done
    pending, carried = queued
    room = b - real_needed(f, done_units, done_real, b)  # synthetic rows the incoming size leaves room for
    largest = max(b, math.floor(max_growth * nominal))
    per_call_max = math.floor((1.0 - f) * largest)  # synthetic rows a batch at the growth cap can take
    wanted = max(room + spread(credit, "synthetic", pending - room, remaining),
                 math.ceil(must_serve(pending, remaining, per_call_max, nominal, share)))
    n_synthetic = 0 if f >= 1.0 else min(pending, int(wanted))
    while (n_synthetic > room
           and n_synthetic + real_for_synthetic(f, done_units, done_real, n_synthetic) > largest):
        n_synthetic -= 1  # growth beyond max_growth: the rest waits for a later micro-batch
    # within the room the batch keeps its size; beyond it, just enough real rows to hold the floor
    n_real = b - n_synthetic if n_synthetic <= room \
        else real_for_synthetic(f, done_units, done_real, n_synthetic)
    extra_real = int(spread(credit, "real", carried - n_real, remaining))
    n_real += max(0, min(extra_real, largest - n_real - n_synthetic))
    return n_synthetic, n_real
