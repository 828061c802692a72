import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import (
    DataCollatorForLanguageModeling,
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from collapse_guard.callbacks import HISTORY_FILENAME, CollapseGuardCallback
from collapse_guard.io import read_json
from collapse_guard.mixing import MixingCollator
from collapse_guard.testing import degenerate_sentences, human_like_sentences, tiny_causal_lm

HELDOUT = human_like_sentences(24, seed=99)
PROMPTS = ["The river", "A farmer", "The council", "My neighbour", "The storm", "A young doctor"]


@pytest.fixture(scope="module")
def pretrained(tokenizer):
    """A tiny LM that already speaks the human-like language (a sane baseline, like a real pretrained model)."""
    model = tiny_causal_lm(tokenizer)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    texts = human_like_sentences(1600, seed=7)
    for step in range(100):
        batch = tokenizer(texts[16 * step: 16 * step + 16], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def model(tokenizer, pretrained):
    model = tiny_causal_lm(tokenizer)
    model.load_state_dict(pretrained)
    return model


def tokenized(tokenizer, texts):
    return Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])


class Recorder(TrainerCallback):
    """Stands in for a report_to integration: records what each on_log call carried."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def make_trainer(model, tokenizer, texts, out, lr=1e-3, max_steps=20, callbacks=(), eval_texts=None, **extra):
    args = TrainingArguments(
        str(out), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=lr, lr_scheduler_type="constant",
        use_cpu=True, report_to=[], **{"logging_steps": 5, "save_strategy": "no", **extra},
        disable_tqdm=True, seed=0,
    )
    return Trainer(
        model=model, args=args, train_dataset=tokenized(tokenizer, texts),
        eval_dataset=tokenized(tokenizer, eval_texts) if eval_texts else None,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def test_degenerate_data_alarms_and_stops(model, tokenizer, tmp_path):
    early, late = Recorder(), Recorder()  # `early` sits where report_to integrations sit: before the guard
    guard = CollapseGuardCallback(HELDOUT, eval_steps=5, context_length=64, prompts=PROMPTS, max_new_tokens=8)
    trainer = make_trainer(model, tokenizer, degenerate_sentences(256), tmp_path, lr=1e-2, max_steps=40,
                           callbacks=[early])
    trainer.add_callback(guard)
    trainer.add_callback(late)
    trainer.train()

    assert trainer.state.global_step < 40 and guard.stopped_at == trainer.state.global_step <= 15
    assert guard.last_verdict.level == "alarm"
    assert any(r.startswith("held-out ppl rose") and r.endswith("alarm at 20%") for r in guard.last_verdict.reasons)
    assert guard.history[0]["step"] == 0 and guard.history[-1]["heldout_ppl"] > 1.2 * guard.baseline["heldout_ppl"]
    assert {"distinct_2", "self_bleu4", "tail_coverage"} <= set(guard.history[-1])
    for recorder in (early, late):  # both see the collapse/ values in the log call of the alarm step
        logged = [log for log in recorder.logs if "collapse/heldout_ppl" in log]
        assert logged and logged[-1]["collapse/level"] == 2.0
        assert logged[-1]["collapse/heldout_ppl_ratio"] > 1.2
    assert any("collapse/heldout_ppl" in entry for entry in trainer.state.log_history)
    stored = read_json(tmp_path / HISTORY_FILENAME)
    assert stored["baseline"]["step"] == 0 and stored["entries"][-1]["level"] == "alarm"


def test_human_data_at_sane_lr_does_not_alarm(model, tokenizer, tmp_path):
    guard = CollapseGuardCallback(HELDOUT, tokenizer, eval_steps=5, context_length=64)
    trainer = make_trainer(model, tokenizer, human_like_sentences(400, seed=3), tmp_path, lr=1e-3, max_steps=20)
    trainer.add_callback(guard)
    trainer.train()
    assert trainer.state.global_step == 20 and guard.stopped_at is None
    assert [e["step"] for e in guard.history] == [0, 5, 10, 15, 20]
    assert all(e["level"] != "alarm" for e in guard.history)
    assert guard.history[-1]["heldout_ppl_ratio"] < 1.05


def test_early_stopping_on_heldout_ppl(model, tokenizer, tmp_path):
    guard = CollapseGuardCallback(HELDOUT, eval_steps=5, context_length=64, stop_on_alarm=False)
    trainer = make_trainer(
        model, tokenizer, degenerate_sentences(256), tmp_path, lr=3e-3, max_steps=40, eval_texts=HELDOUT[:8],
        callbacks=[EarlyStoppingCallback(early_stopping_patience=1)], eval_strategy="steps", eval_steps=5,
        save_strategy="steps", save_steps=5, metric_for_best_model="heldout_ppl", greater_is_better=False,
        load_best_model_at_end=True,
    )
    trainer.add_callback(guard)
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert evals and all("eval_heldout_ppl" in e and "eval_heldout_ppl_ratio" in e for e in evals)
    assert trainer.state.global_step < 40  # EarlyStoppingCallback stopped it, not the guard
    assert guard.stopped_at is None
    assert trainer.state.best_metric == pytest.approx(min(e["eval_heldout_ppl"] for e in evals))


def test_heldout_ppl_as_best_metric_needs_greater_is_better_false(model, tokenizer, tmp_path):
    guard = CollapseGuardCallback(HELDOUT, eval_steps=5, context_length=64)
    trainer = make_trainer(model, tokenizer, HELDOUT, tmp_path, max_steps=2, metric_for_best_model="heldout_ppl",
                           eval_texts=HELDOUT[:4], eval_strategy="steps", eval_steps=5)
    trainer.add_callback(guard)
    with pytest.raises(ValueError, match="greater_is_better=False"):
        trainer.train()


@pytest.mark.parametrize("restore_flag", [False, True])
def test_resume_keeps_baseline_and_history(model, tokenizer, pretrained, tmp_path, restore_flag, monkeypatch):
    texts = human_like_sentences(400, seed=3)
    first = CollapseGuardCallback(HELDOUT, tokenizer, eval_steps=5, context_length=64)
    trainer = make_trainer(model, tokenizer, texts, tmp_path, max_steps=10, save_strategy="steps", save_steps=5)
    trainer.add_callback(first)
    trainer.train()
    assert [e["step"] for e in first.history] == [0, 5, 10]

    resumed_model = tiny_causal_lm(tokenizer)
    resumed_model.load_state_dict(pretrained)  # weights come from the checkpoint; this proves it
    second = CollapseGuardCallback(HELDOUT, tokenizer, eval_steps=5, context_length=64)
    calls = []
    measure = CollapseGuardCallback.measure
    monkeypatch.setattr(CollapseGuardCallback, "measure", lambda self, m: calls.append(1) or measure(self, m))
    trainer = make_trainer(resumed_model, tokenizer, texts, tmp_path, max_steps=15,
                           restore_callback_states_from_checkpoint=restore_flag)
    trainer.add_callback(second)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    guard = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CollapseGuardCallback))
    assert [e["step"] for e in guard.history] == [0, 5, 10, 15]
    assert guard.baseline == first.history[0]  # not re-measured
    assert guard.history[1] == first.history[1]
    assert len(calls) == 2  # steps 10 and 15 only
    stored = read_json(tmp_path / HISTORY_FILENAME)
    assert [e["step"] for e in stored["entries"]] == [0, 5, 10, 15]


def test_history_file_carries_round0_baseline_into_round1(model, tokenizer, tmp_path):
    history = tmp_path / "shared" / "history.json"
    round0 = CollapseGuardCallback(HELDOUT, tokenizer, eval_steps=5, context_length=64, history_path=history)
    trainer = make_trainer(model, tokenizer, human_like_sentences(64, seed=1), tmp_path / "r0", max_steps=5)
    trainer.add_callback(round0)
    trainer.train()

    round1 = CollapseGuardCallback(HELDOUT, tokenizer, eval_steps=5, context_length=64, history_path=history,
                                   round_index=1)
    trainer = make_trainer(model, tokenizer, human_like_sentences(64, seed=2), tmp_path / "r1", max_steps=3)
    trainer.add_callback(round1)
    trainer.train()
    assert round1.baseline == round0.history[0] and round1.baseline["round"] == 0
    # round 1 starts with a check of round 0's result and ends with one at its last step (3)
    assert [(e["round"], e["step"]) for e in round1.history] == [(0, 0), (0, 5), (1, 0), (1, 3)]
    last = round1.history[-1]
    assert last["heldout_ppl_ratio"] == pytest.approx(last["heldout_ppl"] / round0.history[0]["heldout_ppl"])
    assert not (tmp_path / "r1" / HISTORY_FILENAME).exists()
    assert len(read_json(history)["entries"]) == 4


class Poison(TrainerCallback):
    """Sets every weight to NaN after step 2 (what an fp16 overflow or a too-high LR leaves behind)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(math.nan)


