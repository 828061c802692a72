"""A guaranteed share of real (human) data: per round (`mix_datasets`) and per batch (`MixingCollator`).

Why a floor: training a generation only on the previous generation's output collapses (Shumailov et
al. 2024), keeping real data bounds the damage (Gerstgrasser et al. 2024), and 10% real data was
already enough to keep degradation minor. The collator enforces the floor on every batch, so a bad
shuffle, a long synthetic run or a packed batch cannot starve the model of human text.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from transformers import TrainerCallback

from collapse_guard.io import atomic_write_text
from collapse_guard.provenance import (
    DEFAULT_MAX_LENGTH,
    HUMAN_ROUND,
    PROVENANCE_COLUMN,
    REAL,
    SYNTHETIC,
    ProvenanceIndex,
    source_of_example,
    tokenize_like_sft,
    with_provenance,
)

MIN_SAFE_REAL_FRACTION = 0.1
MIX_MODES = ("accumulate", "replace", "fresh")
UNITS = ("examples", "tokens")
# Drop reasons the collator's synthetic filter may return are free text; this one is ours.
_STATE_DIRNAME = "collapse_guard"


def validate_real_fraction(min_real_fraction: Any, allow_low_real_fraction: bool, field: str = "min_real_fraction"):
    if isinstance(min_real_fraction, bool) or not isinstance(min_real_fraction, (int, float)):
        raise TypeError(f"{field} must be a number in [0, 1], got {min_real_fraction!r} ({type(min_real_fraction).__name__}).")
    if not 0.0 <= float(min_real_fraction) <= 1.0 or math.isnan(min_real_fraction):
        raise ValueError(f"{field} must be in [0, 1], got {min_real_fraction}. Use e.g. 0.5 (the default).")
    if min_real_fraction < MIN_SAFE_REAL_FRACTION and not allow_low_real_fraction:
        raise ValueError(
            f"{field}={min_real_fraction} is below {MIN_SAFE_REAL_FRACTION}: with less than 10% real data, "
            "models trained on their own output collapse (Shumailov et al. 2024). Raise it, or pass "
            "allow_low_real_fraction=True if you are studying collapse on purpose."
        )


def _data_format(dataset) -> str:
    columns = set(dataset.column_names)
    for name in ("input_ids", "messages", "prompt", "text"):
        if name in columns:
            return name
    return "unknown"


def _check_nonempty(dataset, name: str) -> None:
    if dataset is None:
        raise ValueError(f"{name} is missing: pass a datasets.Dataset (or a list of dicts) of human examples.")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty (0 rows): the real-data floor needs at least one human example.")


def _as_dataset(data, name: str):
    from datasets import Dataset

    if data is None or isinstance(data, Dataset):
        return data
    if isinstance(data, list):
        if data and isinstance(data[0], str):
            return Dataset.from_dict({"text": data})
        return Dataset.from_list(data)
    raise TypeError(f"{name} must be a datasets.Dataset or a list, got {type(data).__name__}.")


def check_same_format(real, synthetic) -> None:
    """Real and synthetic data must be the same kind (text / messages / prompt-completion / tokens)."""
    real_format, synthetic_format = _data_format(real), _data_format(synthetic)
    if real_format != synthetic_format:
        raise ValueError(
            f"real data is in '{real_format}' format but synthetic data is in '{synthetic_format}' format "
            f"(real columns {real.column_names}, synthetic columns {synthetic.column_names}). Convert one side, "
            "e.g. render messages to text with tokenizer.apply_chat_template(..., tokenize=False)."
        )


def _drop_extra_columns(dataset, keep: Sequence[str]):
    extra = [c for c in dataset.column_names if c not in keep]
    return dataset.remove_columns(extra) if extra else dataset


def _sample_rows(dataset, n: int, rng: np.random.Generator, offset: int = 0):
    """n rows in a seeded order; cycles (repeats) only when the pool is smaller than n."""
    order = rng.permutation(len(dataset))
    idx = [int(order[(offset + i) % len(order)]) for i in range(n)]
    return dataset.select(idx)


def mix_datasets(
    real,
    synthetic,
    mode: Literal["accumulate", "replace", "fresh"] = "accumulate",
    min_real_fraction: float = 0.5,
    seed: int = 0,
    round_index: int = 0,
    previous=None,
    allow_low_real_fraction: bool = False,
):
    """Builds one round's training set with a `provenance` column.

    Modes (Gerstgrasser et al. 2024; Alemohammad et al. 2023):
        - `"replace"`: this round's synthetic data plus just enough real rows for `min_real_fraction`
          (the same real rows every round). With `min_real_fraction=0` this is the fully synthetic
          loop that collapses.
        - `"accumulate"`: all real data, every earlier round's data (`previous`) and this round's.
        - `"fresh"`: this round's synthetic data plus a fresh slice of the real pool each round.

    Real rows are repeated only if the pool is too small for the requested fraction.

    Example:

    ```python
    >>> from collapse_guard import mix_datasets
    >>> mixed = mix_datasets(["A human sentence."] * 4, ["A model sentence."] * 4, mode="replace", min_real_fraction=0.5)
    >>> sorted(set(p["source"] for p in mixed["provenance"]))
    ['real', 'synthetic']
    ```
    """
    if mode not in MIX_MODES:
        raise ValueError(f"mode must be one of {MIX_MODES}, got {mode!r}.")
    validate_real_fraction(min_real_fraction, allow_low_real_fraction)
    real = _as_dataset(real, "real")
    synthetic = _as_dataset(synthetic, "synthetic")
    previous = _as_dataset(previous, "previous")
    if min_real_fraction > 0 or mode == "accumulate":
        _check_nonempty(real, "real")
    if synthetic is None:
        raise ValueError("synthetic is missing: pass this round's generated examples (may be empty).")
    if real is not None and len(real) and len(synthetic):
        check_same_format(real, synthetic)
    from datasets import concatenate_datasets

    data_format = _data_format(synthetic if len(synthetic) else real)
    keep = [c for c in ("text", "messages", "prompt", "completion", "input_ids", "labels") if
            c in (synthetic.column_names if len(synthetic) else real.column_names)] + [PROVENANCE_COLUMN]
    if data_format == "unknown":
        raise ValueError(
            f"cannot find the text in columns {synthetic.column_names}: expected 'text', 'messages', "
            "'prompt'+'completion' or 'input_ids'."
        )
    synthetic = _drop_extra_columns(with_provenance(synthetic, SYNTHETIC, round_index), keep)
    parts = []
    if mode == "accumulate" and previous is not None and len(previous):
        parts.append(_drop_extra_columns(with_provenance(previous, SYNTHETIC, round_index - 1), keep))
    parts.append(synthetic)
    n_other = sum(len(p) for p in parts)
    rng = np.random.default_rng(seed)
    if real is not None and len(real):
        real = _drop_extra_columns(with_provenance(real, REAL, HUMAN_ROUND), keep)
        f = float(min_real_fraction)
        # real rows r so that r / (r + n_other) >= f; f = 1 means real data only
        n_needed = len(real) if f >= 1.0 else math.ceil(f / (1.0 - f) * n_other - 1e-9)
        if f >= 1.0:
            parts = []  # a floor of 100% real leaves no room for synthetic rows
        if mode == "accumulate":
            n_real = max(len(real), n_needed)
            parts.insert(0, _sample_rows(real, n_real, rng) if n_real > len(real) else real)
        elif n_needed > 0:
            # fresh: round r takes the r-th slice of one fixed permutation, so rounds see new human text
            offset = round_index * n_needed if mode == "fresh" else 0
            parts.insert(0, _sample_rows(real, n_needed, np.random.default_rng(seed), offset=offset))
    if sum(len(p) for p in parts) == 0:
        raise ValueError(f"mix_datasets(mode={mode!r}) got no synthetic rows and no real rows to train on.")
    parts = [p.cast(parts[0].features) if p.features != parts[0].features else p for p in parts]
    mixed = concatenate_datasets(parts)
    return mixed.shuffle(seed=seed).flatten_indices()


def _to_list(value) -> list[int]:
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value)


class _RealStream:
    """A deterministic, rank-sharded, endless stream of tokenized real examples."""

    def __init__(self, examples: list[dict[str, list[int]]], seed: int):
        self.examples = examples
        self.seed = seed
        self.draws = 0  # draws made by this rank
        self._cached_epoch: int | None = None
        self._cached_order = np.arange(0)

    def next(self, rank: int, world_size: int) -> dict[str, list[int]]:
        n = len(self.examples)
        global_position = self.draws * world_size + rank
        epoch, offset = divmod(global_position, n)
        order = self._order(epoch)
        self.draws += 1
        example = self.examples[int(order[offset])]
        return {"input_ids": list(example["input_ids"]), "labels": list(example["labels"])}

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached_epoch != epoch:
            self._cached_order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._cached_epoch = epoch
        return self._cached_order


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class MixingCollator:
    """Wraps a data collator so every batch holds at least a share of real examples (or tokens).

    Real examples already in the batch count. When a batch is short, the collator tops it up from
    its own deterministic stream over `real_dataset` (sharded by rank under DDP, so the floor holds
    per rank and therefore for the global batch). Synthetic examples it displaces wait in a FIFO
    carry-over buffer and are served before newer synthetic examples: none is dropped. Batch size is
    unchanged.

    Which examples are real? TRL's SFTTrainer strips every column but `input_ids`/`labels`, so the
    collator recognizes real examples by the fingerprint of their tokens (`ProvenanceIndex`), built by
    tokenizing `real_dataset` the way SFTTrainer does. A `provenance`/`source` key, when present in a
    feature, wins. Unrecognized examples count as synthetic (the safe side).

    Args:
        base_collator: the collator to wrap; defaults to TRL's `DataCollatorForLanguageModeling`.
        real_dataset: human examples (`text`, `messages`, `prompt`/`completion` or tokenized `input_ids`).
        tokenizer: used to tokenize `real_dataset` and to build the default base collator.
        min_real_fraction: the floor f. With `unit="examples"` every batch of B holds >= ceil(f*B) real
            examples; with `unit="tokens"` (packing) >= f of its non-padding tokens are real.
        unit: `"examples"` or `"tokens"`.
        seed: seeds the real stream.
        max_length: the trainer's max sequence length (SFTConfig.max_length), used for truncation.
        allow_low_real_fraction: permit f < 0.1 (refused by default).
        synthetic_filter: optional callable `(texts) -> list[str | None]` applied to incoming synthetic
            examples (a cheap verifier); a string is the drop reason. Dropped examples are replaced
            from the carry-over buffer or the real stream, so the batch size and the floor hold.
        provenance_index: a prebuilt index (e.g. `ProvenanceIndex.from_dataset(trainer.train_dataset)`).

    Example:

    ```python
    >>> from collapse_guard import MixingCollator
    >>> from collapse_guard.testing import tiny_tokenizer, tiny_text_datasets
    >>> tok = tiny_tokenizer()
    >>> real, synthetic = tiny_text_datasets()
    >>> collator = MixingCollator(real_dataset=real, tokenizer=tok, min_real_fraction=0.5)
    >>> batch = collator([{"input_ids": tok(t)["input_ids"]} for t in synthetic["text"][:4]])
    >>> collator.last_real_fraction
    0.5
    ```
    """

    def __init__(
        self,
        base_collator: Callable | None = None,
        real_dataset=None,
        tokenizer=None,
        min_real_fraction: float = 0.5,
        unit: Literal["examples", "tokens"] = "examples",
        seed: int = 0,
        max_length: int | None = DEFAULT_MAX_LENGTH,
        allow_low_real_fraction: bool = False,
        synthetic_filter: Callable[[list[str]], list[str | None]] | None = None,
        provenance_index: ProvenanceIndex | None = None,
        text_field: str = "text",
        max_carryover_warning: int = 100_000,
    ):
        validate_real_fraction(min_real_fraction, allow_low_real_fraction)
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}. Use 'tokens' with packing=True.")
        real_dataset = _as_dataset(real_dataset, "real_dataset")
        _check_nonempty(real_dataset, "real_dataset")
        needs_tokenizer = "input_ids" not in real_dataset.column_names or base_collator is None
        if needs_tokenizer and tokenizer is None:
            raise ValueError(
                "MixingCollator needs tokenizer=... to tokenize real_dataset and build the default base collator "
                "(or pass a tokenized real_dataset with 'input_ids' and an explicit base_collator)."
            )
        if base_collator is None:
            if tokenizer.pad_token_id is None:
                raise ValueError(
                    f"tokenizer {type(tokenizer).__name__} has no pad token (pad_token=None): batches cannot be "
                    "padded. Set one, e.g. tokenizer.pad_token = tokenizer.eos_token."
                )
            from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

            base_collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
        if synthetic_filter is not None and tokenizer is None:
            raise ValueError("synthetic_filter needs tokenizer=... to decode synthetic examples into text.")
        if "text" not in real_dataset.column_names and text_field not in real_dataset.column_names and _data_format(real_dataset) == "unknown":
            raise ValueError(
                f"real_dataset has columns {real_dataset.column_names}: expected '{text_field}', 'messages', "
                "'prompt'+'completion' or 'input_ids'. Pass text_field=... for another text column."
            )
        self.base_collator = base_collator
        self.tokenizer = tokenizer
        self.min_real_fraction = float(min_real_fraction)
        self.unit = unit
        self.seed = seed
        self.max_length = max_length
        self.synthetic_filter = synthetic_filter
        self.max_carryover_warning = max_carryover_warning

        real_examples = [tokenize_like_sft(ex, tokenizer, text_field, max_length) for ex in real_dataset]
        self.provenance_index = provenance_index or ProvenanceIndex(max_length)
        self.provenance_index.add_many((ex["input_ids"] for ex in real_examples), REAL)
        self._stream = _RealStream(real_examples, seed)
        self._buffer: deque[dict[str, Any]] = deque()
        self.paused = False
        self.calls = 0
        self.counts: Counter = Counter()
        self.dropped: Counter = Counter()
        self.last_real_fraction: float | None = None
        self._snapshots: deque[tuple[int, dict]] = deque(maxlen=16)
        self._warned_carryover = False

    # ----- classification -------------------------------------------------------------------
    def _is_real(self, feature: dict[str, Any]) -> bool:
        source = source_of_example(feature)
        if source is None:
            source = self.provenance_index.source_of(_to_list(feature["input_ids"]))
        return source == REAL

    def _segments(self, feature: dict[str, Any]) -> list[tuple[int, int]]:
        ids_len = len(feature["input_ids"])
        lengths = feature.get("seq_lengths")
        if lengths is None:
            return [(0, ids_len)]
        bounds, start = [], 0
        for length in _to_list(lengths):
            bounds.append((start, start + int(length)))
            start += int(length)
        return bounds

    def _real_tokens(self, feature: dict[str, Any]) -> tuple[int, int]:
        """(real tokens, total tokens) of one unpadded row; packed rows are split by `seq_lengths`."""
        if "seq_lengths" not in feature or source_of_example(feature) is not None:
            n = len(feature["input_ids"])
            return (n if self._is_real(feature) else 0), n
        ids = _to_list(feature["input_ids"])
        real = sum(end - start for start, end in self._segments(feature)
                   if self.provenance_index.source_of(ids[start:end]) == REAL)
        return real, len(ids)

    def _real_row(self, like: dict[str, Any]) -> dict[str, Any]:
        """A real example shaped like the batch's rows (same keys), so any base collator accepts it."""
        rank, world = _dist_rank_world()
        example = self._stream.next(rank, world)
        row: dict[str, Any] = {"input_ids": example["input_ids"]}
        if "labels" in like or not like:
            row["labels"] = example["labels"]
        if "attention_mask" in like:
            row["attention_mask"] = [1] * len(example["input_ids"])
        if "seq_lengths" in like:
            row["seq_lengths"] = [len(example["input_ids"])]
        return row

    # ----- the floor --------------------------------------------------------------------------
    def _filter_synthetic(self, synthetic: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.synthetic_filter is None or not synthetic:
            return synthetic
        texts = [self.tokenizer.decode(_to_list(f["input_ids"]), skip_special_tokens=True) for f in synthetic]
        reasons = self.synthetic_filter(texts)
        if len(reasons) != len(synthetic):
            raise ValueError(f"synthetic_filter returned {len(reasons)} verdicts for {len(synthetic)} texts.")
        kept = []
        for feature, reason in zip(synthetic, reasons, strict=True):
            if reason is None:
                kept.append(feature)
            else:
                self.dropped[str(reason)] += 1
        return kept

    def _mix_examples(self, features: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
        need_real = math.ceil(self.min_real_fraction * size - 1e-9)
        is_real = [self._is_real(f) for f in features]  # one fingerprint per row
        real_in = [f for f, real in zip(features, is_real, strict=True) if real]
        synthetic_in = self._filter_synthetic([f for f, real in zip(features, is_real, strict=True) if not real])
        self._buffer.extend(synthetic_in)
        n_synthetic = min(len(self._buffer), size - max(need_real, len(real_in)))
        n_top_up = size - n_synthetic - len(real_in)
        rows = real_in + [self._real_row(features[0] if features else {}) for _ in range(n_top_up)]
        rows += [self._buffer.popleft() for _ in range(n_synthetic)]
        self.counts["real_top_up"] += n_top_up
        self.counts["synthetic_served"] += n_synthetic
        self.counts["synthetic_seen"] += len(synthetic_in)
        self.counts["real_units"] += len(real_in) + n_top_up
        self.counts["units"] += size
        self.last_real_fraction = (len(real_in) + n_top_up) / size
        return rows

    def _mix_tokens(self, features: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
        like = features[0] if features else (self._buffer[0] if self._buffer else {})
        scored = [(f, *self._real_tokens(f)) for f in features]
        batch = [(f, r, n) for f, r, n in scored if r == n]  # fully real rows are never displaced
        others = self._filter_synthetic([f for f, r, n in scored if r != n])
        self.counts["synthetic_seen"] += len(others)
        self._buffer.extend(others)
        while len(batch) < size and self._buffer:
            row = self._buffer.popleft()
            batch.append((row, *self._real_tokens(row)))
        n_top_up = 0
        while len(batch) < size:  # the filter dropped rows and the buffer ran dry
            row = self._real_row(like)
            batch.append((row, len(row["input_ids"]), len(row["input_ids"])))
            n_top_up += 1
        displaced = []
        while sum(r for _, r, _ in batch) < self.min_real_fraction * sum(n for _, _, n in batch) - 1e-9:
            # swap the newest not-fully-real row for a real one; it returns to the front of the queue
            i = max(i for i, (_, r, n) in enumerate(batch) if r != n)
            displaced.append(batch[i][0])
            row = self._real_row(like)
            batch[i] = (row, len(row["input_ids"]), len(row["input_ids"]))
            n_top_up += 1
        self._buffer.extendleft(displaced)  # extendleft reverses, restoring FIFO order
        real_tokens, total_tokens = sum(r for _, r, _ in batch), sum(n for _, _, n in batch)
        self.counts["real_top_up"] += n_top_up
        self.counts["synthetic_served"] += sum(1 for _, r, n in batch if r != n)
        self.counts["real_units"] += real_tokens
        self.counts["units"] += total_tokens
        self.last_real_fraction = real_tokens / max(total_tokens, 1)
        return [row for row, _, _ in batch]

    def _mix(self, features: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
        rows = self._mix_examples(features, size) if self.unit == "examples" else self._mix_tokens(features, size)
        self.calls += 1
        self._snapshots.append((self.calls, self._snapshot()))
        return rows

    def __call__(self, features: list[dict[str, Any]]):
        if self.paused or not features:
            return self.base_collator(features)
        rows = self._mix([dict(f) for f in features], len(features))
        if len(self._buffer) > self.max_carryover_warning and not self._warned_carryover:
            self._warned_carryover = True
            warnings.warn(
                f"MixingCollator carry-over buffer holds {len(self._buffer)} synthetic examples: the training set "
                f"has far less real data than min_real_fraction={self.min_real_fraction}. Build it with "
                "mix_datasets(..., min_real_fraction=...) so the floor rarely needs topping up.",
                stacklevel=2,
            )
        return self.base_collator(self._strip(rows))

    def drain(self, batch_size: int):
        """Yields the carry-over buffer as final batches that still meet the floor (end of training)."""
        while self._buffer:
            pending = len(self._buffer)
            rows = self._mix([], batch_size)
            if len(self._buffer) >= pending:
                raise ValueError(
                    f"drain(batch_size={batch_size}) cannot serve the {pending} pending synthetic examples under "
                    f"min_real_fraction={self.min_real_fraction} ({self.unit}); use a larger batch_size."
                )
            yield self.base_collator(self._strip(rows))

    @staticmethod
    def _strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k not in (PROVENANCE_COLUMN, "source")} for row in rows]

    @property
    def pending_synthetic(self) -> int:
        return len(self._buffer)

    @property
    def real_fraction(self) -> float | None:
        """Realized real share over all batches so far (examples or tokens, per `unit`)."""
        return self.counts["real_units"] / self.counts["units"] if self.counts["units"] else None

    def metrics(self) -> dict[str, float]:
        out = {
            "real_fraction": self.real_fraction if self.real_fraction is not None else float("nan"),
            "last_real_fraction": self.last_real_fraction if self.last_real_fraction is not None else float("nan"),
            "carryover_pending": float(len(self._buffer)),
            "real_top_up": float(self.counts["real_top_up"]),
        }
        out.update({f"dropped/{reason}": float(n) for reason, n in self.dropped.items()})
        return out

    # ----- checkpointing ------------------------------------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        # references only: features are never mutated, so this stays cheap per batch
        return {
            "calls": self.calls,
            "draws": self._stream.draws,
            "buffer": list(self._buffer),
            "counts": dict(self.counts),
            "dropped": dict(self.dropped),
        }

    @staticmethod
    def _serializable(snapshot: dict[str, Any]) -> dict[str, Any]:
        def plain(value):
            return value if isinstance(value, (str, int, float, dict, type(None))) else _to_list(value)

        return {**snapshot, "buffer": [{k: plain(v) for k, v in f.items()} for f in snapshot["buffer"]]}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state: call count, real-stream position, carry-over buffer, counters."""
        return self._serializable(self._snapshot())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        self._stream.draws = int(state["draws"])
        self._buffer = deque(state["buffer"])
        self.counts = Counter(state.get("counts", {}))
        self.dropped = Counter(state.get("dropped", {}))
        self._snapshots.clear()

    def state_at(self, calls: int) -> dict[str, Any]:
        """The state right after the `calls`-th batch (the dataloader may have prefetched more)."""
        for n, snapshot in reversed(self._snapshots):
            if n == calls:
                return self._serializable(snapshot)
        if calls == self.calls:
            return self.state_dict()
        raise KeyError(f"no MixingCollator snapshot after batch {calls} (have {[n for n, _ in self._snapshots]}).")

    def save(self, directory: str | os.PathLike, calls: int | None = None) -> str:
        rank, _ = _dist_rank_world()
        state = self.state_dict() if calls is None else self.state_at(calls)
        path = os.path.join(directory, _STATE_DIRNAME, f"mixing_collator_rank{rank}.json")
        atomic_write_text(path, json.dumps(state))
        return path

    def load(self, directory: str | os.PathLike) -> bool:
        rank, _ = _dist_rank_world()
        path = os.path.join(directory, _STATE_DIRNAME, f"mixing_collator_rank{rank}.json")
        if not os.path.exists(path):
            return False
        with open(path) as fh:
            self.load_state_dict(json.load(fh))
        return True


class MixingCollatorCallback(TrainerCallback):
    """Keeps a `MixingCollator` in step with the Trainer: checkpoint/resume and evaluation.

    - Saves the collator's state (real-stream position, carry-over buffer) into every checkpoint, per
      rank, as of the last batch the trainer consumed (the dataloader prefetches one batch ahead),
      and restores it on resume, so a resumed run sees the same batches as an uninterrupted one.
    - Pauses the floor while the Trainer evaluates: Trainer reuses `data_collator` for eval batches,
      which must not be mixed or consume the real stream.

    `CollapseGuardCallback(collator=...)` does all of this itself; use this class when you want the
    floor without the guard.

    Example:

    ```python
    trainer = SFTTrainer(model, args=SFTConfig(...), train_dataset=mixed, data_collator=collator)
    trainer.add_callback(MixingCollatorCallback(collator))
    ```
    """

    def __init__(self, collator: MixingCollator):
        if not isinstance(collator, MixingCollator):
            raise TypeError(f"MixingCollatorCallback needs a MixingCollator, got {type(collator).__name__}.")
        self.collator = collator
        self.batches_consumed = 0

    def _checkpoint_dir(self, args, state) -> str:
        return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    def on_train_begin(self, args, state, control, **kwargs):
        self.batches_consumed = self.collator.calls
        if state.global_step > 0:
            directory = self._checkpoint_dir(args, state)
            if self.collator.load(directory):
                self.batches_consumed = self.collator.calls
            else:
                warnings.warn(
                    f"resuming at step {state.global_step} but {directory} holds no MixingCollator state: the real "
                    "stream restarts from its beginning.",
                    stacklevel=2,
                )
        if getattr(args, "eval_on_start", False):
            self.collator.paused = True

    def on_substep_end(self, args, state, control, **kwargs):
        self.batches_consumed += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.batches_consumed += 1
        if control.should_evaluate:
            self.collator.paused = True

    def on_evaluate(self, args, state, control, **kwargs):
        self.collator.paused = False

    def on_save(self, args, state, control, **kwargs):
        try:
            self.collator.save(self._checkpoint_dir(args, state), calls=self.batches_consumed)
        except KeyError as err:
            warnings.warn(f"MixingCollator state not saved exactly: {err}", stacklevel=2)
            self.collator.save(self._checkpoint_dir(args, state))
