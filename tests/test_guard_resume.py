"""The guard across a crash and a resume, seen from outside: the floor the collator applies to the first
batch after the resume, the history file compared with an uninterrupted run, and what reaches TensorBoard.
"""

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from collapse_guard.callbacks import CollapseGuardCallback, GuardConfig
from collapse_guard.floor import FloorConfig
from collapse_guard.history import FILENAME
from collapse_guard.io import read_json
from collapse_guard.mixing import MixingCollator, mix_datasets
from collapse_guard.probe import ProbeConfig
from collapse_guard.testing import human_like_sentences, tiny_causal_lm


class Crash(Exception):
    pass


class CrashAt(TrainerCallback):
    """Dies at the end of `step`, after the checkpoints before it were written (a killed job)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(f"killed at step {self.step}")


def sft_run(out, tokenizer, max_steps=9, resume=None, callbacks=(), report_to=(), floor=True):
    from trl import SFTConfig, SFTTrainer

    real = Dataset.from_dict({"text": human_like_sentences(40, seed=1)})
    synthetic = Dataset.from_dict({"text": [f"synthetic {i} the model said" for i in range(60)]})
    args = SFTConfig(str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
                     report_to=list(report_to), use_cpu=True, bf16=False, save_strategy="steps", save_steps=4,
                     logging_steps=2, disable_tqdm=True, max_length=32, seed=0)
    train = mix_datasets(real, synthetic, mode="accumulate", min_real_fraction=0.3)
    trainer = SFTTrainer(model=tiny_causal_lm(tokenizer), args=args, processing_class=tokenizer,
                         train_dataset=train, callbacks=list(callbacks))
    collator = MixingCollator(real_dataset=real, min_real_fraction=0.5)
    # ok verdicts lower the floor x0.8 at every measurement (decay_after=1): a floor that moves each time
    guard = CollapseGuardCallback(
        human_like_sentences(8, seed=9), collator=collator, probe=ProbeConfig(context_length=32),
        config=GuardConfig(eval_steps=3, cost_budget=None),
        floor=FloorConfig(minimum=0.1, maximum=0.9, start=0.5, decay_after=1) if floor else None,
    ).attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, guard, collator


def test_a_resumed_adaptive_run_applies_the_last_decided_floor_and_writes_the_same_history(
        tmp_path, tokenizer, monkeypatch):
    sft_run(tmp_path / "full", tokenizer)
    full = read_json(tmp_path / "full" / FILENAME)["entries"]
    floors = [e["floor"] for e in full]
    assert [e["step"] for e in full] == [0, 3, 6, 9] and len(set(floors)) == len(floors)  # it moves

    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        sft_run(out, tokenizer, callbacks=[CrashAt(5)])  # measured at 0 and 3, checkpoint-4, dead at 5
    before_kill = read_json(out / FILENAME)["entries"][-1]["floor"]

    collated = []  # the collator's floor each time it builds a training batch
    call = MixingCollator.__call__

    def recording(self, features):
        collated.append(self.min_real_fraction)
        return call(self, features)

    monkeypatch.setattr(MixingCollator, "__call__", recording)
    sft_run(out, tokenizer, resume=str(out / "checkpoint-4"))
    assert collated[0] == before_kill == floors[1]
    resumed = read_json(out / FILENAME)["entries"]
    # no extra measurement at the resume step (4): the same file as the run that was never killed
    assert resumed == full


def test_the_step0_baseline_reaches_tensorboard_at_step_0_without_a_nan_real_share(tmp_path, tokenizer):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sft_run(tmp_path, tokenizer, max_steps=3, report_to=["tensorboard"], floor=False)
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent))
    events.Reload()
    ppl_steps = [e.step for e in events.Scalars("train/collapse/heldout_ppl")]
    assert ppl_steps[0] == 0 and 3 in ppl_steps
    level_steps = [e.step for e in events.Scalars("train/collapse/level")]
    assert level_steps[0] == 0
    shares = events.Scalars("train/collapse/mixing/real_fraction")
    assert shares and all(math.isfinite(e.value) for e in shares) and 0 not in [e.step for e in shares]


class Diverge(TrainerCallback):
    """Every weight NaN after step 2 (an fp16 overflow, a learning rate far too high)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(math.nan)


def test_a_diverged_run_writes_a_strict_json_history_that_reads_back_the_same(tmp_path, tokenizer):
    trainer, guard, _ = sft_run(tmp_path, tokenizer, max_steps=6, callbacks=[Diverge()], floor=False)
    assert guard.last_verdict.is_alarm and guard.stopped_at is not None

    def refuse(literal):
        raise ValueError(f"bare {literal} in collapse_history.json")

    text = (tmp_path / FILENAME).read_text()
    stored = json.loads(text, parse_constant=refuse)  # a strict parser: no NaN / Infinity literals
    last = stored["entries"][-1]
    nonfinite = [k for k, v in last.items() if v is None]
    assert nonfinite and all(f"/entries/{len(stored['entries']) - 1}/{k}" in stored["nonfinite"]
                             for k in nonfinite)
    again = read_json(tmp_path / FILENAME)["entries"][-1]
    assert all(math.isnan(again[k]) for k in nonfinite)  # what the guard judged, back after a resume
