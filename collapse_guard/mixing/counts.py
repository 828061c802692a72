"""`MixingCounts`: what the collator has mixed so far, one typed field a counter (checkpointed with it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class MixingCounts:
    """Counters of a `MixingCollator`. Units are rows with `unit="examples"` and supervised tokens (labels
    other than -100) with `unit="tokens"`; `*_tokens` are input tokens either way."""

    micro_batches: int = 0  # micro-batches mixed
    units: int = 0  # units fed
    real_units: int = 0  # real units fed
    incoming_units: int = 0  # units the sampler delivered
    extra_units: int = 0  # units fed beyond those delivered (grown micro-batches)
    grown_batches: int = 0  # micro-batches that took extra rows
    real_top_up: int = 0  # real rows (segments) drawn from the real stream
    synthetic_served: int = 0  # synthetic rows (segments) fed
    real_tokens: int = 0
    synthetic_tokens: int = 0
    real_seen: int = 0  # incoming rows recognised as real (the self-check)
    synthetic_seen: int = 0  # incoming synthetic rows kept by the filter
    synthetic_units_seen: int = 0  # their units (the expected synthetic share)
    intake_units: int = 0  # incoming units that carry loss
    synthetic_skipped: int = 0  # synthetic rows not trained because f = 1
    looked_up: int = 0  # rows whose source came from fingerprints (no provenance)
    unrecognised: int = 0  # looked-up rows found in neither index
    no_loss_real: int = 0  # incoming real rows that carry no loss (passed on, counted as nothing)
    no_loss_synthetic: int = 0
    top_up_no_loss: int = 0  # real top-ups drawn and not used: they carried no loss

    def __getitem__(self, key: str) -> int:
        """Mapping-style reads (`counts["synthetic_served"]`), as callers of the old Counter wrote them."""
        return getattr(self, key)

    def as_dict(self) -> dict[str, int]:
        """The non-zero counters (what a checkpoint stores)."""
        return {k: v for k, v in asdict(self).items() if v}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> MixingCounts:
        """From a checkpoint's counters; unknown keys (a newer or older version's) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in state.items() if k in names})
