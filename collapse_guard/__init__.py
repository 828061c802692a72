"""collapse_guard: keep Hugging Face fine-tuning from collapsing when it learns from synthetic data."""

from collapse_guard.callbacks import CollapseGuardCallback
from collapse_guard.config import LoopConfig, config_from_dict, load_config
from collapse_guard.detector import CollapseDetector, DetectorConfig, Verdict
from collapse_guard.generation import (
    PRESETS,
    ContinuationConfig,
    ContinuationGenerator,
    MagpieConfig,
    MagpieGenerator,
    derive_template,
)
from collapse_guard.loop import run_recipe, run_rounds
from collapse_guard.metrics import (
    HeldoutPerplexity,
    PerplexityResult,
    diversity_metrics,
    document_perplexities,
    load_metric,
    perplexity_concentration,
)
from collapse_guard.mixing import MixingCollator, MixingCollatorCallback, check_same_format, mix_datasets
from collapse_guard.provenance import ProvenanceIndex, make_provenance, tokenize_like_sft, with_provenance
from collapse_guard.report import write_comparison, write_report
from collapse_guard.selection import (
    ContaminationFilter,
    DedupSelector,
    PerplexitySelector,
    PrivacyFilter,
    RewardModelSelector,
    SelectionPipeline,
    Selector,
    VerifierSelector,
    breakdown_point,
    exact_answer_match,
    numeric_match,
    regex_format,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CollapseDetector",
    "CollapseGuardCallback",
    "ContaminationFilter",
    "ContinuationConfig",
    "ContinuationGenerator",
    "DedupSelector",
    "DetectorConfig",
    "HeldoutPerplexity",
    "LoopConfig",
    "MagpieConfig",
    "MagpieGenerator",
    "MixingCollator",
    "MixingCollatorCallback",
    "PerplexityResult",
    "PerplexitySelector",
    "PrivacyFilter",
    "ProvenanceIndex",
    "RewardModelSelector",
    "SelectionPipeline",
    "Selector",
    "Verdict",
    "VerifierSelector",
    "breakdown_point",
    "check_same_format",
    "config_from_dict",
    "derive_template",
    "diversity_metrics",
    "document_perplexities",
    "exact_answer_match",
    "load_config",
    "load_metric",
    "make_provenance",
    "mix_datasets",
    "numeric_match",
    "perplexity_concentration",
    "regex_format",
    "run_recipe",
    "run_rounds",
    "tokenize_like_sft",
    "with_provenance",
    "write_comparison",
    "write_report",
]