def test_nan_loss_is_an_alarm_not_a_crash(model, tokenizer, tmp_path):
    guard = CollapseGuardCallback(HELDOUT, tokenizer, eval_steps=10, context_length=64, prompts=PROMPTS[:2],
                                  max_new_tokens=4)
    trainer = make_trainer(model, tokenizer, HELDOUT, tmp_path, max_steps=20, callbacks=[Poison()],
                           logging_steps=1, logging_nan_inf_filter=False)
    trainer.add_callback(guard)
    trainer.train()
    assert guard.stopped_at == trainer.state.global_step == 3
    assert guard.last_verdict.level == "alarm"
    assert "train_loss is nan (latest evaluation): training diverged" in guard.last_verdict.reasons


def test_collator_metrics_logged_and_mixing_callback_duties(model, tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    real = Dataset.from_dict({"text": human_like_sentences(64, seed=11)})
    collator = MixingCollator(real_dataset=real, tokenizer=tokenizer, min_real_fraction=0.5, max_length=64)
    guard = CollapseGuardCallback(HELDOUT, eval_steps=2, context_length=64, collator=collator)
    recorder = Recorder()
    args = SFTConfig(str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, use_cpu=True,
                     bf16=False, report_to=[], logging_steps=2, save_strategy="steps", save_steps=2,
                     eval_strategy="steps", eval_steps=2, disable_tqdm=True, max_length=64)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": degenerate_sentences(32)}),
                         eval_dataset=Dataset.from_dict({"text": HELDOUT[:4]}), processing_class=tokenizer,
                         data_collator=collator, callbacks=[recorder])
    trainer.add_callback(guard)
    trainer.train()
    train_logs = [log for log in recorder.logs if "loss" in log]
    assert train_logs and all(log["collapse/mixing/real_fraction"] == pytest.approx(0.5) for log in train_logs)
    assert guard.history[-1]["mixing/real_fraction"] == pytest.approx(0.5)
    # MixingCollatorCallback's duties: 4 train batches (+1 prefetched) mixed, the 2 eval batches were not,
    # and each checkpoint holds the collator state as of the batches consumed
    assert collator.calls in (4, 5) and not collator.paused
    saved = read_json(tmp_path / "checkpoint-2" / "collapse_guard" / "mixing_collator_rank0.json")
    assert saved["calls"] == 2
    assert any("eval_heldout_ppl" in log for log in recorder.logs)


