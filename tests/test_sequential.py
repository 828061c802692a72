"""Sequential verdicts (issue 24): a measurement scores half the held-out documents, looks, and scores the
rest only when the half cannot show that the perplexity rules stay quiet. The parts add up exactly, the
first look decides only "ok" and never where the whole set warns, and a Trainer run writes partial entries
whose estimate and verdict follow from the half they scored."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collapse_guard.callbacks import CollapseGuardCallback, GuardConfig
from collapse_guard.detector import CollapseDetector
from collapse_guard.history import FILENAME
from collapse_guard.io import read_json
from collapse_guard.metrics.perplexity import HeldoutPerplexity
from collapse_guard.probe import Probe, ProbeConfig
from collapse_guard.testing import human_like_sentences, launch_two_processes, tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_disjoint_parts_add_up_to_the_whole_set_exactly(tokenizer):
    texts = human_like_sentences(13, seed=3)
    model = tiny_causal_lm(tokenizer, seed=1)
    evaluator = HeldoutPerplexity(texts, tokenizer, context_length=16, max_batch_tokens=64, signals=True)
    whole = evaluator.compute(model)
    half = [0, 2, 3, 7, 11, 12]
    first = evaluator.compute(model, documents=half)
    assert [t > 0 for t in first.document_tokens] == [d in half for d in range(13)]
    assert first.n_tokens == sum(whole.document_tokens[d] for d in half)
    rest = evaluator.compute(model, documents=[d for d in range(13) if d not in half])
    both = evaluator.combine(model, first, rest)
    assert both.document_nll == pytest.approx(whole.document_nll, rel=1e-12)
    assert both.document_tokens == whole.document_tokens
    assert both.perplexity == pytest.approx(whole.perplexity, rel=1e-12)
    assert both.signals == pytest.approx(whole.signals, rel=1e-12)  # the early signals too
    with pytest.raises(ValueError, match="scored in both parts"):
        evaluator.combine(model, first, first)
    with pytest.raises(ValueError, match=r"documents must be indices in \[0, 13\), got \[13\]"):
        evaluator.compute(model, documents=[13])


def _entries(seed: int, shift: float, noise: float, n: int = 32, outlier: float = 0.0):
    """A baseline and a later measurement of n documents whose log-ppl moves by `shift` plus N(0, noise),
    one random document by `outlier` more."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(30, 300, n)
    rate = rng.normal(3.0, 0.4, n)
    moved = rate + shift + rng.normal(0.0, noise, n)
    moved[rng.integers(0, n)] += outlier
    entries = []
    for values in (rate, moved):
        nll = values * tokens
        entries.append({"round": 0, "step": len(entries) * 10, "heldout_doc_nll": nll.tolist(),
                        "heldout_ppl": math.exp(nll.sum() / tokens.sum()),
                        "heldout_doc_tokens": tokens.tolist()})
    return entries


def _first_look(entry: dict, scored: list[int]) -> dict:
    """What the probe's first look gives: the scored documents' sums, 0 elsewhere."""
    nll = [v if d in scored else 0.0 for d, v in enumerate(entry["heldout_doc_nll"])]
    tokens = [v if d in scored else 0 for d, v in enumerate(entry["heldout_doc_tokens"])]
    return {"round": entry["round"], "step": entry["step"], "heldout_ppl": math.exp(sum(nll) / sum(tokens)),
            "heldout_doc_nll": nll, "heldout_doc_tokens": tokens, "heldout_doc_index": scored}


@pytest.mark.parametrize("shift, decided, level", [
    (0.0, True, "ok"),       # far below the 5% warning: the half decides
    (-0.05, True, "ok"),     # improving
    (0.045, False, "ok"),    # just below: the half cannot tell, the whole set decides
    (0.06, False, "warn"),   # just above
    (0.3, False, "alarm"),   # far above: an alarm always rests on the whole set
])
def test_first_look_decides_only_clear_oks(shift, decided, level):
    base, latest = _entries(0, shift, noise=0.01)
    detector = CollapseDetector()
    scored = sorted(random.Random(0).sample(range(32), 16))
    assert detector.held_out_decided([base], _first_look(latest, scored)) is decided
    assert detector.check([base, latest]).evidence["heldout_ppl"]["level"] == level


