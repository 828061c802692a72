"""How trustworthy the detector's verdicts are, measured on the experiment's runs \
(recipes/experiment_cpu.yaml).

    collapse-guard run recipes/experiment_cpu.yaml  # first: 8 arms x 3 seeds x 5 rounds (hours on CPU)
    python benchmarks/detector_calibration.py runs/experiment_cpu

Reads every run folder (<arm>/seed_<s>) and writes benchmarks/results/detector_calibration.json and .md:

- noise: on the healthy control (`real_only`: fine-tuning on human text only, same settings), the
  distribution of each signal's ratio to round 0 and of its round-to-round change, and the lower bound of
  the held-out perplexity interval; the thresholds that follow from it (a warn threshold above the largest
  healthy lower bound) next to the defaults in force;
- false alarms: the share of healthy rounds (and runs) the detector flagged warn / alarm;
- detection: the share of `replace` runs alarmed by round 2, and the round of the first alarm;
- early warning: on the replace runs, which measure inside each round, the first step at which each signal
  alone warns and alarms (`Verdict.evidence[signal].level`), and the lead of the earliest signal over
  held-out perplexity, in optimizer steps.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

from collapse_guard.history import FILENAME, History
from collapse_guard.io import atomic_write_json, atomic_write_text, read_json

SIGNALS = ("heldout_ppl", "distinct_1", "distinct_2", "distinct_3", "distinct_4", "unigram_entropy",
           "self_bleu4", "tail_coverage", "low_ppl_share")
LEVEL = {"ok": 0, "warn": 1, "alarm": 2}


def runs(root: Path) -> dict[str, list[Path]]:
    """{arm: [run folders]} for <root>/<arm>/seed_<s> (or <root>/<arm>)."""
    out: dict[str, list[Path]] = {}
    for arm in sorted(p for p in root.iterdir() if p.is_dir()):
        seeds = sorted(p for p in arm.glob("seed_*") if (p / FILENAME).exists())
        if seeds or (arm / FILENAME).exists():
            out[arm.name] = seeds or [arm]
    return out


def steps_per_round(run: Path) -> int:
    info = read_json(run / "round_1" / "train.json", default={}) or {}
    return int(info.get("max_steps") or 1)


def global_step(entry: dict[str, Any], per_round: int) -> int:
    return 0 if entry["round"] == 0 else (entry["round"] - 1) * per_round + int(entry["step"])


def healthy_noise(folders: list[Path]) -> dict[str, Any]:
    ratios: dict[str, list[float]] = {s: [] for s in SIGNALS}
    changes: dict[str, list[float]] = {s: [] for s in SIGNALS}
    lows, levels = [], []
    for run in folders:
        finals = History.load(run / FILENAME).finals()
        base = finals[0]
        for prev, entry in zip(finals, finals[1:], strict=False):
            levels.append(entry.get("level", "ok"))
            evidence = (entry.get("evidence") or {}).get("heldout_ppl") or {}
            if evidence.get("low") is not None:
                lows.append(evidence["low"])
            for s in SIGNALS:
                if _number(entry.get(s)) and _number(base.get(s)) and base[s]:
                    ratios[s].append(entry[s] / base[s])
                if _number(entry.get(s)) and _number(prev.get(s)) and prev[s]:
                    changes[s].append(entry[s] / prev[s])
    return {
        "rounds": len(levels),
        "runs": len(folders),
        "false_warn_rate": sum(lv != "ok" for lv in levels) / len(levels) if levels else None,
        "false_alarm_rate": sum(lv == "alarm" for lv in levels) / len(levels) if levels else None,
        "runs_flagged": sum(any(e.get("level") != "ok" for e in History.load(r / FILENAME).finals()[1:])
                            for r in folders),
        "heldout_ppl_interval_low_max": max(lows) if lows else None,
        "ratio": {s: _describe(v) for s, v in ratios.items() if v},
        "round_to_round": {s: _describe(v) for s, v in changes.items() if v},
    }


def detection(folders: list[Path]) -> dict[str, Any]:
    first_alarm, first_flag, leads = [], [], []
    per_signal: dict[str, dict[str, list[int]]] = {s: {"warn": [], "alarm": []} for s in SIGNALS}
    for run in folders:
        history = History.load(run / FILENAME)
        finals = history.finals()[1:]
        first_alarm.append(next((e["round"] for e in finals if e.get("level") == "alarm"), None))
        first_flag.append(next((e["round"] for e in finals if e.get("level") != "ok"), None))
        per_round = steps_per_round(run)
        firsts: dict[str, dict[str, int | None]] = {}
        for s in SIGNALS:
            firsts[s] = {}
            for lv in ("warn", "alarm"):
                hit = next((global_step(e, per_round) for e in history.entries if e["round"] > 0
                            and LEVEL.get(((e.get("evidence") or {}).get(s) or {}).get("level", "ok"), 0)
                            >= LEVEL[lv]), None)
                firsts[s][lv] = hit
                if hit is not None:
                    per_signal[s][lv].append(hit)
        ppl = firsts["heldout_ppl"]["warn"]
        earliest = min((v["warn"] for v in firsts.values() if v["warn"] is not None), default=None)
        if ppl is not None and earliest is not None:
            leads.append(ppl - earliest)
    n = len(folders)
    return {
        "runs": n,
        "alarmed_by_round_2": sum(a is not None and a <= 2 for a in first_alarm) / n if n else None,
        "alarmed_at_all": sum(a is not None for a in first_alarm) / n if n else None,
        "first_alarm_round": first_alarm,
        "first_flag_round": first_flag,
        "first_step_per_signal": {s: {lv: _describe(v) if v else None for lv, v in d.items()}
                                  for s, d in per_signal.items()},
        "lead_of_earliest_signal_over_heldout_ppl_steps": _describe(leads) if leads else None,
    }


def calibrated_thresholds(noise: dict[str, Any]) -> dict[str, Any]:
    """Thresholds that follow from the healthy runs: just above the largest healthy value (a false alarm rate
    of about 1 / (rounds + 1) on this sample), never below the design defaults' direction."""
    out: dict[str, Any] = {}
    low = noise.get("heldout_ppl_interval_low_max")
    if low is not None:
        out["ppl_ratio_warn (lower bound of the interval)"] = round(max(1.0, low) + 0.01, 3)
    for s in ("distinct_1", "distinct_2", "unigram_entropy"):
        d = noise["ratio"].get(s)
        if d:
            out[f"diversity_ratio_warn ({s})"] = round(min(1.0, d["min"]) - 0.02, 3)
    d = noise["ratio"].get("self_bleu4")
    if d:
        out["self_bleu_ratio_warn"] = round(d["max"] + 0.05, 3)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _describe(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"n": len(values), "min": values[0], "median": statistics.median(values), "max": values[-1],
            "mean": statistics.fmean(values)}


