"""A diverged model (NaN/inf weights or logits) is an alarm with a reason on every measurement path, never a
crash: held-out perplexity, generation, the diversity signals, the detector, the in-training guard, the
policy guard and the multi-round loop (issue 23, section 1)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

from collapse_guard.callbacks import CollapseGuardCallback, GuardConfig
from collapse_guard.detector import CollapseDetector
from collapse_guard.generation.backends import (
    Decoding,
    ModelDivergedError,
    TransformersBackend,
    generate_texts,
)
from collapse_guard.history import FILENAME as HISTORY_FILENAME
from collapse_guard.io import read_json
from collapse_guard.metrics.diversity import diversity_metrics
from collapse_guard.metrics.perplexity import HeldoutPerplexity, nonfinite_parameters
from collapse_guard.probe import Probe, ProbeConfig
from collapse_guard.testing import human_like_sentences, tiny_causal_lm

HELDOUT = human_like_sentences(12, seed=99)
PROMPTS = human_like_sentences(12, seed=5)
REPO = Path(__file__).resolve().parents[1]


def poison(model, value: float = math.nan, names: tuple[str, ...] = ()) -> int:
    """Fills the parameters (all, or those whose name contains one of `names`) with `value`."""
    hit = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not names or any(n in name for n in names):
                p.fill_(value)
                hit += 1
    return hit


def probe(tokenizer) -> Probe:
    return Probe(HELDOUT, tokenizer, ProbeConfig(context_length=64, max_new_tokens=4, prompt_tokens=4),
                 prompts=PROMPTS)


# ----- held-out perplexity --------------------------------------------------------------------------------
def test_perplexity_of_a_nan_model_is_nan_with_a_reason_not_a_crash(tokenizer, tiny_model):
    n_bad = poison(tiny_model, names=("layers.1.",))
    total = sum(1 for _ in tiny_model.parameters())
    result = HeldoutPerplexity(HELDOUT, tokenizer, context_length=64).compute(tiny_model)
    assert math.isnan(result.perplexity) and not result.finite
    assert len(result.per_document) == len(HELDOUT) and all(math.isnan(p) for p in result.per_document)
    assert all(t > 0 for t in result.document_tokens) and result.n_tokens == sum(result.document_tokens)
    assert result.diverged == (f"model diverged: held-out perplexity is nan (non-finite weights in {n_bad} "
                               f"of {total} parameter tensors; {len(HELDOUT)} of {len(HELDOUT)} documents "
                               "non-finite)")
    assert nonfinite_parameters(tiny_model) == (n_bad, total)


def test_an_overflowing_but_finite_model_gives_an_infinite_perplexity(tokenizer, tiny_model):
    # finite weights whose NLL (~1e24 nats a token) is past exp's range: perplexity inf, not OverflowError
    with torch.no_grad():
        tiny_model.model.norm.weight.mul_(1e25)
    result = HeldoutPerplexity(HELDOUT, tokenizer, context_length=64).compute(tiny_model)
    assert result.perplexity == math.inf and all(p == math.inf for p in result.per_document)
    assert math.isfinite(result.nll_sum)
    assert result.diverged.startswith("model diverged: held-out perplexity is inf (mean NLL ")
    assert "past float range" in result.diverged


def test_the_evaluator_stays_exact_on_a_healthy_model_after_a_diverged_one(tokenizer):
    """The one-time checks (padding, decoder/head split) are not cached for a diverged model."""
    healthy = tiny_causal_lm(tokenizer)
    expected = HeldoutPerplexity(HELDOUT, tokenizer, context_length=64).compute(healthy)
    evaluator = HeldoutPerplexity(HELDOUT, tokenizer, context_length=64)
    state = {k: v.clone() for k, v in healthy.state_dict().items()}
    poison(healthy)
    assert math.isnan(evaluator.compute(healthy).perplexity)
    healthy.load_state_dict(state)  # the same object, repaired (e.g. a rollback to a checkpoint)
    again = evaluator.compute(healthy)
    assert again.diverged is None and again.finite
    assert again.document_nll == expected.document_nll and again.perplexity == expected.perplexity
    assert evaluator._split_ok[id(healthy)] is True  # the fast split path, decided on the healthy weights


# ----- generation and the probe ---------------------------------------------------------------------------
DECODINGS = [Decoding(max_new_tokens=4), Decoding(max_new_tokens=4, temperature=0),
             Decoding(max_new_tokens=4, temperature=0, num_beams=3, min_new_tokens=4),
             Decoding(max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=5)]


@pytest.mark.parametrize("decoding", DECODINGS, ids=["sample", "greedy", "beam", "top-p"])
def test_generating_from_a_nan_model_raises_model_diverged_not_a_sampler_crash(tokenizer, tiny_model,
                                                                                decoding):
    poison(tiny_model)
    with pytest.raises(ModelDivergedError, match=r"^model diverged: non-finite logits \(NaN/inf\) while "
                                                 r"generating for 3 of 3 prompts"):
        generate_texts(TransformersBackend(tiny_model, tokenizer), PROMPTS[:3], decoding, seed=0)


def test_probe_on_a_nan_model_returns_the_divergence_and_the_detector_alarms(tokenizer, tiny_model):
    p = probe(tokenizer)
    baseline = {"round": 0, "step": 0, **p.measure(tiny_model)}
    assert "diverged" not in baseline and len(baseline["generations"]) == len(PROMPTS)
    poison(tiny_model, names=("embed_tokens",))
    signals = p.measure(tiny_model)
    assert math.isnan(signals["heldout_ppl"]) and "generations" not in signals
    assert signals["diverged"].startswith("model diverged: held-out perplexity is nan (non-finite weights in "
                                          "1 of ")
    verdict = CollapseDetector().check([baseline, {"round": 1, "step": 0, **signals}])
    assert verdict.level == "alarm" and verdict.reasons[0] == signals["diverged"]
    assert verdict.evidence["diverged"]["level"] == "alarm"


def test_probe_catches_logits_that_turn_nan_only_while_generating(tokenizer, tiny_model):
    """Finite held-out perplexity, NaN logits at decoding steps (one new token a forward): a forward hook
    on the output head stands in for an overflow that only long generations reach."""
    def nan_on_decoding_steps(_module, _args, output):
        return output.fill_(math.nan) if output.shape[1] == 1 else output

    tiny_model.get_output_embeddings().register_forward_hook(nan_on_decoding_steps)
    signals = probe(tokenizer).measure(tiny_model)
    assert math.isfinite(signals["heldout_ppl"]) and "generations" not in signals
    assert signals["diverged"].startswith("model diverged: non-finite logits (NaN/inf) while generating for "
                                          f"{len(PROMPTS)} of {len(PROMPTS)} prompts (probe)")
    baseline = {"round": 0, "step": 0, "heldout_ppl": signals["heldout_ppl"]}
    verdict = CollapseDetector().check([baseline, {"round": 1, "step": 0, **signals}])
    assert verdict.level == "alarm" and verdict.reasons == [signals["diverged"]]


def test_diversity_signals_of_empty_generations_are_zero_and_alarm():
    empty = diversity_metrics([""] * 12, human_texts=HELDOUT)
    assert empty["distinct_2"] == empty["unigram_entropy"] == empty["self_bleu4"] == 0.0
    base = {"round": 0, "step": 0, "generations": PROMPTS, **diversity_metrics(PROMPTS, human_texts=HELDOUT)}
    verdict = CollapseDetector().check([base, {"round": 1, "step": 0, "generations": [""] * 12, **empty}])
    assert verdict.level == "alarm" and "distinct_1 fell 100%" in verdict.reasons[0]


def test_a_diverged_history_entry_stored_as_null_still_alarms():
    """A history file that writes non-finite numbers as null keeps the probe's words: still an alarm."""
    entry = {"round": 1, "step": 0, "heldout_ppl": None, "diverged": "model diverged: held-out perplexity is "
             "nan (non-finite weights in 3 of 20 parameter tensors)"}
    verdict = CollapseDetector().check([{"round": 0, "step": 0, "heldout_ppl": 10.0}, entry])
    assert verdict.level == "alarm" and verdict.reasons == [entry["diverged"]]


