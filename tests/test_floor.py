"""The adaptive real-data floor: the guard raises the collator's real share on a warn, lowers it after
recovery, applies it on every rank at the same step, and carries it through a resume."""

import json
from pathlib import Path

import pytest
from datasets import Dataset

from collapse_guard.callbacks import CollapseGuardCallback, GuardConfig
from collapse_guard.detector import CollapseDetector, Verdict
from collapse_guard.floor import FloorConfig, FloorController
from collapse_guard.mixing import MixingCollator, mix_datasets
from collapse_guard.probe import ProbeConfig
from collapse_guard.testing import human_like_sentences, launch_two_processes, tiny_causal_lm


def test_policy_steps_and_bounds():
    floor = FloorController(FloorConfig(minimum=0.2, maximum=0.8, step_up=2.0, step_down=0.5, decay_after=2))
    assert floor.value == 0.2
    assert floor.update("warn")[0] == 0.4 and floor.update("warn")[0] == 0.8 \
        and floor.update("warn")[0] == 0.8
    assert floor.update("ok") == (0.8, "ok: floor held at 0.80")
    value, reason = floor.update("ok")
    assert value == 0.4 and reason.startswith("2 healthy measurements")
    for _ in range(6):
        floor.update("ok")
    assert floor.value == 0.2  # never below the user's minimum
    assert floor.update("alarm")[0] == 0.8
    restored = FloorController(FloorConfig(minimum=0.2, maximum=0.8))
    restored.restore({"floor": 0.6, "floor_healthy": 1})
    assert (restored.value, restored.healthy) == (0.6, 1)


@pytest.mark.parametrize(("kwargs", "message"), [({"minimum": 0.9, "maximum": 0.5}, "must be <= maximum"),
                                                 ({"step_up": 0.9}, "step_up must be > 1"),
                                                 ({"start": 0.95}, "must lie in"),
                                                 ({"decay_after": 0}, "decay_after"),
                                                 ({"early_warn": {"heldout_tail": 0.2}}, "heldout_tail_nll"),
                                                 ({"early_warn": {"high_ppl_share": 0.2}},
                                                  "collapse direction"),
                                                 ({"early_warn": {"heldout_tail_nll": float("nan")}},
                                                  "finite number"),
                                                 ({"early_warn": ["heldout_tail_nll"]}, "must map")])
def test_bad_floor_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FloorConfig(**kwargs)


def scripted(levels):
    """A detector that answers the given levels in order (the floor's inputs, not the model's)."""
    def check(self, history):
        level = levels.pop(0) if levels else "ok"
        return Verdict(level, [f"{level} (scripted)"] if level != "ok" else [], {})
    return check


def test_early_crossing_reads_each_signal_in_its_collapse_direction():
    config = FloorConfig(early_warn={"heldout_tail_nll": 0.2, "heldout_entropy": 0.1})
    baseline = {"heldout_tail_nll": 5.0, "heldout_entropy": 3.0}
    assert config.early_crossing({"heldout_tail_nll": 5.15, "heldout_entropy": 2.95}, baseline) is None
    up = config.early_crossing({"heldout_tail_nll": 5.3, "heldout_entropy": 3.0}, baseline)
    assert up.startswith("held-out tail NLL moved +0.3")
    assert config.early_crossing({"heldout_tail_nll": 4.0, "heldout_entropy": 2.8}, baseline) \
        .startswith("held-out predictive entropy moved +0.2")  # entropy falls under collapse
    assert config.early_crossing({"heldout_tail_nll": float("nan")}, baseline) is None
    assert config.early_crossing(baseline, baseline) is None and config.early_crossing(baseline, None) is None


def test_a_threshold_the_baseline_cannot_serve_is_reported_once(caplog):
    from types import SimpleNamespace

    from collapse_guard.floor import AdaptiveFloor

    collator = SimpleNamespace(min_real_fraction=0.5, allow_low_real_fraction=True)
    floor = AdaptiveFloor(FloorConfig(early_warn={"self_bleu4": 0.03, "heldout_tail_nll": 0.2}), collator)
    baseline = {"heldout_ppl": 40.0, "heldout_tail_nll": 6.0}  # measured without generations
    with caplog.at_level("WARNING", logger="collapse_guard.floor"):
        floor.decide({"heldout_ppl": 41.0, "heldout_tail_nll": 6.1}, "ok", baseline)
        floor.decide({"heldout_ppl": 41.0, "heldout_tail_nll": 6.3}, "ok", baseline)
    warnings = [r.getMessage() for r in caplog.records if "will never act" in r.getMessage()]
    assert len(warnings) == 1 and "self_bleu4" in warnings[0] and "heldout_tail_nll" not in warnings[0]
    assert collator.min_real_fraction == 0.75  # the tail NLL still acts: +0.3 nats, 0.5 x step_up 1.5


