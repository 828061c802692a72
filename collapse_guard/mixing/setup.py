"""`TrainerSetup`: what `attach` learns from a Trainer, handed to the collator in one call
(`MixingCollator.bind`), so the collator's view of the trainer has one writer and cannot be half set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collapse_guard.mixing.rows import RowFormat
from collapse_guard.provenance import SourceIndex


@dataclass(frozen=True)
class TrainerSetup:
    """The trainer as the collator sees it (B, GA and the epoch length come later, from `plan`, when the
    dataloader exists).

    Args:
        tokenizer: tokenizes real top-ups (the trainer's `processing_class` unless the collator had one).
        base_collator: the collator that pads the mixed rows (the trainer's own, unless one was given).
        row_format: how the trainer turns an example into a token row (max_length, EOS, truncation side).
        recognition: how real rows are recognised ("row provenance", or the fingerprint index's origin).
        composition: real/synthetic rows (and tokens) of the training set, if it could be counted.
        index: the real pool's fingerprints, when rows carry no provenance.
    """

    tokenizer: Any
    base_collator: Callable
    row_format: RowFormat
    recognition: str
    composition: dict[str, int] | None = None
    index: SourceIndex | None = None
