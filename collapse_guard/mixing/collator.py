"""`MixingCollator`: at least a share of real (human) data in every optimizer step, and every synthetic
example trained exactly once per epoch.

The contract, per rank (so it holds for the global batch under DDP):

- **Floor per optimizer step.** Of the B x GA micro-batch rows of each optimizer step (tokens with
  `unit="tokens"`), at least `ceil(f x rows)` are real; inside a step the real share is kept
  cumulatively, so B=1 with accumulation interleaves real and synthetic rows. `floor_scope=
  "micro_batch"` enforces it on every micro-batch instead.
- **None lost, none duplicated.** Real rows already in a batch count. When a step is short, real rows
  come from a carry-over of real rows, then from a deterministic, rank-sharded stream over the real
  pool. Synthetic rows the floor displaces wait in a carry-over buffer. The buffers are spread over
  the rest of the epoch (a micro-batch grows by a few rows when it must), and the last micro-batch of
  an epoch (or of training, with `max_steps`) flushes them: every synthetic row the sampler delivers
  is fed once. With `f=1` synthetic rows cannot be trained at all; the run says so before it starts.
- **Rows as the trainer makes them.** Top-ups are tokenized like the trainer's rows (`RowFormat`) and
  cut to its `max_length`; with `unit="tokens"` they are packed into the batch's packed rows.

Recognising real rows: a row's own `provenance` (kept through the Trainer by `attach`), else an
index of the real pool tokenized like the trainer (see `collapse_guard.provenance`). Unrecognised
rows count as synthetic, the safe side for the floor, and a self-check says so when it happens.

`attach(trainer)` (or `CollapseGuardCallback.attach`) wires the collator into a Trainer: it wraps the
trainer's own collator, learns B, GA, the epoch length and `max_length`, states the plan up front,
checkpoints the collator's state and pauses mixing during evaluation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from collapse_guard.data import as_dataset, require_format
from collapse_guard.distributed import rank_world
from collapse_guard.io import atomic_write_text
from collapse_guard.mixing.rows import RowFormat, real_pool_index, tokenize_row
from collapse_guard.mixing.segments import (
    ROW_KEYS,
    as_list,
    check_row_keys,
    join_segments,
    pack_first_fit,
    shape_like,
    split_row,
    token_keys,
    truncate,
)
from collapse_guard.mixing.stream import RealStream
from collapse_guard.provenance import REAL, SYNTHETIC, SourceIndex, source_of_example

logger = logging.getLogger(__name__)

MIN_SAFE_REAL_FRACTION = 0.1
UNITS = ("examples", "tokens")
SCOPES = ("step", "micro_batch")
STATE_DIRNAME = "collapse_guard"
_EPS = 1e-9


def validate_real_fraction(value: Any, allow_low_real_fraction: bool = False,
                           key: str = "min_real_fraction") -> float:
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

    def position_in_step(self, calls: int) -> int:
        within_epoch = calls % self.micro_batches_per_epoch if self.micro_batches_per_epoch else calls
        return within_epoch % self.gradient_accumulation_steps


class MixingCollator:
    """Wraps a data collator so every optimizer step trains on at least a share of real data.

    Args:
        base_collator: the collator to wrap. Default: the trainer's own collator when you `attach`
            (TRL's padding-free collator with packing, ...), else TRL's `DataCollatorForLanguageModeling`.
        real_dataset: the human pool: `text`, `messages`, `prompt`/`completion` or tokenized `input_ids`;
            a `datasets.Dataset` of any size or a streaming `IterableDataset`.
        tokenizer: tokenizes real top-ups; default: the trainer's `processing_class` when you `attach`.
        min_real_fraction: the floor f (0.5 by default; below 0.1 needs `allow_low_real_fraction`).
        unit: "examples" (rows) or "tokens" (non-padding tokens; required with packing).
        floor_scope: "step" (B x GA rows of an optimizer step, default) or "micro_batch".
        seed: seeds the real stream.
        real_stream_start: draws already made from this seeded stream (by earlier rounds of a loop, say):
            top-ups continue after them, so successive runs walk the whole real pool before any row repeats
            instead of topping up with the same first rows every time.
        max_length: cut top-ups to this many tokens; default: the trainer's (`SFTConfig.max_length`, or
            the longest training row for a plain `Trainer`).
        allow_low_real_fraction: permit f < 0.1.
        synthetic_filter: optional `(texts) -> list[str | None]` run on incoming synthetic rows (a cheap
            verifier); a string drops the row and is the reason.
        max_growth: a micro-batch holds at most this many times the rows (tokens) the sampler gave it, when
            it takes extra rows to train carried-over synthetic rows within the epoch (2.0 by default).

    Example:

    ```python
    >>> from collapse_guard.mixing import MixingCollator
    >>> from collapse_guard.testing import tiny_tokenizer, tiny_text_datasets
    >>> tok = tiny_tokenizer()
    >>> real, synthetic = tiny_text_datasets()
    >>> collator = MixingCollator(real_dataset=real, tokenizer=tok, min_real_fraction=0.5)
    >>> batch = collator([{"input_ids": tok(t)["input_ids"], "provenance": {"source": "synthetic"}}
    ...                   for t in synthetic["text"][:4]])
    >>> collator.last_real_fraction
    0.5

    ```

    In a training script: `MixingCollator(real_dataset=real, min_real_fraction=0.5).attach(trainer)`.
    """

    def __init__(
        self,
        base_collator: Callable | None = None,
        real_dataset=None,
        tokenizer=None,
        min_real_fraction: float = 0.5,
        unit: Literal["examples", "tokens"] = "examples",
        floor_scope: Literal["step", "micro_batch"] = "step",
        seed: int = 0,
        max_length: int | None = None,
        allow_low_real_fraction: bool = False,
        synthetic_filter: Callable[[list[str]], list[str | None]] | None = None,
        max_growth: float = 2.0,
        real_stream_start: int = 0,
    ):
        self.min_real_fraction = validate_real_fraction(min_real_fraction, allow_low_real_fraction)
        self.allow_low_real_fraction = allow_low_real_fraction
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}. Use 'tokens' with packing=True.")
        if floor_scope not in SCOPES:
            raise ValueError(f"floor_scope must be one of {SCOPES}, got {floor_scope!r}.")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 (tokens per row) or None, got {max_length!r}.")
        if isinstance(max_growth, bool) or not isinstance(max_growth, (int, float)) or not max_growth >= 1.0:
            raise ValueError("max_growth must be a number >= 1 (largest micro-batch / incoming size), got "
                             f"{max_growth!r}.")
        if (isinstance(real_stream_start, bool) or not isinstance(real_stream_start, int)
                or real_stream_start < 0):
            raise ValueError(f"real_stream_start must be an int >= 0 (draws already made), got "
                             f"{real_stream_start!r}.")
        if base_collator is not None and not callable(base_collator):
            raise TypeError(f"base_collator must be callable, got {type(base_collator).__name__}.")
        if real_dataset is None:
            raise ValueError("real_dataset is missing: pass a datasets.Dataset (or a list) of human "
                             "examples.")
        real_dataset = as_dataset(real_dataset, "real_dataset")
        self.real_format = require_format(real_dataset, "real_dataset")
        if hasattr(real_dataset, "__len__") and len(real_dataset) == 0:
            raise ValueError("real_dataset is empty (0 rows): the real-data floor needs at least one human "
                             "example.")
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", 0) is None and base_collator is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no pad token (pad_token=None): batches cannot be "
                "padded. Set one, e.g. tokenizer.pad_token = tokenizer.eos_token."
            )
        self.base_collator = base_collator
        self.real_dataset = real_dataset
        self.tokenizer = tokenizer
        self.unit = unit
        self.floor_scope = floor_scope
        self.seed = seed
        self.real_stream_start = real_stream_start
        self.max_length = max_length
        self.synthetic_filter = synthetic_filter
        self.max_growth = float(max_growth)

        self.row_format: RowFormat | None = None
        self.index: SourceIndex | None = None
        self.plan_: FloorPlan | None = None
        self.attached = False
        self.training = False  # attached collators mix only while the trainer trains
        self.paused = False
        self.skip_calls = 0
        self.composition: dict[str, int] | None = None  # real/synthetic rows of the training set, if known
        self.recognition = "row provenance, else real-pool fingerprints"
        self._stream: RealStream | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.calls = 0
        self.synthetic_buffer: deque[dict[str, Any]] = deque()
        self.real_carry: deque[dict[str, Any]] = deque()
        self.credit = {"synthetic": 0.0, "real": 0.0}
        self.step_units = 0
        self.step_real = 0
        self.counts: Counter = Counter()
        self.dropped: Counter = Counter()
        self.last_real_fraction: float | None = None
        self._snapshots: deque[tuple[int, dict]] = deque(maxlen=8)
        self._warned: set[str] = set()
        self._longest_row = 0
        self._typical_units = 0  # the largest incoming micro-batch seen (tokens unit: its token count)

    # ----- setup ----------------------------------------------------------------------------------------
    def plan(self, gradient_accumulation_steps: int = 1, micro_batches_per_epoch: int | None = None,
             total_micro_batches: int | None = None, batch_size: int | None = None) -> MixingCollator:
        """Declares the training schedule (what `attach` does from the Trainer); for custom training loops.

        With a known epoch length the carry-over is flushed by the end of every epoch; without one it
        waits until `drain()`.
        """
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}.")
        self.plan_ = FloorPlan(int(gradient_accumulation_steps), micro_batches_per_epoch, total_micro_batches,
                               batch_size)
        self._snapshots = deque(self._snapshots, maxlen=int(gradient_accumulation_steps) + 8)
        return self

    def attach(self, trainer) -> MixingCollator:
        """Makes this collator the trainer's data collator (wrapping the one it built) and adds the callback
        that flushes, checkpoints and pauses it. Call after building the trainer, before `train()`."""
        from collapse_guard.mixing.attach import attach_collator

        attach_collator(self, trainer)
        return self

    def _tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(
                "MixingCollator needs a tokenizer to tokenize real top-ups: pass tokenizer=... or "
                "attach(trainer) (it takes the trainer's processing_class)."
            )
        return self.tokenizer

    def _ensure_base(self) -> Callable:
        if self.base_collator is None:
            tok = self._tokenizer()
            if tok.pad_token_id is None:
                raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token = "
                                 "tokenizer.eos_token.")
            from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

            self.base_collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
        return self.base_collator

    def _format(self) -> RowFormat:
        if self.row_format is None:  # not attached: SFTTrainer's defaults
            self.row_format = RowFormat(max_length=self.max_length)
        return self.row_format

    def _row_limit(self) -> int | None:
        return self.max_length or self._format().max_length or (self._longest_row or None)

    def stream(self) -> RealStream:
        if self._stream is None:
            fmt = self._format()
            tok = self._tokenizer() if self.real_format != "tokens" else self.tokenizer
            self._stream = RealStream(self.real_dataset, lambda ex: tokenize_row(ex, tok, fmt), self.seed)
            if self.real_stream_start:
                self._stream.load_state_dict({"draws": self.real_stream_start})
        return self._stream

    @property
    def real_stream_draws(self) -> int:
        """Draws made from the real stream so far, `real_stream_start` included (hand it to the next run)."""
        return self._stream.draws if self._stream is not None else self.real_stream_start

    def source_index(self) -> SourceIndex:
        """The real pool's fingerprints (built on first need: rows that carry no provenance)."""
        if self.index is None:
            self.index = real_pool_index(self.real_dataset, self._tokenizer() if self.real_format != "tokens"
                                         else self.tokenizer, self._format())
        return self.index

    # ----- recognising rows ------------------------------------------------------------------------------
    def _sources(self, rows: list[dict[str, Any]]) -> list[str]:
        sources = [source_of_example(r) for r in rows]
        unknown = [i for i, s in enumerate(sources) if s is None]
        self.counts["looked_up"] += len(unknown)
        if unknown:
            looked_up = self.source_index().sources([as_list(rows[i]["input_ids"]) for i in unknown])
            for i, s in zip(unknown, looked_up, strict=True):
                sources[i] = s or SYNTHETIC  # unrecognised: synthetic, the safe side for the floor
                self.counts["unrecognised"] += s is None and len(self.index.synthetic_keys) > 0
        return sources

    def _segment_sources(self, segments: list[dict[str, list]], row_source: str | None) -> list[str]:
        if row_source is not None:
            return [row_source] * len(segments)
        return self._sources([{"input_ids": s["input_ids"]} for s in segments])

    def _filter_synthetic(self, synthetic: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.synthetic_filter is None or not synthetic:
            return synthetic
        texts = [self._tokenizer().decode(as_list(r["input_ids"]), skip_special_tokens=True)
                 for r in synthetic]
        reasons = self.synthetic_filter(texts)
        if len(reasons) != len(synthetic):
            raise ValueError(f"synthetic_filter returned {len(reasons)} verdicts for {len(synthetic)} texts.")
        kept = []
        for row, reason in zip(synthetic, reasons, strict=True):
            if reason is None:
                kept.append(row)
            else:
                self.dropped[str(reason)] += 1
        return kept

    # ----- the floor --------------------------------------------------------------------------------------
    def _begin_micro_batch(self) -> tuple[int, int]:
        """(units, real units) already in this optimizer step (0, 0 with floor_scope='micro_batch')."""
        plan = self.plan_ or FloorPlan()
        if self.floor_scope == "micro_batch" or plan.position_in_step(self.calls) == 0:
            self.step_units, self.step_real = 0, 0
        return self.step_units, self.step_real

    def _real_needed(self, done_units: int, done_real: int, units: int) -> int:
        """Real units this micro-batch needs so the step's cumulative real share stays >= f."""
        return max(0, math.ceil(self.min_real_fraction * (done_units + units) - _EPS) - done_real)

    def _real_for_synthetic(self, done_units: int, done_real: int, n_synthetic: int) -> int:
        """The fewest real units r with done_real + r >= f * (done_units + n_synthetic + r)."""
        f = self.min_real_fraction
        return max(0, math.ceil((f * (done_units + n_synthetic) - done_real) / (1.0 - f) - _EPS))

    def _remaining(self) -> int | None:
        """Micro-batches left in the delivery window, this one included (None: unknown)."""
        end = self.plan_.window_end(self.calls) if self.plan_ else None
        return None if end is None else max(end - self.calls, 1)

    def _drain(self, which: str, excess: float, remaining: int | None) -> float:
        """How much of a carry-over beyond this micro-batch's natural room to serve now: spread evenly over
        the rest of the window, everything in its last micro-batch."""
        if excess <= 0 or remaining is None:
            return 0
        if remaining <= 1:
            return excess
        self.credit[which] += excess / remaining
        whole = math.floor(self.credit[which])
        self.credit[which] -= whole
        return whole

    def _must_serve(self, pending: float, remaining: int | None, per_call_max: float, units: int,
                    granule: int = 1) -> float:
        """The least to serve now so that, at the growth cap, later micro-batches can still absorb the rest
        of the carry-over and the synthetic rows still to come: their expected number, plus two standard
        deviations (a binomial draw per micro-batch) and one row (`granule`: the longest segment, with
        tokens), so an unlucky end of the epoch does not leave rows behind."""
        if remaining is None or remaining <= 1:
            return 0
        prior = self._prior_share()
        # the share seen so far, shrunk toward the prior while few batches have been seen
        weight = 8.0 * units
        share = min(1.0, (self.counts["synthetic_units_seen"] + prior * weight)
                    / (self.counts["intake_units"] + weight))
        arriving = share * units
        later = remaining - 1
        margin = 2.0 * math.sqrt(later * units * share * (1.0 - share)) + granule
        return pending - later * (per_call_max - arriving) + margin

    def _prior_share(self) -> float:
        """The training set's synthetic share (rows, or tokens with unit='tokens') if known, else 1 - f."""
        comp = self.composition or {}
        if self.unit == "tokens" and comp.get("real_tokens", 0) + comp.get("synthetic_tokens", 0):
            return comp["synthetic_tokens"] / (comp["real_tokens"] + comp["synthetic_tokens"])
        if comp.get(REAL, 0) + comp.get(SYNTHETIC, 0):
            return comp[SYNTHETIC] / (comp[REAL] + comp[SYNTHETIC])
        return 1.0 - self.min_real_fraction

    def _nominal(self, incoming: int) -> int:
        """The micro-batch size the growth cap refers to (a short last batch of an epoch still may grow to
        max_growth times a full one)."""
        nominal = self.plan_.batch_size if self.plan_ and self.plan_.batch_size else 0
        return max(incoming, nominal if self.unit == "examples" else 0, self._typical_units)

    def _intake(self, real_in: list, synthetic_in: list, units: int, measure: Callable[[list], int]) -> None:
        """Incoming rows (segments) join the queues: synthetic ones after the filter, none at all when
        f = 1."""
        synthetic_in = self._filter_synthetic(synthetic_in)
        self.counts["synthetic_seen"] += len(synthetic_in)
        self.counts["synthetic_units_seen"] += measure(synthetic_in)
        self.counts["intake_units"] += units
        self.counts["real_seen"] += len(real_in)
        if self.min_real_fraction >= 1.0:
            self.counts["synthetic_skipped"] += len(synthetic_in)
            synthetic_in = []
        self.synthetic_buffer.extend(synthetic_in)
        self.real_carry.extend(real_in)

    def _mix_examples(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        b = len(rows)
        sources = self._sources(rows)
        real_in = [r for r, s in zip(rows, sources, strict=True) if s == REAL]
        self._intake(real_in, [r for r, s in zip(rows, sources, strict=True) if s != REAL], b, len)
        done_units, done_real = self._begin_micro_batch()
        room = b - self._real_needed(done_units, done_real, b)
        remaining = self._remaining()
        pending = len(self.synthetic_buffer)
        largest = max(b, math.floor(self.max_growth * self._nominal(b)))
        per_call_max = math.floor((1.0 - self.min_real_fraction) * largest)
        wanted = max(room + self._drain("synthetic", pending - room, remaining),
                     math.ceil(self._must_serve(pending, remaining, per_call_max, self._nominal(b))))
        n_synthetic = min(pending, int(wanted))
        if self.min_real_fraction >= 1.0:
            n_synthetic = 0
        while (n_synthetic > room
               and n_synthetic + self._real_for_synthetic(done_units, done_real, n_synthetic) > largest):
            n_synthetic -= 1  # growth beyond max_growth: the rest waits for a later micro-batch
        n_real = b - n_synthetic if n_synthetic <= room else self._real_for_synthetic(done_units, done_real,
                                                                                      n_synthetic)
        extra_real = int(self._drain("real", len(self.real_carry) - n_real, remaining))
        n_real += max(0, min(extra_real, largest - n_real - n_synthetic))
        like = token_keys(rows[0])
        real_rows = [self.real_carry.popleft() for _ in range(min(n_real, len(self.real_carry)))]
        n_top_up = n_real - len(real_rows)
        real_rows += [self._top_up(like) for _ in range(n_top_up)]
        synthetic_rows = [self.synthetic_buffer.popleft() for _ in range(n_synthetic)]
        self._account(units=n_real + n_synthetic, real=n_real, incoming=b, top_up=n_top_up,
                      synthetic=n_synthetic, real_tokens=sum(len(r["input_ids"]) for r in real_rows),
                      synthetic_tokens=sum(len(r["input_ids"]) for r in synthetic_rows))
        return real_rows + synthetic_rows

    def _top_up(self, like: list[str]) -> dict[str, Any]:
        example = self.stream().next()
        limit = self._row_limit()
        if limit is not None:
            example = truncate(example, limit, keep_end=self._format().truncation_mode == "keep_end")
        return shape_like(example, like or ["input_ids", "labels"])

    def _mix_tokens(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        packed = any("seq_lengths" in r for r in rows)
        like = [k for k in token_keys(rows[0])]
        real_in, synthetic_in = [], []
        incoming_tokens = 0
        for row in rows:
            segments = split_row(row)
            incoming_tokens += sum(len(s["input_ids"]) for s in segments)
            for seg, source in zip(segments, self._segment_sources(segments, source_of_example(row)),
                                   strict=True):
                (real_in if source == REAL else synthetic_in).append(seg)
        self._intake(real_in, synthetic_in, incoming_tokens,
                     lambda segs: sum(len(x["input_ids"]) for x in segs))
        done_units, done_real = self._begin_micro_batch()
        room = incoming_tokens - self._real_needed(done_units, done_real, incoming_tokens)
        remaining = self._remaining()
        pending = sum(len(s["input_ids"]) for s in self.synthetic_buffer)
        largest = self.max_growth * self._nominal(incoming_tokens)
        f = self.min_real_fraction
        granule = max((len(s["input_ids"]) for s in self.synthetic_buffer), default=1)
        allowance = max(room + self._drain("synthetic", pending - room, remaining),
                        self._must_serve(pending, remaining, (1.0 - f) * largest,
                                         self._nominal(incoming_tokens), granule))
        # S + real_for(S) <= largest  <=>  S <= largest (1 - f) - f done + done_real
        allowance = min(allowance, largest * (1.0 - f) - f * done_units + done_real)
        chosen = self._take_synthetic(allowance)
        synthetic_tokens = sum(len(s["input_ids"]) for s in chosen)
        real_target = max(incoming_tokens - synthetic_tokens,
                          self._real_for_synthetic(done_units, done_real, synthetic_tokens))
        carry_tokens = sum(len(s["input_ids"]) for s in self.real_carry)
        extra_real = int(self._drain("real", carry_tokens - real_target, remaining))
        real_target += max(0, min(extra_real, int(largest) - real_target - synthetic_tokens))
        real_segments, real_tokens = [], 0
        while self.real_carry and real_tokens < real_target:
            seg = self.real_carry.popleft()
            real_segments.append(seg)
            real_tokens += len(seg["input_ids"])
        if packed:
            out, top_up, real_tokens = self._pack(chosen, real_segments, real_tokens, real_target, len(rows),
                                                  like)
        else:
            out = [*real_segments, *chosen]
            top_up = 0
            while real_tokens < real_target:
                seg = self._top_up(like)
                out.insert(0, seg)
                real_tokens += len(seg["input_ids"])
                top_up += 1
        self._account(units=real_tokens + synthetic_tokens, real=real_tokens, incoming=incoming_tokens,
                      top_up=top_up, synthetic=len(chosen), grown=len(out) > len(rows),
                      real_tokens=real_tokens, synthetic_tokens=synthetic_tokens)
        return out

    def _take_synthetic(self, allowance: float) -> list[dict[str, list]]:
        """Synthetic segments in FIFO order that fit the allowance; a segment too long for it is skipped
        over (not blocking the ones behind it) and stays at the front for a later batch."""
        chosen, kept, used = [], deque(), 0
        while self.synthetic_buffer:
            seg = self.synthetic_buffer.popleft()
            n = len(seg["input_ids"])
            if used + n <= allowance:
                chosen.append(seg)
                used += n
            else:
                kept.append(seg)
                if used >= allowance or len(kept) > 64:  # bounded look-ahead
                    break
        self.synthetic_buffer.extendleft(reversed(kept))
        return chosen

    def _pack(self, synthetic: list, real: list, real_tokens: int, real_target: int, n_rows: int,
              like: list[str]) -> tuple[list[dict[str, Any]], int, int]:
        """Packs the micro-batch's segments into rows of max_length tokens: synthetic segments first (first
        fit decreasing), then carried real segments where they fit (the rest stay carried), then real
        top-ups cut to fill each row's free space, so a mixed batch carries at least the tokens of the
        packed batch it replaced. Rows are added only when the floor needs more real tokens."""
        capacity = self._row_limit()
        if capacity is None:
            raise ValueError("packed rows need a max_length: pass max_length=... or attach(trainer).")
        bins, loads = pack_first_fit(synthetic, capacity, [[] for _ in range(n_rows)], [0] * n_rows)
        real_tokens = 0
        for seg in sorted(real, key=lambda s: -len(s["input_ids"])):
            n = len(seg["input_ids"])
            slot = next((i for i, load in enumerate(loads) if load + n <= capacity), None)
            if slot is None:
                self.real_carry.appendleft(seg)
                continue
            bins[slot].append(seg)
            loads[slot] += n
            real_tokens += n
        min_fill = max(2, min(16, capacity // 8))  # shorter fragments carry almost no loss signal
        top_up, i = 0, 0
        while i < len(bins):
            while capacity - loads[i] >= min_fill and (i < n_rows or real_tokens < real_target):
                seg = truncate(self._top_up(like), capacity - loads[i])
                bins[i].append(seg)
                loads[i] += len(seg["input_ids"])
                real_tokens += len(seg["input_ids"])
                top_up += 1
            i += 1
            if i == len(bins) and real_tokens < real_target:  # the floor needs another row of real tokens
                bins.append([])
                loads.append(0)
        return [join_segments(b) for b in bins if b], top_up, real_tokens

    def _account(self, units: int, real: int, incoming: int, top_up: int, synthetic: int,
                 grown: bool | None = None, real_tokens: int = 0, synthetic_tokens: int = 0) -> None:
        self.step_units += units
        self.step_real += real
        self.counts["units"] += units
        self.counts["real_units"] += real
        self.counts["incoming_units"] += incoming
        self.counts["real_top_up"] += top_up
        self.counts["synthetic_served"] += synthetic
        self.counts["real_tokens"] += real_tokens
        self.counts["synthetic_tokens"] += synthetic_tokens
        if grown if grown is not None else units > incoming:
            self.counts["grown_batches"] += 1
        self.counts["extra_units"] += max(0, units - incoming)
        self.last_real_fraction = real / units if units else None
        self.counts["micro_batches"] += 1
        self._typical_units = max(self._typical_units, incoming)

    # ----- calling ----------------------------------------------------------------------------------------
    def __call__(self, features: list[dict[str, Any]]):
        base = self._ensure_base()
        if not features or self.paused or (self.attached and not self.training) or self.skip_calls > 0:
            if self.skip_calls > 0 and self.training:
                # a resumed IterableDataset replays batches the checkpoint already covers
                self.skip_calls -= 1
            return base(self._strip([dict(f) for f in features]))
        rows = [dict(f) for f in features]
        if self.calls == 0:
            for row in rows[:1]:
                check_row_keys(row)
            if self.unit == "examples" and any("seq_lengths" in r for r in rows):
                raise ValueError(
                    "MixingCollator(unit='examples') got packed rows (seq_lengths): with packing the floor "
                    "must count tokens. Use MixingCollator(..., unit='tokens')."
                )
            if self.plan_ is None:
                self._warn_once("unplanned", "MixingCollator is mixing batches but was not attached to a "
                                "Trainer (collator.attach(trainer)) nor given a plan (collator.plan(...)): "
                                "it cannot flush its carry-over at the end of an epoch, nor checkpoint its "
                                "state. Attach it, or call drain() at the end of your own training loop.")
        self._longest_row = max([self._longest_row, *(len(r["input_ids"]) for r in rows)])
        mixed = self._mix_examples(rows) if self.unit == "examples" else self._mix_tokens(rows)
        self.calls += 1
        self._snapshots.append((self.calls, self._snapshot()))
        self._self_check()
        return base(self._strip(mixed))

    def _self_check(self) -> None:
        """Warns once when no real row has been recognised although real rows should have arrived by now:
        at least 10 expected (the chance of none by bad luck is below e**-10), or 200 rows seen when the
        training set's composition is unknown. Rows that carried their provenance cannot be misread."""
        seen = self.counts["real_seen"] + self.counts["synthetic_seen"]
        if "recognition" in self._warned or self.counts["real_seen"] or self.counts["looked_up"] == 0:
            return
        comp = self.composition
        if comp is not None:
            total = comp.get(REAL, 0) + comp.get(SYNTHETIC, 0)
            expected = comp.get(REAL, 0) / total * seen if total else 0.0
            if expected < 10:
                return
            holds = (f" although the training set holds {comp[REAL]} real rows ({expected:.0f} expected "
                     "so far)")
        elif seen < 200:
            return
        else:
            holds = ""
        origin = self.index.origin if self.index is not None else "real-pool fingerprints"
        self._warn_once(
            "recognition",
            f"MixingCollator recognised no real row among the first {seen} rows{holds} (recognition by: "
            f"{origin}). Real rows in the training set are counted as synthetic and the floor is met with "
            "extra real top-ups instead. Likely cause: your rows are tokenized differently from the real "
            "pool (EOS/BOS, truncation, chat template). Fix: keep the 'provenance' column in the training "
            "set (mix_datasets adds it) and attach the collator to the trainer (collator.attach(trainer)).",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def drain(self, batch_size: int):
        """Yields the carry-over as final batches that meet the floor (custom loops without a plan)."""
        while self.synthetic_buffer:
            pending = len(self.synthetic_buffer)
            self.plan_ = self.plan_ or FloorPlan()
            saved = self.plan_.total_micro_batches
            self.plan_.total_micro_batches = self.calls + 1  # the last micro-batch of its window: flush
            like = token_keys(self.synthetic_buffer[0])
            filler = [{**self._top_up(like), "provenance": {"source": REAL}} for _ in range(batch_size)]
            rows = self._mix_examples(filler) if self.unit == "examples" else self._mix_tokens(filler)
            self.plan_.total_micro_batches = saved
            self.calls += 1
            if len(self.synthetic_buffer) >= pending:
                raise RuntimeError(f"drain(batch_size={batch_size}) cannot serve {pending} pending examples.")
            yield self._ensure_base()(self._strip(rows))

    @staticmethod
    def _strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k not in ROW_KEYS[1:]} for row in rows]

    # ----- reporting ---------------------------------------------------------------------------------------
    @property
    def real_fraction(self) -> float | None:
        """Realised real share over every mixed micro-batch so far (examples or tokens, per `unit`)."""
        return self.counts["real_units"] / self.counts["units"] if self.counts["units"] else None

    def metrics(self) -> dict[str, float]:
        """Counters for logging (`collapse/mixing/...`)."""
        nan = float("nan")
        out = {
            "real_fraction": self.real_fraction if self.real_fraction is not None else nan,
            "min_real_fraction": self.min_real_fraction,
            "synthetic_served": float(self.counts["synthetic_served"]),
            "synthetic_pending": float(len(self.synthetic_buffer)),
            "real_top_up": float(self.counts["real_top_up"]),
            "grown_batches": float(self.counts["grown_batches"]),
            "unrecognised": float(self.counts["unrecognised"]),
        }
        if self.counts["synthetic_skipped"]:
            out["synthetic_skipped"] = float(self.counts["synthetic_skipped"])
        out.update({f"dropped/{reason}": float(n) for reason, n in self.dropped.items()})
        return out

    # ----- checkpointing ------------------------------------------------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        # references only: rows are never mutated after they enter a buffer, so this stays cheap per batch
        return {
            "calls": self.calls,
            "stream": self._stream.state_dict() if self._stream is not None
            else {"draws": self.real_stream_start},
            "synthetic_buffer": list(self.synthetic_buffer),
            "real_carry": list(self.real_carry),
            "credit": dict(self.credit),
            "step": [self.step_units, self.step_real],
            "counts": dict(self.counts),
            "dropped": dict(self.dropped),
            "min_real_fraction": self.min_real_fraction,
        }

    @staticmethod
    def _serializable(snapshot: dict[str, Any]) -> dict[str, Any]:
        def plain(rows):
            return [{k: (v if isinstance(v, (str, int, float, dict, type(None))) else as_list(v))
                     for k, v in row.items()} for row in rows]

        return {**snapshot, "synthetic_buffer": plain(snapshot["synthetic_buffer"]),
                "real_carry": plain(snapshot["real_carry"])}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: position, carry-overs, real-stream position, counters."""
        return self._serializable(self._snapshot())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        self.stream().load_state_dict(state["stream"])
        self.synthetic_buffer = deque(state["synthetic_buffer"])
        self.real_carry = deque(state["real_carry"])
        self.credit = dict(state["credit"])
        self.step_units, self.step_real = state["step"]
        self.counts = Counter(state["counts"])
        self.dropped = Counter(state["dropped"])
        self.min_real_fraction = float(state.get("min_real_fraction", self.min_real_fraction))
        self._snapshots.clear()

    def state_at(self, calls: int) -> dict[str, Any]:
        """The state right after the `calls`-th micro-batch (the dataloader may have prefetched more)."""
        for n, snapshot in reversed(self._snapshots):
            if n == calls:
                return self._serializable(snapshot)
        if calls == self.calls:
            return self.state_dict()
        raise KeyError(f"no MixingCollator snapshot after micro-batch {calls} (have "
                       f"{[n for n, _ in self._snapshots]}).")

    def save(self, directory: str | os.PathLike, calls: int | None = None) -> str:
        state = self.state_dict() if calls is None else self.state_at(calls)
        path = os.path.join(directory, STATE_DIRNAME, f"mixing_collator_rank{rank_world()[0]}.json")
        atomic_write_text(path, json.dumps(state))
        return path

    def load(self, directory: str | os.PathLike) -> bool:
        path = os.path.join(directory, STATE_DIRNAME, f"mixing_collator_rank{rank_world()[0]}.json")
        if not os.path.exists(path):
            return False
        with open(path) as fh:
            self.load_state_dict(json.load(fh))
        return True
