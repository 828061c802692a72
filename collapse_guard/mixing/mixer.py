"""`Mixer`: the one mixing path of a micro-batch, for either unit, and the state it carries between them.

    split -> set aside rows without loss -> queue -> decide -> take carried real -> top up / pack -> count

The unit-specific steps come from a strategy (`mixing.strategies`), how many units to take from the pure
policy (`mixing.policy`); what needs the collator's resources (recognising rows, the synthetic filter, real
top-ups, warnings) arrives as `MixHooks`. The mixer owns the carry-over (`CarryOver`) and the counters
(`MixingCounts`); the collator checkpoints both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collapse_guard.mixing.carry import CarryOver
from collapse_guard.mixing.counts import MixingCounts
from collapse_guard.mixing.packing import TopUp
from collapse_guard.mixing.policy import FloorPlan, expected_share
from collapse_guard.mixing.segments import carries_loss, token_keys
from collapse_guard.mixing.strategies import BatchContext, Demand, Filled, Recognise, UnitStrategy
from collapse_guard.provenance import REAL

Row = dict[str, Any]


@dataclass(frozen=True)
class MixHooks:
    """The collator's resources the mixing path uses.

    Args:
        recognise: rows -> their sources (provenance, else the real pool's fingerprints).
        keep_synthetic: incoming synthetic rows -> those the synthetic filter keeps.
        top_up: (like, fit=None) -> a real row that carries loss, shaped like the batch's rows, or None.
        capacity: the packed row length (None: unknown).
        warn_once: (key, message) -> warns once per key.
        cut_note: the truncation the warnings mention ("" when rows are not cut).
    """

    recognise: Recognise
    keep_synthetic: Callable[[list[Row]], list[Row]]
    top_up: TopUp
    capacity: Callable[[], int | None]
    warn_once: Callable[[str, str], None]
    cut_note: Callable[[], str]


class Mixer:
    """Mixes micro-batches with one strategy; keeps the carry-over and the counters between them."""

    def __init__(self, strategy: UnitStrategy, floor_scope: str, max_growth: float, hooks: MixHooks):
        self.strategy = strategy
        self.floor_scope = floor_scope
        self.max_growth = max_growth
        self.hooks = hooks
        self.carry = CarryOver()
        self.counts = MixingCounts()
        self.last_real_fraction: float | None = None
        self.typical_units = 0  # the largest incoming micro-batch seen, in units (the growth cap's nominal)

    def mix(self, rows: list[Row], f: float, plan: FloorPlan | None, calls: int,
            composition: dict[str, int] | None) -> list[Row]:
        """The `calls`-th micro-batch (from 0), mixed to floor `f`: its rows for the base collator."""
        unit = self.strategy
        items, sources = unit.split(rows, self.hooks.recognise)
        items, sources, passengers = self._set_aside_no_loss(items, sources)
        incoming = sum(unit.measure(x) for x in items)
        self._intake(items, sources, incoming, f)
        # the floor holds cumulatively over an optimizer step: its totals restart at the step's first
        # micro-batch (counted within the epoch, whose last step may be short), or every time per micro-batch
        new_step = self.floor_scope == "micro_batch" or (plan or FloorPlan()).position_in_step(calls) == 0
        nominal = unit.nominal(incoming, plan.batch_size if plan else None, self.typical_units)
        # the synthetic share still to come, from what has arrived so far and the training set's share
        share = expected_share(unit.prior(composition, f), self.counts.synthetic_units_seen,
                               self.counts.intake_units, nominal)
        demand = Demand(f, incoming, self.carry.begin(new_step), plan.remaining(calls) if plan else None,
                        nominal, self.max_growth, share)
        chosen, target = unit.decide(demand, self.carry)
        real, real_units = self.carry.take_real(target, unit.measure)
        filled = unit.fill(chosen, real, real_units, target, BatchContext(
            rows, token_keys(rows[0]), passengers, self.hooks.top_up, self.hooks.capacity))
        self.carry.give_back_real(list(filled.unplaced))
        # grown: more rows than the sampler gave (passengers are in both; packed rows opened for the floor)
        self._account(filled, chosen, passengers, incoming, grown=len(filled.rows) > len(rows))
        return filled.rows

    def _set_aside_no_loss(self, items: list[Row], sources: list[str]
                           ) -> tuple[list[Row], list[str], list[Row]]:
        """Splits off items that carry no loss: they ride along in this micro-batch unchanged but count for
        nothing, so a real row the trainer cut inside its prompt cannot satisfy the floor."""
        if all(carries_loss(x) for x in items):  # the usual case: nothing to split
            return items, sources, []
        kept, kept_sources, passengers = [], [], []
        for item, source in zip(items, sources, strict=True):
            if carries_loss(item):
                kept.append(item)
                kept_sources.append(source)
                continue
            passengers.append(item)
            if source == REAL:
                self.counts.no_loss_real += 1
            else:
                self.counts.no_loss_synthetic += 1
            self.counts.real_seen += source == REAL  # recognised all the same (the self-check)
        if self.counts.no_loss_real:
            self.hooks.warn_once("no_loss_real", (
                f"MixingCollator: {self.counts.no_loss_real} real row(s) so far carry no loss (every "
                f"label is -100{self.hooks.cut_note()}): they are passed on but do not count toward the "
                "real-data floor, which counts only rows (tokens) that are trained. Fix: raise max_length or "
                "shorten the prompts of the real data."))
        return kept, kept_sources, passengers

    def _intake(self, items: list[Row], sources: list[str], units: int, f: float) -> None:
        """Incoming items join the queues: synthetic ones after the filter, none at all when f = 1."""
        real_in = [x for x, s in zip(items, sources, strict=True) if s == REAL]
        synthetic_in = [x for x, s in zip(items, sources, strict=True) if s != REAL]
        synthetic_in = self.hooks.keep_synthetic(synthetic_in)
        self.counts.synthetic_seen += len(synthetic_in)
        self.counts.synthetic_units_seen += sum(self.strategy.measure(x) for x in synthetic_in)
        self.counts.intake_units += units
        self.counts.real_seen += len(real_in)
        if f >= 1.0:
            self.counts.synthetic_skipped += len(synthetic_in)
            synthetic_in = []
        self.carry.queue(real_in, synthetic_in)

    def _account(self, filled: Filled, chosen: list[Row], passengers: list[Row], incoming: int,
                 grown: bool) -> None:
        """Counts a mixed micro-batch. The floor counts units; the token counters count input tokens (what
        the trainer is fed), real ones being whatever the batch holds beside synthetic rows and passengers."""
        units = filled.real_units + sum(self.strategy.measure(s) for s in chosen)
        synthetic_tokens = sum(len(s["input_ids"]) for s in chosen)
        self.carry.add(units, filled.real_units)
        c = self.counts
        c.units += units
        c.real_units += filled.real_units
        c.incoming_units += incoming
        c.real_top_up += filled.top_up
        c.synthetic_served += len(chosen)
        c.real_tokens += (sum(len(r["input_ids"]) for r in filled.rows) - synthetic_tokens
                          - sum(len(p["input_ids"]) for p in passengers))
        c.synthetic_tokens += synthetic_tokens
        c.grown_batches += grown
        c.extra_units += max(0, units - incoming)
        self.last_real_fraction = filled.real_units / units if units else None
        c.micro_batches += 1
        self.typical_units = max(self.typical_units, incoming)
