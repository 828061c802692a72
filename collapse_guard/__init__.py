"""collapse_guard: keep Hugging Face fine-tuning from collapsing when it learns from synthetic data."""

from collapse_guard.mixing import MixingCollator, MixingCollatorCallback, check_same_format, mix_datasets
from collapse_guard.provenance import ProvenanceIndex, make_provenance, tokenize_like_sft, with_provenance

__version__ = "0.1.0"

__all__ = [
    "MixingCollator",
    "MixingCollatorCallback",
    "ProvenanceIndex",
    "check_same_format",
    "make_provenance",
    "mix_datasets",
    "tokenize_like_sft",
    "with_provenance",
]
