"""What the plots draw, as JSON-ready data (also stored in the report's JSON)."""

from __future__ import annotations

import dataclasses
from typing import Any

from collapse_guard.report.arms import (
    _value,
)
from collapse_guard.report.common import (
    DIVERSITY_PANELS,
    _finite,
    _is_number,
    _spread,
    signal_label,
)
from collapse_guard.report.rules import (
    SignalRule,
    _detector,
    _reason_signal,
    flagged_evidence,
    signal_rule,
)


# ----- plot data ---------------------------------------------------------------------------------------
def _series(arm: dict[str, Any], signal: str, kind: str, label: str,
            style: str = "-") -> dict[str, Any] | None:
    """One line of a plot: a single run's values with their intervals, or several seeds' mean and min-max
    band."""
    runs = arm["runs"]
    if len(runs) == 1:
        rows = runs[0]["rounds"]
        xs = [x["round"] for x in rows]
        ys = [_value(x, signal, kind) for x in rows]
        iv = [x["intervals"].get(signal) if kind == "ratio" else None for x in rows]
        low = [i[0] if i else None for i in iv]
        high = [i[1] if i else None for i in iv]
        band = False
    else:
        xs, ys, low, high = [], [], [], []
        for r in sorted({x["round"] for run in runs for x in run["rounds"]}):
            s = _spread([_value(x, signal, kind) for run in runs for x in run["rounds"] if x["round"] == r])
            xs.append(r)
            ys.append(s["mean"])
            low.append(s["min"])
            high.append(s["max"])
        band = True
    if not any(_finite(y) for y in ys):
        return None
    return {"arm": arm["name"], "label": label, "x": xs, "y": ys, "low": low, "high": high, "band": band,
            "style": style, "n_seeds": len(runs)}


def _agreed_rule(runs: list[dict[str, Any]], signal: str) -> SignalRule:
    """The rule every run agrees on; thresholds left out where the runs' detectors differ."""
    rules = [signal_rule(signal, _detector(run)) for run in runs]
    if all(r == rules[0] for r in rules):
        return rules[0]
    return dataclasses.replace(rules[0], warn=None, alarm=None, note="thresholds differ per arm (see Rules)")


def _rule_lines_for_plot(rule: SignalRule) -> list[dict[str, Any]]:
    if not rule.in_rules:
        return []
    lines = [(level, rule.threshold(level)) for level in ("warn", "alarm")]
    return [{"level": level, "y": y, "label": f"{level} ({rule.op} {y:g})"}
            for level, y in lines if _finite(y)]


def _stops(arms: list[dict[str, Any]], signal: str) -> list[dict[str, Any]]:
    stops = []
    for arm in arms:
        for run in arm["runs"]:
            prefix = f"{arm['name']}" + (f" seed {run['seed']}" if len(arm["runs"]) > 1 else "")
            for stop in run["guard_stops"]:
                x = next(x for x in run["rounds"] if x["round"] == stop["round"])
                stops.append({"arm": arm["name"], "seed": run["seed"], "round": stop["round"],
                              "y": x["ratios"].get(signal), "step": stop["step"],
                              "max_steps": stop["max_steps"],
                              "text": f"{prefix}: guard stopped round {stop['round']} at step {stop['step']}/"
                                      f"{stop['max_steps']}"})
            if run.get("stopped"):
                r = run["stopped"].get("round")
                x = next((x for x in run["rounds"] if x["round"] == r), None)
                stops.append({"arm": arm["name"], "seed": run["seed"], "round": r, "step": None,
                              "max_steps": None, "y": x["ratios"].get(signal) if x else None,
                              "text": f"{prefix}: run ended after round {r}"})
    return stops


def _verdict_marks(arms: list[dict[str, Any]], signal: str) -> list[dict[str, Any]]:
    """Every round judged warn or alarm, placed on `signal`'s line and named by the signals that raised it:
    the ppl figure then shows an arm that alarmed on another signal (self-BLEU, diversity) too."""
    marks = []
    for arm in arms:
        for run in arm["runs"]:
            d = _detector(run)
            known = {k for x in run["rounds"] for k in x["metrics"]}
            prefix = arm["name"] + (f" seed {run['seed']}" if len(arm["runs"]) > 1 else "")
            for x in run["rounds"]:
                if x["level"] not in ("warn", "alarm"):
                    continue
                names = [name for name, _ in flagged_evidence(x["evidence"])] or \
                    [name for name in (_reason_signal(r, d, known) for r in x["reasons"]) if name]
                labels = list(dict.fromkeys(signal_label(name) for name in names))
                on = f" on {', '.join(labels)}" if labels else ""
                marks.append({"arm": arm["name"], "seed": run["seed"], "round": x["round"],
                              "level": x["level"], "y": x["ratios"].get(signal), "signals": names,
                              "text": f"{prefix}: {x['level']} at round {x['round']}{on}"})
    return marks


