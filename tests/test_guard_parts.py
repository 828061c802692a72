"""The guard's parts on their own: the signal registry, the history's verdict API, the measurement budget,
the adaptive floor's application, the shared stop decision and the policy guard a GRPO trainer gets."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from transformers import TrainerControl

from collapse_guard.budget import MeasurementBudget
from collapse_guard.detector import CollapseDetector, DetectorConfig, Verdict
from collapse_guard.floor import AdaptiveFloor, FloorConfig
from collapse_guard.history import History, measurement, strip_verdict, verdict_of, write_verdict
from collapse_guard.signals import LEVELS, SIGNALS, label, logged_names, names
from collapse_guard.stop import stop_on_alarm


def test_detector_defaults_and_logged_keys_come_from_the_registry():
    d = DetectorConfig()
    assert d.diversity_signals == names(rule="diversity")
    assert d.nonfinite_alarm_signals == names(nonfinite_alarm=True)
    assert d.self_bleu_signal in names(rule="self_bleu") and d.ppl_signal in names(rule="perplexity")
    assert "heldout_ppl_ratio" in logged_names() and "distinct_1" not in logged_names()
    assert SIGNALS["distinct_2"].logged_key == "collapse/distinct_2" and label("self_bleu4_ratio") == \
        "self-BLEU-4 ratio"
    assert Verdict("warn").severity == LEVELS.index("warn")


def test_a_verdict_goes_into_an_entry_one_way_and_comes_out_one_way():
    history = [{"round": 0, "step": 0, "heldout_ppl": 20.0, "compression_ratio": 2.0},
               {"round": 0, "step": 5, "heldout_ppl": 30.0, "compression_ratio": 2.0, "final": True,
                "floor": 0.3, "floor_reason": "ok", "mixing/real_fraction": 0.5}]
    verdict = CollapseDetector().check(history)
    entry = write_verdict(history[-1], verdict)
    assert entry["level"] == "alarm" and entry["heldout_ppl_ratio"] == pytest.approx(1.5)
    back = verdict_of(entry)
    assert (back.level, back.reasons, back.signals) == ("alarm", verdict.reasons, {"heldout_ppl_ratio": 1.5})
    stripped = strip_verdict(entry)
    assert "level" not in stripped and "heldout_ppl_ratio" not in stripped
    assert stripped["compression_ratio"] == 2.0  # a measured signal, not a derived ratio
    assert set(measurement(entry)) == {"round", "step", "heldout_ppl", "compression_ratio"}
    assert verdict_of(measurement(entry)) is None


def test_budget_counters_reset_in_one_place_and_spacing_holds():
    budget = MeasurementBudget(eval_steps=4, cost_budget=None)
    budget.record(0, {"seconds": 0.5, "forward_tokens": 10})  # the baseline: the guard takes it at start
    taken = [s for s in range(0, 11) if budget.due(s, final=s == 10)
             and budget.record(s, {"seconds": 0.5, "forward_tokens": 10}) is None]
    assert taken == [4, 8, 10] and budget.spent["measurements"] == 4
    budget.start(last_measured=8)  # a resume continuing from the measurement at step 8
    assert budget.spent == {"seconds": 0.0, "tokens": 0.0, "measurements": 0}
    assert not budget.due(11, final=False) and budget.due(12, final=False)
    with pytest.raises(KeyError):
        budget.record(12, {"seconds": 1.0})  # Probe.measure's cost always carries forward_tokens


@pytest.mark.parametrize("sequential, fits", [(False, False), (True, True)])
def test_budget_prices_a_sequential_measurement_at_half_its_held_out_part(sequential, fits):
    """3 forward tokens a training token; 10% budget: a measurement fits when the projected job is >= 9x the
    planned cost. The first one cost 1000 tokens (400 of them held-out): with this one and the final one the
    guard plans 3000, or 2800 when this one may stop at half the held-out set; the job projects to 26,000."""
    budget = MeasurementBudget(eval_steps=1, cost_budget=0.1, budget_unit="tokens", sequential=sequential)
    budget.record(0, {"seconds": 1.0, "forward_tokens": 1000, "heldout_tokens": 400})
    budget.trained_tokens = 26_000 / 3
    assert budget.due(5, final=False, max_steps=5) is fits
    budget.record(5, {"seconds": 1.0, "forward_tokens": 900, "heldout_tokens": 200})
    assert budget._last_optional == 900  # the next optional one is priced at what the last one cost


class Collator:
    allow_low_real_fraction = False

    def __init__(self, floor):
        self.min_real_fraction = floor
        self.set_to = []

    def set_floor(self, value):
        self.set_to.append(value)
        self.min_real_fraction = value


def test_the_floor_has_one_owner_the_collator():
    collator = Collator(0.5)
    floor = AdaptiveFloor(FloorConfig(minimum=0.1, maximum=0.9), collator)
    floor.begin({"floor": 0.3, "floor_healthy": 1}, resumed=True)
    assert collator.set_to == []  # a resume: the collator's checkpoint restored its floor
    collator.min_real_fraction = 0.4  # what the checkpoint held
    entry = {}
    floor.decide(entry, "warn")
    assert collator.min_real_fraction == entry["floor"] == pytest.approx(0.6)  # from the collator's 0.4
    floor.begin({"floor": 0.3, "floor_healthy": 0}, resumed=False)  # a new round without a checkpoint
    assert collator.min_real_fraction == 0.3
    assert floor.hold_stop(True, 10, 5) and floor.recheck_at == 15 and not floor.hold_stop(True, 15, 5)
    with pytest.raises(ValueError, match=r"FloorConfig.minimum=0.05 is below 0.1.*allow_low_real_fraction"):
        AdaptiveFloor(FloorConfig(minimum=0.05), collator)  # refused before training, not at a decision


def test_stop_decision_is_shared_and_can_be_held():
    control = TrainerControl()
    assert not stop_on_alarm(control, Verdict("warn"), True) and not control.should_training_stop
    assert not stop_on_alarm(control, Verdict("alarm"), False) and not control.should_training_stop
    assert not stop_on_alarm(control, Verdict("alarm"), True, hold=lambda alarm: alarm)
    assert stop_on_alarm(control, Verdict("alarm"), True) and control.should_training_stop


def test_history_round_trips_non_finite_values_through_strict_json(tmp_path):
    path = tmp_path / "h.json"
    History(path, [{"round": 0, "step": 0, "heldout_ppl": math.inf, "train_loss": math.nan}]).save()
    def refuse(literal):
        raise ValueError(f"bare {literal}")

    stored = json.loads(path.read_text(), parse_constant=refuse)  # strict: no NaN / Infinity literals
    assert stored["entries"][0]["heldout_ppl"] is None and stored["entries"][0]["train_loss"] is None
    entry = History.load(path).entries[0]
    assert entry["heldout_ppl"] == math.inf and math.isnan(entry["train_loss"])


def test_grpo_gets_the_policy_guard_and_the_example_prints_both_verdicts(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "grpo_guard", Path(__file__).resolve().parents[1] / "examples" / "grpo_guard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trainer, guard = module.main(["--output-dir", str(tmp_path), "--reward", "noise", "--max-steps", "4"])
    from collapse_guard.policy_guard import PolicyGuardCallback

    assert any(isinstance(cb, PolicyGuardCallback) for cb in trainer.callback_handler.callbacks)
    out = capsys.readouterr().out
    assert f"policy verdict (the policy's own completions): {guard.policy_verdict}" in out
    assert f"held-out verdict (human-text perplexity): {guard.last_verdict}" in out
    assert guard.last_verdict is not None and [e["step"] for e in guard.history.entries] == [0, 4]
