"""Lead time of the guard's signals over held-out perplexity, with thresholds from healthy runs' noise.

Reads run folders that hold a guard history (`collapse_history.json`, written by the loop and by
`CollapseGuardCallback`), grouped into arms by their parent folder (`runs/experiment_cpu/replace/seed_0` is
seed_0 of the arm `replace`). For every signal (the early-warning signals of the held-out forward, and for
comparison the generation signals the detector judges) and every measurement of a run, the deviation from
the run's own baseline (its first measurement) in the direction collapse moves it (`collapse_guard.signals`):
value - baseline for "up" signals, baseline - value for "down" ones.

- Threshold per signal: the `--quantile` (0.95) of the deviations of every measurement after the baseline in
  the healthy arms (`--healthy`, default real_only and accumulate): at most 5% of healthy measurements cross
  it, in sample. `--threshold-seeds seed_3,seed_4` takes the thresholds from those seeds' healthy runs
  only and evaluates everything else against them (out of sample); the re-check on other human text must
  not see thresholds tuned on it.
- First crossing per run: the first measurement whose deviation exceeds the threshold.
- Held-out perplexity's first warn: the first measurement whose verdict flagged `heldout_ppl` or
  `heldout_ppl_rises` (its recorded evidence; for histories without evidence, the ratio to the baseline
  against `DetectorConfig().ppl_ratio_warn`).
- Lead: perplexity's first-warn index minus the signal's first-crossing index, in measurements (positive:
  the signal moved first), with the (round, step) of both, and the same lead in optimizer steps and input
  tokens trained (from each round's train.json).
- False alarms: per signal, the share of healthy measurements past the threshold (per verdict) and the share
  of healthy runs with any crossing.

Writes `<out>.json` and `<out>.md` (default benchmarks/results/early_warning). Runs nothing: point it at run
folders of finished experiments.

Usage:

```bash
python benchmarks/early_warning.py runs/experiment_cpu            # every <arm>/<seed>/collapse_history.json
python benchmarks/early_warning.py runs/a/replace/seed_0 runs/a/real_only/seed_0 --healthy real_only
python benchmarks/early_warning.py runs/early_warning_cpu --healthy floor_50,real_only \
    --threshold-seeds seed_3,seed_4 --out benchmarks/results/early_warning_steps
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

from datasets import load_from_disk

from collapse_guard.detector import DetectorConfig
from collapse_guard.history import FILENAME, History
from collapse_guard.io import read_json
from collapse_guard.signals import SIGNALS, finite, names
from collapse_guard.signals import moved_toward_collapse as deviation

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
    """The run's measurements in (round, step) order: entries with a held-out perplexity, each model once.

    A round's evaluation at step 0 scores the model the previous round's final measurement scored; keeping
    both would count one model twice and inflate a lead measured in measurements.
    """
    entries = [e for e in History.load(run / FILENAME).entries if "heldout_ppl" in e]
    fill_train_copy_gain(run, entries)
    kept: list[dict[str, Any]] = []
    for e in entries:
        if kept and e.get("step") == 0 and e.get("heldout_ppl") == kept[-1].get("heldout_ppl"):
            continue
        kept.append(e)
    return kept


def fill_train_copy_gain(run: Path, entries: list[dict[str, Any]]) -> None:
    """`train_copy_gain` for histories written before the guard computed it: each round's generations
    against that round's training rows (`round_<r>/train`, as the loop saved them), less the baseline's,
    with the functions the guard uses."""
    from collapse_guard.data import texts_of
    from collapse_guard.metrics.diversity import copy_gain, ngram_set

    if not entries or any("train_copy_gain" in e for e in entries) or not entries[0].get("generations"):
        return
    tables: dict[int, frozenset | None] = {}
    for e in entries:
        r = e["round"]
        if r not in tables:
            folder = run / f"round_{r}" / "train"
            tables[r] = ngram_set(texts_of(load_from_disk(str(folder)))) if folder.is_dir() else None
        if r == 0 or e is entries[0]:
            e["train_copy_gain"] = 0.0  # the baseline against itself
        elif tables[r] is not None and e.get("generations"):
            e["train_copy_gain"] = copy_gain(e["generations"], entries[0]["generations"], tables[r])


def trained_so_far(run: Path, entries: list[dict[str, Any]]) -> list[tuple[int, int | None]]:
    """(optimizer steps, input tokens) trained before each measurement, counted from the run's start.

    Steps add up the rounds' `train_steps` (round_<r>/train.json); tokens add up their
    `input_tokens_trained`, and inside a round assume its tokens spread evenly over its steps (rows are
    the same length on average: a measurement's token figure is exact at round ends, close inside).
    """
    rounds: dict[int, dict[str, Any]] = {}
    for entry in entries:
        r = entry.get("round")
        if isinstance(r, int) and r not in rounds:
            path = run / f"round_{r}" / "train.json"
            rounds[r] = read_json(path, default=None) or {}
    out: list[tuple[int, int | None]] = []
    for entry in entries:
        r, step = entry.get("round") or 0, entry.get("step") or 0
        before = [rounds.get(k, {}) for k in range(1, r)]
        steps = sum(t.get("train_steps") or 0 for t in before) + step
        this = rounds.get(r, {})
        known = all("input_tokens_trained" in t for t in (*before, this)) if r else True
        if not known:
            out.append((steps, None))
            continue
        tokens = sum(t["input_tokens_trained"] for t in before)
        if r and this.get("train_steps"):
            share = min(step, this["train_steps"]) / this["train_steps"]
            tokens += round(this["input_tokens_trained"] * share)
        out.append((steps, tokens))
    return out


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


def at(i: int, where: list[tuple[Any, Any]], trained: list[tuple[int, int | None]]) -> dict[str, Any]:
    """Where measurement i sits: its index, (round, step), and what was trained before it."""
    return {"index": i, "at": where[i], "steps_trained": trained[i][0], "tokens_trained": trained[i][1]}


def deviations(entries: list[dict[str, Any]], signal: str) -> list[float]:
    return [d for e in entries[1:] if (d := deviation(e, entries[0], signal)) is not None]


def analyse(runs: list[Path], healthy: set[str], q: float,
            threshold_seeds: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    data = {run: measurements(run) for run in runs}
    data = {run: entries for run, entries in data.items() if len(entries) >= 2}
    arm_of = {run: run.parent.name for run in data}
    signals = [s for s in (*names(panel="early"), *COMPARED)
               if any(s in e for entries in data.values() for e in entries)]
    healthy_runs = [run for run in data if arm_of[run] in healthy]
    # Out of sample: with --threshold-seeds the healthy runs of those seeds set the thresholds and nothing
    # else; the false alarms are counted on the other healthy runs, the leads on every other run.
    calibration = [run for run in healthy_runs if not threshold_seeds or run.name in threshold_seeds]
    evaluated = {run: e for run, e in data.items() if not threshold_seeds or run not in calibration}
    checked = [run for run in healthy_runs if run in evaluated] if threshold_seeds else healthy_runs
    if not calibration or not checked:
        split = (f" both inside the seeds {sorted(threshold_seeds)} (--threshold-seeds) and outside them"
                 if threshold_seeds else "")
        raise SystemExit(f"early_warning: no run of the healthy arms {sorted(healthy)}{split} among the arms "
                         f"{sorted(set(arm_of.values()))}; name them with --healthy.")
    out: dict[str, Any] = {"config": {"quantile": q, "healthy_arms": sorted(healthy),
                                      "threshold_runs": [str(r) for r in calibration],
                                      "out_of_sample": bool(threshold_seeds),
                                      "runs": [str(r) for r in evaluated]}, "signals": {}, "runs": {}}
    for signal in signals:
        noise = [d for run in calibration for d in deviations(data[run], signal)]
        if not noise:
            continue
        threshold = quantile(noise, q)
        check = [d for run in checked for d in deviations(data[run], signal)]
        crossed_runs = sum(any(d > threshold for d in deviations(data[run], signal)) for run in checked)
        out["signals"][signal] = {
            "label": SIGNALS[signal].label, "direction": SIGNALS[signal].direction,
            "threshold_deviation": threshold, "threshold_measurements": len(noise),
            "healthy_measurements": len(check),
            "false_alarms_per_verdict": sum(d > threshold for d in check) / len(check) if check else None,
            "false_alarm_runs": crossed_runs / len(checked),
        }
    for run, entries in evaluated.items():
        ppl = ppl_first_warn(entries)
        where = [(e.get("round"), e.get("step")) for e in entries]
        trained = trained_so_far(run, entries)

        row: dict[str, Any] = {"arm": arm_of[run], "measurements": len(entries), "signals": {},
                               "ppl_first_warn": None if ppl is None else at(ppl, where, trained)}
        for signal, facts in out["signals"].items():
            first = next((i for i, e in enumerate(entries[1:], 1)
                          if (d := deviation(e, entries[0], signal)) is not None
                          and d > facts["threshold_deviation"]), None)
            both = first is not None and ppl is not None
            tokens = both and None not in (trained[ppl][1], trained[first][1])
            row["signals"][signal] = {
                "first_crossing": None if first is None else at(first, where, trained),
                "lead": ppl - first if both else None,
                "lead_steps": trained[ppl][0] - trained[first][0] if both else None,
                "lead_tokens": trained[ppl][1] - trained[first][1] if tokens else None,
            }
        out["runs"][str(run)] = row
    out["arms"] = {}
    for arm in sorted(set(arm_of.values())):
        rows = [r for r in out["runs"].values() if r["arm"] == arm]
        warned = sum(r["ppl_first_warn"] is not None for r in rows)
        out["arms"][arm] = {"runs": len(rows), "ppl_warned": warned, "median_lead": {},
                            "median_lead_steps": {}, "median_lead_tokens": {}, "crossed_runs": {}}
        for signal in out["signals"]:
            for key, unit in (("median_lead", "lead"), ("median_lead_steps", "lead_steps"),
                              ("median_lead_tokens", "lead_tokens")):
                leads = [r["signals"][signal][unit] for r in rows if r["signals"][signal][unit] is not None]
                out["arms"][arm][key][signal] = statistics.median(leads) if leads else None
            # a signal that never crosses in a run perplexity warned in has no lead there: count it
            out["arms"][arm]["crossed_runs"][signal] = sum(r["signals"][signal]["first_crossing"] is not None
                                                           for r in rows)
    return out


def markdown(result: dict[str, Any]) -> str:
    signals = list(result["signals"])
    config = result["config"]
    sample = (f"set on {len(config['threshold_runs'])} healthy runs that are not evaluated below; the false "
              "alarms are counted on the other healthy runs (out of sample)" if config.get("out_of_sample")
              else "set and checked on the same healthy runs (in sample)")
    lines = ["# Early warning: lead over held-out perplexity", "",
             f"Thresholds: the {config['quantile']:.0%} quantile of healthy deviations from each "
             f"run's baseline (healthy arms: {', '.join(config['healthy_arms'])}), {sample}. Lead: "
             "measurements between the signal's first crossing and held-out perplexity's first warn "
             "(positive: earlier).", "",
             "| signal | threshold | false alarms / verdict | healthy runs crossed |", "|---|---|---|---|"]
    for f in result["signals"].values():
        rate = "-" if f["false_alarms_per_verdict"] is None else f"{f['false_alarms_per_verdict']:.1%}"
        lines.append(f"| {f['label']} | {f['threshold_deviation']:.4g} | {rate} "
                     f"({f['healthy_measurements']}) | {f['false_alarm_runs']:.0%} |")
    lines += ["", "Median lead per arm over the runs where both warned, in measurements / optimizer steps / "
              "input tokens trained, and (in brackets) the runs where the signal crossed at all; '-': no run "
              "where both warned:", "",
              "| arm | runs | ppl warned | " + " | ".join(SIGNALS[s].label for s in signals) + " |",
              "|---|---|---|" + "---|" * len(signals)]

    def lead(a: dict[str, Any], s: str) -> str:
        if a["median_lead"][s] is None:
            return "-"
        steps, tokens = a["median_lead_steps"].get(s), a["median_lead_tokens"].get(s)
        return (f"{a['median_lead'][s]:+g}" + ("" if steps is None else f" / {steps:+g}")
                + ("" if tokens is None else f" / {tokens:+,.0f}"))

    for arm, a in result["arms"].items():
        leads = [f"{lead(a, s)} ({a['crossed_runs'][s]}/{a['runs']})" for s in signals]
        lines.append(f"| {arm} | {a['runs']} | {a['ppl_warned']} | " + " | ".join(leads) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, or folders holding <arm>/<seed>/")
    parser.add_argument("--healthy", default="real_only,accumulate", help="comma-separated healthy arm names")
    parser.add_argument("--quantile", type=float, default=0.95, help="threshold quantile of healthy noise")
    parser.add_argument("--threshold-seeds", default="",
                        help="comma-separated seed folders (e.g. seed_3,seed_4) whose healthy runs alone set "
                             "the thresholds and are left out of the evaluation, so the false alarms and "
                             "leads are out of sample (default: in sample, from every healthy run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="writes <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if not 0 < args.quantile <= 1:
        parser.error(f"--quantile must be in (0, 1], got {args.quantile}")
    healthy = {a.strip() for a in args.healthy.split(",") if a.strip()}
    seeds = {a.strip() for a in args.threshold_seeds.split(",") if a.strip()}
    result = analyse(find_runs(args.paths), healthy, args.quantile, seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    sys.stdout.write(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
