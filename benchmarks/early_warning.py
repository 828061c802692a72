"""Lead time of the guard's signals over held-out perplexity, with thresholds from healthy runs' noise.

Reads run folders that hold a guard history (`collapse_history.json`, written by the loop and by
`CollapseGuardCallback`), grouped into arms by their parent folder (`runs/experiment_cpu/replace/seed_0` is
seed_0 of the arm `replace`). For every signal (the early-warning signals of the held-out forward, and for
comparison the generation signals the detector judges) and every measurement of a run, the deviation from
the run's own baseline (its first measurement) in the direction collapse moves it (`collapse_guard.signals`):
value - baseline for "up" signals, baseline - value for "down" ones.

- Threshold per signal: the `--quantile` (0.95) of the deviations of every measurement after the baseline in
  the healthy arms (`--healthy`, default real_only and accumulate): at most 5% of healthy measurements cross
  it, in sample. Pick the healthy arms from other runs than those you evaluate where you can; the re-check
  on other human text must not see thresholds tuned on it.
- First crossing per run: the first measurement whose deviation exceeds the threshold.
- Held-out perplexity's first warn: the first measurement whose verdict flagged `heldout_ppl` or
  `heldout_ppl_rises` (its recorded evidence; for histories without evidence, the ratio to the baseline
  against `DetectorConfig().ppl_ratio_warn`).
- Lead: perplexity's first-warn index minus the signal's first-crossing index, in measurements (positive:
  the signal moved first), with the (round, step) of both.
- False alarms: per signal, the share of healthy measurements past the threshold (per verdict) and the share
  of healthy runs with any crossing.

Writes `<out>.json` and `<out>.md` (default benchmarks/results/early_warning). Runs nothing: point it at run
folders of finished experiments.

Usage:

```bash
python benchmarks/early_warning.py runs/experiment_cpu            # every <arm>/<seed>/collapse_history.json
python benchmarks/early_warning.py runs/a/replace/seed_0 runs/a/real_only/seed_0 --healthy real_only
```
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from collapse_guard.detector import DetectorConfig
from collapse_guard.history import FILENAME, History
from collapse_guard.signals import SIGNALS, finite, names

RESULTS = Path(__file__).parent / "results" / "early_warning"
# The generation signals the detector judges, compared with the early-warning ones.
COMPARED = ("distinct_2", "unigram_entropy", "self_bleu4", "low_ppl_share")
PPL_KEYS = ("heldout_ppl", "heldout_ppl_rises")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders holding a history: each path itself, or its <arm>/<seed> folders below it."""
    runs: list[Path] = []
    for path in paths:
        if (path / FILENAME).is_file():
            runs.append(path)
        elif path.is_dir():
            runs += sorted(p.parent for p in path.glob(f"*/*/{FILENAME}"))
            runs += sorted(p.parent for p in path.glob(f"*/{FILENAME}") if p.parent not in runs)
        else:
            raise SystemExit(f"early_warning: {path} is not a folder; pass run folders holding {FILENAME} "
                             "or a folder above them.")
    if not runs:
        raise SystemExit(f"early_warning: no {FILENAME} under {', '.join(map(str, paths))}; pass the run "
                         "folders of a finished experiment (e.g. runs/experiment_cpu).")
    return runs


def measurements(run: Path) -> list[dict[str, Any]]:
    """The run's measurements in (round, step) order: entries with a held-out perplexity."""
    entries = History.load(run / FILENAME).entries
    return [e for e in entries if "heldout_ppl" in e]


def deviation(entry: dict[str, Any], baseline: dict[str, Any], signal: str) -> float | None:
    value, base = entry.get(signal), baseline.get(signal)
    if not (finite(value) and finite(base)):
        return None
    return value - base if SIGNALS[signal].direction == "up" else base - value


def ppl_first_warn(entries: list[dict[str, Any]]) -> int | None:
    warn_ratio = DetectorConfig().ppl_ratio_warn
    base = entries[0].get("heldout_ppl") if entries else None
    for i, e in enumerate(entries):
        evidence = e.get("evidence") or {}
        if any((evidence.get(k) or {}).get("level") in ("warn", "alarm") for k in PPL_KEYS):
            return i
        if not evidence and finite(e.get("heldout_ppl")) and finite(base) and base > 0 \
                and e["heldout_ppl"] / base >= warn_ratio:
            return i
        if i and not math.isfinite(e.get("heldout_ppl") or math.nan):  # diverged: an alarm
            return i
    return None


