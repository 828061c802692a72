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
- **Only what is trained counts.** The floor counts rows that carry loss (tokens: labels other than
  -100). A row whose labels are all -100 (a prompt-completion row cut inside its prompt) rides along and
  counts as nothing; a top-up that would carry none is redrawn, and a pool that cannot give one is said.

How many rows to take is decided by pure functions (`mixing.policy`), counters live in `MixingCounts`,
and what `attach` learns about the trainer arrives in one `TrainerSetup` (`bind`); the floor has one
writer, `set_floor`.

Recognising real rows: a row's own `provenance` (kept through the Trainer by `attach`), else an
index of the real pool tokenized like the trainer (see `collapse_guard.provenance`). Unrecognised
rows count as synthetic, the safe side for the floor, and a self-check says so when it happens.

`attach(trainer)` (or `CollapseGuardCallback.attach`) wires the collator into a Trainer: it wraps the
trainer's own collator, learns B, GA, the epoch length and `max_length`, states the plan up front,
checkpoints the collator's state and pauses mixing during evaluation.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Literal

from collapse_guard.data import as_dataset, require_format, require_tokenizer
from collapse_guard.distributed import rank_world
from collapse_guard.io import atomic_write_json, read_json
from collapse_guard.mixing.attach import attach_collator
from collapse_guard.mixing.counts import MixingCounts
from collapse_guard.mixing.policy import (  # noqa: F401  (re-exported: the public names of old)
    MIN_SAFE_REAL_FRACTION,
    FloorPlan,
    decide_examples,
    expected_share,
    must_serve,
    real_for_synthetic,
    real_needed,
    spread,
    validate_real_fraction,
)
from collapse_guard.mixing.rows import RowFormat, real_pool_index, tokenize_row
from collapse_guard.mixing.segments import (
    ROW_KEYS,
    as_list,
    carries_loss,
    check_row_keys,
    join_segments,
    pack_first_fit,
    shape_like,
    split_row,
    supervised_tokens,
    token_keys,
    truncate,
)
from collapse_guard.mixing.selfcheck import recognition_problem
from collapse_guard.mixing.setup import TrainerSetup
from collapse_guard.mixing.stream import RealStream
from collapse_guard.provenance import REAL, SYNTHETIC, SourceIndex, source_of_example

logger = logging.getLogger(__name__)