@settings(max_examples=300, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), shift=st.floats(-0.05, 0.1), noise=st.floats(0.0, 0.3),
       outlier=st.sampled_from([0.0, 0.5, 3.0]), n=st.integers(20, 64))
def test_first_look_never_says_ok_where_the_whole_set_warns(seed, shift, noise, outlier, n):
    base, latest = _entries(seed, shift, noise, n, outlier)
    scored = sorted(random.Random(seed).sample(range(n), (n + 1) // 2))
    detector = CollapseDetector()
    if detector.held_out_decided([base, base], _first_look(latest, scored)):
        whole = detector.check([base, latest])
        assert whole.evidence["heldout_ppl"]["level"] == "ok"
        assert "heldout_ppl_rises" not in whole.evidence


def test_first_look_waits_when_the_trend_rule_could_fire():
    """Two rises of 1.5% in a row warn (the trend rule) although the ratio to the baseline is under 5%: a
    first look that sees the second rise must not decide; one that follows a step without a rise may."""
    base, prev = _entries(2, 0.015, noise=0.001, n=64)
    rate = np.array(prev["heldout_doc_nll"]) / np.array(prev["heldout_doc_tokens"])
    latest = dict(prev, step=20, heldout_doc_nll=((rate + 0.015) * prev["heldout_doc_tokens"]).tolist())
    latest["heldout_ppl"] = math.exp(sum(latest["heldout_doc_nll"]) / sum(latest["heldout_doc_tokens"]))
    detector = CollapseDetector()
    assert detector.check([base, prev, latest]).level == "warn"
    assert "heldout_ppl_rises" in detector.check([base, prev, latest]).evidence
    scored = sorted(random.Random(2).sample(range(64), 32))
    assert not detector.held_out_decided([base, prev], _first_look(latest, scored))
    assert detector.held_out_decided([base, base], _first_look(prev, scored))  # no earlier rise: decided


def test_partial_entries_are_judged_on_the_documents_they_scored():
    base, latest = _entries(1, 0.0, noise=0.01)
    scored = sorted(random.Random(1).sample(range(32), 16))
    partial = {**_first_look(latest, scored)}
    partial["heldout_ppl_scored"], partial["heldout_ppl"] = partial["heldout_ppl"], latest["heldout_ppl"]
    evidence = CollapseDetector().check([base, partial]).evidence["heldout_ppl"]
    assert evidence["n"] == 16 and "sequential: the 16 of 32 documents both scored" in evidence["method"]
    assert evidence["level"] == "ok"
    # a later whole-set measurement is compared with it on the half they share (the trend rule)
    assert CollapseDetector().check([base, partial, latest]).level == "ok"


def _train_under_guard(tokenizer, tmp_path, heldout: list[str]) -> CollapseGuardCallback:
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = tiny_causal_lm(tokenizer, seed=0)
    data = Dataset.from_dict({"text": human_like_sentences(64, seed=5)}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    args = TrainingArguments(str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-5,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    guard = CollapseGuardCallback(heldout, probe=ProbeConfig(context_length=64),
                                  config=GuardConfig(eval_steps=4, cost_budget=None))
    guard.attach(trainer)
    trainer.train()
    return guard


def test_too_few_documents_for_a_first_look_say_so_and_score_the_whole_set(tokenizer, tmp_path, caplog):
    """12 documents: a first look at 6 could never decide (intervals need DetectorConfig.min_items = 10), so
    the guard says so once and scores every document, rather than scoring 6 and then 6 more."""
    caplog.set_level("INFO", logger="collapse_guard.callbacks")
    guard = _train_under_guard(tokenizer, tmp_path, human_like_sentences(12, seed=11))
    entries = read_json(tmp_path / FILENAME)["entries"]
    assert [e["step"] for e in entries] == [0, 4, 8]
    assert not any("heldout_doc_index" in e for e in entries) and not guard.budget.sequential
    said = [r.message for r in caplog.records if "sequential measurements are off" in r.message]
    assert len(said) == 1 and "would hold 6 documents and its interval needs 10" in said[0]


def test_guard_scores_half_between_first_and_final_and_estimates_the_whole(tokenizer, tmp_path, monkeypatch):
    scored = []
    compute = HeldoutPerplexity.compute
    monkeypatch.setattr(HeldoutPerplexity, "compute", lambda self, m, documents=None: scored.append(
        documents) or compute(self, m, documents))
    guard = _train_under_guard(tokenizer, tmp_path, human_like_sentences(32, seed=11))
    entries = read_json(tmp_path / FILENAME)["entries"]
    assert [(e["step"], "heldout_doc_index" in e) for e in entries] == [(0, False), (4, True), (8, False)]
    base, partial, final = entries
    half = guard.probe.first_look_documents()
    assert partial["heldout_doc_index"] == half and len(half) == 16
    assert all((t > 0) == (d in half) for d, t in enumerate(partial["heldout_doc_tokens"]))
    assert "heldout_entropy" not in partial and "heldout_entropy" in final  # whole-set signals only
    # the estimate: the baseline's whole-set ppl times the paired ratio on the half
    base_half = (sum(base["heldout_doc_nll"][d] for d in half)
                 / sum(base["heldout_doc_tokens"][d] for d in half))
    shift = partial["heldout_nll"] / partial["heldout_tokens"] - base_half
    assert partial["heldout_ppl"] == pytest.approx(base["heldout_ppl"] * math.exp(shift), rel=1e-9)
    assert partial["heldout_ppl_scored"] == pytest.approx(
        math.exp(partial["heldout_nll"] / partial["heldout_tokens"]), rel=1e-9)
    assert partial["level"] == "ok" and partial["heldout_ppl_ratio"] == pytest.approx(
        partial["heldout_ppl"] / base["heldout_ppl"], rel=1e-6)
    assert scored == [None, half, None]  # the model at step 4 scored only its half


def test_a_diverged_model_alarms_on_the_first_look(tokenizer):
    texts = human_like_sentences(24, seed=2)
    model = tiny_causal_lm(tokenizer, seed=0)
    probe = Probe(texts, tokenizer, ProbeConfig(context_length=64))
    looked = []
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    signals = probe.measure(model, generations=False, first_look=lambda partial: looked.append(1) or False)
    assert signals["diverged"].startswith("model diverged") and looked == []  # NaN decides without a look
    assert signals["heldout_doc_index"] == probe.first_look_documents()


def test_sequential_settings_are_validated():
    with pytest.raises(ValueError, match=r"sequential_confidence must be in \[0.5, 1\), e.g. 0.999, got 1.0"):
        GuardConfig(sequential_confidence=1.0)
    with pytest.raises(TypeError, match="GuardConfig.sequential must be True or False, got 'yes'"):
        GuardConfig(sequential="yes")
    with pytest.raises(ValueError, match=r"ProbeConfig.sampler must be one of .*got 'gumbel'"):
        ProbeConfig(sampler="gumbel")


@pytest.mark.distributed
def test_two_processes_take_the_same_first_looks_and_score_the_half_as_one(tmp_path):
    """torchrun, 2 ranks, gloo: the in-training measurements stop at the first look on both ranks alike
    (same documents, sums, estimate, verdict), and the half's all-reduced per-document sums equal one
    process scoring the same half."""
    import json
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "sequential_dist.py"
    done = launch_two_processes(script, tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["world_size"] == 2
    history = ranks[0]["history"]
    assert [(e["step"], e["heldout_doc_index"] is not None) for e in history] == [
        (0, False), (2, True), (4, True), (6, False)]
    assert all(e["heldout_doc_index"] == ranks[0]["first_look"] for e in history[1:3])
    nll, tokens = ranks[0]["two_processes"]
    alone_nll, alone_tokens = json.loads((tmp_path / "single.json").read_text())
    assert tokens == alone_tokens and sum(t > 0 for t in tokens) == len(ranks[0]["first_look"]) == 13
    assert nll == pytest.approx(alone_nll, rel=1e-9)
