"""Reports: JSON, PNG plots and a Markdown/HTML summary from a run folder's artifacts (hand-built folders)."""

import json
import re
import warnings
from html import unescape

import numpy as np
import pytest

from collapse_guard.history import FILENAME
from collapse_guard.io import atomic_write_json
from collapse_guard.report import (
    find_runs,
    group_arms,
    log_ticks,
    report_path,
    summarize_run,
    write_comparison,
    write_report,
)

HUMAN = [20.0 + i for i in range(40)]  # round 0's human reference perplexities: 25th percentile 29.75
PPL_METHOD = "paired bootstrap over documents (2000 resamples), seed 0"


def _metrics(ppl, div=0.8, bleu=0.05, low=0.25, **extra):
    return {"heldout_ppl": ppl, "distinct_1": div, "distinct_2": div, "distinct_4": div,
            "unigram_entropy": 8 * div, "tail_coverage": div / 2, "self_bleu4": bleu, "low_ppl_share": low,
            "ttr": div, **extra}


def _ev(ratio, level="ok", low=None, high=None, n=None, value=None, baseline=None, method=None, rule="r"):
    """One `Verdict.evidence` entry (detector.EVIDENCE_FIELDS)."""
    interval = low is not None
    return {"value": value, "baseline": baseline, "against": "round 0", "ratio": ratio, "low": low,
            "high": high, "n": n, "confidence": 0.95 if interval else None, "level": level, "rule": rule,
            "method": method or ("delete-one jackknife over prompts" if interval else "point estimate")}


def _ppl_ev(ratio, low, high, n=32, level="ok"):
    return _ev(ratio, level, low, high, n, method=PPL_METHOD)


def _train(tokens=1536, real=0, steps=16, stopped=None, rows=16, loss=2.0, floor=0.0):
    """round_r/train.json as the loop writes it."""
    share = real / (tokens + real) if tokens + real else 0.0
    return {"train_steps": steps, "max_steps": 16, "stopped_by_guard_at": stopped, "real_fraction": share,
            "synthetic_rows_trained": rows, "synthetic_tokens_trained": tokens, "real_tokens_trained": real,
            "synthetic_rows_untrained": 0, "floor": floor, "train_loss": loss, "resumed_from": None}


SELECTION = {"generated": 16, "wanted": 16, "selected": 16, "kept_share": 1.0, "tokens": 1536,
             "steps": [{"selector": "DedupSelector", "input": 16, "kept": 16, "dropped": 0, "reasons": {}}]}


def make_run(folder, rounds, config=None, stopped=None, extra_entries=()):
    """A run folder as `run_rounds` leaves it. `rounds`: one dict per round with `metrics` and optionally
    level, reasons, evidence, train, selection, generation, generations, generated_ppl."""
    cfg = {"name": folder.name, "rounds": len(rounds) - 1, "seed": 0, "seeds": [], "end_run_on_alarm": False,
           "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
           "generation": {"method": "continuation", "n_samples": 16, "pool_factor": 1.0},
           "selectors": [{"class": "collapse_guard.selection.DedupSelector"}],
           "mixing": {"mode": "replace", "min_real_fraction": 0.0}, "training": {}, "evaluation": {},
           "guard": {"enabled": True, "stop_training_on_alarm": True}, "detector": {}, "variants": {}}
    for key, value in (config or {}).items():
        merge = isinstance(value, dict) and isinstance(cfg.get(key), dict)
        cfg[key] = {**cfg[key], **value} if merge else value
    entries = list(extra_entries)
    for r, spec in enumerate(rounds):
        metrics = spec["metrics"]
        generations = spec.get("generations", [f"sample {r}.{i}" for i in range(4)])
        train = spec.get("train", _train(loss=2.5 - r / 10))
        entry = {"round": r, "step": train["train_steps"] if r else 0, "final": True, **metrics,
                 "generations": generations, "level": spec.get("level", "ok"),
                 "reasons": spec.get("reasons", []), "evidence": spec.get("evidence", {})}
        entries.append(entry)
        rd = folder / f"round_{r}"
        scored = [metrics["heldout_ppl"] * (0.6 + i / 20) for i in range(16)] if r else []
        atomic_write_json(rd / "eval.json", {"metrics": metrics, "generations": generations,
                                             "generated_ppl": spec.get("generated_ppl", scored),
                                             "human_reference_ppl": HUMAN})
        atomic_write_json(rd / "verdict.json", {"level": entry["level"], "reasons": entry["reasons"],
                                                "signals": {}, "evidence": entry["evidence"]})
        if r:
            atomic_write_json(rd / "generation.json", spec.get("generation", {"rows": 16, "tokens": 1600}))
            atomic_write_json(rd / "selection.json", spec.get("selection", SELECTION))
            atomic_write_json(rd / "train.json", train)
    entries.sort(key=lambda e: (e["round"], e["step"]))
    atomic_write_json(folder / FILENAME, {"version": 2, "entries": entries})
    atomic_write_json(folder / "run_state.json",
                      {"config": cfg, "done": {}, "stopped": stopped, "finished": True})
    return folder


