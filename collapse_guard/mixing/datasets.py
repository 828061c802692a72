"""`mix_datasets`: one round's training set, real and synthetic rows with their provenance."""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np

from collapse_guard.data import (
    FORMATS,
    TEXT_COLUMNS,
    as_dataset,
    check_same_format,
    column_names,
    require_format,
)
from collapse_guard.mixing.policy import validate_real_fraction
from collapse_guard.provenance import (
    HUMAN_ROUND,
    PROVENANCE_COLUMN,
    REAL,
    SYNTHETIC,
    make_provenance,
    with_provenance,
)

MIX_MODES = ("accumulate", "replace", "fresh")


def _select_columns(dataset, keep: list[str]):
    return dataset.select_columns([c for c in keep if c in column_names(dataset)])


def _sample_rows(dataset, n: int, seed: int, offset: int = 0):
    """n rows in a seeded order; cycles (repeats) only when the pool is smaller than n."""
    order = np.random.default_rng(seed).permutation(len(dataset))
    return dataset.select([int(order[(offset + i) % len(order)]) for i in range(n)])


def _require_finite(dataset, name: str) -> None:
    """Refuses a streaming synthetic set up front: the mix counts its rows (every one trained, the real
    share computed from their number), which needs a finite `Dataset`."""
    if dataset is not None and not hasattr(dataset, "__len__"):
        raise ValueError(
            f"mix_datasets: {name} is a streaming {type(dataset).__name__}; a round's synthetic rows are "
            "counted to size the real share, so they must be a finite Dataset (only `real` may stream). "
            f"Materialise it first: datasets.Dataset.from_list(list({name}))."
        )


def _as_synthetic(dataset, round_index: int, name: str):
    """`dataset` with provenance 'synthetic' on every row. Rows passed as synthetic whose own provenance
    says otherwise are relabelled, with a warning: model output counted as real would satisfy the
    real-data floor, the one thing the floor exists to prevent. Rows already labelled synthetic keep their
    record (round, generator details)."""
    if PROVENANCE_COLUMN not in column_names(dataset):
        return with_provenance(dataset, SYNTHETIC, round_index)
    records = dataset[PROVENANCE_COLUMN]
    wrong = sum(not (isinstance(p, dict) and p.get("source") == SYNTHETIC) for p in records)
    if not wrong:
        return dataset
    fresh = make_provenance(SYNTHETIC, round_index)
    warnings.warn(
        f"mix_datasets: {wrong} of the {len(records)} rows passed as {name} carry a provenance that is not "
        f"'synthetic' (e.g. 'real'); they are relabelled synthetic (round {round_index}), since counting "
        "model output as real would let it satisfy the real-data floor. If they are human data, pass them in "
        "`real` instead.", stacklevel=3)

    def relabel(row):
        p = row[PROVENANCE_COLUMN]
        if isinstance(p, dict) and p.get("source") == SYNTHETIC:
            return {PROVENANCE_COLUMN: p}
        return {PROVENANCE_COLUMN: {**(p if isinstance(p, dict) else {}), **fresh}}

    return dataset.map(relabel)


