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

from collapse_guard.selection.base import SelectionPipeline, SelectionPolicy, Selector
from collapse_guard.selection.dedup import ContaminationFilter, DedupSelector
from collapse_guard.selection.embedding import EmbeddingDiversitySelector
from collapse_guard.selection.judge import JudgeSelector, LLMJudge
from collapse_guard.selection.perplexity import PerplexitySelector
from collapse_guard.selection.privacy import PrivacyFilter, presidio_detector
from collapse_guard.selection.reward_model import RewardModelSelector
from collapse_guard.selection.verifier import (
    VerifierSelector,
    breakdown_point,
    exact_answer_match,
    math_answer_match,
    numeric_match,
    regex_format,
)

# Helpers (PII patterns, answer extraction, judge rubrics, k-center, ...) stay in their modules.
__all__ = [
    "ContaminationFilter",
    "DedupSelector",
    "EmbeddingDiversitySelector",
    "JudgeSelector",
    "LLMJudge",
    "PerplexitySelector",
    "PrivacyFilter",
    "RewardModelSelector",
    "SelectionPipeline",
    "SelectionPolicy",
    "Selector",
    "VerifierSelector",
    "breakdown_point",
    "exact_answer_match",
    "math_answer_match",
    "numeric_match",
    "presidio_detector",
    "regex_format",
]
