"""The early-warning signals of the held-out forward (issue 21): predictive entropy, top-1 mass, tail NLL,
worst-decile document NLL and the share of tokens below probability 1e-4. Checked on models whose
distribution we control, against a one-document-at-a-time plain-torch reference, across 2 processes, on a
diverged model, and through the guard (history file and logged metrics), where they must stay observe-only."""

import copy
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from collapse_guard.detector import CollapseDetector, DetectorConfig
from collapse_guard.metrics import HeldoutPerplexity
from collapse_guard.metrics.perplexity import LOW_PROBABILITY, SIGNAL_NAMES, TAIL_SHARE
from collapse_guard.probe import Probe, ProbeConfig
from collapse_guard.signals import SIGNALS, logged_names, names
from collapse_guard.testing import degenerate_sentences, human_like_sentences, tiny_causal_lm

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from ppl_dist import heldout_texts  # noqa: E402

SUMS = ("entropy", "top1_mass", "low_prob_tokens", "tail_nll", "tail_tokens")


def evaluator(tokenizer, stride=None, texts=None) -> HeldoutPerplexity:
    return HeldoutPerplexity(texts or heldout_texts(), tokenizer, context_length=16, stride=stride,
                             max_batch_tokens=64, signals=True)


def sharpen(model, factor: float):
    """Multiplies the model's logits by `factor` with a forward hook on its output head (temperature
    1/factor): the same ranking of tokens, more probability on the top ones."""
    model.get_output_embeddings().register_forward_hook(lambda _m, _args, out: out * factor)
    return model


# ----- a plain-torch reference, one document and one window at a time ----------------------------------
def reference_tail(token_ids: list[list[int]]) -> set[int]:
    counts = Counter(t for ids in token_ids for t in ids)
    total, covered, tail = sum(counts.values()), 0, set()
    for count in sorted(set(counts.values())):  # rarest first, whole ties at a time
        if covered >= TAIL_SHARE * total:
            break
        types = [t for t, c in counts.items() if c == count]
        tail.update(types)
        covered += count * len(types)
    return tail


def reference(model, tokenizer, texts, context_length, stride=None) -> dict[str, list[float]]:
    """Per-document sums from the model's own full logits in float64: log_softmax, entropy -sum p log p,
    max p."""
    token_ids = tokenizer(texts)["input_ids"]
    tail = reference_tail(token_ids)
    out = {name: [] for name in ("nll", "tokens", *SUMS)}
    with torch.no_grad():
        for ids in token_ids:
            doc = dict.fromkeys(out, 0.0)
            prev_end = 0
            for begin in range(0, len(ids), stride or context_length) if len(ids) >= 2 else []:
                end = min(begin + context_length, len(ids))
                first = 1 if stride is None else max(prev_end - begin, 1)  # first window position scored
                if end - begin >= 2:
                    logits = model(input_ids=torch.tensor([ids[begin:end]])).logits[0]
                    logp = torch.log_softmax(logits.double(), -1)
                    for pos in range(first, end - begin):
                        row, target = logp[pos - 1], ids[begin + pos]
                        nll = -float(row[target])
                        doc["nll"] += nll
                        doc["tokens"] += 1
                        doc["entropy"] -= float((row.exp() * row).sum())
                        doc["top1_mass"] += float(row.exp().max())
                        doc["low_prob_tokens"] += float(math.exp(-nll) < LOW_PROBABILITY)
                        doc["tail_nll"] += nll if target in tail else 0.0
                        doc["tail_tokens"] += float(target in tail)
                prev_end = end
                if stride is not None and end == len(ids):
                    break
            for name, value in doc.items():
                out[name].append(value)
    return out


def worst_decile(nll: list[float], tokens: list[float]) -> float:
    docs = sorted(((n / c, n, c) for n, c in zip(nll, tokens, strict=True) if c), reverse=True)
    worst = docs[: math.ceil(0.1 * len(docs))]
    return sum(w[1] for w in worst) / sum(w[2] for w in worst)


