"""Rows and segments: splitting packed rows by `seq_lengths`, shaping top-ups like the batch's rows, and
packing segments back into rows of at most `max_length` tokens (first-fit decreasing)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from collapse_guard.provenance import PROVENANCE_COLUMN

IGNORE_INDEX = -100
# Keys that describe a whole row, not one value per token.
ROW_KEYS = ("seq_lengths", PROVENANCE_COLUMN, "source")
# Per-token keys a top-up can be given when the batch's rows carry them.
_DERIVED = {
    "attention_mask": lambda ex: [1] * len(ex["input_ids"]),
    "position_ids": lambda ex: list(range(len(ex["input_ids"]))),
    "completion_mask": lambda ex: [int(t != IGNORE_INDEX) for t in ex["labels"]],
    "assistant_masks": lambda ex: [int(t != IGNORE_INDEX) for t in ex["labels"]],
}


def as_list(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def token_keys(row: dict[str, Any]) -> list[str]:
    """The row's per-token keys: sequences as long as its input_ids."""
    n = len(row["input_ids"])
    return [k for k, v in row.items() if k not in ROW_KEYS and not isinstance(v, (str, bytes, dict))
            and hasattr(v, "__len__") and len(v) == n]


def check_row_keys(row: dict[str, Any]) -> None:
    """Refuses batch rows that a real top-up could not imitate (before any batch is mixed)."""
    if "input_ids" not in row:
        raise ValueError(
            f"MixingCollator got a row with keys {sorted(row)} and no 'input_ids'. It mixes tokenized SFT "
            "rows (as SFTTrainer and a tokenized Trainer dataset feed them); preference pairs "
            "(chosen/rejected) and untokenized rows are not supported."
        )
    unknown = [k for k in token_keys(row) if k not in ("input_ids", "labels", *_DERIVED)]
    if unknown:
        raise ValueError(
            f"MixingCollator cannot build real top-up rows with the per-token key(s) {unknown} (row keys "
            f"{sorted(row)}). Supported: input_ids, labels, {', '.join(_DERIVED)}."
        )


def shape_like(example: dict[str, list[int]], keys: Sequence[str]) -> dict[str, list[int]]:
    """A tokenized real example with exactly the per-token `keys` of the batch's rows."""
    row: dict[str, list[int]] = {"input_ids": list(example["input_ids"])}
    for key in keys:
        if key == "input_ids":
            continue
        row[key] = list(example["labels"]) if key == "labels" else _DERIVED[key](example)
    return row


def split_row(row: dict[str, Any]) -> list[dict[str, list]]:
    """A packed row (`seq_lengths`) -> its segments; an unpacked row -> [itself without row keys]."""
    keys = token_keys(row)
    lengths = row.get("seq_lengths")
    if lengths is None:
        return [{k: as_list(row[k]) for k in keys}]
    columns = {k: as_list(row[k]) for k in keys}
    out, start = [], 0
    for length in as_list(lengths):
        length = int(length)
        out.append({k: v[start: start + length] for k, v in columns.items()})
        start += length
    return out


def join_segments(segments: Sequence[dict[str, list]]) -> dict[str, list]:
    """Segments -> one packed row with `seq_lengths`."""
    keys = list(segments[0])
    row = {k: [t for seg in segments for t in seg[k]] for k in keys}
    row["seq_lengths"] = [len(seg["input_ids"]) for seg in segments]
    return row


def carries_loss(row: dict[str, Any]) -> bool:
    """Whether a row (or segment) adds anything to the loss. A causal LM predicts token t from the tokens
    before it, so the first label never counts: a 1-token row, or one whose labels past the first are all
    -100 (a prompt-completion row cut inside its prompt), trains nothing. Without `labels` the trainer's
    collator (TRL's `DataCollatorForLanguageModeling`, transformers' LM collator) trains every token."""
    labels = row.get("labels")
    if labels is None:
        return len(row["input_ids"]) >= 2
    return bool((np.asarray(labels)[1:] != IGNORE_INDEX).any())


def supervised_tokens(row: dict[str, Any]) -> int:
    """The tokens of a row the loss is taken on (labels other than -100; every token without labels), 0 for
    a row that carries no loss: what the token floor counts."""
    if not carries_loss(row):
        return 0
    labels = row.get("labels")
    if labels is None:
        return len(row["input_ids"])
    return int((np.asarray(labels) != IGNORE_INDEX).sum())


def truncate(example: dict[str, list], length: int, keep_end: bool = False) -> dict[str, list]:
    if len(example["input_ids"]) <= length:
        return example
    cut = slice(-length, None) if keep_end else slice(None, length)
    return {k: v[cut] for k, v in example.items()}


def pack_first_fit(segments: Sequence[dict[str, list]], capacity: int, bins: list[list] | None = None,
                   loads: list[int] | None = None) -> tuple[list[list], list[int]]:
    """First-fit decreasing into bins of `capacity` tokens (new bins are opened as needed)."""
    bins = bins if bins is not None else []
    loads = loads if loads is not None else []
    for seg in sorted(segments, key=lambda s: -len(s["input_ids"])):
        n = len(seg["input_ids"])
        for i, load in enumerate(loads):
            if load + n <= capacity:
                bins[i].append(seg)
                loads[i] += n
                break
        else:
            bins.append([seg])
            loads.append(n)
    return bins, loads