def _collapsing(folder, **kwargs):
    """Round 1: held-out ppl alarm with its bootstrap interval over 32 documents."""
    reason = ("held-out ppl rose 27% over round 0 (20.00 -> 25.40; x1.27, 95% interval x1.21-x1.33 over 32 "
              "documents): alarm at 20%")
    return make_run(folder, [
        {"metrics": _metrics(20.0)},
        {"metrics": _metrics(25.4), "level": "alarm", "reasons": [reason],
         "evidence": {"heldout_ppl": _ppl_ev(1.27, 1.21, 1.33, level="alarm"), "distinct_2": _ev(1.0)}},
    ], **kwargs)


def _read(paths):
    with open(paths["markdown"]) as md, open(paths["html"]) as page:
        return md.read(), page.read()


def _json(paths):
    with open(paths["json"]) as fh:
        return json.load(fh)


def test_a_collapse_is_stated_with_its_evidence_and_budget(tmp_path):
    run = _collapsing(tmp_path / "replace")
    paths = write_report(run)
    markdown, html = _read(paths)
    evidence = "held-out ppl x1.27 (95% interval x1.21-x1.33 over 32 documents)"
    assert paths["verdicts"][0].startswith(
        f"replace: COLLAPSED at round 1 — {evidence}: alarm at >= 1.2; trained on 1,536 synthetic tokens per "
        "round (100% synthetic)")
    assert f"**replace: COLLAPSED at round 1** — {evidence}" in markdown
    assert f"COLLAPSED at round 1</b> — {evidence}" in html
    # the table states the evidence of the verdict: ratio, interval and n
    row = next(line for line in markdown.splitlines() if line.startswith("| 1 | alarm |"))
    assert "held-out ppl x1.27 [x1.21-x1.33, n=32]: alarm at >= 1.2" in row and "| 25.40 |" in row
    assert "held-out ppl x1.27 [x1.21-x1.33, n=32]: alarm at &gt;= 1.2" in html
    assert "| 16 of 16 |" in row
    data = _json(paths)
    assert data["runs"][0]["collapsed"] and data["runs"][0]["rounds"][1]["ratios"]["heldout_ppl"] == 1.27
    assert data["runs"][0]["rounds"][1]["intervals"]["heldout_ppl"] == [1.21, 1.33]
    assert "carry no meaning" not in markdown