# ----- crafted distributions --------------------------------------------------------------------------------
def test_a_model_that_concentrates_its_mass_lowers_entropy_and_raises_top1(tokenizer, tiny_model):
    base = evaluator(tokenizer).compute(tiny_model).signals
    sharp = evaluator(tokenizer).compute(sharpen(copy.deepcopy(tiny_model), 8.0)).signals
    assert set(base) == set(sharp) == set(SIGNAL_NAMES)
    assert sharp["heldout_entropy"] < base["heldout_entropy"] - 0.5
    assert sharp["heldout_top1_mass"] > 10 * base["heldout_top1_mass"]
    # a random model's human text is not its top token: sharpening pushes it into the tail
    assert sharp["heldout_low_prob_share"] > base["heldout_low_prob_share"]
    assert sharp["heldout_tail_nll"] > base["heldout_tail_nll"]
    assert sharp["heldout_worst_decile_nll"] > base["heldout_worst_decile_nll"]
    # a random 512-token model is near uniform: entropy near log(512), top-1 mass near 1/512
    assert base["heldout_entropy"] == pytest.approx(math.log(len(tokenizer)), rel=0.01)


def test_identical_models_give_identical_values(tokenizer, tiny_model):
    ours = evaluator(tokenizer)
    first = ours.compute(tiny_model)
    again = evaluator(tokenizer).compute(copy.deepcopy(tiny_model))
    assert first.signals == again.signals == ours.compute(tiny_model).signals
    assert first.document_sums == again.document_sums
    plain = HeldoutPerplexity(heldout_texts(), tokenizer, context_length=16, max_batch_tokens=64)
    plain = plain.compute(tiny_model)
    # the signals ride on the same pass: the perplexity is the same to the bit, and off by default
    assert plain.signals == {} and plain.document_nll == first.document_nll and plain.nll_sum == first.nll_sum


@pytest.mark.parametrize("stride", [None, 5])
def test_exact_per_document_against_one_document_at_a_time(tokenizer, stride):
    model = sharpen(tiny_causal_lm(tokenizer), 8.0).eval()
    texts = heldout_texts()
    ours = evaluator(tokenizer, stride).compute(model)
    ref = reference(model, tokenizer, texts, 16, stride)
    assert ours.document_tokens == [int(t) for t in ref["tokens"]]
    assert sum(ref["low_prob_tokens"]) > 0 and sum(ref["tail_tokens"]) > 0  # both sums are exercised
    for name in SUMS:
        assert ours.document_sums[name] == pytest.approx(ref[name], rel=1e-6, abs=1e-9), name
    n = sum(ref["tokens"])
    expected = {
        "heldout_entropy": sum(ref["entropy"]) / n,
        "heldout_top1_mass": sum(ref["top1_mass"]) / n,
        "heldout_tail_nll": sum(ref["tail_nll"]) / sum(ref["tail_tokens"]),
        "heldout_worst_decile_nll": worst_decile(ref["nll"], ref["tokens"]),
        "heldout_low_prob_share": sum(ref["low_prob_tokens"]) / n,
    }
    assert ours.signals == pytest.approx(expected, rel=1e-6)


def test_in_chunk_scores_match_float64_and_keep_the_nll_bit_for_bit():
    """The chunk kernel on logits the size of a real vocabulary, with tokens a model rules out (-inf)."""
    from collapse_guard.metrics import perplexity

    torch.manual_seed(0)
    logits = torch.randn(37, 49152) * 4
    logits[:5, :1000] = -math.inf  # ruled out: probability 0, entropy term 0 (not 0 * -inf = NaN)
    targets = torch.randint(1000, 49152, (37,))
    nll, entropy, top1 = perplexity._scores_in_place(logits.clone(), targets, signals=True)
    assert torch.equal(nll, perplexity._nll_in_place(logits.clone(), targets))
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    expected_entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(1)
    assert torch.allclose(entropy.double(), expected_entropy, rtol=1e-6, atol=0)
    assert torch.allclose(top1.double(), p.max(1).values, rtol=1e-6, atol=0)
    nan_row = torch.full((2, 64), math.nan)
    assert all(v.isnan().all() for v in perplexity._scores_in_place(nan_row, torch.zeros(2, dtype=torch.long),
                                                                     signals=True))


