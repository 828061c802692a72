"""Sequential verdicts re-judged on saved runs: how often the first look decides, and whether any verdict
changes.

    python benchmarks/sequential_rejudge.py runs/early_warning_cpu runs/floor_equal_tokens_cpu \
        runs/self_improve_cpu

For every run folder under the given roots (those with a collapse_history.json and a run_state.json), the
history is replayed entry by entry, twice, with the run's own detector settings (its recorded recipe):
- whole set: each entry as it was measured (every held-out document), judged against the history before it;
- sequential: each measurement the guard takes between a round's first and its final one (the ones
  `GuardConfig.sequential` applies to) is first cut to its first look (the documents
  `collapse_guard.probe.first_look_documents` picks with the run's evaluation seed: their per-document sums,
  0 elsewhere). When `CollapseDetector.held_out_decided` says the half decides, the entry stays partial
  (its heldout_ppl the whole-set estimate) and later verdicts are judged against it; otherwise the whole
  entry is used.
The per-document sums are exact per document (tests/test_sequential.py: the parts add up to the whole set
to 1e-12), so a partial entry cut from a saved whole one is what a first look at that model would have
scored. Generations are untouched (the first look is about the held-out set only).

Reports, per group of runs and in all: the measurements a first look applies to, the share it decided
(and so scored half the documents), and every verdict whose level or firing rules differ between the two
replays, with the entry. Writes benchmarks/results/sequential_rejudge.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from collapse_guard.callbacks import GuardConfig  # noqa: E402
from collapse_guard.config import config_from_dict, recorded_config  # noqa: E402
from collapse_guard.detector import CollapseDetector  # noqa: E402
from collapse_guard.history import History, strip_verdict  # noqa: E402
from collapse_guard.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from collapse_guard.probe import estimate_whole_set, first_look_documents  # noqa: E402
from collapse_guard.stats import TEXT_SIGNALS, diversity_ratio_intervals  # noqa: E402

CONFIDENCE = GuardConfig().sequential_confidence


def first_look(entry: dict, scored: list[int]) -> dict:
    """The entry as its first look would have measured it: the scored documents' sums, 0 elsewhere."""
    keep = set(scored)
    nll = [v if d in keep else 0.0 for d, v in enumerate(entry["heldout_doc_nll"])]
    tokens = [v if d in keep else 0 for d, v in enumerate(entry["heldout_doc_tokens"])]
    total_nll, total_tokens = sum(nll), sum(tokens)
    held = {k: v for k, v in entry.items() if not k.startswith("heldout_")}
    return {**held, "heldout_doc_nll": nll, "heldout_doc_tokens": tokens, "heldout_doc_index": list(scored),
            "heldout_nll": total_nll, "heldout_tokens": float(total_tokens),
            "heldout_ppl": math.exp(total_nll / total_tokens)}


def prompts_would_decide(detector: CollapseDetector, baseline: dict, entry: dict,
                         half: list[int]) -> bool | None:
    """Whether a first look at half the prompts (paired with the baseline's same prompts) would show every
    generation rule quiet at the first look's level: each diversity signal's lower bound at or above its
    warn ratio, self-BLEU's upper bound at or below its own (or its rise's bound under self_bleu_min_rise).
    None: the entries hold no generations.
    (A study only: the probe generates every prompt.)"""
    c = detector.config
    base, new = baseline.get(c.generations_signal), entry.get(c.generations_signal)
    if not base or not new or len(base) != len(new):
        return None
    names = [s for s in (*c.diversity_signals, c.self_bleu_signal) if s in TEXT_SIGNALS]
    intervals = diversity_ratio_intervals([base[i] for i in half], [new[i] for i in half], names, CONFIDENCE)
    for name in names:
        est = intervals.get(name)
        if est is None:
            return False
        if name == c.self_bleu_signal:  # quiet below its ratio, or when even the rise's bound is too small
            if est.high > c.self_bleu_ratio_warn and est.baseline * (est.high - 1.0) >= c.self_bleu_min_rise:
                return False
        elif est.low < c.diversity_ratio_warn:
            return False
    return True


def firing(verdict) -> tuple[str, list[str]]:
    return verdict.level, sorted(k for k, e in verdict.evidence.items() if e.get("level") != "ok")