def test_min_rise_rule_and_a_signal_outside_the_default_plots_appear_everywhere(tmp_path):
    """Round 1 warns on self-BLEU (a rule that needs a minimum rise), round 2 alarms on distinct_1 (not one
    of the default panels); the recipe's detector leaves tail_coverage out of the rules."""
    detector = {"diversity_signals": ["distinct_1", "distinct_2", "distinct_3", "distinct_4",
                                      "unigram_entropy"],
                "self_bleu_min_rise": 0.08, "ppl_rise_tolerance": 0.02, "ppl_rises_warn": 3,
                "confidence": 0.9}
    bleu_rule = ("warn when the interval's lower bound > 1.1, alarm when > 1.25, either only with a rise "
                 ">= 0.08")
    bleu = {**_ev(1.6, "warn", 1.31, 1.95, 16, 0.24, 0.15), "confidence": 0.9, "rule": bleu_rule}
    distinct = {**_ev(0.625, "alarm", 0.55, 0.70, 16, 0.5, 0.8), "confidence": 0.9}
    run = make_run(tmp_path / "drift", [
        {"metrics": _metrics(20.0, bleu=0.15)},
        {"metrics": _metrics(20.2, bleu=0.24), "level": "warn",
         "reasons": ["self-BLEU-4 rose 60% over round 0 (0.150 -> 0.240; x1.60, 90% interval x1.31-x1.95 "
                     "over 16 prompts): warn at 10%"],
         "evidence": {"self_bleu4": bleu, "heldout_ppl": _ppl_ev(1.01, 0.99, 1.03)}},
        {"metrics": _metrics(20.4, div=0.5, bleu=0.2), "level": "alarm",
         "reasons": ["distinct_1 fell 38% below round 0 (0.800 -> 0.500; x0.62, 90% interval x0.55-x0.70 "
                     "over 16 prompts): alarm at 25%"],
         "evidence": {"distinct_1": distinct, "tail_coverage": _ev(0.625)}},
    ], config={"detector": detector})
    paths = write_report(run)
    markdown, html = _read(paths)
    for text in (markdown, unescape(html)):
        assert "self-BLEU-4 x1.60 [x1.31-x1.95, n=16]: warn at > 1.1" in text  # the round table
        assert "distinct-1 x0.62 [x0.55-x0.70, n=16]: alarm at < 0.75" in text
        # the rules in force, as the detector reads them from the recipe
        assert "Rules:" in text
        assert "absolute rise of at least 0.08" in text and "self_bleu_min_rise" in text
        assert "rising 3 evaluations in a row" in text and "> 1.02" in text and "ppl_rise_tolerance" in text
        assert "confidence 90% two-sided" in text and "one-sided 95.0%" in text
        assert "Not in the rules" in text and "tail_coverage" in text.split("Not in the rules")[1][:200]
    assert ("drift: COLLAPSED at round 2 — distinct-1 x0.62 (90% interval x0.55-x0.70 over 16 prompts): "
            "alarm at < 0.75") in paths["verdicts"][0]
    assert "distinct-1 ratio" in markdown and "0.625 [0.55, 0.70] alarm" in markdown  # tabled
    panels = {p["signal"]: p for p in paths["plot_specs"]["panels"]}
    # plotted, with its rule lines
    assert panels["distinct_1"]["triggered"] and panels["distinct_1"]["in_rules"]
    lines = [(line["level"], line["y"]) for line in panels["distinct_1"]["lines"]]
    assert lines == [("warn", 0.9), ("alarm", 0.75)]
    assert panels["self_bleu4"]["triggered"] and "only with a rise >= 0.08" in panels["self_bleu4"]["title"]
    # tail_coverage is outside this detector's rules: drawn, but without warn/alarm lines, and says so
    assert panels["tail_coverage"]["lines"] == [] and not panels["tail_coverage"]["in_rules"]
    assert "not in the rules" in panels["tail_coverage"]["title"]
    assert panels["distinct_2"]["lines"] and "not in the rules" not in panels["distinct_2"]["title"]
    assert set(summarize_run(run)["triggered"]) == {"self_bleu4", "distinct_1"}


def test_a_verdict_known_only_by_its_reasons_is_still_tabled_and_plotted(tmp_path):
    run = make_run(tmp_path / "old", [
        {"metrics": _metrics(20.0)},
        {"metrics": _metrics(20.1, div=0.6), "level": "warn",
         "reasons": ["distinct_1 fell 25% below round 0 (0.800 -> 0.600): warn at 10%"]},
    ])
    summary = summarize_run(run)
    assert summary["triggered"] == {"distinct_1": {"round": 1, "step": 16, "level": "warn"}}
    paths = write_report(run)
    assert any(p["signal"] == "distinct_1" and p["triggered"] for p in paths["plot_specs"]["panels"])
    assert "distinct_1 fell 25% below round 0" in _read(paths)[0]
    assert paths["verdicts"][0].startswith("old: WARNING at round 1 — distinct_1 fell 25%")


