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

The collator is a façade over parts that are tested on their own:

- `mixer.Mixer`: the one mixing path, for both units; `strategies`: what differs per unit (measure, decide,
  top up, pack); `policy`: how many units to take (pure: integers in, counts out; the dry run uses it too);
- `carry.CarryOver`: the carry-over and the step's running totals; `counts.MixingCounts`: the counters;
- `recognition`: real or synthetic (a row's `provenance`, else fingerprints of the real pool tokenized like
  the trainer; unrecognised rows count as synthetic, the safe side, and a self-check says so);
- `topup`, `packing`: real top-ups and packed rows; `checkpoint`: the state on disk;
- `setup.TrainerSetup`: what `attach(trainer)` learned, bound in one call (`bind`); `set_floor`: the floor's
  one writer. `attach` also states the plan up front, checkpoints the state and pauses during evaluation.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Literal

from collapse_guard.mixing import checkpoint
from collapse_guard.mixing.attach import attach_collator
from collapse_guard.mixing.checkpoint import STATE_DIRNAME, MixingCheckpoint, SnapshotRing, serializable
from collapse_guard.mixing.counts import MixingCounts
from collapse_guard.mixing.mixer import Mixer, MixHooks
from collapse_guard.mixing.options import (
    SCOPES,
    UNITS,
    check_base_collator,
    check_real_dataset,
    check_settings,
    check_tokenizer,
)
from collapse_guard.mixing.policy import MIN_SAFE_REAL_FRACTION, FloorPlan, validate_real_fraction
from collapse_guard.mixing.recognition import filter_synthetic, lookup_sources
from collapse_guard.mixing.rows import RowFormat, real_pool_index, tokenize_row
from collapse_guard.mixing.segments import ROW_KEYS, check_row_keys, token_keys
from collapse_guard.mixing.selfcheck import recognition_problem
from collapse_guard.mixing.setup import TrainerSetup
from collapse_guard.mixing.strategies import strategy_for
from collapse_guard.mixing.stream import RealStream
from collapse_guard.mixing.topup import TOP_UP_TRIES, draw_top_up, no_loss_warning
from collapse_guard.provenance import REAL, SourceIndex

