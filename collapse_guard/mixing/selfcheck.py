"""The recognition self-check as a pure function: from the collator's counters, whether to say that no real
row has been recognised (and what), so a misread training set never fails silently."""

from __future__ import annotations

from collapse_guard.mixing.counts import MixingCounts
from collapse_guard.provenance import REAL, SYNTHETIC

# Rows looked up before the check speaks when the collator is used directly (two small batches): nothing
# tells what those batches hold, so waiting for 200 rows would stay silent through a whole short run.
API_CHECK_ROWS = 8
# With the composition unknown (a streaming set), rows seen before an all-synthetic start is suspicious.
BLIND_CHECK_ROWS = 200


def recognition_problem(counts: MixingCounts, composition: dict[str, int] | None, attached: bool,
                        origin: str) -> str | None:
    """The warning to give when no real row has been recognised although real rows should have arrived by
    now, else None: at least 10 expected from the training set's composition (the chance of none by bad
    luck is below e**-10), 200 rows seen when the composition is unknown, or, used directly (not attached),
    the first `API_CHECK_ROWS` rows looked up. Rows that carried their provenance cannot be misread, so
    the check speaks only when some rows were looked up by fingerprint."""
    seen = counts.real_seen + counts.synthetic_seen
    if counts.real_seen or counts.looked_up == 0:
        return None
    if composition is not None:
        total = composition.get(REAL, 0) + composition.get(SYNTHETIC, 0)
        expected = composition.get(REAL, 0) / total * seen if total else 0.0
        if expected < 10:
            return None
        holds = (f" although the training set holds {composition[REAL]} real rows ({expected:.0f} expected "
                 "so far)")
    elif not attached:
        if counts.looked_up < API_CHECK_ROWS:
            return None
        holds = (" looked up by fingerprint (none carried a 'provenance' key); if these batches hold real "
                 "rows, they were not recognised")
    elif seen < BLIND_CHECK_ROWS:
        return None
    else:
        holds = ""
    return (f"MixingCollator recognised no real row among the first {seen} rows{holds} (recognition by: "
            f"{origin}). Real rows in the training set are counted as synthetic and the floor is met with "
            "extra real top-ups instead. Likely cause: your rows are tokenized differently from the real "
            "pool (EOS/BOS, truncation, chat template). Fix: keep the 'provenance' column in the training "
            "set (mix_datasets adds it) and attach the collator to the trainer (collator.attach(trainer)).")