def markdown(result: dict[str, Any]) -> str:
    h, d = result["healthy"], result["replace"]
    lines = [f"# Detector calibration ({result['experiment']})", "",
             f"Healthy control `{result['healthy_arm']}`: {h['runs']} runs x rounds = {h['rounds']} "
             "verdicts.",
             "", "| measure | value |", "|---|---|",
             f"| false warn rate (healthy rounds flagged warn or alarm) | {_pct(h['false_warn_rate'])} |",
             f"| false alarm rate (healthy rounds alarmed) | {_pct(h['false_alarm_rate'])} |",
             f"| healthy runs flagged at least once | {h['runs_flagged']} of {h['runs']} |",
             f"| replace runs alarmed by round 2 | {_pct(d['alarmed_by_round_2'])} |",
             f"| replace runs alarmed at all | {_pct(d['alarmed_at_all'])} |",
             f"| first alarm round, per replace run | {d['first_alarm_round']} |", "",
             "## Early warning on the replace runs (optimizer steps from the start of round 1)", "",
             "| signal | first warn (median [min, max]) | first alarm (median [min, max]) |", "|---|---|---|"]
    for s, v in d["first_step_per_signal"].items():
        lines.append(f"| {s} | {_span(v['warn'])} | {_span(v['alarm'])} |")
    lead = d["lead_of_earliest_signal_over_heldout_ppl_steps"]
    lines += ["", f"Lead of the earliest signal over held-out perplexity: {_span(lead)} steps.", "",
              "## Healthy noise (ratio to round 0 over healthy rounds)", "",
              "| signal | min | median | max |", "|---|---|---|---|"]
    for s, v in h["ratio"].items():
        lines.append(f"| {s} | {v['min']:.3f} | {v['median']:.3f} | {v['max']:.3f} |")
    lines += ["", "## Thresholds that follow from the healthy runs", "",
              "| threshold | from the noise | in force |", "|---|---|---|"]
    for k, v in result["calibrated"].items():
        lines.append(f"| {k} | {v} | {result['defaults'].get(k.split(' ')[0], '')} |")
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _span(v: dict[str, float] | None) -> str:
    return "never" if not v else f"{v['median']:g} [{v['min']:g}, {v['max']:g}] (n={v['n']})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from collapse_guard.detector import DetectorConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiment", help="the experiment's output_dir (e.g. runs/experiment_cpu)")
    parser.add_argument("--healthy", default="real_only", help="the healthy control arm")
    parser.add_argument("--collapsing", default="replace", help="the arm expected to collapse")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "detector_calibration"))
    args = parser.parse_args(argv)
    arms = runs(Path(args.experiment))
    missing = [a for a in (args.healthy, args.collapsing) if a not in arms]
    if missing:
        raise SystemExit(f"{args.experiment} has no finished runs of {missing}; arms found: {sorted(arms)}")
    defaults = DetectorConfig()
    healthy = healthy_noise(arms[args.healthy])
    result = {
        "experiment": str(args.experiment), "healthy_arm": args.healthy, "collapsing_arm": args.collapsing,
        "healthy": healthy, "replace": detection(arms[args.collapsing]),
        "other_arms": {arm: detection(folders) for arm, folders in arms.items()
                       if arm not in (args.healthy, args.collapsing)},
        "calibrated": calibrated_thresholds(healthy),
        "defaults": {"ppl_ratio_warn": defaults.ppl_ratio_warn, "ppl_ratio_alarm": defaults.ppl_ratio_alarm,
                     "diversity_ratio_warn": defaults.diversity_ratio_warn,
                     "self_bleu_ratio_warn": defaults.self_bleu_ratio_warn,
                     "confidence": defaults.confidence},
    }
    atomic_write_json(f"{args.out}.json", result)
    atomic_write_text(f"{args.out}.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
