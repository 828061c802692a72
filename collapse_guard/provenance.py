"""Where each example came from, and how a batch row's source is recognised.

Every example carries a `provenance` struct column: `source` ("real" | "synthetic"), `round` (the
self-training round that produced it; -1 for human data) and `meta` (a JSON string with generator /
selector details, one schema for every row so real and synthetic sets concatenate).

A batch row's source is read, in order of preference:

1. from its `provenance` key, when the row still carries one (`MixingCollator.attach` asks the
   Trainer to keep the column, and the collator strips it before the base collator);
2. from a `SourceIndex` of the trainer's own prepared training set (the exact token ids it feeds);
3. from a `SourceIndex` of the real pool tokenized like the trainer (packing drops every column, so
   packed segments can only be recognised this way). Token sequences are compared in a canonical
   form (one leading BOS and one trailing EOS stripped) and in their truncated forms, so a row
   recognises whether or not the trainer appended EOS or truncated it at `max_length`.

Fingerprints are 64-bit hashes computed with numpy over whole batches of sequences (8 bytes a key),
so indexing millions of rows is fast and small.

Example:

```python
>>> from collapse_guard.provenance import SourceIndex, fingerprints
>>> index = SourceIndex.from_sequences(real=[[5, 6, 7, 2]], synthetic=[[9, 9, 2]], eos_id=2)
>>> index.sources([[5, 6, 7], [9, 9, 2], [1]])
['real', 'synthetic', None]
>>> bool(fingerprints([[1, 2, 3]])[0] == fingerprints([[1, 2, 3]])[0])
True

```
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PROVENANCE_COLUMN = "provenance"
REAL = "real"
SYNTHETIC = "synthetic"
SOURCES = (REAL, SYNTHETIC)
HUMAN_ROUND = -1


def make_provenance(source: str, round_index: int = HUMAN_ROUND, **meta: Any) -> dict[str, Any]:
    if source not in SOURCES:
        raise ValueError(f"provenance source must be one of {SOURCES}, got {source!r}.")
    return {"source": source, "round": int(round_index),
            "meta": json.dumps(meta, sort_keys=True, default=str)}


def with_provenance(dataset, source: str, round_index: int = HUMAN_ROUND, overwrite: bool = False,
                    **meta: Any):
    """`dataset` with a `provenance` column; rows that already carry one keep it unless `overwrite`."""
    record = make_provenance(source, round_index, **meta)
    if PROVENANCE_COLUMN in (dataset.column_names or []):
        if not overwrite:
            return dataset
        dataset = dataset.remove_columns(PROVENANCE_COLUMN)
    if hasattr(dataset, "add_column") and hasattr(dataset, "__len__"):
        return dataset.add_column(PROVENANCE_COLUMN, [record] * len(dataset))
    return dataset.map(lambda _: {PROVENANCE_COLUMN: record})  # IterableDataset


def source_of_example(example: dict[str, Any]) -> str | None:
    """The source a row carries itself (`provenance` struct or a plain `source` key), else None."""
    record = example.get(PROVENANCE_COLUMN)
    if isinstance(record, dict):
        source = record.get("source")
        return source if source in SOURCES else None
    source = example.get("source")
    return source if source in SOURCES else None


# ----- fingerprints ---------------------------------------------------------------------------------------
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of 64-bit words (vectorised; wraps modulo 2**64)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _hash_segments(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """One 64-bit key per segment values[start:start+length].

    Each (position, token) pair is scrambled on its own and the results are summed: unlike a
    polynomial hash modulo 2**64 this has no structured collisions (Thue-Morse strings), and it is
    a handful of vectorised numpy operations per batch of sequences.
    """
    n = len(starts)
    out = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return out
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total:
        seg_offsets = np.cumsum(lengths) - lengths
        rel = np.arange(total, dtype=np.int64) - np.repeat(seg_offsets, lengths)
        tokens = values[np.repeat(starts.astype(np.int64), lengths) + rel].astype(np.uint64)
        with np.errstate(over="ignore"):
            scrambled = _mix64((rel.astype(np.uint64) << np.uint64(32)) ^ (tokens & np.uint64(0xFFFFFFFF))
                               ^ np.uint64(0x9E3779B97F4A7C15))
        nonempty = lengths > 0
        with np.errstate(over="ignore"):
            out[nonempty] = np.add.reduceat(scrambled, seg_offsets[nonempty])
    with np.errstate(over="ignore"):
        return _mix64(out ^ (lengths.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)))


def _flatten(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    values = np.fromiter((int(t) for s in sequences for t in s), dtype=np.int64, count=int(lengths.sum()))
    starts = np.cumsum(lengths) - lengths
    return values, starts, lengths


def canonical_bounds(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, bos_id: int | None,
                     eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) with one leading BOS and one trailing EOS removed from each segment.

    Trainers differ exactly there (SFTTrainer appends EOS to text, a plain tokenizer call does not;
    some tokenizers prepend BOS), so both the index and the lookups compare this canonical form.
    """
    starts, lengths = starts.copy(), lengths.copy()
    if len(values) == 0:
        return starts, lengths
    top = len(values) - 1
    if bos_id is not None:
        has = (lengths > 0) & (values[np.minimum(starts, top)] == bos_id)
        starts[has] += 1
        lengths[has] -= 1
    if eos_id is not None:
        has = (lengths > 0) & (values[np.clip(starts + lengths - 1, 0, top)] == eos_id)
        lengths[has] -= 1
    return starts, lengths


