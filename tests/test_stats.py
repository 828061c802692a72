"""The intervals behind the detector's verdicts: stated coverage on known distributions, fast, repeatable."""

import math
import time

import numpy as np
import pytest

from collapse_guard import stats
from collapse_guard.metrics.diversity import distinct_n, self_bleu4, unigram_entropy
from collapse_guard.stats import TEXT_SIGNALS, diversity_ratio_intervals, ppl_ratio_interval, set_statistics

VOCAB = [f"w{i}" for i in range(2000)]
ZIPF = 1.0 / np.arange(1, len(VOCAB) + 1)
ZIPF /= ZIPF.sum()


def documents(seed, n=64, change=0.0, noise=0.05):
    """Per-document NLL sums of a baseline and a later evaluation: each document's log-ppl moves by
    `change` plus N(0, noise), so the corpus ratio is exp(change) in expectation."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(50, 400, n)
    rate = rng.normal(3.0, 0.4, n)  # documents differ in difficulty (mean NLL per token)
    moved = rate + rng.normal(change, noise, n)
    return (rate * tokens).tolist(), tokens.tolist(), (moved * tokens).tolist(), tokens.tolist()


def zipf_texts(rng, n=32, words=30):
    sizes = rng.integers(words // 2, 2 * words, n)
    return [" ".join(VOCAB[j] for j in rng.choice(len(VOCAB), size, p=ZIPF)) for size in sizes]


def looping_texts(rng, n=32, words=30):
    """Collapse: every text cycles through a few phrases."""
    phrases = ["the model said the same thing", "and then it said it again", "over and over"]
    return [" ".join((phrases * 20)[int(rng.integers(0, 3)):])[: words * 6] for _ in range(n)]


# ----- held-out perplexity: paired bootstrap over documents -------------------------------------------
def test_ppl_ratio_is_the_token_weighted_corpus_ratio():
    base_nll, base_tok = [10.0, 30.0, 50.0] * 4, [5, 10, 20] * 4
    new_nll, new_tok = [12.0, 33.0, 49.0] * 4, [5, 10, 21] * 4
    est = ppl_ratio_interval(base_nll, base_tok, new_nll, new_tok)
    expected = math.exp(sum(new_nll) / sum(new_tok) - sum(base_nll) / sum(base_tok))
    assert est.ratio == pytest.approx(expected)
    assert est.baseline == pytest.approx(math.exp(sum(base_nll) / sum(base_tok)))
    assert est.low <= est.ratio <= est.high and est.n == 12 and est.confidence == 0.95


@pytest.mark.parametrize(("n", "noise"), [(64, 0.05), (64, 0.5), (32, 0.1)])
def test_ppl_interval_covers_the_true_ratio_at_the_stated_level(n, noise):
    # the decision side is the lower bound: it must exceed the true ratio in about 2.5% of seeds, not more
    seeds = range(200)
    estimates = [ppl_ratio_interval(*documents(s, n=n, change=0.1, noise=noise)) for s in seeds]
    truth = math.exp(0.1)
    coverage = np.mean([e.low <= truth <= e.high for e in estimates])
    above = np.mean([e.low > truth for e in estimates])
    assert 0.9 <= coverage <= 0.99, coverage
    assert above <= 0.05, above


def test_ppl_interval_is_deterministic_and_seeded():
    data = documents(7, noise=0.2)
    first, second = ppl_ratio_interval(*data), ppl_ratio_interval(*data)
    assert first == second
    other = ppl_ratio_interval(*data, seed=1)
    assert other.ratio == first.ratio and other.low != first.low
    assert other.low == pytest.approx(first.low, rel=0.01)  # 2000 resamples: the seed barely matters


def test_ppl_interval_is_fast():
    data = documents(0)
    ppl_ratio_interval(*data)
    best = min(_seconds(lambda: ppl_ratio_interval(*data, resamples=2000)) for _ in range(3))
    assert best < 0.05, f"2000 resamples over 64 documents took {best * 1000:.1f} ms"
    big = documents(0, n=5000)
    assert _seconds(lambda: ppl_ratio_interval(*big)) < 2.0


def test_documents_without_tokens_are_dropped():
    base_nll, base_tok, new_nll, new_tok = documents(3, n=20)
    est = ppl_ratio_interval(base_nll + [0.0], base_tok + [0], new_nll + [0.0], new_tok + [0])
    assert est.n == 20
    assert est.ratio == pytest.approx(ppl_ratio_interval(base_nll, base_tok, new_nll, new_tok).ratio)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([1.0, 2.0], [1, 1], [1.0], [1]), "one length"),
        (([1.0, math.nan], [1, 1], [1.0, 1.0], [1, 1]), "finite"),
        (([1.0, 2.0], [1, -1], [1.0, 1.0], [1, 1]), ">= 0"),
        (([0.0, 0.0], [0, 0], [0.0, 0.0], [0, 0]), "no predicted tokens"),
    ],
)
def test_ppl_interval_rejects_bad_sums(args, message):
    with pytest.raises(ValueError, match=message):
        ppl_ratio_interval(*args)


def test_ppl_interval_checks_its_settings():
    with pytest.raises(ValueError, match="resamples"):
        ppl_ratio_interval(*documents(0), resamples=1)
    with pytest.raises(ValueError, match="confidence"):
        ppl_ratio_interval(*documents(0), confidence=1.0)


# ----- diversity: delete-one jackknife over prompts ------------------------------------------------------
@pytest.mark.parametrize("kind", ["varied", "looping", "short", "with_empty"])
def test_set_statistics_match_the_diversity_metrics(kind):
    rng = np.random.default_rng(0)
    texts = {
        "varied": zipf_texts(rng, 24),
        "looping": looping_texts(rng, 12),
        "short": ["a", "b c", "a b", "c", "the cat sat.", "a cat."],
        "with_empty": ["", "a b a b", "", "b a b a c", "x"],
    }[kind]
    got = set_statistics(texts)
    for k in range(1, 5):
        assert got[f"distinct_{k}"] == pytest.approx(distinct_n(texts, k), abs=1e-12)
    assert got["unigram_entropy"] == pytest.approx(unigram_entropy(texts), abs=1e-9)
    assert got["self_bleu4"] == pytest.approx(self_bleu4(texts), abs=1e-9)


def test_jackknife_replicates_match_the_metrics_without_that_text():
    texts = zipf_texts(np.random.default_rng(1), 10) + looping_texts(np.random.default_rng(1), 4)
    values = stats._jackknife_values(texts, TEXT_SIGNALS)
    for left_out in (0, 5, 12):
        rest = [t for i, t in enumerate(texts) if i != left_out]
        row = left_out + 1
        for k in range(1, 5):
            assert values[f"distinct_{k}"][row] == pytest.approx(distinct_n(rest, k), abs=1e-12)
        assert values["unigram_entropy"][row] == pytest.approx(unigram_entropy(rest), abs=1e-9)
        assert values["self_bleu4"][row] == pytest.approx(self_bleu4(rest), abs=1e-9)


def test_jackknife_intervals_cover_no_change():
    # two independent draws of the same distribution: every ratio is 1 up to sampling noise
    hits = {name: 0 for name in TEXT_SIGNALS}
    seeds = range(60)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        for name, est in diversity_ratio_intervals(zipf_texts(rng), zipf_texts(rng)).items():
            hits[name] += est.low <= 1.0 <= est.high
    for name, count in hits.items():
        assert count / len(seeds) >= 0.85, (name, count)


def test_collapsed_generations_fall_far_outside_the_interval():
    rng = np.random.default_rng(2)
    result = diversity_ratio_intervals(zipf_texts(rng), looping_texts(rng))
    for k in range(1, 5):
        assert result[f"distinct_{k}"].high < 0.75
    assert result["unigram_entropy"].high < 0.75
    assert result["self_bleu4"].low > 1.25
    assert all(e.n == 32 and e.method == "delete-one jackknife over prompts" for e in result.values())


def test_empty_generations_give_a_zero_ratio_not_a_crash():
    rng = np.random.default_rng(3)
    result = diversity_ratio_intervals(zipf_texts(rng, 12), [""] * 12, ["distinct_2", "unigram_entropy"])
    assert result["distinct_2"].ratio == 0.0 and result["distinct_2"].high == 0.0


def test_zero_baseline_has_no_ratio():
    rng = np.random.default_rng(4)
    unrelated = ["a", "b", "c", "d"]  # one word each: no n-gram in common, self-BLEU 0
    assert "self_bleu4" not in diversity_ratio_intervals(unrelated, zipf_texts(rng, 4), ["self_bleu4"])


def test_self_bleu_is_left_out_without_sacrebleu(monkeypatch):
    monkeypatch.setattr(stats, "_has_sacrebleu", lambda: False)
    rng = np.random.default_rng(5)
    result = diversity_ratio_intervals(zipf_texts(rng, 8), zipf_texts(rng, 8))
    assert "self_bleu4" not in result and "distinct_2" in result


def test_diversity_intervals_are_fast_and_deterministic():
    rng = np.random.default_rng(6)
    base, new = zipf_texts(rng, 64, 100), zipf_texts(rng, 64, 100)
    first = diversity_ratio_intervals(base, new)
    assert diversity_ratio_intervals(base, new) == first
    best = min(_seconds(lambda: diversity_ratio_intervals(base, new)) for _ in range(3))
    assert best < 1.0, f"64 generations of ~100 words took {best * 1000:.0f} ms"
    looping = looping_texts(rng, 64, 100)  # long runs of one n-gram: the most clipping levels
    assert _seconds(lambda: diversity_ratio_intervals(looping, looping)) < 1.0


def test_diversity_intervals_check_their_input():
    with pytest.raises(ValueError, match="same prompts"):
        diversity_ratio_intervals(["a"] * 5, ["a"] * 6)
    with pytest.raises(ValueError, match="at least 3"):
        diversity_ratio_intervals(["a", "b"], ["a", "b"])


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_module_example_holds():
    import doctest

    text = stats.__doc__.replace("```python", "").replace("```", "")  # markdown fences are not doctest output
    test = doctest.DocTestParser().get_doctest(text, {}, "collapse_guard.stats", None, 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