def test_a_round_the_guard_stopped_is_shown_and_marked(tmp_path):
    alarm = {"heldout_ppl": _ppl_ev(1.5, 1.4, 1.6, level="alarm")}
    during = {"round": 1, "step": 1, "final": False, "heldout_ppl": 30.0, "level": "alarm", "stopped": True,
              "reasons": ["held-out ppl rose 50%"], "evidence": alarm}
    run = make_run(tmp_path / "stop", [
        {"metrics": _metrics(20.0)},
        {"metrics": _metrics(30.0), "level": "alarm", "train": _train(384, steps=1, stopped=1, rows=4),
         "reasons": ["held-out ppl rose 50%"], "evidence": alarm},
        {"metrics": _metrics(31.0), "level": "alarm", "reasons": ["held-out ppl rose 55%"],
         "evidence": {"heldout_ppl": _ppl_ev(1.55, 1.45, 1.65, level="alarm")}},
    ], extra_entries=[during])
    paths = write_report(run)
    markdown, html = _read(paths)
    assert "| stopped by the guard at step 1 of 16 |" in markdown and "| 16 of 16 |" in markdown
    assert "stopped by the guard at step 1 of 16" in html
    assert "the guard stopped training in round 1 at step 1 of 16" in paths["verdicts"][0]
    assert "step 1 x1.500 alarm (stopped here)" in markdown  # the guard's in-training measurement
    stops = paths["plot_specs"]["ppl"]["stops"]
    assert [(s["round"], s["step"], s["max_steps"]) for s in stops] == [(1, 1, 16)]
    assert "guard stopped round 1 at step 1/16" in stops[0]["text"]
    assert all(p["stops"] == [1] for p in paths["plot_specs"]["panels"])
    assert paths["plot_specs"]["ppl"]["guard_points"][0]["x"] == pytest.approx(1 / 16)


def test_synthetic_budget_and_a_selector_that_keeps_almost_nothing(tmp_path):
    scarce = {"generated": 64, "wanted": 16, "selected": 2, "kept_share": 2 / 64, "tokens": 190,
              "steps": [{"selector": "PerplexitySelector", "input": 64, "kept": 2, "dropped": 62,
                         "reasons": {"below human band": 62}}]}
    run = make_run(tmp_path / "picky", [
        {"metrics": _metrics(20.0)},
        {"metrics": _metrics(19.8), "selection": scarce, "train": _train(190, real=1900, rows=2, floor=0.5),
         "generation": {"rows": 64, "tokens": 6100}, "evidence": {"heldout_ppl": _ppl_ev(0.99, 0.97, 1.01)}},
    ])
    paths = write_report(run)
    markdown, html = _read(paths)
    row = next(line for line in markdown.splitlines() if line.startswith("| 1 | 64 (6,100) |"))
    assert ("| 2 (190) | 12% of 16 (selector keeps almost nothing) | 3% | 2 (190) | 1,900 | 0.91 (0.50) "
            "| 9% |") in row
    assert ("Round 1: selection kept 2 of the 16 rows the round wanted (12%) (PerplexitySelector kept 2 of "
            "64): the selector keeps almost nothing") in markdown
    assert "selector keeps almost nothing" in html and "selection dropped 62 below human band" in markdown
    assert "Only 9% of the tokens trained on were synthetic" in markdown
    budget = summarize_run(run)["rounds"][1]["budget"]
    assert budget["scarce_selection"] and budget["kept_of_wanted"] == 2 / 16
    assert budget["generated_tokens"] == 6100 and budget["kept_tokens"] == 190


def test_html_is_self_contained_with_rules_and_escaped_samples(tmp_path):
    weird = "<script>alert(1)</script> a `tick` & more"
    run = make_run(tmp_path / "h", [
        {"metrics": _metrics(20.0), "generations": ["first sample", weird, "third", "fourth (not shown)"]},
        {"metrics": _metrics(20.5), "generations": ["round one text", "b", "c"],
         "evidence": {"heldout_ppl": _ppl_ev(1.025, 1.0, 1.05)}},
    ])
    paths = write_report(run)
    markdown, html = _read(paths)
    assert html.count("src='data:image/png;base64,iVBOR") == 3
    assert ".png'" not in html and '.png"' not in html  # no link to a PNG file
    assert "`" not in html and "<code>heldout_ppl</code>" in html
    assert "<b>Rules:</b>" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; a &#96;tick&#96; &amp; more" in html
    assert "<script>" not in html
    assert "round one text" in html and "fourth (not shown)" not in html  # three samples a round
    for name in ("ppl_ratio.png", "diversity.png", "generated_ppl.png"):
        assert f"]({name})" in markdown  # the Markdown report links its PNGs
    assert "round 0: \\<script\\>alert(1)\\</script\\> a \\`tick\\` & more" in markdown