def run(tmp_path, tokenizer, monkeypatch, levels, max_steps=12, resume=None, save=False, floor=None):
    from trl import SFTConfig, SFTTrainer

    monkeypatch.setattr(CollapseDetector, "check", scripted(list(levels)))
    real = Dataset.from_dict({"text": human_like_sentences(40, seed=1)})
    synthetic = Dataset.from_dict({"text": [f"synthetic {i} the model said" for i in range(40)]})
    args = SFTConfig(str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, report_to=[],
                     use_cpu=True, bf16=False, save_strategy="steps" if save else "no", save_steps=4,
                     logging_steps=2, disable_tqdm=True, max_length=32)
    trainer = SFTTrainer(model=tiny_causal_lm(tokenizer), args=args, processing_class=tokenizer,
                         train_dataset=mix_datasets(real, synthetic, mode="accumulate",
                                                    min_real_fraction=0.3))
    collator = MixingCollator(real_dataset=real, min_real_fraction=0.1, allow_low_real_fraction=True)
    guard = CollapseGuardCallback(human_like_sentences(8, seed=9), collator=collator,
                                  probe=ProbeConfig(context_length=32),
                                  config=GuardConfig(eval_steps=2, cost_budget=None,
                                                     stop_training_on_alarm=True),
                                  floor=floor or FloorConfig(minimum=0.1, maximum=0.9, decay_after=2)
                                  ).attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, guard, collator


def test_floor_rises_on_warn_falls_after_recovery_and_is_logged(tmp_path, tokenizer, monkeypatch):
    # measurements at steps 0, 2, 4, ...: ok, warn, warn, ok, ok, ok, ok
    trainer, guard, collator = run(tmp_path, tokenizer, monkeypatch,
                                   ["ok", "warn", "warn", "ok", "ok", "ok", "ok"])
    floors = [(e["step"], e["floor"]) for e in guard.history.entries]
    assert floors[:4] == [(0, 0.1), (2, 0.15), (4, 0.225), (6, 0.225)]
    assert floors[4][1] == pytest.approx(0.18) and floors[-1][1] < 0.18  # decays toward the minimum
    assert all(e["floor_reason"] for e in guard.history.entries)
    logged = [log["collapse/floor"] for log in trainer.state.log_history if "collapse/floor" in log]
    assert 0.225 in logged
    assert collator.min_real_fraction == floors[-1][1]


def test_an_early_signal_raises_the_floor_and_leaves_the_verdict_ok(tmp_path, tokenizer, monkeypatch):
    # every verdict is ok; the tail NLL threshold is crossed by any measurement (-100 nats) or by none (+100)
    crossing = FloorConfig(minimum=0.1, maximum=0.9, decay_after=2, early_warn={"heldout_tail_nll": -100.0})
    trainer, guard, collator = run(tmp_path / "crossed", tokenizer, monkeypatch, [], max_steps=6,
                                   floor=crossing)
    entries = guard.history.entries
    assert all(e["level"] == "ok" for e in entries) and all("heldout_tail_nll" in e for e in entries)
    assert [e["floor"] for e in entries] == [0.1, 0.15, 0.225, 0.3375]  # the baseline is not compared
    reason = entries[1]["floor_reason"]
    assert reason.startswith("warn: floor 0.10 -> 0.15 (held-out tail NLL moved")
    assert reason.endswith("the verdict stays ok)")
    assert collator.min_real_fraction == 0.3375
    quiet = FloorConfig(minimum=0.1, maximum=0.9, start=0.5, decay_after=2,
                        early_warn={"heldout_tail_nll": 100.0})
    trainer, guard, collator = run(tmp_path / "quiet", tokenizer, monkeypatch, [], max_steps=6, floor=quiet)
    assert [e["floor"] for e in guard.history.entries] == [0.5, 0.4, 0.4, 0.32]


def test_alarm_raises_to_the_maximum_and_rechecks_before_stopping(tmp_path, tokenizer, monkeypatch):
    trainer, guard, collator = run(tmp_path / "rescued", tokenizer, monkeypatch, ["ok", "alarm", "ok", "ok"])
    assert guard.stopped_at is None and trainer.state.global_step == 12  # the maximum floor rescued it
    assert [e["floor"] for e in guard.history.entries][1] == 0.9
    trainer, guard, collator = run(tmp_path / "stopped", tokenizer, monkeypatch, ["ok", "alarm", "alarm"])
    # re-measured once at the maximum, then stop
    assert guard.stopped_at == 4 and trainer.state.global_step == 4


def test_floor_state_survives_a_resume(tmp_path, tokenizer, monkeypatch):
    levels = ["ok", "warn", "warn", "ok", "ok", "ok", "ok"]
    _, full, _ = run(tmp_path / "full", tokenizer, monkeypatch, levels, save=True)
    out = tmp_path / "resumed"
    run(out, tokenizer, monkeypatch, levels[:3], max_steps=4, save=True)  # measured at 0, 2, 4; checkpoint-4
    _, resumed, collator = run(out, tokenizer, monkeypatch, levels[3:], resume=str(out / "checkpoint-4"))
    assert [e["floor"] for e in resumed.history.entries] == [e["floor"] for e in full.history.entries]


@pytest.mark.distributed
def test_two_processes_apply_the_same_floor_at_the_same_step(tmp_path):
    script = Path(__file__).parent / "scripts" / "floor_dist.py"
    done = launch_two_processes(script, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["floors"] == ranks[1]["floors"] and len(set(f for _, f in ranks[0]["floors"])) > 1
    assert ranks[0]["applied"] == ranks[1]["applied"]
