"""The `MixingCollator` constructor's checks, each with what was wrong, the value received and the fix,
made before anything is tokenized or indexed."""

from __future__ import annotations

from typing import Any

from collapse_guard.data import as_dataset, require_format, require_tokenizer

UNITS = ("examples", "tokens")
SCOPES = ("step", "micro_batch")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(unit: Any, floor_scope: Any, max_length: Any, max_growth: Any,
                   real_stream_start: Any) -> None:
    """Refuses a bad unit, scope, row length, growth cap or stream position."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}. Use 'tokens' with packing=True.")
    if floor_scope not in SCOPES:
        raise ValueError(f"floor_scope must be one of {SCOPES}, got {floor_scope!r}.")
    if max_length is not None and (not _is_int(max_length) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 (tokens per row) or None, got {max_length!r}.")
    if isinstance(max_growth, bool) or not isinstance(max_growth, (int, float)) or not max_growth >= 1.0:
        raise ValueError("max_growth must be a number >= 1 (largest micro-batch / incoming size), got "
                         f"{max_growth!r}.")
    if not _is_int(real_stream_start) or real_stream_start < 0:
        raise ValueError(f"real_stream_start must be an int >= 0 (draws already made), got "
                         f"{real_stream_start!r}.")


def check_base_collator(base_collator: Any) -> None:
    if base_collator is not None and not callable(base_collator):
        raise TypeError(f"base_collator must be callable, got {type(base_collator).__name__}.")


def check_real_dataset(real_dataset: Any) -> tuple[Any, str]:
    """(the real pool as a dataset, its format), or a clear error for a missing or empty pool."""
    if real_dataset is None:
        raise ValueError("real_dataset is missing: pass a datasets.Dataset (or a list) of human "
                         "examples.")
    real_dataset = as_dataset(real_dataset, "real_dataset")
    real_format = require_format(real_dataset, "real_dataset")
    if hasattr(real_dataset, "__len__") and len(real_dataset) == 0:
        raise ValueError("real_dataset is empty (0 rows): the real-data floor needs at least one human "
                         "example.")
    return real_dataset, real_format


def check_tokenizer(tokenizer: Any, base_collator: Any) -> None:
    """A given tokenizer must tokenize, and pad when the collator builds its own base collator."""
    if tokenizer is None:
        return
    require_tokenizer(tokenizer, "MixingCollator")
    if getattr(tokenizer, "pad_token_id", 0) is None and base_collator is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no pad token (pad_token=None): batches cannot be "
            "padded. Set one, e.g. tokenizer.pad_token = tokenizer.eos_token."
        )