def test_tail_is_fixed_at_construction_from_the_heldout_set(tokenizer):
    ours = evaluator(tokenizer)
    token_ids = tokenizer(heldout_texts())["input_ids"]
    assert set(torch.nonzero(ours.tail_tokens).flatten().tolist()) == reference_tail(token_ids)
    counts = Counter(t for ids in token_ids for t in ids)
    share = sum(counts[t] for t in reference_tail(token_ids)) / sum(counts.values())
    assert TAIL_SHARE <= share < 0.5


# ----- all-reduce ------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_two_processes_give_the_single_process_values(tmp_path, tokenizer, tiny_model):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(SCRIPTS / "early_signals_dist.py"), str(tmp_path)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPTS)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0 == rank1 and rank0["world_size"] == 2  # every rank the same answer, bit for bit
    for name, stride in (("blocks", None), ("stride", 5)):
        single = evaluator(tokenizer, stride).compute(tiny_model)
        got = rank0[name]
        assert got["document_tokens"] == single.document_tokens
        assert got["signals"] == pytest.approx(single.signals, rel=1e-6)
        for key in SUMS:
            assert got["document_sums"][key] == pytest.approx(single.document_sums[key], rel=1e-6, abs=1e-9)


# ----- a diverged model -------------------------------------------------------------------------------------
def test_a_nan_model_keeps_the_diverged_path_and_its_signals_are_nan(tokenizer, tiny_model):
    probe = Probe(human_like_sentences(12, seed=99), tokenizer, ProbeConfig(context_length=64))
    healthy = {"round": 0, "step": 0, **probe.measure(tiny_model)}
    assert all(math.isfinite(healthy[name]) for name in SIGNAL_NAMES)
    with torch.no_grad():
        for name, p in tiny_model.named_parameters():
            if "layers.1." in name:
                p.fill_(math.nan)
    result = evaluator(tokenizer).compute(tiny_model)
    assert result.diverged.startswith("model diverged: held-out perplexity is nan (non-finite weights in ")
    assert set(result.signals) == set(SIGNAL_NAMES) and all(math.isnan(v) for v in result.signals.values())
    measured = probe.measure(tiny_model)
    assert measured["diverged"].startswith("model diverged: held-out perplexity is nan")
    assert all(math.isnan(measured[name]) for name in SIGNAL_NAMES)
    verdict = CollapseDetector().check([healthy, {"round": 1, "step": 0, **measured}])
    assert verdict.level == "alarm" and verdict.reasons[0] == measured["diverged"]


# ----- observe-only, through the guard ----------------------------------------------------------------------
def test_registered_logged_and_never_judged_by_default():
    assert names(panel="early") == (*SIGNAL_NAMES, "train_copy_gain")  # the held-out ones, then copying
    config = DetectorConfig()
    for name in names(panel="early"):
        assert SIGNALS[name].rule is None and not SIGNALS[name].nonfinite_alarm and name in logged_names()
        assert name not in config.diversity_signals and name not in config.nonfinite_alarm_signals
    # an entropy collapse alone, with a steady perplexity, raises nothing (thresholds come from healthy noise)
    entry = {"heldout_ppl": 20.0, "heldout_entropy": 3.0, "heldout_top1_mass": 0.1, "heldout_tail_nll": 6.0,
             "heldout_worst_decile_nll": 4.0, "heldout_low_prob_share": 0.01}
    later = {**entry, "heldout_entropy": 0.3, "heldout_top1_mass": 0.9, "heldout_tail_nll": math.nan,
             "heldout_worst_decile_nll": 40.0, "heldout_low_prob_share": 0.5}
    verdict = CollapseDetector().check([{"round": 0, "step": 0, **entry}, {"round": 1, "step": 0, **later}])
    assert verdict.level == "ok" and verdict.reasons == []


