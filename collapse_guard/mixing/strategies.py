"""What differs between the two units of the floor, as one small strategy object each.

The mixing path (`mixing.mixer.Mixer.mix`) is the same for both units: split the incoming rows into items,
set aside those that carry no loss, queue the rest, decide how many synthetic units to serve and how many
real units the floor then needs, take them from the carry-over, top up and arrange the micro-batch. A
strategy supplies the unit-specific steps:

- `ExamplesUnit`: items are rows, each worth 1; the decision is `policy.decide_examples` (whole rows).
- `TokensUnit`: items are segments (a packed row splits at `seq_lengths`), worth their supervised tokens;
  the decision is `token_allowance` / `token_real_target` (below); packed batches are packed again
  (`mixing.packing`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collapse_guard.mixing.carry import CarryOver
from collapse_guard.mixing.packing import PackedRows, TopUp, pack_micro_batch
from collapse_guard.mixing.policy import decide_examples, must_serve, real_for_synthetic, real_needed, spread
from collapse_guard.mixing.segments import split_row, supervised_tokens
from collapse_guard.provenance import REAL, SYNTHETIC, source_of_example

Row = dict[str, Any]
Recognise = Callable[[list[Row]], list[str]]  # rows -> their sources (REAL or SYNTHETIC)


@dataclass(frozen=True)
class Demand:
    """What the floor's decision for one micro-batch starts from (units: rows, or supervised tokens).

    Args:
        f: the floor.
        incoming: units the sampler delivered that carry loss.
        done: (units, real units) the optimizer step already holds.
        remaining: micro-batches left in the delivery window, this one included (None: unknown).
        nominal: the micro-batch size the growth cap refers to.
        max_growth: the growth cap, a multiple of `nominal`.
        share: the expected synthetic share of the units still to come (`policy.expected_share`).
    """

    f: float
    incoming: int
    done: tuple[int, int]
    remaining: int | None
    nominal: int
    max_growth: float
    share: float


@dataclass(frozen=True)
class BatchContext:
    """What the fill step needs besides the chosen items: the micro-batch as it came (its rows, their
    per-token keys), its passengers (items without loss, passed on as they are), a real top-up
    (`like`, `fit=`) and the row capacity for packing (None: unknown)."""

    rows: list[Row]
    like: list[str]
    passengers: list[Row]
    top_up: TopUp
    capacity: Callable[[], int | None]


@dataclass(frozen=True)
class Filled:
    """A mixed micro-batch: its rows, the top-ups drawn, its real units, carried items packing gave back."""

    rows: list[Row]
    top_up: int
    real_units: int
    unplaced: tuple[Row, ...] = ()


class UnitStrategy:
    """The unit-specific steps of the mixing path; `ExamplesUnit` and `TokensUnit` fill them in."""

    name = ""

    def measure(self, item: Row) -> int:
        """The units an item is worth to the floor."""
        raise NotImplementedError

    def split(self, rows: list[Row], recognise: Recognise) -> tuple[list[Row], list[str]]:
        """The micro-batch's rows -> (items, their sources)."""
        raise NotImplementedError

    def nominal(self, incoming: int, batch_size: int | None, typical: int) -> int:
        """The micro-batch size the growth cap refers to: a short last batch of an epoch may still grow to
        `max_growth` times a full one, so the largest incoming batch seen counts too."""
        return max(incoming, typical)

    def prior(self, composition: dict[str, int] | None, f: float) -> float:
        """The training set's synthetic share in this unit, if known, else 1 - f (what the floor leaves)."""
        comp = composition or {}
        if comp.get(REAL, 0) + comp.get(SYNTHETIC, 0):
            return comp[SYNTHETIC] / (comp[REAL] + comp[SYNTHETIC])
        return 1.0 - f

    def decide(self, demand: Demand, carry: CarryOver) -> tuple[list[Row], int]:
        """Takes the synthetic items to serve from the carry-over: (them, real units the floor then needs)."""
        raise NotImplementedError

    def fill(self, synthetic: list[Row], real: list[Row], real_units: int, target: int,
             batch: BatchContext) -> Filled:
        """Tops the carried real items up to `target` units and arranges the micro-batch."""
        raise NotImplementedError

    def top_up_to(self, real_units: int, target: int, batch: BatchContext) -> tuple[list[Row], int]:
        """Real top-ups until `target` units: (them, real units now); fewer when the pool gives no top-up
        that carries loss (the floor goes short; the collator says so once, with the fix)."""
        drawn = []
        while real_units < target:
            item = batch.top_up(batch.like)
            if item is None:
                break
            drawn.append(item)
            real_units += self.measure(item)
        return drawn, real_units


class ExamplesUnit(UnitStrategy):
    """`unit="examples"`: the floor counts rows that carry loss."""

    name = "examples"

    def measure(self, item: Row) -> int:
        return 1

    def split(self, rows: list[Row], recognise: Recognise) -> tuple[list[Row], list[str]]:
        return rows, recognise(rows)

    def nominal(self, incoming: int, batch_size: int | None, typical: int) -> int:
        # the sampler's B, known from the plan: the last, short micro-batch of an epoch grows like a full one
        return max(incoming, batch_size or 0, typical)

    def decide(self, demand: Demand, carry: CarryOver) -> tuple[list[Row], int]:
        d, queued = demand, (len(carry.synthetic), len(carry.real))
        n_synthetic, n_real = decide_examples(d.f, d.incoming, d.done, queued, d.remaining, d.nominal,
                                              d.max_growth, d.share, carry.credit)
        # every row is worth 1 and n_synthetic <= the queue: exactly the first n_synthetic rows
        return carry.take_synthetic(n_synthetic, self.measure), n_real

    def fill(self, synthetic: list[Row], real: list[Row], real_units: int, target: int,
             batch: BatchContext) -> Filled:
        drawn, real_units = self.top_up_to(real_units, target, batch)
        return Filled([*real, *drawn, *synthetic, *batch.passengers], len(drawn), real_units)