def _guard_points(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The guard's measurements during training, placed between rounds (single-seed arms only)."""
    points = []
    for arm in arms:
        if len(arm["runs"]) != 1:
            continue
        for x in arm["runs"][0]["rounds"]:
            for m in x["guard_measurements"]:
                if _finite(m["ratio"]) and _is_number(m["max_steps"]) and m["max_steps"]:
                    points.append({"arm": arm["name"], "x": x["round"] - 1 + m["step"] / m["max_steps"],
                                   "y": m["ratio"], "level": m["level"], "step": m["step"]})
    return points


def _ppl_spec(arms: list[dict[str, Any]], runs: list[dict[str, Any]], d, present: set[str]) -> dict[str, Any]:
    """The held-out ppl figure: each arm's ratio to round 0 (and the extra corpora's), the rule's bands,
    the guard's in-training points, stopped rounds and the rounds judged warn or alarm."""
    ppl_rule = _agreed_rule(runs, d.ppl_signal)
    series = [s for arm in arms for s in [_series(arm, d.ppl_signal, "ratio", arm["name"])] if s]
    extra = []
    for corpus in sorted(k for k in present if k.startswith(f"{d.ppl_signal}@")):
        for arm in arms:
            label = f"{arm['name']} {signal_label(corpus)} (not in the rules)".strip()
            s = _series(arm, corpus, "ratio", label, style="--")
            if s:
                extra.append(s)
    return {"signal": d.ppl_signal, "title": "Held-out human perplexity / round 0",
            "ylabel": "held-out ppl / round 0", "in_rules": True, "lines": _rule_lines_for_plot(ppl_rule),
            "note": ppl_rule.note, "series": series + extra, "guard_points": _guard_points(arms),
            "stops": _stops(arms, d.ppl_signal), "verdicts": _verdict_marks(arms, d.ppl_signal),
            "band_note": "shaded: min-max over seeds" if any(s["band"] for s in series) else
            "bars: the detector's interval" if any(_finite(v) for s in series for v in s["low"]) else ""}


def _panel_title(signal: str, rule: SignalRule) -> str:
    title = signal_label(signal) + (" / round 0" if rule.kind == "ratio" else "")
    if rule.direction:
        title += f" ({'higher' if rule.direction == 'above' else 'lower'} = collapse)"
    if not rule.in_rules:
        return title + " (not in the rules)"
    return title + (f"\n{rule.note}" if rule.note else "")


def _panel_specs(arms: list[dict[str, Any]], runs: list[dict[str, Any]], d,
                 present: set[str]) -> list[dict[str, Any]]:
    """One panel per signal: those that raised a verdict first, then the usual diversity panels."""
    triggered = [s for run in runs for s in run["triggered"]]
    candidates = [*[s for s in triggered if not s.endswith("_rises") and s != d.ppl_signal
                    and not s.startswith(f"{d.ppl_signal}@") and s in present],
                  *[p for p in DIVERSITY_PANELS if p in present]]
    panels = []
    for signal in dict.fromkeys(candidates):
        rule = _agreed_rule(runs, signal)
        panels.append({"signal": signal, "title": _panel_title(signal, rule), "kind": rule.kind,
                       "in_rules": rule.in_rules, "triggered": signal in triggered,
                       "lines": _rule_lines_for_plot(rule), "reference": rule.reference,
                       "series": [s for arm in arms for s in [_series(arm, signal, rule.kind, arm["name"])]
                                  if s],
                       "stops": sorted({s["round"] for s in _stops(arms, signal)})})
    return panels


def _histograms(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm: the perplexity of each round's generated data under the round-0 model (seeds pooled)."""
    hists = []
    for arm in arms:
        rounds: dict[int, list[float]] = {}
        for run in arm["runs"]:
            for x in run["rounds"]:
                scores = [p for p in x["generated_ppl"] if _finite(p) and p > 0]
                rounds.setdefault(x["round"], []).extend(scores)
        human = [p for run in arm["runs"][:1] for p in run["human_reference_ppl"] if p > 0]
        pooled = f" (pooled over {len(arm['runs'])} seeds)" if len(arm["runs"]) > 1 else ""
        title = f"{arm['name']}: perplexity of generated data under the round-0 model{pooled}"
        hists.append({"arm": arm["name"], "title": title,
                      "human": human, "low_cut": arm["runs"][0]["low_ppl_cut"],
                      "rounds": [{"round": r, "values": v} for r, v in sorted(rounds.items()) if v]})
    return hists


def build_plot_specs(arms: list[dict[str, Any]]) -> dict[str, Any]:
    """What the plots draw, as data (JSON-ready): the ppl figure, the signal panels, the histograms.

    Every line carries its label; a panel of a signal outside the rules has `in_rules` False and no `lines`.
    """
    runs = [run for arm in arms for run in arm["runs"]]
    d = _detector(runs[0])
    present = {k for run in runs for x in run["rounds"] for k in x["metrics"]}
    return {"ppl": _ppl_spec(arms, runs, d, present), "panels": _panel_specs(arms, runs, d, present),
            "histograms": _histograms(arms)}
