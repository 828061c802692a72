import math

import pytest

from collapse_guard.detector import CollapseDetector, DetectorConfig, Verdict


def check(*entries, **config):
    return CollapseDetector(DetectorConfig(**config) if config else None).check(list(entries))


BASE = {"round": 0, "step": 0, "heldout_ppl": 20.0, "distinct_2": 0.8, "unigram_entropy": 6.0,
        "tail_coverage": 0.5, "self_bleu4": 0.2, "low_ppl_share": 0.25}


def test_healthy_history_is_ok():
    verdict = check(BASE, {**BASE, "round": 1, "heldout_ppl": 19.0})
    assert verdict.level == "ok" and verdict.reasons == []
    assert verdict.signals["heldout_ppl_ratio"] == pytest.approx(0.95)


def test_baseline_alone_is_ok_and_empty_history_is_ok():
    assert check(BASE).level == "ok"
    assert CollapseDetector().check([]).level == "ok"


def test_ppl_ratio_alarm_reason_reads_like_the_design():
    verdict = check({"round": 0, "heldout_ppl": 20.0}, {"round": 1, "heldout_ppl": 24.6})
    assert verdict.level == "alarm"
    assert verdict.reasons == ["held-out ppl rose 23% over round 0 (20.00 -> 24.60): alarm at 20%"]


def test_ppl_ratio_warn_between_thresholds():
    verdict = check({"heldout_ppl": 20.0}, {"heldout_ppl": 21.2})
    assert verdict.level == "warn"
    assert "warn at 5%" in verdict.reasons[0] and "the baseline" in verdict.reasons[0]


def test_two_rises_in_a_row_warn_even_below_ratio():
    history = [{"heldout_ppl": 20.0}, {"heldout_ppl": 18.0}, {"heldout_ppl": 18.5}, {"heldout_ppl": 19.0}]
    verdict = CollapseDetector().check(history)
    assert verdict.level == "warn"
    assert verdict.reasons == ["held-out ppl rose 2 evaluations in a row (18.00 -> 18.50 -> 19.00)"]
    # one rise is not enough; the rule can be switched off; a tolerance absorbs small rises
    assert CollapseDetector().check(history[:3]).level == "ok"
    assert check(*history, ppl_rises_warn=0).level == "ok"
    assert check(*history, ppl_rise_tolerance=0.05).level == "ok"


@pytest.mark.parametrize("name", ["distinct_2", "unigram_entropy", "tail_coverage"])
def test_diversity_ratios(name):
    warn = check(BASE, {**BASE, name: BASE[name] * 0.85})
    alarm = check(BASE, {**BASE, name: BASE[name] * 0.70})
    assert warn.level == "warn" and alarm.level == "alarm"
    assert alarm.reasons[0].startswith(f"{name} fell 30% below round 0") and "alarm at 25%" in alarm.reasons[0]
    assert alarm.signals[f"{name}_ratio"] == pytest.approx(0.70)


def test_self_bleu_ratio():
    assert check({**BASE, "self_bleu4": 0.5}, {**BASE, "self_bleu4": 0.58}).level == "warn"
    alarm = check(BASE, {**BASE, "self_bleu4": 0.3})
    assert alarm.level == "alarm" and "self-BLEU-4 rose 50%" in alarm.reasons[0]
    # a zero baseline gives no meaningful ratio: skipped, not a crash
    assert check({**BASE, "self_bleu4": 0.0}, {**BASE, "self_bleu4": 0.3}).level == "ok"


def test_self_bleu_needs_an_absolute_rise():
    # 0.040 -> 0.061 is a 52% rise, but of sampling-noise size for varied text: not collapse
    assert check({**BASE, "self_bleu4": 0.040}, {**BASE, "self_bleu4": 0.061}).level == "ok"
    assert check({**BASE, "self_bleu4": 0.040}, {**BASE, "self_bleu4": 0.103}).level == "alarm"
    lenient = CollapseDetector(DetectorConfig(self_bleu_min_rise=0.0))
    assert lenient.check([{**BASE, "self_bleu4": 0.040}, {**BASE, "self_bleu4": 0.061}]).level == "alarm"


def test_low_ppl_concentration_is_absolute():
    assert check(BASE, {**BASE, "low_ppl_share": 0.45}).level == "warn"
    alarm = check(BASE, {**BASE, "low_ppl_share": 0.7})
    assert alarm.level == "alarm" and "70% of generations" in alarm.reasons[0]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["heldout_ppl", "train_loss", "eval_loss"])
def test_nonfinite_loss_or_ppl_is_an_alarm_not_a_crash(name, value):
    verdict = check(BASE, {**BASE, name: value})
    assert verdict.level == "alarm"
    assert any(f"{name} is {value}" in r for r in verdict.reasons)


def test_nonfinite_baseline_is_an_alarm():
    verdict = check({"heldout_ppl": math.nan}, {"heldout_ppl": 10.0})
    assert verdict.level == "alarm" and "baseline" in verdict.reasons[0]


def test_missing_signals_are_skipped():
    verdict = check({"heldout_ppl": 20.0}, {"distinct_2": 0.1})
    assert verdict.level == "ok" and verdict.signals == {}


def test_every_threshold_is_configurable():
    latest = {**BASE, "heldout_ppl": 23.0}  # +15%
    assert check(BASE, latest).level == "warn"
    assert check(BASE, latest, ppl_ratio_alarm=1.10).level == "alarm"
    assert check(BASE, latest, ppl_ratio_warn=1.2, ppl_ratio_alarm=1.3).level == "ok"
    custom = check(BASE, {**BASE, "distinct_2": 0.7}, diversity_signals=("tail_coverage",))
    assert custom.level == "ok"


def test_worst_rule_wins_and_all_reasons_are_listed():
    verdict = check(BASE, {**BASE, "heldout_ppl": 21.6, "distinct_2": 0.5})
    assert verdict.level == "alarm" and len(verdict.reasons) == 2
    assert str(verdict).startswith("ALARM: held-out ppl rose 8%")


def test_verdict_round_trips_through_dict():
    verdict = check(BASE, {**BASE, "heldout_ppl": 30.0})
    assert Verdict.from_dict(verdict.to_dict()) == verdict
    assert verdict.severity == 2 and verdict.is_alarm


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ppl_ratio_warn": 1.3, "ppl_ratio_alarm": 1.2}, "ppl_ratio_warn=1.3 must be <= ppl_ratio_alarm"),
        ({"diversity_ratio_alarm": 0.95}, "diversity_ratio_alarm=0.95 must be <="),
        ({"ppl_ratio_warn": 0.9}, "below 1"),
        ({"low_ppl_share_alarm": math.nan}, "low_ppl_share_alarm must be a finite number"),
        ({"ppl_rises_warn": -1}, "ppl_rises_warn must be an int >= 0"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DetectorConfig(**kwargs)


def test_bad_history_types():
    with pytest.raises(TypeError, match="history must be a list"):
        CollapseDetector().check("heldout_ppl")
    with pytest.raises(TypeError, match=r"history\[1\] must be a dict"):
        CollapseDetector().check([BASE, 3.0])
    with pytest.raises(TypeError, match="config must be a DetectorConfig"):
        CollapseDetector({"ppl_ratio_warn": 1.1})
    with pytest.raises(ValueError, match="Verdict.level"):
        Verdict(level="panic")