def replay(run: Path) -> dict:
    config = config_from_dict(recorded_config(read_json(run / "run_state.json")["config"]))
    detector = CollapseDetector(config.detector)
    entries = [strip_verdict(e) for e in read_json(run / "collapse_history.json")["entries"]]
    whole, sequential = History(), History()
    applies = decided = prompts_decided = both_decided = 0
    differences = []
    scored = prompt_half = None
    for entry in entries:
        if "heldout_doc_nll" not in entry:  # a training log without a measurement
            whole.add(dict(entry))
            sequential.add(dict(entry))
            continue
        if scored is None:
            tokens = entry["heldout_doc_tokens"]
            scored = first_look_documents([d for d, t in enumerate(tokens) if t > 0], config.evaluation.seed)
        r = entry["round"]
        whole_verdict = detector.check([*whole.context(r), entry])
        whole.add(dict(entry))
        context = sequential.context(r)
        used = dict(entry)
        if entry["step"] > 0 and not entry.get("final") and context:
            applies += 1
            partial = first_look(entry, scored)
            held_out = detector.held_out_decided(context, partial, CONFIDENCE)
            if held_out:
                decided += 1
                estimate_whole_set(partial, context[0])
                used = partial
            generations = entry.get("generations") or []
            if prompt_half is None and len(generations) >= 2:
                prompt_half = first_look_documents(list(range(len(generations))), config.evaluation.seed)
            quiet = prompts_would_decide(detector, context[0], entry, prompt_half) if prompt_half else None
            prompts_decided += bool(quiet)
            both_decided += bool(quiet) and held_out
        seq_verdict = detector.check([*context, used])
        sequential.add(used)
        if firing(whole_verdict) != firing(seq_verdict):
            window = [e for e in context[-2:] if "heldout_doc_index" in e]
            reason = "other"
            changed = set(firing(whole_verdict)[1]) ^ set(firing(seq_verdict)[1])
            if changed == {"heldout_ppl_rises"} and window:
                reason = (f"trend rule: the window holds a partial entry (step {window[-1]['step']}), so its "
                          "step ratios are over the documents both scored; their interval did not clear the "
                          "rise tolerance where the whole set's did")
            differences.append({"run": str(run), "round": r, "step": entry["step"],
                                "whole_set": firing(whole_verdict), "sequential": firing(seq_verdict),
                                "first_look_decided": "heldout_doc_index" in used, "reason": reason})
    return {"run": str(run), "measurements": len(entries), "first_look_applies": applies,
            "first_look_decided": decided, "half_prompts_would_decide": prompts_decided,
            "both_would_decide": both_decided, "documents": len(entries[0]["heldout_doc_tokens"]),
            "first_look_documents": len(scored or []), "differences": differences}


def group_of(run: Path, root: Path) -> str:
    parts = run.relative_to(root).parts
    return f"{root.name}/{parts[0]}" if parts else root.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path)
    parser.add_argument("--out", default=str(HERE / "results" / "sequential_rejudge"))
    args = parser.parse_args()
    runs, groups = [], {}
    for root in args.roots:
        for history in sorted(root.rglob("collapse_history.json")):
            run = history.parent
            if not (run / "run_state.json").exists():
                continue
            result = replay(run)
            runs.append(result)
            groups.setdefault(group_of(run, root), []).append(result)
    if not runs:
        raise SystemExit(f"no run folders (collapse_history.json + run_state.json) under {args.roots}")

    def totals(items: list[dict]) -> dict:
        applies = sum(r["first_look_applies"] for r in items)
        decided = sum(r["first_look_decided"] for r in items)
        return {"runs": len(items), "measurements": sum(r["measurements"] for r in items),
                "first_look_applies": applies, "first_look_decided": decided,
                "decided_share": decided / applies if applies else None,
                "half_prompts_would_decide": sum(r["half_prompts_would_decide"] for r in items),
                "both_would_decide": sum(r["both_would_decide"] for r in items),
                "verdict_differences": sum(len(r["differences"]) for r in items)}

    summary = {name: totals(items) for name, items in groups.items()}
    summary["all"] = totals(runs)
    out = {"confidence": CONFIDENCE, "summary": summary, "runs": runs,
           "differences": [d for r in runs for d in r["differences"]]}
    atomic_write_json(Path(args.out).with_suffix(".json"), out)
    lines = ["# Sequential verdicts re-judged on saved runs", "",
             "`python benchmarks/sequential_rejudge.py " + " ".join(str(r) for r in args.roots) + "`", "",
             f"First look: half the held-out documents, decides only \"ok\", at the {CONFIDENCE:.1%} "
             "interval (Haybittle-Peto). Applies to the measurements between a round's first and its final "
             "one.", "",
             "| runs | n | measurements | first look applies | decided (half scored) | verdicts that "
             "differ | study: half the prompts would decide | and the held-out half too |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in summary.items():
        share = (f"{t['first_look_decided']} ({t['decided_share']:.0%})" if t["decided_share"] is not None
                 else "-")
        lines.append(f"| {name} | {t['runs']} | {t['measurements']} | {t['first_look_applies']} | {share} | "
                     f"{t['verdict_differences']} | {t['half_prompts_would_decide']} | "
                     f"{t['both_would_decide']} |")
    lines += ["", "The last two columns are a study, not what the guard does: whether a first look at "
              "half the prompts (their generations paired with the baseline's same prompts, jackknife "
              "intervals at the same level) would show every generation rule quiet (each diversity signal's "
              "lower bound at or above its warn ratio, self-BLEU's upper bound at or below its own, or its "
              "rise's bound under the minimum rise)."]
    if out["differences"]:
        lines += ["", "Differences (level, firing rules):", ""]
        lines += [f"- {d['run']} round {d['round']} step {d['step']}: whole set {d['whole_set']}, sequential "
                  f"{d['sequential']}; {d['reason']}" for d in out["differences"]]
    atomic_write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(summary["all"]))


if __name__ == "__main__":
    main()
