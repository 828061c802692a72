"""Selectors: keep only the synthetic samples worth learning from (Feng et al. 2024, "Beyond Model Collapse").

Each selector is one small class; compose them with `SelectionPipeline`, or hand one to
`MixingCollator(synthetic_filter=selector.as_batch_filter())` to filter at batch time.

Example:

```python
>>> from collapse_guard.selection import DedupSelector, PrivacyFilter, SelectionPipeline
>>> pipeline = SelectionPipeline([DedupSelector(), PrivacyFilter()])
>>> len(pipeline(["An answer.", "An answer.", "Call 555-123-4567."])), pipeline.report["dropped"]
(1, 2)

```
"""

from collapse_guard.selection.base import (
    SelectionPipeline,
    SelectionPolicy,
    Selector,
    write_rejects,
)
from collapse_guard.selection.dedup import ContaminationFilter, DedupSelector, normalize_words
from collapse_guard.selection.embedding import EmbeddingDiversitySelector, SentenceEmbedder, k_center
from collapse_guard.selection.judge import CATEGORIES, RUBRICS, JudgeSelector, LLMJudge, judge_agreement
from collapse_guard.selection.perplexity import PerplexitySelector
from collapse_guard.selection.privacy import (
    PII_KINDS,
    PII_PATTERNS,
    PrivacyFilter,
    find_pii,
    luhn_valid,
    presidio_detector,
    privacy_scores,
)
from collapse_guard.selection.reward_model import RewardModelSelector, check_reward_model
from collapse_guard.selection.verifier import (
    VerifierSelector,
    breakdown_point,
    exact_answer_match,
    extract_answer,
    math_answer_match,
    math_verify_available,
    normalize_answer,
    numeric_match,
    regex_format,
    selection_quality,
)

__all__ = [
    "PII_KINDS",
    "PII_PATTERNS",
    "CATEGORIES",
    "ContaminationFilter",
    "DedupSelector",
    "EmbeddingDiversitySelector",
    "JudgeSelector",
    "LLMJudge",
    "PerplexitySelector",
    "PrivacyFilter",
    "RUBRICS",
    "RewardModelSelector",
    "SelectionPipeline",
    "SelectionPolicy",
    "SentenceEmbedder",
    "Selector",
    "VerifierSelector",
    "breakdown_point",
    "check_reward_model",
    "exact_answer_match",
    "extract_answer",
    "find_pii",
    "judge_agreement",
    "k_center",
    "luhn_valid",
    "math_answer_match",
    "math_verify_available",
    "normalize_answer",
    "normalize_words",
    "numeric_match",
    "presidio_detector",
    "privacy_scores",
    "regex_format",
    "selection_quality",
    "write_rejects",
]
