import math

import numpy as np
import pytest

from collapse_guard.detector import EVIDENCE_FIELDS, CollapseDetector, DetectorConfig, Verdict


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
    assert verdict.reasons == ["held-out ppl rose 2 evaluations in a row (18.00 -> 18.50 -> 19.00), "
                               "each by more than 1%"]
    assert verdict.evidence["heldout_ppl_rises"]["level"] == "warn"
    # one rise is not enough; the rule can be switched off; a tolerance absorbs small rises
    assert CollapseDetector().check(history[:3]).level == "ok"
    assert check(*history, ppl_rises_warn=0).level == "ok"
    assert check(*history, ppl_rise_tolerance=0.05).level == "ok"


def test_noise_sized_rises_do_not_warn():
    # issue #11: +0.02% twice in a row used to warn, because the rise tolerance was 0
    history = [{"heldout_ppl": 20.0}, {"heldout_ppl": 20.004}, {"heldout_ppl": 20.008}]
    assert CollapseDetector().check(history).level == "ok"
    assert check(*history, ppl_rise_tolerance=0.0).level == "warn"  # the old rule, still available


@pytest.mark.parametrize("name", ["distinct_2", "unigram_entropy", "tail_coverage"])
def test_diversity_ratios(name):
    warn = check(BASE, {**BASE, name: BASE[name] * 0.85})
    alarm = check(BASE, {**BASE, name: BASE[name] * 0.70})
    assert warn.level == "warn" and alarm.level == "alarm"
    assert alarm.reasons[0].startswith(f"{name} fell 30% below round 0") \
        and "alarm at 25%" in alarm.reasons[0]
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
    assert verdict.evidence[name]["level"] == "alarm"


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


