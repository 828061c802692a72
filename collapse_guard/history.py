"""One metric history for the in-training guard and the multi-round loop (`collapse_history.json`).

Every measurement of a model is one entry: `round`, `step` (optimizer steps into that round's
training), `final` (the round's closing measurement), the signals (held-out perplexity, its
per-document sums, the fixed prompts' generations and their diversity), and, once judged, `level`,
`reasons` and `evidence`. Round 0 step 0 is the baseline every later verdict compares with, so a
new round's trainer knows the first round's model. The file is rewritten atomically.

Example:

```python
>>> from collapse_guard.history import History
>>> h = History()
>>> _ = h.add({"round": 0, "step": 0, "final": True, "heldout_ppl": 20.0})
>>> _ = h.add({"round": 1, "step": 8, "final": True, "heldout_ppl": 23.0})
>>> [e["heldout_ppl"] for e in h.context(round_index=2)]
[20.0, 23.0]

```
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

from collapse_guard.io import atomic_write_json, read_json

FILENAME = "collapse_history.json"
VERSION = 2
# Keys that describe an entry (or its verdict) rather than measure the model.
META_KEYS = ("round", "step", "final", "level", "reasons", "evidence", "stopped", "floor_reason",
             "floor_healthy", "cost")
# Per-item lists the detector reads; too big to log as scalars.
LIST_KEYS = ("heldout_doc_nll", "heldout_doc_tokens", "generations")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalars(entry: dict[str, Any]) -> dict[str, float]:
    """The entry's numeric signals (what loggers and plots take)."""
    return {k: float(v) for k, v in entry.items()
            if k not in META_KEYS and k not in LIST_KEYS and is_number(v)}


class History:
    """Entries ordered by (round, step); `path=None` keeps them in memory only."""

    def __init__(self, path: str | os.PathLike | None = None, entries: Iterable[dict[str, Any]] = ()):
        self.path = os.fspath(path) if path is not None else None
        self.entries: list[dict[str, Any]] = [dict(e) for e in entries]

    @classmethod
    def load(cls, path: str | os.PathLike) -> History:
        data = read_json(path, default=None)
        if data is None:
            return cls(path)
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError(
                f"{os.fspath(path)} is not a collapse_guard history (version {VERSION}); it was written by "
                "another version or program. Move it away, or point the guard at another file."
            )
        return cls(path, data.get("entries", []))

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"version": VERSION, "entries": self.entries})

    def add(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Adds (or replaces the entry at the same round and step) and keeps the order."""
        key = (entry["round"], entry["step"])
        self.entries = [e for e in self.entries if (e["round"], e["step"]) != key]
        self.entries.append(entry)
        self.entries.sort(key=lambda e: (e["round"], e["step"]))
        return entry

    def at(self, round_index: int, step: int) -> dict[str, Any] | None:
        return next((e for e in self.entries if e["round"] == round_index and e["step"] == step), None)

    def drop_after(self, round_index: int, step: int = -1) -> None:
        """Forgets what a restarted round (or a resumed checkpoint) no longer has: entries of `round_index`
        after `step`, and of every later round."""
        self.entries = [e for e in self.entries
                        if e["round"] < round_index or (e["round"] == round_index and e["step"] <= step)]

    @property
    def baseline(self) -> dict[str, Any] | None:
        return self.entries[0] if self.entries else None

    def finals(self) -> list[dict[str, Any]]:
        """Each round's closing measurement (the loop's per-round trajectory)."""
        return [e for e in self.entries if e.get("final")]

    def context(self, round_index: int) -> list[dict[str, Any]]:
        """What a verdict in `round_index` is judged against: the baseline, every earlier round's final
        measurement, then this round's measurements so far."""
        earlier = [e for e in self.finals() if e["round"] < round_index]
        if self.baseline is not None and (not earlier or earlier[0] is not self.baseline):
            earlier.insert(0, self.baseline)
        return earlier + [e for e in self.entries if e["round"] == round_index and e is not self.baseline]


def finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)