def test_guard_writes_them_to_the_history_and_logs_them(tokenizer, tiny_model, tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from collapse_guard.callbacks import CollapseGuardCallback, GuardConfig
    from collapse_guard.history import FILENAME
    from collapse_guard.io import read_json

    class Recorder(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    recorder = Recorder()
    data = Dataset.from_dict({"text": degenerate_sentences(128)}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    args = TrainingArguments(str(tmp_path), max_steps=10, per_device_train_batch_size=8, learning_rate=1e-2,
                             lr_scheduler_type="constant", use_cpu=True, report_to=[], logging_steps=5,
                             save_strategy="no", disable_tqdm=True, seed=0)
    trainer = Trainer(model=tiny_model, args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[recorder])
    guard = CollapseGuardCallback(human_like_sentences(24, seed=99), probe=ProbeConfig(context_length=64),
                                  config=GuardConfig(eval_steps=5, cost_budget=None, sequential=False,
                                                     stop_training_on_alarm=False))
    guard.attach(trainer)
    trainer.train()
    entries = read_json(tmp_path / FILENAME)["entries"]
    assert [e["step"] for e in entries] == [0, 5, 10]  # sequential=False: every entry scores every document
    assert all(isinstance(e[name], float) for e in entries for name in SIGNAL_NAMES)
    # training on one repeated sentence concentrates the model's mass: entropy falls, top-1 mass rises
    assert entries[-1]["heldout_entropy"] < entries[0]["heldout_entropy"] - 0.5
    assert entries[-1]["heldout_top1_mass"] > entries[0]["heldout_top1_mass"]
    logged = [log for log in recorder.logs if "collapse/heldout_ppl" in log]
    assert len(logged) == 3 and all(f"collapse/{name}" in log for log in logged for name in SIGNAL_NAMES)
    assert logged[-1]["collapse/heldout_entropy"] == entries[-1]["heldout_entropy"]
    # observe-only: no verdict speaks of them
    assert not any(name in (e.get("evidence") or {}) for e in entries for name in SIGNAL_NAMES)


def test_guard_logs_how_much_its_generations_copy_the_training_rows(tiny_model, tokenizer, tmp_path):
    """train_copy_gain: the generations' word 4-grams found in the training rows, less the baseline's share;
    0 at the baseline, recomputed here from the history's own generations; a copying model moves it up;
    without training_texts it is not logged; bad training_texts are refused before training."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from collapse_guard.callbacks import CollapseGuardCallback, GuardConfig
    from collapse_guard.history import FILENAME
    from collapse_guard.io import read_json
    from collapse_guard.metrics.diversity import copied_share, ngram_set

    rows = human_like_sentences(64, seed=5)
    data = Dataset.from_dict({"text": rows}).map(lambda b: tokenizer(b["text"]), batched=True,
                                                 remove_columns=["text"])
    args = TrainingArguments(str(tmp_path), max_steps=10, per_device_train_batch_size=8, learning_rate=1e-2,
                             lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no",
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=tiny_model, args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    guard = CollapseGuardCallback(human_like_sentences(24, seed=99), prompts=human_like_sentences(16, seed=7),
                                  probe=ProbeConfig(context_length=64, max_new_tokens=16),
                                  config=GuardConfig(eval_steps=5, cost_budget=None,
                                                     stop_training_on_alarm=False),
                                  training_texts=rows)
    guard.attach(trainer)
    trainer.train()
    entries = read_json(tmp_path / FILENAME)["entries"]
    table = ngram_set(rows)
    assert entries[0]["train_copy_gain"] == 0.0
    for entry in entries[1:]:
        expected = copied_share(entry["generations"], table) - copied_share(entries[0]["generations"], table)
        assert entry["train_copy_gain"] == pytest.approx(expected, abs=1e-12)
    # a model that writes its training rows back copies all of their 4-grams
    signals = {"generations": rows[:8]}
    guard._copy_gain(signals, {"generations": human_like_sentences(8, seed=123)})
    assert signals["train_copy_gain"] > 0.5
    with pytest.raises(TypeError, match="training_texts must be a list of strings"):
        CollapseGuardCallback(["A held-out document."], training_texts="one string")
    plain = CollapseGuardCallback(["A held-out document."], prompts=["A prompt here"])
    signals = {"generations": ["a b c d e"]}
    plain._copy_gain(signals, None)
    assert "train_copy_gain" not in signals
