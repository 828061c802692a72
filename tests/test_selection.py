"""Selectors: each keeps what it should, drops what it should with the reason, and refuses bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from collapse_guard.data import prompts_and_responses
from collapse_guard.selection import (
    ContaminationFilter,
    DedupSelector,
    PerplexitySelector,
    PrivacyFilter,
    RewardModelSelector,
    SelectionPipeline,
    Selector,
    VerifierSelector,
    breakdown_point,
    exact_answer_match,
    numeric_match,
    regex_format,
)
from collapse_guard.selection.verifier import extract_answer
from collapse_guard.testing import (
    degenerate_sentences,
    human_like_sentences,
    tiny_causal_lm,
    tiny_reward_model,
    tiny_text_datasets,
)

REPO = Path(__file__).resolve().parents[1]


class Length(Selector):
    """Score = response length in characters."""

    def score(self, batch):
        return [len(r) for r in self.texts(batch)]


def chat(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


# ----- base: policies, formats, report, sink ----------------------------------------------------------
def test_threshold_adds_score_column_and_counts_reasons():
    data = Dataset.from_dict({"text": ["a", "abc", "abcdef", "ab"]})
    selector = Length(threshold=3, batch_size=3)
    kept = selector(data)
    assert kept["text"][:] == ["abc", "abcdef"]
    assert kept["length_score"][:] == [3.0, 6.0]
    assert selector.report["input"] == 4 and selector.report["kept"] == 2
    assert selector.report["reasons"] == {"below_threshold": 2}


def test_top_k_top_fraction_and_lower_is_better():
    data = Dataset.from_dict({"text": ["aaaa", "a", "aaa", "aa"]})
    assert Length(top_k=2)(data)["text"][:] == ["aaaa", "aaa"]
    selector = Length(top_fraction=0.25)
    assert selector(data)["text"][:] == ["aaaa"]
    assert selector.report["reasons"] == {"not_top_fraction": 3}
    assert Length(top_k=1, higher_is_better=False)(data)["text"][:] == ["a"]


def test_best_of_n_per_prompt_group_in_every_format():
    rows = [("q1", "x"), ("q1", "xxx"), ("q2", "yy"), ("q2", "y"), ("q1", "xx")]
    formats = {
        "messages": Dataset.from_dict({"messages": [chat(q, a) for q, a in rows]}),
        "prompt_completion": Dataset.from_dict({"prompt": [q for q, _ in rows],
                                                "completion": [a for _, a in rows]}),
    }
    for data in formats.values():
        selector = Length(best_of_n=1)
        kept = selector(data)
        _, responses = prompts_and_responses(kept[:])
        assert sorted(responses) == ["xxx", "yy"]
        assert selector.report["reasons"] == {"not_best_of_n": 3}
    grouped = Dataset.from_dict({"text": [a for _, a in rows], "group": [q for q, _ in rows]})
    assert sorted(Length(best_of_n=2, group_column="group")(grouped)["text"][:]) == ["xx", "xxx", "y", "yy"]


def test_prompts_and_responses_reads_last_assistant_turn():
    batch = {"messages": [[{"role": "system", "content": "Be brief."}, *chat("Hi?", "Hello."),
                           {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Bye."}]]}
    prompts, responses = prompts_and_responses(batch)
    assert responses == ["Bye."] and prompts[0].startswith("Be brief.") and prompts[0].endswith("Bye?")
    assert prompts_and_responses({"text": ["Plain."]}) == ([""], ["Plain."])


def test_rejects_sink_and_pipeline_report(tmp_path):
    texts = ["Same answer.", "same answer!", "Call me at 555-123-4567.", "A unique answer here.", "x"]
    pipeline = SelectionPipeline(
        [DedupSelector(), PrivacyFilter(), Length(threshold=2, name="length")],
        rejects_path=tmp_path / "rejects.jsonl",
    )
    kept = pipeline(texts)
    assert kept["text"][:] == ["Same answer.", "A unique answer here."]
    report = pipeline.report
    assert (report["input"], report["kept"], report["dropped"]) == (5, 2, 3)
    assert [s["reasons"] for s in report["steps"]] == [
        {"exact_duplicate": 1}, {"pii:phone": 1}, {"below_threshold": 1}]
    assert [s["input"] for s in report["steps"]] == [5, 4, 3]
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["text"], r["reject_reason"], r["rejected_by"]) for r in rejects] == [
        ("same answer!", "exact_duplicate", "dedup"),
        ("Call me at 555-123-4567.", "pii:phone", "privacy"),
        ("x", "below_threshold", "length"),
    ]
    pipeline.write_report(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["steps"][1]["name"] == "privacy"
    assert sorted(os.listdir(tmp_path)) == ["rejects.jsonl", "report.json"]  # no temp files left


def test_single_selector_rejects_path(tmp_path):
    selector = PrivacyFilter(rejects_path=tmp_path / "r.jsonl")
    selector(Dataset.from_dict({"text": ["ok", "mail ann@example.com"], "id": [1, 2]}))
    (row,) = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert row == {"text": "mail ann@example.com", "id": 2, "reject_reason": "pii:email",
                   "rejected_by": "privacy"}


class Boom(Selector):
    def score(self, batch):
        raise AssertionError("scoring must not start on bad input")


@pytest.mark.parametrize(
    ("make", "data", "error", "match"),
    [
        (lambda: Boom(threshold=0.0), Dataset.from_dict({"text": []}), ValueError, "empty"),
        (lambda: Boom(threshold=0.0), Dataset.from_dict({"content": ["x"]}), ValueError,
         "'messages'.*'text'"),
        (lambda: Boom(best_of_n=1, group_column="question"), Dataset.from_dict({"text": ["x"]}), ValueError,
         r"lacks column\(s\) \['question'\]"),
        (lambda: VerifierSelector(exact_answer_match()), Dataset.from_dict({"text": ["5"]}), ValueError,
         r"lacks column\(s\) \['answer'\]"),
        (lambda: Boom(), Dataset.from_dict({"text": ["x"]}), ValueError, "no keep rule"),
        (lambda: Boom(threshold=0.0), "just a string", TypeError, "datasets.Dataset"),
    ],
)
def test_bad_input_fails_before_scoring(make, data, error, match):
    with pytest.raises(error, match=match):
        make()(data)


def test_bad_policy_values_name_field_and_value():
    with pytest.raises(TypeError, match=r"threshold must be a number, got '0\.5' \(str\)"):
        Length(threshold="0.5")
    with pytest.raises(ValueError, match="top_fraction must be a number in"):
        Length(top_fraction=1.5)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        Length(top_k=0)

    class Both(Selector):
        def score(self, batch):
            return []

        def keep(self, batch):
            return []

    with pytest.raises(TypeError, match="exactly one of score"):
        Both()


# ----- reward model ------------------------------------------------------------------------------------
def _naive_rewards(model, tok, texts):
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                for t in texts]


def test_reward_model_batched_sorted_matches_one_by_one(tokenizer):
    model = tiny_reward_model(tokenizer)
    data = Dataset.from_dict({"messages": [chat(f"Question {i}?",
                                                " ".join(human_like_sentences(1 + i % 4, seed=i)))
                                           for i in range(13)]})
    selector = RewardModelSelector(model, tokenizer, top_k=4, batch_size=8, forward_batch_size=3)
    formatted = selector.format(data[:])
    assert formatted[0].startswith("<|im_start|>user\nQuestion 0?")  # the reward model's chat template
    expected = _naive_rewards(model, tokenizer, formatted)
    kept = selector(data)
    best = sorted(range(13), key=lambda i: -expected[i])[:4]
    assert kept["reward_model_score"][:] == pytest.approx([expected[i] for i in sorted(best)], abs=1e-4)
    assert selector.report["reasons"] == {"not_top_k": 9}


def test_reward_model_refuses_models_without_a_reward_head(tokenizer):
    with pytest.raises(TypeError, match="LlamaForCausalLM.*no sequence-classification"):
        RewardModelSelector(tiny_causal_lm(tokenizer), tokenizer, threshold=0.0)
    model = tiny_reward_model(tokenizer)
    model.config.num_labels = 2
    with pytest.raises(ValueError, match="num_labels=2; pass label_index"):
        RewardModelSelector(model, tokenizer, threshold=0.0)
    assert RewardModelSelector(model, tokenizer, threshold=0.0, label_index=1).label_index == 1


def test_reward_model_from_path_and_prompt_completion(tmp_path, tokenizer):
    tiny_reward_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    selector = RewardModelSelector(str(tmp_path), threshold=-1e9)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Hi?"}],
                                         [{"role": "user", "content": "Yo?"}]],
                              "completion": [[{"role": "assistant", "content": "Hello."}],
                                             [{"role": "assistant", "content": "Hey there."}]]})
    assert selector.format(data[:])[1] == (
        "<|im_start|>user\nYo?<|im_end|>\n<|im_start|>assistant\nHey there.<|im_end|>\n")
    assert len(selector(data)) == 2 and selector.report["reasons"] == {}


@pytest.mark.distributed
def test_reward_model_data_parallel_two_processes(tmp_path, tokenizer):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(REPO / "tests/scripts/selection_reward_ddp.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank returns the same scores and keeps the same rows
    texts = [" ".join(human_like_sentences(1 + i % 4, seed=i)) for i in range(37)]
    torch.manual_seed(0)
    single = RewardModelSelector(tiny_reward_model(tokenizer), tokenizer, threshold=0.0)
    assert ranks[0]["scores"] == pytest.approx(single.score({"text": texts}), abs=1e-4)
    assert ranks[0]["report"]["kept"] == 5


# ----- verifier ------------------------------------------------------------------------------------------
def test_answer_extraction_and_builtin_verifiers():
    assert extract_answer("so 2+3 = \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_answer("First 12, then 1,234.") == "1,234"
    completions = ["The answer is 1,234.", "It is \\boxed{42}", "I think 41.", "no number", "about 3.14159"]
    answers = ["1234", "42", "42", "7", "3.1416"]
    assert exact_answer_match()(completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert numeric_match(rel_tol=1e-4)(completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0]
    conversational = [[{"role": "assistant", "content": "= 5"}]]
    assert exact_answer_match()(conversational, answer=["5"]) == [1.0]
    assert regex_format(r"answer is \d")(completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert regex_format(r"The answer is [\d,]+\.", full_match=True)(completions[:1]) == [1.0]


def _arithmetic():
    rows = []
    for a, b in [(2, 3), (7, 5), (10, 4), (6, 6)]:
        right, wrong = a + b, a + b + 1
        q = f"What is {a} + {b}?"
        rows += [(q, f"The answer is {right}.", str(right)), (q, f"{a} + {b} = {wrong}", str(right)),
                 (q, f"The answer is {wrong}.", str(right)), (q, f"The answer is {wrong + 1}.", str(right))]
    return Dataset.from_dict({"messages": [chat(q, c) for q, c, _ in rows], "answer": [a for *_, a in rows]})


def test_verifier_keeps_correct_and_reports_phi_psi_pstar():
    data = _arithmetic()
    correct = exact_answer_match()([[m[-1]] for m in data["messages"]], answer=data["answer"])
    data = data.add_column("correct", correct)
    selector = VerifierSelector(exact_answer_match())
    kept = selector(data)
    assert all(kept["correct"]) and len(kept) == 4
    r = selector.report
    assert r["reasons"] == {"verifier_rejected": 12}
    assert (r["phi"], r["psi"], r["breakdown_point"], r["correct_share_kept"]) == (1.0, 0.0, 1.0, 1.0)
    assert r["error_rate"] == pytest.approx(0.75)


def test_weak_verifier_warns_when_error_rate_exceeds_breakdown_point():
    data = _arithmetic()
    oracle = exact_answer_match()
    # format-only check: keeps "The answer is N." whether N is right or wrong
    selector = VerifierSelector(regex_format(r"The answer is \d+\."), oracle=oracle)
    with pytest.warns(UserWarning, match="above the verifier's breakdown point"):
        selector(data)
    r = selector.report
    assert r["phi"] == 1.0 and r["psi"] == pytest.approx(2 / 3)
    assert r["breakdown_point"] == pytest.approx(breakdown_point(1.0, 2 / 3)) == pytest.approx(0.6)
    assert r["error_rate"] == pytest.approx(0.75) and r["correct_share_kept"] == pytest.approx(1 / 3)


def test_verifier_weights_none_scores_and_batch_filter():
    def only_long(completions, **kwargs):
        return [None if len(c) < 6 else float("x" in c) for c in completions]

    selector = VerifierSelector([only_long, regex_format("x")], weights=[1.0, 1.0], threshold=1.0,
                                label_column=None)
    kept = selector(Dataset.from_dict({"text": ["x", "xxxxxxxx", "yyyyyyyy", "y"]}))
    assert kept["text"][:] == ["x", "xxxxxxxx"]
    assert selector.report["reasons"] == {"verifier_rejected": 2}
    batch_filter = VerifierSelector(regex_format(r"\d"), label_column=None).as_batch_filter()
    assert batch_filter(["has 1 digit", "none"]) == [None, "verifier_rejected"]


def test_verifier_rejects_wrong_signature():
    with pytest.raises(TypeError, match="completions"):
        VerifierSelector(lambda texts: [1.0])


# ----- perplexity -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_lm():
    """A tiny LM trained briefly on human-like sentences plus one repeated sentence (learnt by heart)."""
    from collapse_guard.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok)
    texts = human_like_sentences(256, seed=7) + degenerate_sentences(64)
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(texts), (32,), generator=g)
        out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx],
                    labels=labels[idx])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


def test_perplexity_selector_drops_degenerate_and_garbage(trained_lm):
    model, tok = trained_lm
    selector = PerplexitySelector(model, tok, human_texts=human_like_sentences(200, seed=11))
    human = human_like_sentences(16, seed=12)
    garbage = ["zq xv 9#@ lkj ;;pw qqqq ~~ xzv", "@@@ ### $$$ %%% ^^^ zzk qpx"]
    data = Dataset.from_dict({"text": human + degenerate_sentences(3) + garbage})
    kept = selector(data)
    reasons = {r["text"]: r["reject_reason"] for r in selector.last_rejects}
    assert reasons[degenerate_sentences(1)[0]] == "low_perplexity"
    assert [reasons[g] for g in garbage] == ["high_perplexity"] * 2
    assert set(kept["text"][:]) <= set(human) and len(kept) >= 12  # ~95% of human-like text stays
    low, high = selector.report["low_bound"], selector.report["high_bound"]
    assert 1 < low < high and all(low <= p <= high for p in kept["perplexity_score"][:])
    assert selector.report["reasons"]["low_perplexity"] >= 3


def test_perplexity_selector_with_precomputed_bounds_and_bad_args(tokenizer):
    model = tiny_causal_lm(tokenizer)
    with pytest.raises(ValueError, match="exactly one of human_texts"):
        PerplexitySelector(model, tokenizer)
    with pytest.raises(ValueError, match="low_percentile=50 must be below high_percentile=10"):
        PerplexitySelector(model, tokenizer, human_perplexities=[1.0], low_percentile=50, high_percentile=10)
    selector = PerplexitySelector(model, tokenizer, human_perplexities=[10.0, 20.0, 30.0], low_percentile=0,
                                  high_percentile=100)
    assert selector.bounds == (10.0, 30.0)
    ppl = selector.score({"text": ["The river crossed the valley."]})[0]
    assert math.isfinite(ppl) and ppl > 1


# ----- dedup and contamination -------------------------------------------------------------------------
def test_dedup_exact_near_and_against_real():
    real = ["The old bridge watched the quiet harbour with great care on a cold winter morning near the sea."]
    base = "A farmer carried three red apples to the market before the rain came down over the valley today"
    texts = [
        base,
        base.upper() + "!!",  # exact after normalization
        base.replace("today", "again"),  # one word of 18 changed: near duplicate
        "The old bridge watched the quiet harbour with great care on a cold winter morning near the sea",
        "The old bridge watched the quiet harbour with great care on a cold winter morning near the lake.",
        "Seven blue stones lay in the empty field during the festival.",
    ]
    selector = DedupSelector(real_texts=real, threshold=0.7)
    kept = selector(Dataset.from_dict({"text": texts}))
    assert kept["text"][:] == [texts[0], texts[5]]
    assert [r["reject_reason"] for r in selector.last_rejects] == [
        "exact_duplicate", "near_duplicate", "duplicate_of_real", "near_duplicate_of_real"]
    assert len(DedupSelector(near=False)(Dataset.from_dict({"text": texts}))) == 5


def test_vectorized_minhash_estimates_jaccard_as_datasketch_sketches():
    import random

    from collapse_guard.selection.dedup import ShingleMinHasher

    hasher = ShingleMinHasher(num_perm=256, shingle_size=3)
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(300)]
    for edits in (0, 3, 10, 30):
        a = rng.choices(vocab, k=60)
        b = list(a)
        for _ in range(edits):
            b[rng.randrange(60)] = rng.choice(vocab)
        sa, sb = ({tuple(x[i : i + 3]) for i in range(58)} for x in (a, b))
        ma, mb = hasher.minhashes([a, b])
        assert ma.jaccard(mb) == pytest.approx(len(sa & sb) / len(sa | sb), abs=0.1)
    short, same, empty = hasher.minhashes([["x"], ["x"], []])
    assert short.jaccard(same) == 1.0 and short.jaccard(empty) < 0.1


def test_dedup_state_resets_per_call_and_persists_in_batch_filter():
    selector = DedupSelector()
    assert len(selector(["one two three", "one two three"])) == 1
    assert len(selector(["one two three"])) == 1  # a new call starts fresh
    batch_filter = selector.as_batch_filter()
    assert batch_filter(["alpha beta gamma"]) == [None]
    assert batch_filter(["alpha beta gamma", "delta"]) == ["exact_duplicate", None]
    with pytest.raises(ValueError, match="threshold must be a Jaccard"):
        DedupSelector(threshold=80)


def test_contamination_13_gram_overlap():
    heldout = human_like_sentences(4, seed=3)
    benchmark = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                 "in May.")
    selector = ContaminationFilter(eval_texts=[benchmark, *heldout])
    leaked = ("Here is a question: natalia sold clips to 48 of her friends in april and then she sold half. "
              "Solve it.")
    short = heldout[0].lower().rstrip(".")  # shorter than 13 words, identical to a held-out text
    clean = ("Natalia sold clips to friends. Then she sold pencils in May to 48 different people in her "
             "school.")
    kept = selector(Dataset.from_dict({"prompt": ["Q1", "Q2", "Q3"], "completion": [leaked, short, clean]}))
    assert kept["completion"][:] == [clean]
    assert selector.report["reasons"] == {"contamination": 2}
    with pytest.raises(ValueError, match="eval_texts is empty"):
        ContaminationFilter([])


# ----- privacy -------------------------------------------------------------------------------------------
def test_privacy_verbatim_copy_threshold():
    real = [" ".join(human_like_sentences(12, seed=5))]
    words = real[0].split()
    copy_32 = "As I recall: " + " ".join(words[10:42]) + " and so on."
    copy_31 = "As I recall: " + " ".join(words[10:41]) + " and so on."
    selector = PrivacyFilter(real_texts=real)
    kept = selector([copy_32, copy_31])
    assert kept["text"][:] == [copy_31]
    assert selector.report["reasons"] == {"verbatim_copy": 1}
    assert len(PrivacyFilter(real_texts=real, min_copied_words=20)([copy_31])) == 0


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Contact jane.doe+news@mail.example.co.uk for details.", "pii:email"),
        ("Call (555) 123-4567 after six.", "pii:phone"),
        ("Ring +44 20 7946 0958 tomorrow.", "pii:phone"),
        ("Card: 4111 1111 1111 1111, exp 12/27.", "pii:credit_card"),
        ("export OPENAI_API_KEY=sk-proj-AbCdEf1234567890GhIjKl", "pii:api_key"),
        ("token ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ", "pii:api_key"),
        ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "pii:aws_key"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIE...", "pii:private_key"),
        ("secret=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "pii:secret"),
        ("blob wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY0123456789ab", "pii:secret"),
        ("What is 17 + 25? It is 42. In 2024-05-17 we sold 1,234,567 units.", None),
        ("Card-like but invalid: 4111 1111 1111 1112.", None),
        ("Version 1.2.3 of the library, see section 4.5 on page 123.", None),
    ],
)
def test_privacy_pii_patterns(text, reason):
    selector = PrivacyFilter()
    selector([text])
    assert selector.last_rejects[0]["reject_reason"] == reason if reason else not selector.last_rejects


# ----- selection inside training: the MixingCollator's synthetic filter ---------------------------------
def test_mixing_collator_applies_selector_filter_and_holds_floor(tokenizer):
    from collapse_guard.mixing import MixingCollator

    real, _ = tiny_text_datasets(n_real=32)
    clean = [f"The model answered question number {i} politely." for i in range(20)]
    leaky = [f"Write to user{i}@example.com for the answer." for i in range(6)]
    synthetic = [clean[i // 2] if i % 2 == 0 else leaky[i // 2 % 6] for i in range(24)]
    pipeline = SelectionPipeline([PrivacyFilter(), DedupSelector(name="dedup")])
    collator = MixingCollator(real_dataset=real, tokenizer=tokenizer, min_real_fraction=0.5,
                              synthetic_filter=pipeline.as_batch_filter())
    real_ids = {tuple(tokenizer(t + tokenizer.eos_token)["input_ids"]) for t in real["text"]}
    features = [{"input_ids": tokenizer(t + tokenizer.eos_token)["input_ids"]} for t in synthetic]
    served = []
    for start in range(0, 24, 8):
        batch = collator(features[start : start + 8])
        assert batch["input_ids"].shape[0] == 8  # batch size holds
        rows = [[t for t in ids.tolist() if t != tokenizer.pad_token_id] for ids in batch["input_ids"]]
        n_real = sum(tuple(r) in real_ids for r in rows)
        assert n_real >= 4  # the real floor holds
        served += [tokenizer.decode(r, skip_special_tokens=True) for r in rows if tuple(r) not in real_ids]
    metrics = collator.metrics()
    assert metrics["dropped/pii:email"] == 12
    assert not any("@" in s for s in served)
    assert metrics["real_fraction"] >= 0.5


@pytest.mark.slow
def test_select_arithmetic_example_runs_on_smollm2(tmp_path):
    """The worked example end to end (SmolLM2-135M-Instruct, small settings)."""
    cmd = [sys.executable, str(REPO / "examples/select_arithmetic.py"), "--questions", "4", "--samples", "3",
           "--max-new-tokens", "12", "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    exact = summary["exact_answer_match"]
    # the oracle-backed verifier keeps no wrong sample
    assert exact["psi"] in (0.0, None) or math.isnan(exact["psi"])
    assert exact["kept"] == 0 or exact["correct_share_kept"] == 1.0
    assert {"phi", "psi", "breakdown_point"} <= set(summary["majority_vote"])
    assert (tmp_path / "report_exact_answer_match.json").exists()


# ----- math answers: math-verify and the built-in fallback ---------------------------------------------
def test_math_answer_match_builtin_fallback():
    from collapse_guard.selection import math_answer_match

    verify = math_answer_match(backend="builtin")
    completions = [r"It is \boxed{\frac{1}{2}}.", "The probability is 0.5.", "We get $x = 2$.",
                   r"\boxed{\sqrt{8}}", "13"]
    answers = ["0.5", r"50\%", "2", r"2\sqrt{2}", "12"]
    assert verify(completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0]  # square roots need math-verify
    assert verify.backend == "builtin"
    with pytest.raises(ValueError, match="backend='sympy' is unknown"):
        math_answer_match(backend="sympy")


@pytest.mark.skipif(importlib.util.find_spec("math_verify") is None,
                    reason="needs math-verify (collapse-guard[math])")
def test_math_answer_match_uses_math_verify_and_trl_accuracy_reward_plugs_in():
    from trl.rewards import accuracy_reward

    from collapse_guard.selection import math_answer_match

    verify = math_answer_match()
    assert verify.backend == "math_verify"  # the default when installed
    completions = [r"So $\boxed{\sqrt{8}}$", r"$\boxed{\{3, 2, 1\}}$", "The probability is $0.5$.",
                   r"$\boxed{2}$"]
    answers = [r"2\sqrt{2}", r"\{1,2,3\}", r"50\%", r"\sqrt{2}"]
    assert verify(completions, answer=answers) == [1.0, 1.0, 1.0, 0.0]
    data = Dataset.from_dict({"messages": [chat("Solve.", c) for c in completions],
                              "solution": [f"${a}$" for a in answers]})
    selector = VerifierSelector(accuracy_reward, label_column=None)  # TRL's GRPO reward, unchanged
    assert len(selector(data)) == 2 and selector.report["reasons"] == {"verifier_rejected": 2}


def test_latex_answers_example_table(tmp_path):
    out = tmp_path / "table.json"
    cmd = [sys.executable, str(REPO / "examples/verify_latex_answers.py"), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["exact_answer_match"]["equal_pairs_matched"] == 3
    assert summary["math_answer_match[builtin]"]["equal_pairs_matched"] == 7
    assert all(s["unequal_pairs_accepted"] == 0 for s in summary.values())
    if importlib.util.find_spec("math_verify") is not None:
        assert summary["math_answer_match[math_verify]"]["equal_pairs_matched"] == 12