def test_policy_guard_alarms_on_non_finite_logs():
    from collapse_guard.policy import POLICY_RULES, policy_signals

    first = {"round": 0, "step": 1, **policy_signals(PROMPTS, {"entropy": 1.2, "reward": 0.4})}
    for logs in ({"entropy": math.nan, "reward": 0.4}, {"entropy": 1.2, "reward": math.nan}):
        latest = {"round": 0, "step": 2, **policy_signals(PROMPTS, logs)}
        verdict = CollapseDetector(POLICY_RULES).check([first, latest])
        assert verdict.level == "alarm" and "is nan (latest evaluation)" in verdict.reasons[0]


# ----- the in-training guard ------------------------------------------------------------------------------
class PoisonAt(TrainerCallback):
    """Sets every weight to NaN at the end of step `step` (what an fp16 overflow or a huge LR leaves)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            poison(model)


def _trainer(model, tokenizer, out, callbacks, **extra) -> Trainer:
    data = Dataset.from_dict({"text": human_like_sentences(256, seed=3)}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    args = TrainingArguments(str(out), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-3,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                             **{"logging_steps": 100, **extra})
    return Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=callbacks)


def test_guard_stops_a_run_whose_weights_turn_nan_and_writes_why(tokenizer, tiny_model, tmp_path):
    # the guard's first look at the model comes after it diverged (the loop hands it round 0's measurement
    # as `start`): the evaluator's one-time checks meet NaN logits first
    start = probe(tokenizer).measure(tiny_model)
    start.pop("cost")
    guard = CollapseGuardCallback(HELDOUT, prompts=PROMPTS, start=start,
                                  probe=ProbeConfig(context_length=64, max_new_tokens=4, prompt_tokens=4),
                                  config=GuardConfig(eval_steps=4, cost_budget=None))
    trainer = _trainer(tiny_model, tokenizer, tmp_path, [PoisonAt(2)])
    guard.attach(trainer)
    trainer.train()
    assert trainer.state.global_step == 4 and guard.stopped_at == 4
    entries = read_json(tmp_path / HISTORY_FILENAME)["entries"]
    last = entries[-1]
    assert last["step"] == 4 and last["level"] == "alarm" and last["stopped"] is True
    assert last["reasons"][0].startswith("model diverged: held-out perplexity is nan (non-finite weights in ")
    assert "generations" not in last


def test_guard_alarms_on_a_nan_gradient_norm_the_loss_filter_hides(tokenizer, tiny_model, tmp_path, caplog):
    """The Trainer's logging_nan_inf_filter (on by default) replaces a NaN loss by the running mean: the
    gradient norm, which it does not filter, still tells, at the first log after the weights turned NaN
    (no measurement is due before step 100)."""
    guard = CollapseGuardCallback(HELDOUT, probe=ProbeConfig(context_length=64),
                                  config=GuardConfig(eval_steps=100, cost_budget=None))
    trainer = _trainer(tiny_model, tokenizer, tmp_path, [PoisonAt(2)], logging_steps=1)
    guard.attach(trainer)
    with caplog.at_level("WARNING", logger="collapse_guard"):
        trainer.train()
    assert guard.stopped_at == 3 and trainer.state.global_step == 3
    assert "ALARM: model diverged: grad_norm is nan at step 3" in caplog.text
    last = read_json(tmp_path / HISTORY_FILENAME)["entries"][-1]  # the final measurement of step 3
    assert last["level"] == "alarm" and last["reasons"][0].startswith("model diverged: held-out perplexity")


def test_guard_told_not_to_stop_records_the_divergence_once_and_summarises(tokenizer, tiny_model, tmp_path):
    guard = CollapseGuardCallback(HELDOUT, probe=ProbeConfig(context_length=64),
                                  config=GuardConfig(eval_steps=100, cost_budget=None,
                                                     stop_training_on_alarm=False))
    trainer = _trainer(tiny_model, tokenizer, tmp_path, [PoisonAt(2)], logging_steps=1)
    guard.attach(trainer)
    trainer.train()
    assert trainer.state.global_step == 12 and guard.stopped_at is None
    entries = read_json(tmp_path / HISTORY_FILENAME)["entries"]
    assert [e["step"] for e in entries] == [0, 3, 12]  # baseline, the first NaN gradient norm, the final
    assert entries[1]["diverged"] == ("model diverged: grad_norm is nan at step 3 (the update wrote "
                                      "non-finite gradients into the weights)")
    summary = guard.summary()
    assert "step     3: a training log (no measurement)  alarm" in summary and "held-out ppl nan" in summary


# ----- the loop and its command line ----------------------------------------------------------------------
def _cli(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # learning rate 1e30: finite (the recipe accepts it) and the weights turn NaN within the first steps
    cmd = [sys.executable, "-m", "collapse_guard.cli", "run", str(REPO / "recipes" / "tiny_loop.yaml"),
           "training.learning_rate=1e30", f"output_dir={out}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_generate_command_on_a_nan_model_is_one_line_not_a_traceback(tmp_path):
    from transformers import AutoModelForCausalLM

    from collapse_guard.testing import save_tiny_model

    folder = save_tiny_model(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    poison(model)
    model.save_pretrained(folder)
    (tmp_path / "texts.txt").write_text("\n".join(HELDOUT[:3]) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "collapse_guard.cli", "generate", "continuation", "--model", str(folder),
           "--texts", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "out"), "--prefix-tokens", "2",
           "--max-new-tokens", "3", "--decoding", "sample", "--no-show-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("collapse-guard: error:")]
    assert lines == ["collapse-guard: error: model diverged: non-finite logits (NaN/inf) while generating "
                     "for 3 of 3 prompts (continuation); its generations would be noise, so none are "
                     "returned. Look for NaN weights or a too-high learning rate."]
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_loop_from_a_diverged_starting_model_ends_after_round_0(tmp_path):
    from transformers import AutoModelForCausalLM

    from collapse_guard.testing import save_tiny_model

    folder = save_tiny_model(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    poison(model, names=("lm_head", "norm"))
    model.save_pretrained(folder)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "collapse_guard.cli", "run", str(REPO / "recipes" / "tiny_loop.yaml"),
           f"model.name_or_path={folder}", f"output_dir={out}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    state = read_json(out / "run_state.json")
    assert state["finished"] and state["stopped"]["round"] == 0
    assert state["stopped"]["reason"].startswith("model diverged: held-out perplexity is nan (non-finite "
                                                 "weights in ")
    assert read_json(out / "round_0" / "verdict.json")["level"] == "alarm"
    assert not (out / "round_1").exists()


@pytest.mark.slow
def test_loop_with_a_diverging_model_ends_in_alarm_and_resumes(tmp_path):
    out = tmp_path / "run"
    done = _cli(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    state = read_json(out / "run_state.json")
    assert state["finished"] and state["stopped"]["round"] == 1
    assert state["stopped"]["reason"].startswith("model diverged")
    verdict = read_json(out / "round_1" / "verdict.json")
    assert verdict["level"] == "alarm" and verdict["reasons"][0].startswith("model diverged")
    finals = [e for e in read_json(out / HISTORY_FILENAME)["entries"] if e.get("final")]
    assert [e["round"] for e in finals] == [0, 1] and finals[-1]["level"] == "alarm"
    assert not (out / "round_2").exists()  # a diverged model generates no next round
    again = _cli(out)  # the same command again: the finished run is shown, nothing crashes
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