def test_plots_are_real_pngs_without_legend_warnings(tmp_path):
    import matplotlib.image as mpimg

    run = _collapsing(tmp_path / "p")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = write_report(run)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "No artists with labels" in m], messages
    for path in paths["plots"]:
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
        assert image.std() > 0.05  # not a blank canvas
    hist = paths["plot_specs"]["histograms"][0]
    assert hist["low_cut"] == pytest.approx(np.percentile(HUMAN, 25)) == pytest.approx(29.75)
    # a narrow log range gets a few plain ticks (the old axis labelled every minor tick, overlapping)
    ticks = log_ticks(500.0, 540.0)
    assert 2 <= len(ticks) <= 5 and all(500 * 0.98 <= t <= 540 * 1.02 for t in ticks)
    assert len(log_ticks(3.0, 3000.0)) <= 5


def _seeded_arms(root):
    """2 variants x 3 seeds: `a` collapses in two seeds (100% synthetic), `b` stays healthy (50% real)."""
    dirs = []
    ratios = {"a": [(1.10, 1.30), (1.12, 1.26), (1.02, 1.04)], "b": [(1.0, 0.98), (1.01, 1.0), (0.99, 1.02)]}
    for arm, per_seed in ratios.items():
        for seed, pair in enumerate(per_seed):
            rounds = [{"metrics": _metrics(20.0, **{"heldout_ppl@wiki": 30.0})}]
            for ratio in pair:
                level = "alarm" if ratio >= 1.2 else "ok"
                tokens = 1536 if arm == "a" else 1500 + 10 * seed
                rounds.append({"metrics": _metrics(20.0 * ratio, **{"heldout_ppl@wiki": 30.0 * ratio * 1.1}),
                               "level": level, "reasons": ["held-out ppl rose"] if level != "ok" else [],
                               "train": _train(tokens, real=0 if arm == "a" else tokens),
                               "evidence": {"heldout_ppl": _ppl_ev(ratio, ratio - 0.03, ratio + 0.03,
                                                                   level=level)}})
            dirs.append(make_run(root / arm / f"seed_{seed}", rounds,
                                 config={"name": arm, "seed": seed, "seeds": [0, 1, 2]}))
    return dirs