def _cut(starts: np.ndarray, lengths: np.ndarray, cut: int, keep_end: bool) -> tuple[np.ndarray, np.ndarray]:
    if keep_end:
        starts = starts + np.maximum(lengths - cut, 0)
    return starts, np.minimum(lengths, cut)


def fingerprints(sequences: Sequence[Sequence[int]], bos_id: int | None = None, eos_id: int | None = None,
                 truncate_to: int | None = None, keep_end: bool = False) -> np.ndarray:
    """64-bit keys of token sequences in canonical form (see `canonical_bounds`), optionally truncated
    (to the first `truncate_to` tokens, or the last with `keep_end`)."""
    values, starts, lengths = _flatten(sequences)
    starts, lengths = canonical_bounds(values, starts, lengths, bos_id, eos_id)
    if truncate_to is not None:
        starts, lengths = _cut(starts, lengths, truncate_to, keep_end)
    return _hash_segments(values, starts, lengths)


def arrow_fingerprints(list_array, bos_id: int | None = None, eos_id: int | None = None,
                       truncations: Iterable[int] = (), keep_end: bool = False) -> list[np.ndarray]:
    """Keys straight from an Arrow list column (no Python lists): the full canonical form, then one
    array per truncation length."""
    import pyarrow as pa

    if isinstance(list_array, pa.ChunkedArray):
        list_array = list_array.combine_chunks()
    offsets = list_array.offsets.to_numpy().astype(np.int64)
    values = list_array.values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    values = values[offsets[0]:]
    starts, lengths = canonical_bounds(values, starts, lengths, bos_id, eos_id)
    out = [_hash_segments(values, starts, lengths)]
    for cut in truncations:
        longer = lengths > cut
        if longer.any():
            out.append(_hash_segments(values, *_cut(starts[longer], lengths[longer], cut, keep_end)))
    return out


class SourceIndex:
    """Sorted fingerprint arrays of real and synthetic sequences (8 bytes a key); vectorised lookups.

    A sequence known as both real and synthetic counts as real: it is human text.
    """

    def __init__(self, real_keys: Any, synthetic_keys: Any = None, bos_id: int | None = None,
                 eos_id: int | None = None, origin: str = "fingerprints"):
        self.real_keys = np.unique(np.asarray(real_keys, dtype=np.uint64))
        synthetic = np.unique(np.asarray(synthetic_keys if synthetic_keys is not None else [],
                                         dtype=np.uint64))
        self.synthetic_keys = np.setdiff1d(synthetic, self.real_keys, assume_unique=True)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.origin = origin

    def __len__(self) -> int:
        return len(self.real_keys) + len(self.synthetic_keys)

    @property
    def nbytes(self) -> int:
        return int(self.real_keys.nbytes + self.synthetic_keys.nbytes)

    @staticmethod
    def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
        if len(sorted_keys) == 0:
            return np.zeros(len(keys), bool)
        pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
        return sorted_keys[pos] == keys

    def sources(self, sequences: Sequence[Sequence[int]]) -> list[str | None]:
        """'real' / 'synthetic' / None (unknown) for each token sequence."""
        if not sequences:
            return []
        keys = fingerprints(sequences, self.bos_id, self.eos_id)
        real = self._member(keys, self.real_keys)
        synthetic = self._member(keys, self.synthetic_keys)
        return [REAL if r else SYNTHETIC if s else None for r, s in zip(real, synthetic, strict=True)]

    @classmethod
    def from_sequences(cls, real: Sequence[Sequence[int]], synthetic: Sequence[Sequence[int]] = (),
                       bos_id: int | None = None, eos_id: int | None = None) -> SourceIndex:
        return cls(fingerprints(real, bos_id, eos_id), fingerprints(synthetic, bos_id, eos_id) if synthetic
                   else None, bos_id, eos_id)

    @classmethod
    def from_prepared(cls, dataset, batch_size: int = 50_000) -> SourceIndex:
        """The exact index of a prepared training set that still holds `input_ids` and `provenance`."""
        real, synthetic = [], []
        table = dataset.with_format("arrow")
        for start in range(0, len(dataset), batch_size):
            chunk = table[start: start + batch_size]
            keys = arrow_fingerprints(chunk["input_ids"])[0]
            is_real = np.asarray([p == REAL for p in chunk[PROVENANCE_COLUMN].combine_chunks().field("source")
                                  .to_pylist()], bool)
            real.append(keys[is_real])
            synthetic.append(keys[~is_real])
        return cls(np.concatenate(real) if real else [], np.concatenate(synthetic) if synthetic else [],
                   origin="training set")
