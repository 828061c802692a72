"""The guard inside GRPO: the diversity of the policy's own completions, with no extra generation.

A reward that one letter hacks drives the tiny policy into repeating a few tokens; the guard must raise
an alarm and stop training. The same run with a reward that carries no exploitable regularity (seeded
noise) must train to the end without an alarm.
"""

import random
import zlib

import pytest
from datasets import Dataset

from collapse_guard.callbacks import CollapseGuardCallback, GuardConfig
from collapse_guard.probe import ProbeConfig
from collapse_guard.testing import human_like_sentences, tiny_causal_lm


def hacked(completions, **kwargs):  # one letter pays: repeating one token is the shortcut
    return [c.count("e") / max(len(c), 1) for c in completions]


def noise(completions, **kwargs):
    # crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), and so did this reward
    return [random.Random(zlib.crc32(c.encode())).random() for c in completions]


def run_grpo(tmp_path, tokenizer, reward, max_steps=24):
    from trl import GRPOConfig, GRPOTrainer

    prompts = Dataset.from_dict({"prompt": [" ".join(s.split()[:3])
                                            for s in human_like_sentences(64, seed=3)]})
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=16, num_generations=8,
                      max_completion_length=12, learning_rate=1.5e-2, lr_scheduler_type="constant",
                      max_steps=max_steps, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                      save_strategy="no", disable_tqdm=True, beta=0.0, seed=0)
    trainer = GRPOTrainer(model=tiny_causal_lm(tokenizer), reward_funcs=reward, args=args,
                          train_dataset=prompts, processing_class=tokenizer)
    guard = CollapseGuardCallback(human_like_sentences(16, seed=99), probe=ProbeConfig(context_length=64),
                                  config=GuardConfig(eval_steps=10_000, cost_budget=None)).attach(trainer)
    trainer.train()
    return trainer, guard


def test_grpo_guard_fires_on_a_hacked_reward_and_not_on_the_control(tmp_path, tokenizer):
    trainer, guard = run_grpo(tmp_path / "hacked", tokenizer, hacked)
    levels = [e["level"] for e in guard.policy_history.entries]
    assert guard.policy_verdict.is_alarm and guard.stopped_at == trainer.state.global_step < 24
    first_flag = next(e["step"] for e in guard.policy_history.entries if e["level"] != "ok")
    assert first_flag < guard.stopped_at and levels[0] == "ok"
    # reward rose
    assert guard.policy_history.entries[-1]["reward"] > guard.policy_history.entries[0]["reward"]
    logged = [log for log in trainer.state.log_history if "collapse/policy/distinct_1" in log]
    assert logged and logged[-1]["collapse/policy/level"] == 2.0
    assert (tmp_path / "hacked" / "collapse_history_policy.json").exists()

    trainer, guard = run_grpo(tmp_path / "noise", tokenizer, noise)
    # Noise is not a flat reward: at this learning rate it sharpens the policy a little too. Over 16 salted
    # noise rewards, 3 runs' policy signals warned near the end (token entropy -21% to -23%, warn line 20%)
    # and none alarmed; so the control may warn, but a policy alarm here is the guard over-firing. (The
    # held-out guard does alarm at the last step, rightly: human-text perplexity x2.3 after 24 steps.)
    assert trainer.state.global_step == 24
    assert not any(e["level"] == "alarm" for e in guard.policy_history.entries), \
        guard.policy_history.entries[-1]["reasons"]
    assert guard.policy_history.entries[0]["level"] == "ok"


def test_dpo_like_trainers_take_the_guard_but_not_the_collator(tmp_path, tokenizer):
    from transformers import Trainer, TrainingArguments

    from collapse_guard.mixing import MixingCollator

    dpo_like = type("DPOTrainer", (Trainer,), {})
    train = Dataset.from_dict({"input_ids": [[5, 6, 7]] * 4})
    trainer = dpo_like(model=tiny_causal_lm(tokenizer), args=TrainingArguments(str(tmp_path), report_to=[],
                       use_cpu=True), train_dataset=train, processing_class=tokenizer)
    with pytest.raises(ValueError, match="DPOTrainer trains on preference pairs.*without a collator"):
        CollapseGuardCallback(human_like_sentences(8),
                              collator=MixingCollator(real_dataset=["a"])).attach(trainer)
    guard = CollapseGuardCallback(human_like_sentences(8),
                                  probe=ProbeConfig(context_length=64)).attach(trainer)
    assert guard.probe is not None and guard in trainer.callback_handler.callbacks