def test_comparison_of_two_variants_over_three_seeds_reports_mean_and_spread(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    dirs = _seeded_arms(tmp_path / "cmp")
    bands = []
    original = Axes.fill_between
    monkeypatch.setattr(Axes, "fill_between",
                        lambda self, *a, **k: bands.append(a) or original(self, *a, **k))
    paths = write_comparison(tmp_path / "cmp", dirs, title="arms")
    markdown, html = _read(paths)
    data = _json(paths)
    arms = {a["name"]: a for a in data["arms"]}
    assert set(arms) == {"a", "b"} and arms["a"]["n_seeds"] == 3 and arms["a"]["seeds"] == [0, 1, 2]
    round2 = arms["a"]["rounds"][2]
    ppl = round2["signals"]["heldout_ppl"]
    assert ppl["values"] == [1.30, 1.26, 1.04]  # the per-seed numbers are kept
    assert ppl["mean"] == pytest.approx(1.2) and (ppl["min"], ppl["max"]) == (1.04, 1.30)
    wiki = round2["signals"]["heldout_ppl@wiki"]
    assert wiki["mean"] == pytest.approx(1.2 * 1.1) and wiki["n"] == 3
    assert round2["flagged_share"] == pytest.approx(2 / 3) and round2["levels"] == ["alarm", "alarm", "ok"]
    assert round2["synthetic_tokens_trained"]["mean"] == 1536 and round2["real_fraction"]["mean"] == 0.0
    assert arms["b"]["rounds"][1]["synthetic_tokens_trained"]["values"] == [1500, 1510, 1520]
    assert len(data["runs"]) == 6  # every seed's full summary too
    # the table: mean [min, max] per arm x round, budget and the share of seeds flagged
    section = markdown.split("## a (3 seeds: 0, 1, 2)")[1]
    row = next(line for line in section.splitlines() if line.startswith("| 2 |"))
    assert row.startswith("| 2 | x1.20 [1.04, 1.30] | x1.32 [1.14, 1.43] |")
    assert "| 1,536 | 0.00 | 100% | 67% (2 of 3, 2 alarm) |" in row
    assert "a: COLLAPSED in 2 of 3 seeds (first alarm at round 2, seed 0)" in paths["verdicts"][0]
    assert "held-out ppl at round 2 x1.20 [1.04, 1.30] (mean [min, max] over 3 seeds)" in paths["verdicts"][0]
    assert paths["verdicts"][1].startswith("b: OK in all 3 seeds")
    assert "b (3 seeds: 0, 1, 2)" in html and "67% (2 of 3, 2 alarm)" in html
    # the plot: one band per arm (min-max over seeds), the extra corpus drawn outside the rules
    series = paths["plot_specs"]["ppl"]["series"]
    main = [s for s in series if s["style"] == "-"]
    assert [(s["label"], s["band"], s["n_seeds"]) for s in main] == [("a", True, 3), ("b", True, 3)]
    assert main[0]["low"][2] == 1.04 and main[0]["high"][2] == 1.30
    assert any("(wiki) (not in the rules)" in s["label"] for s in series)
    assert len(bands) >= 2
    # the synthetic budget of the arms is compared (issue #11)
    assert "Same synthetic budget" in markdown and "different numbers of tokens in all (x2.0)" in markdown
    # `collapse-guard report DIR` finds the seed folders (and groups them by arm)
    assert find_runs(tmp_path / "cmp") == dirs
    assert [a["name"] for a in group_arms(data["runs"])] == ["a", "b"]


def test_comparison_of_single_seed_arms_and_budget_mismatch(tmp_path):
    collapsed = _collapsing(tmp_path / "demo" / "replace")
    healthy = make_run(tmp_path / "demo" / "guarded", [
        {"metrics": _metrics(20.0)},
        {"metrics": _metrics(19.6), "train": _train(400, real=800, rows=8, floor=0.5),
         "evidence": {"heldout_ppl": _ppl_ev(0.98, 0.95, 1.01)}},
    ], config={"mixing": {"min_real_fraction": 0.5}})
    paths = write_comparison(tmp_path / "demo", [collapsed, healthy], title="demo")
    markdown, _ = _read(paths)
    assert paths["verdicts"][0].startswith("replace: COLLAPSED at round 1")
    assert paths["verdicts"][1].startswith(
        "guarded: OK over 1 round — held-out ppl x0.98 (95% interval x0.95-x1.01 over 32 documents) at "
        "round 1; trained on 400 synthetic")
    assert "Synthetic budgets differ (x3.8): replace 1,536 of 1,536, guarded 400 of 1,200" in markdown
    assert "## replace" in markdown and "## guarded" in markdown and "real floor 0.5" in markdown
    # single runs: intervals, not bands
    assert [s["band"] for s in paths["plot_specs"]["ppl"]["series"]] == [False, False]
    # `collapse-guard report DIR` on the parent folder writes each run's report and the comparison
    again = report_path(tmp_path / "demo")
    assert again["markdown"].endswith("comparison.md") and (healthy / "report.md").exists()
    assert sorted(again["verdicts"]) == sorted(paths["verdicts"])


def test_a_run_on_the_tiny_model_says_its_numbers_mean_nothing(tmp_path):
    run = _collapsing(tmp_path / "tiny_loop", config={"model": {"name_or_path": "tiny"}})
    paths = write_report(run)
    assert paths["verdicts"][0].endswith(
        "offline tiny model: a random network, these numbers carry no meaning.")
    assert "randomly initialised network" in _read(paths)[0]


def test_missing_or_empty_folders_fail_with_one_clear_line(tmp_path, capsys):
    from collapse_guard.cli import main

    with pytest.raises(FileNotFoundError, match=r"missing is not a folder: give the output_dir of a"):
        summarize_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        report_path(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"empty holds no finished round \(no {FILENAME} with a"):
        report_path(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=rf"holds no finished round \(no {FILENAME} in it\)"):
        summarize_run(tmp_path / "empty")
    (tmp_path / "started").mkdir()  # a run that has not judged round 0 yet
    atomic_write_json(tmp_path / "started" / FILENAME, {"version": 2, "entries": [
        {"round": 0, "step": 0, "final": False, "heldout_ppl": 20.0}]})
    with pytest.raises(FileNotFoundError, match="has no judged round yet"):
        report_path(tmp_path / "started")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no finished round" in err and "Traceback" not in err
    assert re.search(r"collapse-guard run RECIPE", err)
