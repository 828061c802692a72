"""Drop generations whose reference-model perplexity falls outside the human range.

Synthetic text concentrates at low perplexity (ToEdit, Zhu et al. 2024): repetitive, over-likely
text that narrows the distribution when trained on. The other end is garbage (broken encodings,
random tokens). The band comes from human text scored by the same reference model, so it means the
same thing for any model: by default keep what lies between the human 5th and 99th percentiles.
Why 5 and not 25 (where the guard's low-perplexity *signal* sits): the 25th percentile measures
concentration; as a filter it would remove a quarter of perfectly human-like text.

Example:

```python
>>> from collapse_guard.selection import PerplexitySelector
>>> from collapse_guard.testing import human_like_sentences, tiny_causal_lm, tiny_tokenizer
>>> tok = tiny_tokenizer()
>>> selector = PerplexitySelector(tiny_causal_lm(tok), tok, human_texts=human_like_sentences(50))
>>> kept = selector(human_like_sentences(10, seed=3))
>>> "perplexity_score" in kept.column_names
True

```
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from collapse_guard.selection.base import Selector


class PerplexitySelector(Selector):
    """Keeps samples whose reference perplexity lies within human-derived percentiles.

    Args:
        model: the reference causal LM (e.g. the round-0 model); PEFT/DDP wrappers are fine.
        tokenizer: its tokenizer.
        human_texts: human documents that define the band (e.g. a slice of the real training data).
        human_perplexities: precomputed perplexities of human text, instead of `human_texts`.
        low_percentile: samples below this human percentile are dropped as `low_perplexity`
            (degenerate, over-likely text); None disables the lower bound.
        high_percentile: samples above this human percentile are dropped as `high_perplexity`
            (garbage tail); None disables the upper bound.
        keep: instead of the band, keep the `keep` samples closest to the human median (in log perplexity) and
            drop the rest as `less_typical`: selection from a larger pool, so a round trains on as many
            synthetic samples as an unselected one (Feng et al. 2024). A band would keep almost nothing of a
            pool whose every sample is degenerate (greedy text sits below the human 5th percentile); ranking
            keeps its least degenerate part. None: the band.
        context_length / max_batch_tokens: passed to `document_perplexities`.
        target: which text is scored, default `"both"` (prompt + response, as the model reads them).
        **kwargs: further `Selector` options (`name`, `batch_size`, `rejects_path`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        human_texts: Sequence[str] | None = None,
        human_perplexities: Sequence[float] | None = None,
        low_percentile: float | None = 5.0,
        high_percentile: float | None = 99.0,
        context_length: int = 512,
        max_batch_tokens: int = 16384,
        keep: int | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("name", "perplexity")
        kwargs.setdefault("target", "both")
        kwargs.setdefault("higher_is_better", False)
        super().__init__(**kwargs)
        if (human_texts is None) == (human_perplexities is None):
            raise ValueError("pass exactly one of human_texts=[...] (scored here) or "
                             "human_perplexities=[...].")
        if human_texts is not None and (isinstance(human_texts, str) or len(human_texts) == 0):
            raise ValueError(f"human_texts must be a non-empty list of strings, got {human_texts!r:.80}.")
        for name, value in (("low_percentile", low_percentile), ("high_percentile", high_percentile)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value <= 100):
                raise ValueError(f"{name} must be a number in [0, 100] or None, got {value!r}.")
        if low_percentile is None and high_percentile is None:
            raise ValueError("low_percentile and high_percentile are both None: "
                             "nothing would ever be dropped.")
        if low_percentile is not None and high_percentile is not None and low_percentile >= high_percentile:
            raise ValueError(f"low_percentile={low_percentile} must be below "
                             f"high_percentile={high_percentile}.")
        self.model = model
        self.tokenizer = tokenizer
        self.human_texts = list(human_texts) if human_texts is not None else None
        self._human_ppl = None if human_perplexities is None \
            else np.asarray(human_perplexities, dtype=np.float64)
        self.low_percentile = low_percentile
        self.high_percentile = high_percentile
        self.context_length = context_length
        self.max_batch_tokens = max_batch_tokens
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be a positive int or None, got {keep!r}.")
        self.keep_n = keep

    def _perplexities(self, texts: list[str]) -> list[float]:
        from collapse_guard.metrics.perplexity import document_perplexities

        return document_perplexities(self.model, self.tokenizer, texts, self.context_length,
                                     self.max_batch_tokens)

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high) perplexity bounds, from the human texts (scored once, on first use)."""
        if self._human_ppl is None:
            self._human_ppl = np.asarray(self._perplexities(self.human_texts), dtype=np.float64)
        finite = self._human_ppl[np.isfinite(self._human_ppl)]
        if finite.size == 0:
            raise ValueError("no human text had a finite perplexity (all shorter than 2 tokens?); pass "
                             "longer texts.")
        low = float(np.percentile(finite, self.low_percentile)) if self.low_percentile is not None \
            else -math.inf
        high = float(np.percentile(finite, self.high_percentile)) if self.high_percentile is not None \
            else math.inf
        return low, high

    def validate(self, dataset) -> None:
        self.bounds  # noqa: B018  (scores the human texts, and fails, before any sample is scored)

    def score(self, batch: dict[str, list]) -> list[float]:
        return self._perplexities(self.texts(batch))

    def decide(self, scores: np.ndarray, dataset) -> list[str | None]:
        low, high = self.bounds
        self.stats.update({"low_bound": low, "high_bound": high, "low_percentile": self.low_percentile,
                           "high_percentile": self.high_percentile})
        reasons: list[str | None] = []
        for s in scores:
            if not math.isfinite(s):
                reasons.append("invalid_perplexity")
            elif s < low and self.keep_n is None:
                reasons.append("low_perplexity")
            elif s > high and self.keep_n is None:
                reasons.append("high_perplexity")
            else:
                reasons.append(None)
        if self.keep_n is not None:
            finite = self._human_ppl[np.isfinite(self._human_ppl)]
            center = math.log(float(np.median(finite)))
            inside = [i for i, r in enumerate(reasons) if r is None]
            inside.sort(key=lambda i: (abs(math.log(scores[i]) - center), i))
            for i in inside[self.keep_n:]:
                reasons[i] = "less_typical"
            self.stats["human_median"] = math.exp(center)
        return reasons
