"""Which incoming rows are real, and which synthetic rows the filter keeps: rows in, sources (rows) out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from collapse_guard.mixing.counts import MixingCounts
from collapse_guard.mixing.segments import as_list
from collapse_guard.provenance import SYNTHETIC, SourceIndex, source_of_example

Row = dict[str, Any]


def lookup_sources(rows: list[Row], index: Callable[[], SourceIndex], counts: MixingCounts) -> list[str]:
    """Each row's source: its own `provenance`, else the real pool's fingerprints (`index()`, built only when
    a row needs it). A row found in neither counts as synthetic: the safe side for the floor, which then
    draws a real top-up instead of trusting a row it cannot place."""
    sources = [source_of_example(r) for r in rows]
    unknown = [i for i, s in enumerate(sources) if s is None]
    counts.looked_up += len(unknown)
    if unknown:
        found = index()
        looked_up = found.sources([as_list(rows[i]["input_ids"]) for i in unknown])
        for i, s in zip(unknown, looked_up, strict=True):
            sources[i] = s or SYNTHETIC
            # only an index that also knows synthetic rows can tell "unrecognised" from "synthetic"
            counts.unrecognised += s is None and len(found.synthetic_keys) > 0
    return sources


def filter_synthetic(rows: list[Row], verdicts: Callable[[list[str]], list[str | None]] | None,
                     decode: Callable[[list[int]], str], dropped: Counter) -> list[Row]:
    """The synthetic rows the filter keeps (a verdict of None); the others are counted in `dropped` under
    the reason the filter gave."""
    if verdicts is None or not rows:
        return rows
    reasons = verdicts([decode(as_list(r["input_ids"])) for r in rows])
    if len(reasons) != len(rows):
        raise ValueError(f"synthetic_filter returned {len(reasons)} verdicts for {len(rows)} texts.")
    dropped.update(str(reason) for reason in reasons if reason is not None)
    return [row for row, reason in zip(rows, reasons, strict=True) if reason is None]