def token_allowance(demand: Demand, pending: int, granule: int, credit: dict[str, float]) -> float:
    """Synthetic (supervised) tokens this micro-batch may serve, `pending` tokens waiting.

    The most of: the room the incoming size leaves (incoming minus the real tokens the floor needs) plus
    this batch's part of the carry-over beyond it (`spread`), and what must be served now so later batches
    at the growth cap can still absorb the rest (`must_serve`, with one `granule`, the longest pending
    segment, of margin). Capped so the batch, with the real tokens the floor then needs, stays within
    `max_growth` times `nominal`. Unlike whole rows (`policy.decide_examples`), tokens come in segments of
    any length, so the cap is an allowance that `CarryOver.take_synthetic` fills as far as segments fit.
    """
    d = demand
    done_units, done_real = d.done
    room = d.incoming - real_needed(d.f, done_units, done_real, d.incoming)
    largest = d.max_growth * d.nominal
    allowance = max(room + spread(credit, "synthetic", pending - room, d.remaining),
                    must_serve(pending, d.remaining, (1.0 - d.f) * largest, d.nominal, d.share, granule))
    # S + real_for(S) <= largest  <=>  S <= largest (1 - f) - f done + done_real
    return min(allowance, largest * (1.0 - d.f) - d.f * done_units + done_real)


def token_real_target(demand: Demand, synthetic: int, carried: int, credit: dict[str, float]) -> int:
    """Real (supervised) tokens this micro-batch serves once `synthetic` tokens are chosen: the rest of the
    incoming size, or more if the floor needs more, plus this batch's part of the `carried` real tokens
    beyond that (`spread`) as far as the growth cap leaves room."""
    d = demand
    target = max(d.incoming - synthetic, real_for_synthetic(d.f, *d.done, synthetic))
    extra = int(spread(credit, "real", carried - target, d.remaining))
    largest = int(d.max_growth * d.nominal)  # whole tokens: the cap never rounds up
    return target + max(0, min(extra, largest - target - synthetic))


class TokensUnit(UnitStrategy):
    """`unit="tokens"`: the floor counts supervised tokens (labels other than -100); rows split into
    segments at `seq_lengths`, and packed micro-batches are packed again."""

    name = "tokens"

    def measure(self, item: Row) -> int:
        return supervised_tokens(item)

    def split(self, rows: list[Row], recognise: Recognise) -> tuple[list[Row], list[str]]:
        segments, sources = [], []
        for row in rows:
            row_segments = split_row(row)
            segments += row_segments
            # a row's own provenance holds for all its segments; packed rows lost theirs: looked up one by one
            source = source_of_example(row)
            sources += [source] * len(row_segments) if source is not None \
                else recognise([{"input_ids": s["input_ids"]} for s in row_segments])
        return segments, sources

    def prior(self, composition: dict[str, int] | None, f: float) -> float:
        comp = composition or {}
        if comp.get("real_tokens", 0) + comp.get("synthetic_tokens", 0):
            return comp["synthetic_tokens"] / (comp["real_tokens"] + comp["synthetic_tokens"])
        return super().prior(composition, f)

    def decide(self, demand: Demand, carry: CarryOver) -> tuple[list[Row], int]:
        pending = sum(self.measure(s) for s in carry.synthetic)
        granule = max((self.measure(s) for s in carry.synthetic), default=1)
        chosen = carry.take_synthetic(token_allowance(demand, pending, granule, carry.credit), self.measure)
        taken = sum(self.measure(s) for s in chosen)
        carried = sum(self.measure(s) for s in carry.real)
        return chosen, token_real_target(demand, taken, carried, carry.credit)

    def fill(self, synthetic: list[Row], real: list[Row], real_units: int, target: int,
             batch: BatchContext) -> Filled:
        if any("seq_lengths" in r for r in batch.rows):
            capacity = batch.capacity()
            if capacity is None:
                raise ValueError("packed rows need a max_length: pass max_length=... or attach(trainer).")
            packed = pack_micro_batch([*synthetic, *batch.passengers], real, target,
                                      PackedRows.empty(len(batch.rows), capacity),
                                      lambda fit: batch.top_up(batch.like, fit=fit))
            return Filled(packed.rows, packed.top_up, packed.real_tokens, tuple(packed.unplaced))
        drawn, real_units = self.top_up_to(real_units, target, batch)
        # top-ups lead the batch, the latest first (the order the collator has always fed them in)
        return Filled([*reversed(drawn), *real, *synthetic, *batch.passengers], len(drawn), real_units)


STRATEGIES: dict[str, UnitStrategy] = {"examples": ExamplesUnit(), "tokens": TokensUnit()}


def strategy_for(unit: str) -> UnitStrategy:
    return STRATEGIES[unit]

