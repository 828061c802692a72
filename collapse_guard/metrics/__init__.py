"""Collapse signals: held-out perplexity and diversity/distribution metrics on lists of strings."""

from collapse_guard.metrics.diversity import (
    compression_ratio,
    distinct_n,
    diversity_metrics,
    embedding_diversity,
    perplexity_concentration,
    self_bleu4,
    tail_coverage,
    type_token_ratio,
    unigram_entropy,
)
from collapse_guard.metrics.evaluate_modules import load_metric
from collapse_guard.metrics.perplexity import (
    HeldoutPerplexity,
    PerplexityResult,
    document_perplexities,
)

__all__ = [
    "HeldoutPerplexity",
    "PerplexityResult",
    "compression_ratio",
    "distinct_n",
    "diversity_metrics",
    "document_perplexities",
    "embedding_diversity",
    "load_metric",
    "perplexity_concentration",
    "self_bleu4",
    "tail_coverage",
    "type_token_ratio",
    "unigram_entropy",
]