def _take_streaming(real, n: int, seed: int, offset: int = 0):
    """n rows from a streaming pool (seeded shuffle buffer), materialised: a round's set is finite."""
    from datasets import Dataset

    rows = list(real.shuffle(seed=seed, buffer_size=10_000).skip(offset).take(n))
    if len(rows) < n:
        raise ValueError(f"the streaming real pool ran out after {len(rows)} rows; {n} were needed.")
    return Dataset.from_list(rows)


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
    """Builds one round's training set with a `provenance` column (shuffled, seeded).

    Modes (Gerstgrasser et al. 2024; Alemohammad et al. 2023):
        - `"replace"`: this round's synthetic data plus just enough real rows for `min_real_fraction`
          (the same real rows every round). With `min_real_fraction=0` this is the fully synthetic loop
          that collapses.
        - `"accumulate"`: all real data, every earlier round's synthetic data (`previous`) and this round's.
          With a streaming real pool the result is a streaming interleave at the floor's share.
        - `"fresh"`: this round's synthetic data plus a fresh slice of the real pool each round.

    `real` may be a `Dataset`, a streaming `IterableDataset` or a list; rows of any SFT format
    (`collapse_guard.data`), real and synthetic in the same one. Real rows repeat only if the pool is
    too small for the requested share.

    Example:

    ```python
    >>> from collapse_guard import mix_datasets
    >>> mixed = mix_datasets(["A human sentence."] * 4, ["A model sentence."] * 4, mode="replace")
    >>> sorted(p["source"] for p in mixed["provenance"])
    ['real', 'real', 'real', 'real', 'synthetic', 'synthetic', 'synthetic', 'synthetic']

    ```
    """
    if mode not in MIX_MODES:
        raise ValueError(f"mode must be one of {MIX_MODES}, got {mode!r}.")
    f = validate_real_fraction(min_real_fraction, allow_low_real_fraction)
    if synthetic is None:
        raise ValueError("synthetic is missing: pass this round's generated examples (may be empty).")
    real, synthetic, previous = as_dataset(real, "real"), as_dataset(synthetic, "synthetic"), \
        as_dataset(previous, "previous")
    _require_finite(synthetic, "synthetic")
    _require_finite(previous, "previous")
    streaming = real is not None and not hasattr(real, "__len__")
    if (f > 0 or mode == "accumulate") and (real is None or (not streaming and len(real) == 0)):
        raise ValueError("real is missing or empty: the real-data floor needs human examples (a Dataset, a "
                         "streaming IterableDataset or a list of texts).")
    if len(synthetic) and real is not None:
        fmt = check_same_format(real, synthetic)
    else:
        fmt = require_format(synthetic if len(synthetic) else real,
                             "synthetic data" if len(synthetic) else "real data")
    keep = [c for c in TEXT_COLUMNS if c in column_names(synthetic if len(synthetic) else real)]
    keep = [c for c in keep if fmt != "text" or c == "text"] + [PROVENANCE_COLUMN]
    assert fmt in FORMATS
    from datasets import concatenate_datasets, interleave_datasets

    parts = []
    if mode == "accumulate" and previous is not None and len(previous):
        parts.append(_select_columns(_as_synthetic(previous, round_index - 1, "previous"), keep))
    if len(synthetic):
        parts.append(_select_columns(_as_synthetic(synthetic, round_index, "synthetic"), keep))
    n_other = sum(len(p) for p in parts)
    if f >= 1.0:
        parts, n_other = [], 0  # a floor of 100% real leaves no room for synthetic rows
    if real is not None:
        real = _select_columns(with_provenance(real, REAL, HUMAN_ROUND), keep)
        if streaming and mode == "accumulate":
            if not parts:
                return real
            synthetic_part = concatenate_datasets(parts).shuffle(seed=seed).to_iterable_dataset()
            share = max(f, 1e-6)
            return interleave_datasets([real, synthetic_part], probabilities=[share, 1.0 - share], seed=seed,
                                       stopping_strategy="first_exhausted")
        n_needed = math.ceil(f / (1.0 - f) * n_other - 1e-9) if f < 1.0 else None
        if mode == "accumulate":
            n_real = max(len(real), n_needed or 0)
            parts.insert(0, _sample_rows(real, n_real, seed) if n_real > len(real) else real)
        else:
            n = n_needed if n_needed is not None else (len(real) if not streaming else 0)
            if n:  # fresh: round r takes the r-th slice of one fixed order, so rounds see new human text
                offset = round_index * n if mode == "fresh" else 0
                parts.insert(0, _take_streaming(real, n, seed, offset) if streaming
                             else _sample_rows(real, n, seed, offset))
    if sum(len(p) for p in parts) == 0:
        raise ValueError(f"mix_datasets(mode={mode!r}) got no synthetic rows and no real rows to train on.")
    parts = [p.cast(parts[0].features) if p.features != parts[0].features else p for p in parts]
    return concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()