__all__ = ["MIN_SAFE_REAL_FRACTION", "SCOPES", "STATE_DIRNAME", "UNITS", "MixingCollator",
           "validate_real_fraction"]


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
        check_settings(unit, floor_scope, max_length, max_growth, real_stream_start)
        check_base_collator(base_collator)
        self.real_dataset, self.real_format = check_real_dataset(real_dataset)
        check_tokenizer(tokenizer, base_collator)
        self.base_collator, self.tokenizer, self.synthetic_filter = base_collator, tokenizer, synthetic_filter
        self.unit, self.floor_scope, self.max_growth = unit, floor_scope, float(max_growth)
        self.seed, self.real_stream_start, self.max_length = seed, real_stream_start, max_length
        self.setup: TrainerSetup | None = None  # what attach learned (bind)
        self.row_format: RowFormat | None = None
        self.index: SourceIndex | None = None
        self.plan_: FloorPlan | None = None
        self.attached = self.training = self.paused = False  # attached: mixes only while the trainer trains
        self.skip_calls = 0
        self.composition: dict[str, int] | None = None  # real/synthetic rows of the training set, if known
        self.recognition = "row provenance, else real-pool fingerprints"
        self._stream: RealStream | None = None
        self.calls = 0
        self.dropped: Counter = Counter()  # synthetic rows the filter dropped, by reason
        self._snapshots = SnapshotRing()
        self._warned: set[str] = set()
        self._longest_row = 0
        hooks = MixHooks(self._recognise, self._keep_synthetic, self._top_up, self._row_limit,
                         self._warn_once, self._cut_note)
        self.mixer = Mixer(strategy_for(unit), floor_scope, self.max_growth, hooks)

    # ----- the mixer's state, under the names callers have always read ------------------------------------
    @property
    def counts(self) -> MixingCounts:
        return self.mixer.counts

    @property
    def synthetic_buffer(self) -> deque[dict[str, Any]]:
        """Synthetic rows (segments) waiting in the carry-over, oldest first."""
        return self.mixer.carry.synthetic

    @property
    def real_carry(self) -> deque[dict[str, Any]]:
        return self.mixer.carry.real

    @property
    def last_real_fraction(self) -> float | None:
        """The real share of the last mixed micro-batch."""
        return self.mixer.last_real_fraction

    # ----- setup ----------------------------------------------------------------------------------------
    def bind(self, setup: TrainerSetup) -> MixingCollator:
        """Takes what `attach` learned about the trainer, in one call (the only writer of these fields
        besides the constructor), and marks the collator attached: from then on it mixes only while the
        trainer trains."""
        self.tokenizer, self.base_collator = setup.tokenizer, setup.base_collator
        self.row_format = setup.row_format
        self.recognition, self.composition = setup.recognition, setup.composition
        if setup.index is not None:
            self.index = setup.index
        self.setup, self.attached = setup, True
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
        self._snapshots.resize(int(gradient_accumulation_steps))
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
        # unattached and without max_length, the longest row seen stands in for the trainer's truncation
        return self.max_length or self._format().max_length or (self._longest_row or None)

    def _pool_tokenizer(self):
        # a pre-tokenized pool needs no tokenizer; every other format does, and says so when it is missing
        return self._tokenizer() if self.real_format != "tokens" else self.tokenizer

    def stream(self) -> RealStream:
        if self._stream is None:
            fmt, tok = self._format(), self._pool_tokenizer()
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
            self.index = real_pool_index(self.real_dataset, self._pool_tokenizer(), self._format())
        return self.index

    # ----- what the mixing path asks of the collator (`MixHooks`) ---------------------------------------
    def _recognise(self, rows: list[dict[str, Any]]) -> list[str]:
        return lookup_sources(rows, self.source_index, self.counts)  # the index is built on first need

    def _keep_synthetic(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return filter_synthetic(rows, self.synthetic_filter, self._decode, self.dropped)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer().decode(ids, skip_special_tokens=True)

    def _top_up(self, like: list[str], fit: int | None = None) -> dict[str, Any] | None:
        """A real row that carries loss, cut like the trainer's rows (`topup.draw_top_up`); None, warned
        once, when the pool gives none in `TOP_UP_TRIES` draws."""
        row, misses = draw_top_up(self.stream(), like, self._row_limit(),
                                  self._format().truncation_mode == "keep_end", fit)
        self.counts.top_up_no_loss += misses
        if row is None:
            self._warn_once("top_up_no_loss", no_loss_warning(TOP_UP_TRIES, self._cut_note(),
                                                              self.counts.top_up_no_loss))
        return row

    def _cut_note(self) -> str:
        limit = self._row_limit()
        return f" after truncation to max_length={limit}" if limit else ""

    def _warn_once(self, key: str, message: str, stacklevel: int = 3) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=stacklevel)

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
            self._check_first(rows)
        self._longest_row = max([self._longest_row, *(len(r["input_ids"]) for r in rows)])
        mixed = self._mix(rows)
        self._snapshots.add(self.calls, self._snapshot())
        self._self_check()
        return base(self._strip(mixed))

    def _mix(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        mixed = self.mixer.mix(rows, self.min_real_fraction, self.plan_, self.calls, self.composition)
        self.calls += 1
        return mixed

    def _check_first(self, rows: list[dict[str, Any]]) -> None:
        """Refuses rows the collator cannot mix, and says when it cannot flush, before the first batch."""
        check_row_keys(rows[0])
        if self.unit == "examples" and any("seq_lengths" in r for r in rows):
            raise ValueError(
                "MixingCollator(unit='examples') got packed rows (seq_lengths): with packing the floor "
                "must count tokens. Use MixingCollator(..., unit='tokens')."
            )
        if self.plan_ is None:
            self._warn_once("unplanned", "MixingCollator is mixing batches but was not attached to a "
                            "Trainer (collator.attach(trainer)) nor given a plan (collator.plan(...)): "
                            "it cannot flush its carry-over at the end of an epoch, nor checkpoint its "
                            "state. Attach it, or call drain() at the end of your own training loop.",
                            stacklevel=4)  # the caller of __call__: the user's loop

    def _self_check(self) -> None:
        """Warns once when no real row has been recognised although real rows should have arrived by now
        (`selfcheck.recognition_problem` says when, and what)."""
        if "recognition" in self._warned:
            return
        origin = self.index.origin if self.index is not None else "real-pool fingerprints"
        message = recognition_problem(self.counts, self.composition, self.attached, origin)
        if message is not None:
            self._warn_once("recognition", message)

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
            rows = self._mix(filler)
            self.plan_.total_micro_batches = saved
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
        out = {
            "real_fraction": self.real_fraction if self.real_fraction is not None else float("nan"),
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

    # ----- checkpointing (`mixing.checkpoint`) ----------------------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        stream = self._stream.state_dict() if self._stream is not None else {"draws": self.real_stream_start}
        return MixingCheckpoint(self.calls, stream, self.mixer.carry, self.counts, self.dropped,
                                self.min_real_fraction).snapshot()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: position, carry-overs, real-stream position, counters."""
        return serializable(self._snapshot())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = MixingCheckpoint.from_state_dict(state)
        self.calls = saved.calls
        self.stream().load_state_dict(saved.stream)
        self.mixer.carry, self.mixer.counts, self.dropped = saved.carry, saved.counts, saved.dropped
        if saved.min_real_fraction is not None:
            self.set_floor(saved.min_real_fraction)
        self._snapshots.clear()

    def state_at(self, calls: int) -> dict[str, Any]:
        """The state right after the `calls`-th micro-batch (the dataloader may have prefetched more)."""
        return self._snapshots.state_at(calls, self.calls, self.state_dict)

    def save(self, directory: str | os.PathLike, calls: int | None = None) -> str:
        state = self.state_dict() if calls is None else self.state_at(calls)
        # The floor is a setting (the adaptive floor's latest decision), not per-batch state: the snapshot of
        # the last consumed batch predates decisions taken since, and a resume must apply the latest one.
        state["min_real_fraction"] = self.min_real_fraction
        return checkpoint.write(directory, state)

    def load(self, directory: str | os.PathLike) -> bool:
        state = checkpoint.read(directory)
        if state is None:
            return False
        self.load_state_dict(state)
        return True
