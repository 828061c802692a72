"""A guaranteed share of real (human) data: per round (`mix_datasets`) and per optimizer step
(`MixingCollator`).

Why a floor: training a generation only on the previous generation's output collapses (Shumailov et al.
2024), keeping real data bounds the damage (Gerstgrasser et al. 2024), and 10% real data was already
enough to keep degradation minor. The collator enforces the floor on every optimizer step, so a bad
shuffle, a long synthetic run or a packed batch cannot starve the model of human text.
"""

from collapse_guard.mixing.attach import MixingCollatorCallback
from collapse_guard.mixing.collator import MixingCollator
from collapse_guard.mixing.datasets import MIX_MODES, mix_datasets
from collapse_guard.mixing.policy import MIN_SAFE_REAL_FRACTION, validate_real_fraction
from collapse_guard.mixing.rows import RowFormat, tokenize_like_sft, tokenize_row

__all__ = [
    "MIN_SAFE_REAL_FRACTION",
    "MIX_MODES",
    "MixingCollator",
    "MixingCollatorCallback",
    "RowFormat",
    "mix_datasets",
    "tokenize_like_sft",
    "tokenize_row",
    "validate_real_fraction",
]