# ----- statistical verdicts: per-document NLL and generations turn point rules into interval rules ------
def doc_entries(seed, change=0.0, noise=0.05, n=64, rounds=(0, 1)):
    """A baseline and later entries whose per-document log-ppl moves by `change` (per round) plus N(0, noise):
    the items behind `heldout_ppl`, drawn from a known distribution."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(50, 400, n)
    rate = rng.normal(3.0, 0.4, n)  # documents differ in difficulty
    entries = []
    for i, r in enumerate(rounds):
        moved = rate + (i * change + rng.normal(0.0, noise, n) if i else 0.0)
        nll = moved * tokens
        entries.append({"round": r, "step": 0, "heldout_ppl": math.exp(nll.sum() / tokens.sum()),
                        "heldout_doc_nll": nll.tolist(), "heldout_doc_tokens": tokens.tolist()})
    return entries


VOCAB = [f"w{i}" for i in range(2000)]
ZIPF = 1.0 / np.arange(1, len(VOCAB) + 1)
ZIPF /= ZIPF.sum()


def generations(seed, n=32, collapsed=False):
    rng = np.random.default_rng(seed)
    if collapsed:
        loop = "the model said the same thing and then it said it again over and over "
        return [(loop * 10)[int(rng.integers(0, 20)):][:200] for _ in range(n)]
    sizes = rng.integers(15, 60, n)
    return [" ".join(VOCAB[j] for j in rng.choice(len(VOCAB), size, p=ZIPF)) for size in sizes]


def test_no_change_is_ok_in_at_least_95_percent_of_seeds():
    seeds = range(100)
    ok = sum(CollapseDetector().check(doc_entries(s, change=0.0, noise=0.1)).level == "ok" for s in seeds)
    assert ok >= 95
    # even with the warn threshold at "any rise", the lower bound crosses it in about 2.5% of seeds
    strict = CollapseDetector(DetectorConfig(ppl_ratio_warn=1.0))
    false_warns = sum(strict.check(doc_entries(s, change=0.0, noise=0.1)).level != "ok" for s in range(200))
    assert false_warns <= 10, false_warns


def test_a_clear_25_percent_rise_is_an_alarm_with_its_interval():
    verdict = CollapseDetector().check(doc_entries(1, change=math.log(1.25), noise=0.05))
    assert verdict.level == "alarm"
    reason = verdict.reasons[0]
    assert reason.startswith("held-out ppl rose 2") and "over round 0" in reason
    assert reason.endswith("alarm at 20%")
    assert "95% interval x1.2" in reason and "over 64 documents" in reason
    evidence = verdict.evidence["heldout_ppl"]
    assert evidence["level"] == "alarm" and evidence["n"] == 64 and evidence["confidence"] == 0.95
    assert 1.20 <= evidence["low"] <= evidence["ratio"] <= evidence["high"]
    assert evidence["method"].startswith("paired bootstrap over documents (2000 resamples")
    assert evidence["rule"] == "warn when the interval's lower bound >= 1.05, alarm when >= 1.2"


def test_a_6_percent_rise_with_tight_noise_warns():
    verdict = CollapseDetector().check(doc_entries(2, change=math.log(1.06), noise=0.01))
    assert verdict.level == "warn" and verdict.reasons[0].endswith("warn at 5%")
    assert verdict.evidence["heldout_ppl"]["low"] >= 1.05


def test_a_6_percent_rise_with_huge_noise_is_not_significant():
    history = doc_entries(3, change=math.log(1.06), noise=0.6)
    verdict = CollapseDetector().check(history)
    evidence = verdict.evidence["heldout_ppl"]
    assert verdict.level == "ok" and verdict.reasons == []
    assert evidence["ratio"] >= 1.05 > evidence["low"] and evidence["level"] == "ok"
    # the point rule alone would have warned on the same perplexities
    points = [{k: v for k, v in e.items() if not k.startswith("heldout_doc")} for e in history]
    assert CollapseDetector().check(points).level == "warn"


def test_a_point_above_the_alarm_with_a_wide_interval_warns_and_says_why():
    verdict = CollapseDetector().check(doc_entries(12, change=math.log(1.22), noise=0.25))
    evidence = verdict.evidence["heldout_ppl"]
    assert evidence["ratio"] >= 1.2 > evidence["low"] >= 1.05
    assert verdict.level == "warn"
    assert verdict.reasons[0].endswith("warn at 5% (alarm needs the whole interval above 20%)")


def test_the_verdict_is_a_deterministic_function_of_the_history():
    history = doc_entries(4, change=0.05, noise=0.3, rounds=(0, 1, 2))
    history[0]["generations"] = generations(1)
    history[-1]["generations"] = generations(2)
    first = CollapseDetector().check(history).to_dict()
    assert CollapseDetector().check(history).to_dict() == first
    assert CollapseDetector(DetectorConfig()).check([dict(e) for e in history]).to_dict() == first


def test_check_is_fast():
    import time

    history = doc_entries(6, rounds=(0, 1, 2, 3))
    history[0]["generations"], history[-1]["generations"] = generations(1, 64), generations(2, 64)
    detector = CollapseDetector()
    detector.check(history)
    start = time.perf_counter()
    detector.check(history)
    assert time.perf_counter() - start < 1.0


def test_evidence_round_trips_through_json():
    import json

    history = doc_entries(7, change=0.3)
    history[0]["generations"], history[-1]["generations"] = generations(1), generations(2, collapsed=True)
    verdict = CollapseDetector().check(history)
    restored = Verdict.from_dict(json.loads(json.dumps(verdict.to_dict())))
    assert restored == verdict
    assert set(verdict.evidence) >= {"heldout_ppl", "distinct_2", "unigram_entropy", "self_bleu4"}
    for evidence in verdict.evidence.values():
        assert tuple(evidence) == EVIDENCE_FIELDS
    # verdicts written before evidence existed still load
    assert Verdict.from_dict({"level": "warn", "reasons": ["x"]}).evidence == {}


def test_point_rules_decide_without_per_document_data():
    base, latest = doc_entries(8, change=math.log(1.3))
    cases = {
        "no per-document NLL in the baseline entry": ({**base, "heldout_doc_nll": None}, latest),
        "per-document data unusable (per-document NLL and token lists must be flat and of one length":
            (base, {**latest, "heldout_doc_nll": latest["heldout_doc_nll"][:-1]}),
        "per-document sums give ppl": (base, {**latest, "heldout_ppl": latest["heldout_ppl"] * 2}),
        "9 documents, intervals need 10": (_first_documents(base, 9), _first_documents(latest, 9)),
    }
    for why, (b, new) in cases.items():
        verdict = CollapseDetector().check([b, new])
        evidence = verdict.evidence["heldout_ppl"]
        assert evidence["method"].startswith("point estimate: ") and why in evidence["method"]
        assert evidence["low"] is None and evidence["n"] is None
        assert verdict.level != "ok" and "interval" not in verdict.reasons[0]


def _first_documents(entry, n):
    nll, tokens = entry["heldout_doc_nll"][:n], entry["heldout_doc_tokens"][:n]
    ppl = math.exp(sum(nll) / sum(tokens))
    return {**entry, "heldout_doc_nll": nll, "heldout_doc_tokens": tokens, "heldout_ppl": ppl}


def test_per_document_data_alone_is_enough():
    base, latest = doc_entries(9, change=math.log(1.3))
    del base["heldout_ppl"], latest["heldout_ppl"]
    verdict = CollapseDetector().check([base, latest])
    assert verdict.level == "alarm" and "over 64 documents" in verdict.reasons[0]


def test_significant_rises_in_a_row_warn_with_their_intervals():
    history = doc_entries(10, change=0.03, noise=0.01, rounds=(0, 1, 2))
    history.insert(1, {**history[0], "round": 0, "step": 50})  # flat first step: the rise starts after it
    verdict = CollapseDetector(DetectorConfig(ppl_ratio_warn=1.2)).check(history)
    assert verdict.level == "warn"
    assert verdict.reasons[0].startswith("held-out ppl rose 2 evaluations in a row (")
    assert "95% intervals of the rises x1.0" in verdict.reasons[0]
    assert "over 64 documents), each by more than 1%" in verdict.reasons[0]
    rises = verdict.evidence["heldout_ppl_rises"]
    assert rises["value"] == 2 and rises["low"] > 1.01 and rises["method"].startswith("paired bootstrap")


def test_tiny_or_noisy_rises_are_not_counted():
    detector = CollapseDetector(DetectorConfig(ppl_ratio_warn=1.2))
    tiny = doc_entries(11, change=0.003, noise=0.001, rounds=(0, 1, 2))  # significant, but within tolerance
    assert detector.check(tiny).level == "ok"
    noisy = doc_entries(11, change=0.03, noise=1.0, rounds=(0, 1, 2))  # 3% a round, but drowned in noise
    assert "heldout_ppl_rises" not in detector.check(noisy).evidence


@pytest.mark.parametrize(
    ("baseline", "label"),
    [({"round": 2, "step": 0}, "round 2"), ({"round": 1, "step": 40}, "round 1 step 40"),
     ({"step": 0}, "step 0"), ({}, "the baseline")],
)
def test_the_baseline_label_names_history_0(baseline, label):
    base, latest = doc_entries(1, change=math.log(1.25))
    for key in ("round", "step"):
        base.pop(key)
    verdict = CollapseDetector().check([{**base, **baseline}, latest])
    assert f"over {label} (" in verdict.reasons[0]


def test_collapsed_generations_alarm_with_prompt_intervals():
    base = {"round": 0, "generations": generations(1)}
    verdict = CollapseDetector().check([base, {"round": 1, "generations": generations(2, collapsed=True)}])
    assert verdict.level == "alarm"
    distinct = next(r for r in verdict.reasons if r.startswith("distinct_2 fell"))
    assert "below round 0" in distinct and "95% interval x0." in distinct and "over 32 prompts" in distinct
    assert distinct.endswith("alarm at 25%")
    bleu = next(r for r in verdict.reasons if r.startswith("self-BLEU-4 rose"))
    assert "over 32 prompts" in bleu and bleu.endswith("alarm at 25%")
    evidence = verdict.evidence["distinct_2"]
    assert evidence["method"] == "delete-one jackknife over prompts" and evidence["high"] < 0.75
    assert evidence["rule"] == "warn when the interval's upper bound < 0.9, alarm when < 0.75"


def test_healthy_generations_are_ok():
    detector = CollapseDetector()
    levels = [detector.check([{"generations": generations(s)}, {"generations": generations(s + 100)}]).level
              for s in range(10)]
    assert levels.count("ok") >= 9


def test_generation_intervals_fall_back_to_point_rules():
    base = {**BASE, "generations": generations(1)}
    latest = {**BASE, "distinct_2": 0.5, "generations": generations(2)[:-1]}  # one prompt short: not paired
    verdict = CollapseDetector().check([base, latest])
    assert verdict.evidence["distinct_2"]["method"] == "point estimate: 32 baseline and 31 latest generations"
    assert verdict.level == "alarm" and "interval" not in verdict.reasons[0]
    # tail coverage has no interval (it needs the human corpus): a point rule, beside the jackknifed signals
    both = CollapseDetector().check([{**base, "tail_coverage": 0.5}, {**base, "tail_coverage": 0.3}])
    assert both.evidence["tail_coverage"]["method"] == "point estimate" and both.level == "alarm"
    assert both.evidence["distinct_2"]["method"] == "delete-one jackknife over prompts"


def test_self_bleu_interval_still_needs_an_absolute_rise():
    lenient = DetectorConfig(self_bleu_min_rise=1.0)
    history = [{"generations": generations(1)}, {"generations": generations(2, collapsed=True)}]
    verdict = CollapseDetector(lenient).check(history)
    assert verdict.evidence["self_bleu4"]["low"] > 1.25 and verdict.evidence["self_bleu4"]["level"] == "ok"
    assert not any(r.startswith("self-BLEU") for r in verdict.reasons)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"confidence": 1.0}, "confidence must be in"),
        ({"confidence": 0.3}, "confidence must be in"),
        ({"ppl_bootstrap_resamples": 10}, "ppl_bootstrap_resamples must be an int >= 100"),
        ({"bootstrap_seed": -1}, "bootstrap_seed must be an int >= 0"),
        ({"min_items": 2}, "min_items must be an int >= 3"),
        ({"min_items": True}, "min_items must be an int >= 3"),
    ],
)
def test_interval_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DetectorConfig(**kwargs)


def test_every_interval_setting_is_a_documented_field():
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(DetectorConfig)}
    for name in ("confidence", "ppl_bootstrap_resamples", "bootstrap_seed", "min_items", "ppl_doc_nll_signal",
                 "ppl_doc_tokens_signal", "generations_signal", "ppl_rise_tolerance"):
        assert fields[name].metadata["help"]
    narrow = CollapseDetector(DetectorConfig(confidence=0.5)).check(doc_entries(3, change=0.05, noise=0.4))
    wide = CollapseDetector().check(doc_entries(3, change=0.05, noise=0.4))
    assert narrow.evidence["heldout_ppl"]["low"] > wide.evidence["heldout_ppl"]["low"]
    assert "50% interval" in (narrow.reasons or ["50% interval"])[0]


@pytest.mark.parametrize("obj", [CollapseDetector, DetectorConfig])
def test_docstring_examples_hold(obj):
    import doctest

    text = obj.__doc__.replace("```python", "").replace("```", "")  # markdown fences are not doctest output
    test = doctest.DocTestParser().get_doctest(text, {}, obj.__name__, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