def quantile(values: list[float], q: float) -> float:
    """The q-quantile, taking the higher value between two ranks (never below the empirical share)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def analyse(runs: list[Path], healthy: set[str], q: float) -> dict[str, Any]:
    data = {run: measurements(run) for run in runs}
    data = {run: entries for run, entries in data.items() if len(entries) >= 2}
    arm_of = {run: run.parent.name for run in data}
    signals = [s for s in (*names(panel="early"), *COMPARED)
               if any(s in e for entries in data.values() for e in entries)]
    healthy_runs = [run for run in data if arm_of[run] in healthy]
    if not healthy_runs:
        raise SystemExit(f"early_warning: no run of the healthy arms {sorted(healthy)} among "
                         f"{sorted(set(arm_of.values()))}; name them with --healthy.")
    out: dict[str, Any] = {"config": {"quantile": q, "healthy_arms": sorted(healthy),
                                      "runs": [str(r) for r in data]}, "signals": {}, "runs": {}}
    for signal in signals:
        noise = [d for run in healthy_runs for e in data[run][1:]
                 if (d := deviation(e, data[run][0], signal)) is not None]
        if not noise:
            continue
        threshold = quantile(noise, q)
        crossed_runs = sum(any((d := deviation(e, data[run][0], signal)) is not None and d > threshold
                               for e in data[run][1:]) for run in healthy_runs)
        out["signals"][signal] = {
            "label": SIGNALS[signal].label, "direction": SIGNALS[signal].direction,
            "threshold_deviation": threshold, "healthy_measurements": len(noise),
            "false_alarms_per_verdict": sum(d > threshold for d in noise) / len(noise),
            "false_alarm_runs": crossed_runs / len(healthy_runs),
        }
    for run, entries in data.items():
        ppl = ppl_first_warn(entries)
        where = [(e.get("round"), e.get("step")) for e in entries]
        row: dict[str, Any] = {"arm": arm_of[run], "measurements": len(entries),
                               "ppl_first_warn": None if ppl is None else {"index": ppl, "at": where[ppl]},
                               "signals": {}}
        for signal, facts in out["signals"].items():
            first = next((i for i, e in enumerate(entries[1:], 1)
                          if (d := deviation(e, entries[0], signal)) is not None
                          and d > facts["threshold_deviation"]), None)
            row["signals"][signal] = {
                "first_crossing": None if first is None else {"index": first, "at": where[first]},
                "lead": None if first is None or ppl is None else ppl - first,
            }
        out["runs"][str(run)] = row
    out["arms"] = {}
    for arm in sorted(set(arm_of.values())):
        rows = [r for r in out["runs"].values() if r["arm"] == arm]
        warned = sum(r["ppl_first_warn"] is not None for r in rows)
        out["arms"][arm] = {"runs": len(rows), "ppl_warned": warned, "median_lead": {}, "crossed_runs": {}}
        for signal in out["signals"]:
            leads = [r["signals"][signal]["lead"] for r in rows if r["signals"][signal]["lead"] is not None]
            out["arms"][arm]["median_lead"][signal] = statistics.median(leads) if leads else None
            # a signal that never crosses in a run perplexity warned in has no lead there: count it
            out["arms"][arm]["crossed_runs"][signal] = sum(r["signals"][signal]["first_crossing"] is not None
                                                           for r in rows)
    return out


def markdown(result: dict[str, Any]) -> str:
    signals = list(result["signals"])
    lines = ["# Early warning: lead over held-out perplexity", "",
             f"Thresholds: the {result['config']['quantile']:.0%} quantile of healthy deviations from each "
             f"run's baseline (healthy arms: {', '.join(result['config']['healthy_arms'])}). Lead: "
             "measurements between the signal's first crossing and held-out perplexity's first warn "
             "(positive: earlier).", "",
             "| signal | threshold | false alarms / verdict | healthy runs crossed |", "|---|---|---|---|"]
    for f in result["signals"].values():
        lines.append(f"| {f['label']} | {f['threshold_deviation']:.4g} | "
                     f"{f['false_alarms_per_verdict']:.1%} | {f['false_alarm_runs']:.0%} |")
    lines += ["", "Median lead (measurements) per arm over the runs where both warned, and (in brackets) the "
              "runs where the signal crossed at all; '-': no run where both warned:", "",
              "| arm | runs | ppl warned | " + " | ".join(SIGNALS[s].label for s in signals) + " |",
              "|---|---|---|" + "---|" * len(signals)]
    for arm, a in result["arms"].items():
        leads = [("-" if a["median_lead"][s] is None else f"{a['median_lead'][s]:+g}")
                 + f" ({a['crossed_runs'][s]}/{a['runs']})" for s in signals]
        lines.append(f"| {arm} | {a['runs']} | {a['ppl_warned']} | " + " | ".join(leads) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, or folders holding <arm>/<seed>/")
    parser.add_argument("--healthy", default="real_only,accumulate", help="comma-separated healthy arm names")
    parser.add_argument("--quantile", type=float, default=0.95, help="threshold quantile of healthy noise")
    parser.add_argument("--out", type=Path, default=RESULTS, help="writes <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if not 0 < args.quantile <= 1:
        parser.error(f"--quantile must be in (0, 1], got {args.quantile}")
    healthy = {a.strip() for a in args.healthy.split(",") if a.strip()}
    result = analyse(find_runs(args.paths), healthy, args.quantile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    sys.stdout.write(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