def test_low_ppl_concentration_with_seeded_sampling(model, tokenizer, tmp_path):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    guards = []
    for _ in range(2):  # seeded decoding: the same model measured twice gives the same signals
        model.load_state_dict(state)
        guard = CollapseGuardCallback(HELDOUT, tokenizer, eval_steps=2, context_length=64, prompts=PROMPTS * 3,
                                      max_new_tokens=8, do_sample=True, reference_model="initial",
                                      stop_on_alarm=False)
        trainer = make_trainer(model, tokenizer, human_like_sentences(64, seed=4), tmp_path, max_steps=2)
        trainer.add_callback(guard)
        trainer.train()
        guards.append(guard)
    first, second = (g.history for g in guards)
    assert 0.0 <= first[0]["low_ppl_share"] <= 1.0 and "high_ppl_share" in first[-1]
    assert first == second
    torch.manual_seed(123)
    # the generation RNG is forked: training randomness after a measurement is not disturbed
    before = torch.rand(1)
    torch.manual_seed(123)
    guards[0].measure(model)
    assert torch.equal(torch.rand(1), before)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"heldout_texts": []}, ValueError, "heldout_texts is empty"),
        ({"heldout_texts": "one text"}, TypeError, "heldout_texts must be a list"),
        ({"heldout_texts": ["ok", 3]}, TypeError, r"heldout_texts\[1\] is int"),
        ({"eval_steps": 0}, ValueError, "eval_steps must be a positive int"),
        ({"context_length": 1}, ValueError, "context_length must be an int >= 2"),
        ({"stride": 1024}, ValueError, "stride must be None"),
        ({"prompts": []}, ValueError, "prompts must be a non-empty list"),
        ({"round_index": -1}, ValueError, "round_index must be an int >= 0"),
        ({"reference_model": "initial"}, ValueError, "needs prompts"),
        ({"reference_model": "initial", "prompts": PROMPTS}, ValueError, "needs do_sample=True"),
        ({"detector_config": {"ppl_ratio_alarm": 2}}, TypeError, "detector_config must be a DetectorConfig"),
        ({"collator": object()}, TypeError, "needs a MixingCollator"),
    ],
)
def test_bad_input_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        CollapseGuardCallback(**{"heldout_texts": HELDOUT, **kwargs})


def test_missing_tokenizer_is_a_clear_error(model, tokenizer, tmp_path):
    guard = CollapseGuardCallback(HELDOUT, eval_steps=5)
    trainer = make_trainer(model, tokenizer, HELDOUT, tmp_path, max_steps=1)
    trainer.processing_class = trainer.callback_handler.processing_class = None
    trainer.add_callback(guard)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        trainer.train()


@pytest.mark.distributed
def test_two_processes_stop_at_the_same_step(tmp_path):
    script = Path(__file__).parent / "scripts" / "guard_dist.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(script), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    assert results[0]["level"] == "alarm" and results[0]["stopped_at"] == results[0]["global_step"] < 40
    assert results[0]["world_size"] == 2 and any("held-out ppl rose" in r for r in results[0]["reasons"])