UNITS = ("examples", "tokens")
SCOPES = ("step", "micro_batch")
STATE_DIRNAME = "collapse_guard"


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
        self.allow_low_real_fraction = allow_low_real_fraction
        self.set_floor(min_real_fraction)
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
        if tokenizer is not None:
            require_tokenizer(tokenizer, "MixingCollator")
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

        self.setup: TrainerSetup | None = None  # what attach learned (bind)
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
        self.counts = MixingCounts()
        self.dropped: Counter = Counter()
        self.last_real_fraction: float | None = None
        self._snapshots: deque[tuple[int, dict]] = deque(maxlen=8)
        self._warned: set[str] = set()
        self._longest_row = 0
        self._typical_units = 0  # the largest incoming micro-batch seen (tokens unit: its token count)

    # ----- setup ----------------------------------------------------------------------------------------
    def bind(self, setup: TrainerSetup) -> MixingCollator:
        """Takes what `attach` learned about the trainer, in one call (the only writer of these fields
        besides the constructor), and marks the collator attached: from then on it mixes only while the
        trainer trains."""
        self.tokenizer = setup.tokenizer
        self.base_collator = setup.base_collator
        self.row_format = setup.row_format
        self.recognition = setup.recognition
        self.composition = setup.composition
        if setup.index is not None:
            self.index = setup.index
        self.setup = setup
        self.attached = True
        return self

    def set_floor(self, value: float) -> None:
        """Sets the floor f, validated like the constructor's `min_real_fraction` (a number in [0, 1]; below
        0.1 only with `allow_low_real_fraction`). The one writer of `min_real_fraction`: the adaptive floor,
        a resume and the constructor all go through it, so a bad value fails here, where it is written, not
        batches later. It applies from the next micro-batch on."""
        self.min_real_fraction = validate_real_fraction(value, self.allow_low_real_fraction)

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
        self.counts.looked_up += len(unknown)
        if unknown:
            looked_up = self.source_index().sources([as_list(rows[i]["input_ids"]) for i in unknown])
            for i, s in zip(unknown, looked_up, strict=True):
                sources[i] = s or SYNTHETIC  # unrecognised: synthetic, the safe side for the floor
                self.counts.unrecognised += s is None and len(self.index.synthetic_keys) > 0
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

    def _remaining(self) -> int | None:
        """Micro-batches left in the delivery window, this one included (None: unknown)."""
        return self.plan_.remaining(self.calls) if self.plan_ else None

    def _share(self, units: int) -> float:
        """The expected synthetic share of the units still to come (`policy.expected_share`)."""
        return expected_share(self._prior_share(), self.counts.synthetic_units_seen,
                              self.counts.intake_units, units)

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
        self.counts.synthetic_seen += len(synthetic_in)
        self.counts.synthetic_units_seen += measure(synthetic_in)
        self.counts.intake_units += units
        self.counts.real_seen += len(real_in)
        if self.min_real_fraction >= 1.0:
            self.counts.synthetic_skipped += len(synthetic_in)
            synthetic_in = []
        self.synthetic_buffer.extend(synthetic_in)
        self.real_carry.extend(real_in)

    def _mix_examples(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        like = token_keys(rows[0])
        rows, sources, passengers = self._set_aside_no_loss(rows, self._sources(rows))
        b = len(rows)
        real_in = [r for r, s in zip(rows, sources, strict=True) if s == REAL]
        self._intake(real_in, [r for r, s in zip(rows, sources, strict=True) if s != REAL], b, len)
        nominal = self._nominal(b)
        n_synthetic, n_real = decide_examples(
            self.min_real_fraction, b, self._begin_micro_batch(),
            (len(self.synthetic_buffer), len(self.real_carry)), self._remaining(), nominal, self.max_growth,
            self._share(nominal), self.credit)
        real_rows = [self.real_carry.popleft() for _ in range(min(n_real, len(self.real_carry)))]
        top_ups = []
        for _ in range(n_real - len(real_rows)):
            row = self._top_up(like)
            if row is None:  # no top-up carries loss: the floor goes short (said once, with the fix)
                break
            top_ups.append(row)
        real_rows += top_ups
        n_real = len(real_rows)
        synthetic_rows = [self.synthetic_buffer.popleft() for _ in range(n_synthetic)]
        self._account(units=n_real + n_synthetic, real=n_real, incoming=b, top_up=len(top_ups),
                      synthetic=n_synthetic, real_tokens=sum(len(r["input_ids"]) for r in real_rows),
                      synthetic_tokens=sum(len(r["input_ids"]) for r in synthetic_rows))
        return real_rows + synthetic_rows + passengers

    def _set_aside_no_loss(self, items: list[dict[str, Any]], sources: list[str]
                           ) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
        """Splits off rows (segments) that carry no loss: they ride along in this micro-batch unchanged but
        count for nothing, so a real row the trainer cut inside its prompt cannot satisfy the floor."""
        if all(carries_loss(x) for x in items):  # the usual case: nothing to split
            return items, sources, []
        kept, kept_sources, passengers = [], [], []
        for item, source in zip(items, sources, strict=True):
            if carries_loss(item):
                kept.append(item)
                kept_sources.append(source)
            else:
                passengers.append(item)
                if source == REAL:
                    self.counts.no_loss_real += 1
                else:
                    self.counts.no_loss_synthetic += 1
                self.counts.real_seen += source == REAL  # recognised all the same (the self-check)
        if self.counts.no_loss_real:
            self._warn_once("no_loss_real", (
                f"MixingCollator: {self.counts.no_loss_real} real row(s) so far carry no loss (every "
                f"label is -100{self._cut_note()}): they are passed on but do not count toward the real-data "
                "floor, which counts only rows (tokens) that are trained. Fix: raise max_length or shorten "
                "the prompts of the real data."))
        return kept, kept_sources, passengers

    def _cut_note(self) -> str:
        limit = self._row_limit()
        return f" after truncation to max_length={limit}" if limit else ""

    _TOP_UP_TRIES = 16  # draws per top-up before giving up on a pool whose rows carry no loss when cut

    def _top_up(self, like: list[str], fit: int | None = None) -> dict[str, Any] | None:
        """A real row cut like the trainer cuts its rows (then to its first `fit` tokens, to fill a packed
        row's free space) and shaped like the batch's rows, that carries loss; None after `_TOP_UP_TRIES`
        draws that all carried none (warned once): a top-up whose labels are all -100 would count toward the
        floor while training nothing."""
        limit = self._row_limit()
        keep_end = self._format().truncation_mode == "keep_end"
        for _ in range(self._TOP_UP_TRIES):
            example = self.stream().next()
            if limit is not None:
                example = truncate(example, limit, keep_end=keep_end)
            if fit is not None:
                example = truncate(example, fit)
            if carries_loss(example):
                return shape_like(example, like or ["input_ids", "labels"])
            self.counts.top_up_no_loss += 1
        self._warn_once("top_up_no_loss", (
            f"MixingCollator: {self._TOP_UP_TRIES} real top-ups in a row carry no loss{self._cut_note()} "
            "(all their labels are -100: prompt-completion rows whose prompt fills max_length, say), so they "
            "are not used and this micro-batch gets fewer real rows (tokens) than the floor asks "
            f"({self.counts.top_up_no_loss} such draws so far). Fix: raise max_length "
            "(SFTConfig.max_length) or shorten the prompts of the real data."))
        return None

    def _mix_tokens(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        packed = any("seq_lengths" in r for r in rows)
        like = [k for k in token_keys(rows[0])]
        segments, sources = [], []
        for row in rows:
            row_segments = split_row(row)
            segments += row_segments
            sources += self._segment_sources(row_segments, source_of_example(row))
        # the token floor counts supervised tokens (labels other than -100): what the loss is taken on
        segments, sources, passengers = self._set_aside_no_loss(segments, sources)
        incoming_tokens = sum(supervised_tokens(s) for s in segments)
        real_in = [seg for seg, source in zip(segments, sources, strict=True) if source == REAL]
        synthetic_in = [seg for seg, source in zip(segments, sources, strict=True) if source != REAL]
        self._intake(real_in, synthetic_in, incoming_tokens,
                     lambda segs: sum(supervised_tokens(x) for x in segs))
        done_units, done_real = self._begin_micro_batch()
        f = self.min_real_fraction
        room = incoming_tokens - real_needed(f, done_units, done_real, incoming_tokens)
        remaining = self._remaining()
        pending = sum(supervised_tokens(s) for s in self.synthetic_buffer)
        largest = self.max_growth * self._nominal(incoming_tokens)
        granule = max((supervised_tokens(s) for s in self.synthetic_buffer), default=1)
        nominal = self._nominal(incoming_tokens)
        allowance = max(room + spread(self.credit, "synthetic", pending - room, remaining),
                        must_serve(pending, remaining, (1.0 - f) * largest, nominal, self._share(nominal),
                                   granule))
        # S + real_for(S) <= largest  <=>  S <= largest (1 - f) - f done + done_real
        allowance = min(allowance, largest * (1.0 - f) - f * done_units + done_real)
        chosen = self._take_synthetic(allowance)
        synthetic_tokens = sum(supervised_tokens(s) for s in chosen)
        real_target = max(incoming_tokens - synthetic_tokens,
                          real_for_synthetic(f, done_units, done_real, synthetic_tokens))
        carry_tokens = sum(supervised_tokens(s) for s in self.real_carry)
        extra_real = int(spread(self.credit, "real", carry_tokens - real_target, remaining))
        real_target += max(0, min(extra_real, int(largest) - real_target - synthetic_tokens))
        real_segments, real_tokens = [], 0
        while self.real_carry and real_tokens < real_target:
            seg = self.real_carry.popleft()
            real_segments.append(seg)
            real_tokens += supervised_tokens(seg)
        if packed:
            out, top_up, real_tokens = self._pack(chosen, real_segments, real_target, len(rows), like,
                                                  passengers)
        else:
            out = [*real_segments, *chosen]
            top_up = 0
            while real_tokens < real_target:
                seg = self._top_up(like)
                if seg is None:  # no top-up carries loss: the floor goes short (said once, with the fix)
                    break
                out.insert(0, seg)
                real_tokens += supervised_tokens(seg)
                top_up += 1
            out += passengers
        # the token counters stay input tokens (what the trainer is fed); the floor's units are supervised
        synthetic_in_tokens = sum(len(s["input_ids"]) for s in chosen)
        self._account(units=real_tokens + synthetic_tokens, real=real_tokens, incoming=incoming_tokens,
                      top_up=top_up, synthetic=len(chosen), grown=len(out) > len(rows),
                      real_tokens=sum(len(r["input_ids"]) for r in out) - synthetic_in_tokens
                      - sum(len(p["input_ids"]) for p in passengers),
                      synthetic_tokens=synthetic_in_tokens)
        return out

    def _take_synthetic(self, allowance: float) -> list[dict[str, list]]:
        """Synthetic segments in FIFO order that fit the allowance; a segment too long for it is skipped
        over (not blocking the ones behind it) and stays at the front for a later batch."""
        chosen, kept, used = [], deque(), 0
        while self.synthetic_buffer:
            seg = self.synthetic_buffer.popleft()
            n = supervised_tokens(seg)
            if used + n <= allowance:
                chosen.append(seg)
                used += n
            else:
                kept.append(seg)
                if used >= allowance or len(kept) > 64:  # bounded look-ahead
                    break
        self.synthetic_buffer.extendleft(reversed(kept))
        return chosen

    def _pack(self, synthetic: list, real: list, real_target: int, n_rows: int, like: list[str],
              passengers: list) -> tuple[list[dict[str, Any]], int, int]:
        """Packs the micro-batch's segments into rows of max_length tokens: synthetic segments first (first
        fit decreasing), then carried real segments where they fit (the rest stay carried), then real
        top-ups cut to fill each row's free space, so a mixed batch carries at least the tokens of the
        packed batch it replaced. Rows are added only when the floor needs more real tokens."""
        capacity = self._row_limit()
        if capacity is None:
            raise ValueError("packed rows need a max_length: pass max_length=... or attach(trainer).")
        bins, loads = pack_first_fit([*synthetic, *passengers], capacity, [[] for _ in range(n_rows)],
                                     [0] * n_rows)
        real_tokens = 0  # supervised, as the floor counts them; bins are filled by input tokens
        for seg in sorted(real, key=lambda s: -len(s["input_ids"])):
            n = len(seg["input_ids"])
            slot = next((i for i, load in enumerate(loads) if load + n <= capacity), None)
            if slot is None:
                self.real_carry.appendleft(seg)
                continue
            bins[slot].append(seg)
            loads[slot] += n
            real_tokens += supervised_tokens(seg)
        min_fill = max(2, min(16, capacity // 8))  # shorter fragments carry almost no loss signal
        top_up, i = 0, 0
        while i < len(bins):
            while capacity - loads[i] >= min_fill and (i < n_rows or real_tokens < real_target):
                seg = self._top_up(like, fit=capacity - loads[i])
                if seg is None:  # no top-up carries loss: the floor goes short (said once, with the fix)
                    return [join_segments(b) for b in bins if b], top_up, real_tokens
                bins[i].append(seg)
                loads[i] += len(seg["input_ids"])
                real_tokens += supervised_tokens(seg)
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
        self.counts.units += units
        self.counts.real_units += real
        self.counts.incoming_units += incoming
        self.counts.real_top_up += top_up
        self.counts.synthetic_served += synthetic
        self.counts.real_tokens += real_tokens
        self.counts.synthetic_tokens += synthetic_tokens
        if grown if grown is not None else units > incoming:
            self.counts.grown_batches += 1
        self.counts.extra_units += max(0, units - incoming)
        self.last_real_fraction = real / units if units else None
        self.counts.micro_batches += 1
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
        """Warns once when no real row has been recognised although real rows should have arrived by now
        (`selfcheck.recognition_problem` says when, and what)."""
        if "recognition" in self._warned:
            return
        origin = self.index.origin if self.index is not None else "real-pool fingerprints"
        message = recognition_problem(self.counts, self.composition, self.attached, origin)
        if message is not None:
            self._warn_once("recognition", message)

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
            filler = [{**row, "provenance": {"source": REAL}}
                      for row in (self._top_up(like) for _ in range(batch_size)) if row is not None]
            if not filler:
                raise RuntimeError(f"drain(batch_size={batch_size}) cannot serve {pending} pending examples: "
                                   "no real top-up carries loss (see the warning above).")
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
        return self.counts.real_units / self.counts.units if self.counts.units else None

    def metrics(self) -> dict[str, float]:
        """Counters for logging (`collapse/mixing/...`)."""
        nan = float("nan")
        out = {
            "real_fraction": self.real_fraction if self.real_fraction is not None else nan,
            "min_real_fraction": self.min_real_fraction,
            "synthetic_served": float(self.counts.synthetic_served),
            "synthetic_pending": float(len(self.synthetic_buffer)),
            "real_top_up": float(self.counts.real_top_up),
            "grown_batches": float(self.counts.grown_batches),
            "unrecognised": float(self.counts.unrecognised),
        }
        if self.counts.synthetic_skipped:
            out["synthetic_skipped"] = float(self.counts.synthetic_skipped)
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
            "counts": self.counts.as_dict(),
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
        self.counts = MixingCounts.from_dict(state["counts"])
        self.dropped = Counter(state["dropped"])
        if state.get("min_real_fraction") is not None:
            self.set_floor(state["min_real_fraction"])
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
        # The floor is a setting (the adaptive floor's latest decision), not per-batch state: the snapshot of
        # the last consumed batch predates decisions taken since, and a resume must apply the latest one.
        state["min_real_fraction"] = self.min_real_fraction
        path = os.path.join(directory, STATE_DIRNAME, f"mixing_collator_rank{rank_world()[0]}.json")
        atomic_write_json(path, state, indent=None)  # strict JSON: a NaN counter is written as null
        return path

    def load(self, directory: str | os.PathLike) -> bool:
        path = os.path.join(directory, STATE_DIRNAME, f"mixing_collator_rank{rank_world()[0]}.json")
        if not os.path.exists(path):
            return False
        self.load_state_dict(read_json(path))
        return True
