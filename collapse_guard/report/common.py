"""What every part of the report shares: the signal words, the level colours, number formatting."""

from __future__ import annotations

import math
import re
from typing import Any

from collapse_guard.signals import LEVELS as LEVELS  # re-exported: the report's modules read it here
from collapse_guard.signals import SIGNALS, names
from collapse_guard.signals import finite as _finite
from collapse_guard.signals import is_number as _is_number

LEVEL_WORDS = {"ok": "OK", "warn": "WARNING", "alarm": "COLLAPSED"}
COLORS = {"ok": "#2e7d32", "warn": "#b26a00", "alarm": "#c62828"}
# Diversity panels always drawn (when measured); every signal that raised a verdict is added to them.
DIVERSITY_PANELS = ("distinct_2", "distinct_4", "unigram_entropy", "tail_coverage", "self_bleu4",
                    "low_ppl_share")
# Signals a comparison aggregates over seeds, besides held-out perplexity (and the extra held-out corpora).
COMPARED_SIGNALS = ("distinct_2", "unigram_entropy", "self_bleu4", "low_ppl_share")
# Signals of the probe the report knows; those the detector does not judge are listed as "not in the rules".
# The registry's diversity panel, in the order reports have always listed them (a test keeps the two equal).
MEASURED_SIGNALS = ("distinct_1", "distinct_2", "distinct_3", "distinct_4", "unigram_entropy", "ttr",
                    "self_bleu4", "compression_ratio", "tail_coverage", "embedding_diversity",
                    "low_ppl_share", "high_ppl_share")
# Signals whose value (not their ratio to round 0) is what a report shows.
ABSOLUTE_SIGNALS = ("low_ppl_share", "high_ppl_share", "train_loss", "eval_loss")
# Which way a signal moves under collapse (for the plot titles), and its words: the signal registry's.
HIGHER_IS_COLLAPSE = names(direction="up")
LOWER_IS_COLLAPSE = names(direction="down")
LABELS = {name: signal.label for name, signal in SIGNALS.items()}
# The human percentile below which a generation counts as low-perplexity (metrics.diversity).
LOW_PERCENTILE = 25.0
# A selection that keeps less than this share of the rows its round wanted is flagged in words.
SCARCE_SELECTION = 0.25
# Arms whose synthetic tokens trained per round differ by more than this factor are flagged.
BUDGET_TOLERANCE = 1.25
SAMPLES_PER_ROUND = 3
SAMPLE_CHARS = 240
_SEED_FOLDER = re.compile(r"^seed_(-?\d+)$")


# ----- small helpers -----------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if not _is_number(value) or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _count(value: Any) -> str:
    return f"{round(value):,}" if _finite(value) else "-"


def _share(value: Any) -> str:
    return f"{value:.0%}" if _finite(value) else "-"


def _x(ratio: Any, digits: int = 2) -> str:
    return f"x{ratio:.{digits}f}" if _finite(ratio) else "-"


def _digits(low: Any, high: Any) -> int:
    return 3 if _finite(low) and _finite(high) and high - low < 0.02 else 2


def signal_label(name: str) -> str:
    if name.endswith("_rises"):
        return LABELS.get(name[: -len("_rises")], name[: -len("_rises")]) + " rises"
    if "@" in name:
        base, corpus = name.split("@", 1)
        return f"{LABELS.get(base, base)} ({corpus})"
    return LABELS.get(name, name)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if _finite(v)]
    return sum(values) / len(values) if values else None


def _spread(values: list[Any]) -> dict[str, Any]:
    """{mean, min, max, n, values}: `values` keeps every seed's number (None where a seed has none)."""
    finite = [float(v) for v in values if _finite(v)]
    if not finite:
        return {"mean": None, "min": None, "max": None, "n": 0, "values": list(values)}
    return {"mean": sum(finite) / len(finite), "min": min(finite), "max": max(finite), "n": len(finite),
            "values": list(values)}
