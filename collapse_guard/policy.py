"""The guard inside on-policy RL (TRL's GRPOTrainer and its kin): the diversity of the policy's own
completions.

On-policy RL collapses differently from SFT on synthetic data: reward rises while the policy's entropy
and the variety of its completions fall ("entropy collapse"), most visibly when a reward can be hacked
with one phrase. The trainer already generates: at every logging step the guard reads the completions
of the latest generation batch (`trainer._logs["completion"]`, gathered from every rank, so every
rank computes the same numbers) and TRL's logged token `entropy`, measures distinct-n, unigram
entropy and self-BLEU on them (no extra generation) and judges them against the first logging step.

Rules calibrated for RL (`POLICY_RULES`; every threshold is a `DetectorConfig` field): a policy's
completions vary far more between logging steps than a fixed prompt set's generations (small batches,
new prompts each step), so ratios warn at 0.8 and alarm at 0.6 (SFT: 0.9 / 0.75), self-BLEU warns at
x1.5 and alarms at x2.0 with an absolute rise of 0.1, and the per-token entropy TRL logs warns below
x0.8 and alarms below x0.6 of its first value. Item-level noise is handled by the detector's
jackknife intervals over completions.
"""

from __future__ import annotations

from typing import Any

from collapse_guard.data import content
from collapse_guard.detector import DetectorConfig

POLICY_RULES = DetectorConfig(
    ppl_signal="heldout_ppl",  # absent from policy entries: the perplexity rules stay silent
    ppl_rises_warn=0,
    diversity_signals=("distinct_1", "distinct_2", "unigram_entropy", "token_entropy"),
    diversity_ratio_warn=0.8,
    diversity_ratio_alarm=0.6,
    self_bleu_ratio_warn=1.5,
    self_bleu_ratio_alarm=2.0,
    self_bleu_min_rise=0.1,
    # a NaN/inf token entropy or reward: the policy (or its reward) diverged, whatever the completions say
    nonfinite_alarm_signals=("token_entropy", "reward"),
)


def policy_completions(trainer) -> list[str] | None:
    """The latest generation batch's completions of an on-policy trainer (None for other trainers)."""
    logs = getattr(trainer, "_logs", None)
    if not isinstance(logs, dict) or "completion" not in logs:
        return None
    return [content(c) for c in logs["completion"]]


def policy_signals(completions: list[str], logs: dict[str, Any]) -> dict[str, Any]:
    """Diversity of the completions, plus TRL's logged per-token entropy and reward when present."""
    from collapse_guard.metrics.diversity import distinct_n, self_bleu4, unigram_entropy

    texts = [t if t.strip() else "" for t in completions]
    signals: dict[str, Any] = {
        "generations": texts,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "unigram_entropy": unigram_entropy(texts),
        "self_bleu4": self_bleu4(texts),
        "completions": float(len(texts)),
    }
    for source, key in (("entropy", "token_entropy"), ("reward", "reward")):
        value = logs.get(source)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            signals[key] = float(value)
    return signals
