import json
import math
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

from collapse_guard.callbacks import CollapseGuardCallback, GuardConfig
from collapse_guard.history import FILENAME as HISTORY_FILENAME
from collapse_guard.io import read_json
from collapse_guard.mixing import MixingCollator
from collapse_guard.probe import ProbeConfig
from collapse_guard.testing import (
    degenerate_sentences,
    human_like_sentences,
    launch_two_processes,
    tiny_causal_lm,
)

HELDOUT = human_like_sentences(24, seed=99)
PROMPTS = ["The river", "A farmer", "The council", "My neighbour", "The storm", "A young doctor"]


@pytest.fixture(scope="module")
def pretrained(tokenizer):
    """A tiny LM that already speaks the human-like language (a sane baseline, like a real pretrained
    model)."""
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
    return Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"]), batched=True,
                                                  remove_columns=["text"])


class Recorder(TrainerCallback):
    """Stands in for a report_to integration: records what each on_log call carried."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def guard_for(eval_steps=5, prompts=None, max_new_tokens=8, budget=None, **config):
    """A guard measuring at fixed steps (no cost budget, unless asked): steps are what the tests check."""
    return CollapseGuardCallback(HELDOUT, prompts=prompts, probe=ProbeConfig(context_length=64,
                                 max_new_tokens=max_new_tokens, prompt_tokens=None),
                                 config=GuardConfig(eval_steps=eval_steps, cost_budget=budget, **config))


def make_trainer(model, tokenizer, texts, out, lr=1e-3, max_steps=20, callbacks=(), eval_texts=None, **extra):
    args = TrainingArguments(
        str(out), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=lr,
        lr_scheduler_type="constant", use_cpu=True, report_to=[],
        **{"logging_steps": 5, "save_strategy": "no", **extra}, disable_tqdm=True, seed=0,
    )
    return Trainer(
        model=model, args=args, train_dataset=tokenized(tokenizer, texts),
        eval_dataset=tokenized(tokenizer, eval_texts) if eval_texts else None,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def test_degenerate_data_alarms_and_stops(model, tokenizer, tmp_path):
    early, late = Recorder(), Recorder()  # `early` sits where report_to integrations sit: before the guard
    guard = guard_for(prompts=PROMPTS * 3)
    trainer = make_trainer(model, tokenizer, degenerate_sentences(256), tmp_path, lr=1e-2, max_steps=40,
                           callbacks=[early])
    guard.attach(trainer)
    trainer.add_callback(late)
    trainer.train()

    assert trainer.state.global_step < 40 and guard.stopped_at == trainer.state.global_step <= 15
    assert guard.last_verdict.level == "alarm"
    assert any(r.startswith("held-out ppl rose") and r.endswith("alarm at 20%")
               for r in guard.last_verdict.reasons)
    entries = guard.history.entries
    assert entries[0]["step"] == 0 and entries[-1]["heldout_ppl"] > 1.2 * entries[0]["heldout_ppl"]
    assert {"distinct_2", "self_bleu4", "tail_coverage", "generations"} <= set(entries[-1])
    assert entries[-1]["stopped"] and entries[-1]["final"]
    for recorder in (early, late):  # both see the collapse/ values in the log call of the alarm step
        logged = [log for log in recorder.logs if "collapse/heldout_ppl" in log]
        assert logged and logged[-1]["collapse/level"] == 2.0
        assert logged[-1]["collapse/heldout_ppl_ratio"] > 1.2
        assert not any(isinstance(v, list) for v in logged[-1].values())
    stored = read_json(tmp_path / HISTORY_FILENAME)
    assert stored["entries"][0]["step"] == 0 and stored["entries"][-1]["level"] == "alarm"
    assert "evidence" in stored["entries"][-1]


def test_human_data_at_sane_lr_does_not_alarm(model, tokenizer, tmp_path):
    guard = guard_for()
    trainer = make_trainer(model, tokenizer, human_like_sentences(400, seed=3), tmp_path, lr=1e-3,
                           max_steps=20)
    guard.attach(trainer)
    trainer.train()
    assert trainer.state.global_step == 20 and guard.stopped_at is None
    assert [e["step"] for e in guard.history.entries] == [0, 5, 10, 15, 20]
    assert all(e["level"] != "alarm" for e in guard.history.entries)
    assert guard.history.entries[-1]["heldout_ppl_ratio"] < 1.05


def test_cost_budget_keeps_the_guard_under_its_share_in_forward_tokens(model, tokenizer, tmp_path):
    """Counted in forward tokens (not wall time), so the assertion does not depend on the machine."""
    guard = guard_for(eval_steps=1, prompts=PROMPTS, budget=0.25, budget_unit="tokens",
                      stop_training_on_alarm=False)
    trainer = make_trainer(model, tokenizer, human_like_sentences(400, seed=3), tmp_path, max_steps=30)
    guard.attach(trainer)
    trainer.train()
    steps = [e["step"] for e in guard.history.entries]
    assert 2 < len(steps) < 31  # it measured, but far less often than every step
    assert steps[0] == 0 and steps[-1] == 30  # the baseline and the final verdict are always taken
    training = 3 * guard.budget.trained_tokens
    # the whole guard, baseline and final measurement included, stays within its share of the job
    assert guard.spent["tokens"] <= 0.25 * (training + guard.spent["tokens"])
    assert guard.cost_share() <= 0.25
    unbounded = guard_for(eval_steps=1, prompts=PROMPTS, stop_training_on_alarm=False)
    trainer = make_trainer(model, tokenizer, human_like_sentences(400, seed=3), tmp_path / "b", max_steps=6)
    unbounded.attach(trainer)
    trainer.train()
    assert [e["step"] for e in unbounded.history.entries] == list(range(7))


def test_a_job_too_short_for_the_budget_says_so(model, tokenizer, tmp_path, caplog):
    guard = guard_for(eval_steps=1, prompts=PROMPTS, budget=0.01, budget_unit="tokens",
                      stop_training_on_alarm=False)
    trainer = make_trainer(model, tokenizer, human_like_sentences(400, seed=3), tmp_path, max_steps=4)
    guard.attach(trainer)
    with caplog.at_level("INFO", logger="collapse_guard"):
        trainer.train()
    assert [e["step"] for e in guard.history.entries] == [0, 4]  # nothing between the two fixed ones
    assert guard.cost_share() > 0.01
    # said when it skips the first in-between measurement; no warning at the end about the two required ones,
    # which no setting of the guard changes (the share stays in cost_share)
    assert "no measurement at step 1" in caplog.text and "the final one is still taken" in caplog.text
    assert "over its cost_budget" not in caplog.text


def test_early_stopping_on_heldout_ppl(model, tokenizer, tmp_path):
    guard = guard_for(stop_training_on_alarm=False)
    trainer = make_trainer(
        model, tokenizer, degenerate_sentences(256), tmp_path, lr=3e-3, max_steps=40, eval_texts=HELDOUT[:8],
        callbacks=[EarlyStoppingCallback(early_stopping_patience=1)], eval_strategy="steps", eval_steps=5,
        save_strategy="steps", save_steps=5, metric_for_best_model="heldout_ppl", greater_is_better=False,
        load_best_model_at_end=True,
    )
    guard.attach(trainer)
    trainer.train()
    # the guard's evaluation metrics: their own log row at every evaluation step
    evals = [e for e in trainer.state.log_history if "eval_heldout_ppl" in e]
    assert [e["step"] for e in evals] == [e["step"] for e in trainer.state.log_history if "eval_loss" in e]
    assert all("eval_heldout_ppl_ratio" in e for e in evals)
    assert not any(k in e for e in evals for k in ("eval_eval_loss", "eval_train_loss"))
    assert trainer.state.global_step < 40  # EarlyStoppingCallback stopped it, not the guard
    assert guard.stopped_at is None
    assert trainer.state.best_metric == pytest.approx(min(e["eval_heldout_ppl"] for e in evals))


def test_heldout_ppl_as_best_metric_needs_greater_is_better_false(model, tokenizer, tmp_path):
    trainer = make_trainer(model, tokenizer, HELDOUT, tmp_path, max_steps=2,
                           metric_for_best_model="heldout_ppl", eval_texts=HELDOUT[:4], eval_strategy="steps",
                           eval_steps=5)
    with pytest.raises(ValueError, match="greater_is_better=False"):
        guard_for().attach(trainer)


def test_guard_added_without_attach_is_a_clear_error(model, tokenizer, tmp_path):
    trainer = make_trainer(model, tokenizer, HELDOUT, tmp_path, max_steps=1, callbacks=[guard_for()])
    with pytest.raises(ValueError, match=r"use guard.attach\(trainer\)"):
        trainer.train()


def test_resume_keeps_baseline_and_history(model, tokenizer, pretrained, tmp_path, monkeypatch):
    texts = human_like_sentences(400, seed=3)
    first = guard_for()
    trainer = make_trainer(model, tokenizer, texts, tmp_path, max_steps=10, save_strategy="steps",
                           save_steps=5)
    first.attach(trainer)
    trainer.train()
    assert [e["step"] for e in first.history.entries] == [0, 5, 10]

    resumed_model = tiny_causal_lm(tokenizer)
    resumed_model.load_state_dict(pretrained)  # weights come from the checkpoint; this proves it
    second = guard_for()
    calls = []
    measure = CollapseGuardCallback.measure
    monkeypatch.setattr(CollapseGuardCallback, "measure",
                        lambda self, m, step, final=False, **kw: calls.append(step)
                        or measure(self, m, step, final, **kw))
    trainer = make_trainer(resumed_model, tokenizer, texts, tmp_path, max_steps=15)
    second.attach(trainer)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    assert [e["step"] for e in second.history.entries] == [0, 5, 10, 15]
    assert second.history.entries[0] == first.history.entries[0]  # the baseline is not re-measured
    assert calls == [10, 15]
    stored = read_json(tmp_path / HISTORY_FILENAME)
    assert [e["step"] for e in stored["entries"]] == [0, 5, 10, 15]
    assert (tmp_path / "checkpoint-5" / "collapse_guard" / HISTORY_FILENAME).exists()


def test_history_file_carries_round0_baseline_into_round1(model, tokenizer, tmp_path):
    history = tmp_path / "shared" / "history.json"
    round0 = guard_for(history_path=str(history))
    trainer = make_trainer(model, tokenizer, human_like_sentences(64, seed=1), tmp_path / "r0", max_steps=5)
    round0.attach(trainer)
    trainer.train()

    round1 = guard_for(history_path=str(history), round_index=1)
    trainer = make_trainer(model, tokenizer, human_like_sentences(64, seed=2), tmp_path / "r1", max_steps=3)
    round1.attach(trainer)
    trainer.train()
    entries = round1.history.entries
    assert entries[0] == round0.history.entries[0] and entries[0]["round"] == 0
    # round 1 starts with a check of round 0's result and ends with one at its last step (3)
    assert [(e["round"], e["step"]) for e in entries] == [(0, 0), (0, 5), (1, 0), (1, 3)]
    assert entries[-1]["heldout_ppl_ratio"] == pytest.approx(
        entries[-1]["heldout_ppl"] / entries[0]["heldout_ppl"], rel=1e-6)
    assert any("over round 0" in r for r in round1.last_verdict.reasons) or round1.last_verdict.level == "ok"
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
    guard = guard_for(eval_steps=10, prompts=PROMPTS[:2], max_new_tokens=4)
    trainer = make_trainer(model, tokenizer, HELDOUT, tmp_path, max_steps=20, callbacks=[Poison()],
                           logging_steps=1, logging_nan_inf_filter=False)
    guard.attach(trainer)
    trainer.train()
    assert guard.stopped_at == 3 and trainer.state.global_step == 3
    assert guard.last_verdict.level == "alarm"
    assert any("training diverged" in r for r in guard.last_verdict.reasons)


def test_collator_metrics_logged_and_mixing_duties(model, tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    real = Dataset.from_dict({"text": human_like_sentences(64, seed=11)})
    collator = MixingCollator(real_dataset=real, min_real_fraction=0.5)
    guard = CollapseGuardCallback(HELDOUT, collator=collator, probe=ProbeConfig(context_length=64),
                                  config=GuardConfig(eval_steps=2, cost_budget=None))
    recorder = Recorder()
    args = SFTConfig(str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                     use_cpu=True, bf16=False, report_to=[], logging_steps=2, save_strategy="steps",
                     save_steps=2, eval_strategy="steps", eval_steps=2, disable_tqdm=True, max_length=64)
    trainer = SFTTrainer(model=model, args=args,
                         train_dataset=Dataset.from_dict({"text": degenerate_sentences(32)}),
                         eval_dataset=Dataset.from_dict({"text": HELDOUT[:4]}), processing_class=tokenizer,
                         callbacks=[recorder])
    guard.attach(trainer)
    assert trainer.data_collator is collator  # attach wrapped the trainer's own collator
    trainer.train()
    logged = [log for log in recorder.logs if "collapse/mixing/real_fraction" in log]
    assert logged and all(log["collapse/mixing/real_fraction"] >= 0.5 for log in logged)
    assert guard.history.entries[-1]["mixing/real_fraction"] >= 0.5
    assert collator.counts["micro_batches"] in (4, 5) and not collator.paused  # eval batches were not mixed
    saved = read_json(tmp_path / "checkpoint-2" / "collapse_guard" / "mixing_collator_rank0.json")
    assert saved["calls"] == 2
    assert any("eval_heldout_ppl" in log for log in recorder.logs)


def test_low_ppl_concentration_with_seeded_sampling(model, tokenizer, tmp_path):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = tiny_causal_lm(tokenizer)
    reference.load_state_dict(state)
    histories = []
    for _ in range(2):  # seeded decoding: the same model measured twice gives the same signals
        model.load_state_dict(state)
        guard = CollapseGuardCallback(HELDOUT, prompts=PROMPTS * 3, reference_model=reference,
                                      probe=ProbeConfig(context_length=64, max_new_tokens=8,
                                                        prompt_tokens=None),
                                      config=GuardConfig(eval_steps=2, cost_budget=None,
                                                         stop_training_on_alarm=False))
        trainer = make_trainer(model, tokenizer, human_like_sentences(64, seed=4), tmp_path, max_steps=2)
        guard.attach(trainer)
        trainer.train()
        histories.append([{k: v for k, v in e.items() if k != "cost"} for e in guard.history.entries])
    first, second = histories
    assert 0.0 <= first[0]["low_ppl_share"] <= 1.0 and "high_ppl_share" in first[-1]
    assert [e["generations"] for e in first] == [e["generations"] for e in second]
    torch.manual_seed(123)
    before = torch.rand(1)  # the generation RNG is forked: training randomness is not disturbed
    torch.manual_seed(123)
    guard.probe.measure(model)
    assert torch.equal(torch.rand(1), before)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"heldout_texts": []}, ValueError, "heldout_texts is empty"),
        ({"heldout_texts": "one text"}, TypeError, "heldout_texts must be a list"),
        ({"heldout_texts": ["ok", 3]}, TypeError, r"heldout_texts\[1\] is int"),
        ({"prompts": []}, ValueError, "prompts is empty"),
        ({"collator": object()}, TypeError, "collator must be a MixingCollator"),
        ({"config": {"eval_steps": 2}}, TypeError, "config must be a GuardConfig"),
    ],
)
def test_bad_input_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        CollapseGuardCallback(**{"heldout_texts": HELDOUT, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eval_steps": 0}, "eval_steps must be a positive int"),
        ({"cost_budget": 1.5}, "cost_budget must be in"),
        ({"budget_unit": "flops"}, "budget_unit must be"),
        ({"round_index": -1}, "round_index must be an int >= 0"),
    ],
)
def test_bad_guard_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuardConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [({"context_length": 1}, "context_length"),
                                                 ({"stride": 1024}, "stride"),
                                                 ({"temperature": -1}, "temperature")])
def test_bad_probe_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProbeConfig(**kwargs)


def test_missing_tokenizer_is_a_clear_error(model, tokenizer, tmp_path):
    trainer = make_trainer(model, tokenizer, HELDOUT, tmp_path, max_steps=1)
    trainer.processing_class = None
    trainer.data_collator = lambda rows: rows
    with pytest.raises(ValueError, match="has no processing_class"):
        guard_for().attach(trainer)


def test_final_verdict_reaches_tensorboard_event_files(model, tokenizer, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guard = guard_for(eval_steps=100)  # only the baseline and the final measurement
    args = TrainingArguments(str(tmp_path), max_steps=7, per_device_train_batch_size=8, use_cpu=True,
                             report_to=["tensorboard"], logging_steps=5,
                             save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args,
                      train_dataset=tokenized(tokenizer, human_like_sentences(80, seed=5)),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      processing_class=tokenizer)
    guard.attach(trainer)
    trainer.train()
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/collapse/heldout_ppl")]
    assert 7 in steps  # the final verdict, at the last step
    assert events.Scalars("train/collapse/level")[-1].value == 0.0


@pytest.mark.distributed
def test_two_processes_stop_at_the_same_step(tmp_path):
    script = Path(__file__).parent / "scripts" / "guard_dist.py"
    done = launch_two_processes(script, tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    assert results[0]["level"] == "alarm" and results[0]["stopped_at"] == results[0]["global_step"] < 40
    assert results[0]["world_size"] == 2 and any("held-out ppl rose" in r for r in results[0]["reasons"])
