"""One metric history for the in-training guard and the multi-round loop (`collapse_history.json`).

Every measurement of a model is one entry: `round`, `step` (optimizer steps into that round's
training), `final` (the round's closing measurement), the signals (held-out perplexity, its
per-document sums, the fixed prompts' generations and their diversity), and, once judged, the verdict
(`level`, `reasons`, `evidence` and the ratios to the baseline). Round 0 step 0 is the baseline every later
verdict compares with, so a new round's trainer knows the first round's model. The file is rewritten
atomically and is strict JSON: a NaN or infinite value (a diverged model) is written as `null`, and the
file's `nonfinite` map says what it was, so loading gives the same value back (`collapse_guard.io`).

The entry API: `write_verdict(entry, verdict)` is the one way a verdict enters an entry, `verdict_of(entry)`
reads it back, and `strip_verdict(entry)` / `measurement(entry)` are the one way to take it out again.

Example:

```python
>>> from collapse_guard.detector import Verdict
>>> from collapse_guard.history import History, strip_verdict, write_verdict
>>> h = History()
>>> _ = h.add({"round": 0, "step": 0, "final": True, "heldout_ppl": 20.0})
>>> entry = h.add({"round": 1, "step": 8, "final": True, "heldout_ppl": 23.0})
>>> [e["heldout_ppl"] for e in h.context(round_index=2)]
[20.0, 23.0]
>>> _ = write_verdict(entry, Verdict("warn", ["held-out ppl rose 15%"], {"heldout_ppl_ratio": 1.15}))
>>> entry["level"], entry["heldout_ppl_ratio"], sorted(strip_verdict(entry))
('warn', 1.15, ['final', 'heldout_ppl', 'round', 'step'])

```
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from collapse_guard.io import atomic_write_json, read_json
from collapse_guard.signals import finite, is_number

if TYPE_CHECKING:
    from collapse_guard.detector import Verdict

__all__ = ["FILENAME", "History", "finite", "is_number", "measurement", "scalars", "strip_verdict",
           "verdict_of", "write_verdict"]

FILENAME = "collapse_history.json"
VERSION = 2
# What a verdict writes into an entry (besides the `<signal>_ratio` values it derives).
VERDICT_KEYS = ("level", "reasons", "evidence", "stopped")
# What the adaptive floor writes into an entry: its decision, not a measurement of the model.
FLOOR_KEYS = ("floor", "floor_reason", "floor_healthy")
# Keys that describe an entry (or its verdict) rather than measure the model.
META_KEYS = ("round", "step", "final", *VERDICT_KEYS, "floor_reason", "floor_healthy", "cost")
# Per-item lists the detector reads; too big to log as scalars.
LIST_KEYS = ("heldout_doc_nll", "heldout_doc_tokens", "heldout_doc_index", "generations")


def scalars(entry: Mapping[str, Any]) -> dict[str, float]:
    """The entry's numeric signals (what loggers and plots take)."""
    return {k: float(v) for k, v in entry.items()
            if k not in META_KEYS and k not in LIST_KEYS and is_number(v)}


# ----- the verdict inside an entry ---------------------------------------------------------------------
def _is_derived_ratio(entry: Mapping[str, Any], key: str) -> bool:
    # `heldout_ppl_ratio` is the verdict's; `compression_ratio` is a measured signal (no `compression` key)
    return key.endswith("_ratio") and key.removesuffix("_ratio") in entry


def write_verdict(entry: dict[str, Any], verdict: Verdict) -> dict[str, Any]:
    """Records `verdict` in `entry` (replacing an earlier one): level, reasons, evidence and the ratios to
    the baseline it computed. Returns the entry."""
    for key in [k for k in entry if _is_derived_ratio(entry, k)]:
        del entry[key]
    entry.update({k: v for k, v in verdict.signals.items() if k.endswith("_ratio")})
    entry.update(level=verdict.level, reasons=list(verdict.reasons),
                 evidence={name: dict(e) for name, e in verdict.evidence.items()})
    return entry


def verdict_of(entry: Mapping[str, Any]) -> Verdict | None:
    """The verdict recorded in `entry` (None if it was never judged)."""
    from collapse_guard.detector import Verdict

    if entry.get("level") is None:
        return None
    signals = {k: float(v) for k, v in entry.items() if _is_derived_ratio(entry, k) and is_number(v)}
    return Verdict(entry["level"], list(entry.get("reasons") or []), signals,
                   {name: dict(e) for name, e in (entry.get("evidence") or {}).items()})


def strip_verdict(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `entry` without its verdict (level, reasons, evidence, stop mark, derived ratios): the
    measurement as it was before it was judged."""
    return {k: v for k, v in entry.items() if k not in VERDICT_KEYS and not _is_derived_ratio(entry, k)}


def measurement(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The model's signals only: `strip_verdict`, less what belongs to the round that measured it (its
    `final` mark, the floor's decision, the collator's counters). What a later trainer takes as its start."""
    return {k: v for k, v in strip_verdict(entry).items()
            if k != "final" and k not in FLOOR_KEYS and not k.startswith("mixing/")}


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

    def save(self, path: str | os.PathLike | None = None) -> None:
        """Writes the history (to `path`, default its own) as strict JSON, atomically."""
        target = os.fspath(path) if path is not None else self.path
        if target is None:
            return
        # strict JSON: a non-finite value is written null, and `load` gets it back (collapse_guard.io)
        atomic_write_json(target, {"version": VERSION, "entries": self.entries})

    def add(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Adds (or replaces the entry at the same round and step) and keeps the order."""
        key = (entry["round"], entry["step"])
        self.entries = [e for e in self.entries if (e["round"], e["step"]) != key]
        self.entries.append(entry)
        self.entries.sort(key=lambda e: (e["round"], e["step"]))
        return entry

    def at(self, round_index: int, step: int) -> dict[str, Any] | None:
        return next((e for e in self.entries if e["round"] == round_index and e["step"] == step), None)

    def last(self, round_index: int) -> dict[str, Any] | None:
        """The latest entry of `round_index`."""
        return next((e for e in reversed(self.entries) if e["round"] == round_index), None)

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
