"""The adaptive floor against the fixed 50% floor at equal compute (recipes/floor_equal_tokens_cpu.yaml).

    collapse-guard run recipes/floor_equal_tokens_cpu.yaml   # 2 arms x 3 seeds x 5 rounds
    python benchmarks/floor_equal_tokens.py runs/floor_equal_tokens_cpu

Writes benchmarks/results/floor_equal_tokens.{json,md}. Per round and seed, from the run folders:

- tokens trained, counted at the model input (real top-ups included), and the real share of them;
- held-out perplexity of the report documents (which neither the floor nor the verdicts read) and of the
  Wikipedia sample, each as a ratio to round 0 with a paired bootstrap interval over documents;
- the head-to-head: the adaptive arm's report-set perplexity over the fixed arm's at the same round and
  seed, paired over the same documents (below 1: the adaptive floor did better);
- where the recipe's third arm ran (`adaptive_early`: the adaptive floor that also acts on the early-warning
  thresholds of `FloorConfig.early_warn`), the same head-to-heads against both arms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from collapse_guard.io import atomic_write_json, atomic_write_text, read_json
from collapse_guard.stats import ppl_ratio_interval

sys.path.insert(0, str(Path(__file__).parent))
from self_improve import run_rows  # noqa: E402  (one reader of a run's rounds for both comparisons)

ARMS = ("floor_50", "adaptive_50")
EARLY = "adaptive_early"
RESULTS = Path(__file__).parent / "results" / "floor_equal_tokens"


def _report_nll(run: Path, r: int) -> tuple[list[float], list[int]] | None:
    payload = read_json(run / f"round_{r}" / "eval.json", default=None) or {}
    nll, tokens = payload.get("heldout_doc_nll@report"), payload.get("heldout_doc_tokens@report")
    return (nll, tokens) if nll and tokens else None


def head_to_head(fixed: Path, adaptive: Path, r: int) -> dict[str, float] | None:
    """Adaptive / fixed report-set perplexity at round r, paired over documents."""
    a, b = _report_nll(fixed, r), _report_nll(adaptive, r)
    if not a or not b:
        return None
    est = ppl_ratio_interval(a[0], a[1], b[0], b[1])
    return {"ratio": est.ratio, "low": est.low, "high": est.high, "n": est.n}


def summarise(root: Path) -> dict[str, Any]:
    seeds = sorted({p.name for arm in ARMS for p in (root / arm).glob("seed_*")
                    if (read_json(p / "run_state.json", default={}) or {}).get("finished")})
    seeds = [s for s in seeds if all((root / arm / s / "run_state.json").exists() for arm in ARMS)]
    per_seed: dict[str, Any] = {}
    for seed in seeds:
        rows = {arm: run_rows(root / arm / seed) for arm in ARMS}
        rounds = sorted(set.intersection(*({row["round"] for row in rows[arm]} for arm in ARMS)))
        per_seed[seed] = [
            {"round": r,
             **{f"{arm}": next(row for row in rows[arm] if row["round"] == r) for arm in ARMS},
             "adaptive_over_fixed": head_to_head(root / "floor_50" / seed, root / "adaptive_50" / seed, r)
             if r else None}
            for r in rounds]
        early = root / EARLY / seed
        if (read_json(early / "run_state.json", default={}) or {}).get("finished"):
            early_rows = {row["round"]: row for row in run_rows(early)}
            for row in per_seed[seed]:
                r = row["round"]
                if r not in early_rows:
                    continue
                row[EARLY] = early_rows[r]
                row["early_over_adaptive"] = r and head_to_head(root / "adaptive_50" / seed, early, r) or None
                row["early_over_fixed"] = r and head_to_head(root / "floor_50" / seed, early, r) or None
    arms = [*ARMS, *([EARLY] if any(EARLY in row for rows in per_seed.values() for row in rows) else [])]
    total_tokens = {arm: {seed: sum((row.get(arm) or {}).get("tokens_trained") or 0 for row in per_seed[seed])
                          for seed in seeds if any(arm in row for row in per_seed[seed])} for arm in arms}
    return {"seeds": seeds, "per_seed": per_seed, "total_tokens": total_tokens}


def _cell(c: dict[str, Any] | None) -> str:
    return "-" if not c else f"x{c['ratio']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"


def _tokens(row: dict[str, Any]) -> str:
    if row.get("real_tokens_share") is None:
        return "-"
    return f"{row['tokens_trained']:,} ({row['real_tokens_share']:.0%})"


def markdown(summary: dict[str, Any], command: str) -> str:
    lines = ["# Adaptive floor vs fixed 50% floor at equal compute", "",
             f"Made by `{command}` from `collapse-guard run recipes/floor_equal_tokens_cpu.yaml` "
             f"(SmolLM2-135M-Instruct, CPU; seeds {', '.join(summary['seeds'])}). Every round of both arms "
             "stops at the first optimizer step past 3,000 tokens counted at the model input. Perplexity "
             "ratios are on the 26 report documents, which no decision read, with 95% paired bootstrap "
             "intervals over documents.", "",
             "| seed | round | floor_50: tokens (real share) | floor_50: ppl@report "
             "| adaptive: tokens (real share) | adaptive: floor | adaptive: ppl@report "
             "| adaptive / floor_50 ppl@report | ppl@wiki floor_50 / adaptive | verdicts |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for seed, rows in summary["per_seed"].items():
        for row in rows:
            if not row["round"]:
                continue
            f, a = row["floor_50"], row["adaptive_50"]
            wiki = (f"{(f.get('ppl_wiki') or {}).get('ratio', float('nan')):.3f} / "
                    f"{(a.get('ppl_wiki') or {}).get('ratio', float('nan')):.3f}")
            cells = [seed, row["round"], _tokens(f), _cell(f.get("ppl_report")), _tokens(a), a.get("floor"),
                     _cell(a.get("ppl_report")), _cell(row["adaptive_over_fixed"]), wiki,
                     f"{f.get('level')}, {a.get('level')}"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Tokens trained over all rounds: " + "; ".join(
        f"{arm} " + ", ".join(f"{s} {n:,}" for s, n in by_seed.items())
        for arm, by_seed in summary["total_tokens"].items()), ""]
    last = [rows[-1]["adaptive_over_fixed"] for rows in summary["per_seed"].values() if rows]
    last = [c for c in last if c]
    if last:
        lines.append(f"Last round, adaptive / floor_50 on the report documents: mean x"
                     f"{statistics.fmean(c['ratio'] for c in last):.3f}; per seed "
                     + ", ".join(_cell(c) for c in last) + ".")
    early = [(seed, row) for seed, rows in summary["per_seed"].items() for row in rows if EARLY in row]
    if early:
        lines += ["", "## The adaptive floor acting on early warnings too (`adaptive_early`)", "",
                  "The same adaptive floor, which also raises the floor when an early-warning signal "
                  "crosses its threshold (`guard.floor.early_warn`, set in the recipe from other runs' "
                  "healthy noise) while the verdict is ok.", "",
                  "| seed | round | tokens (real share) | floor | ppl@report | early / adaptive ppl@report "
                  "| early / floor_50 ppl@report | ppl@wiki | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for seed, row in early:
            if not row["round"]:
                continue
            e = row[EARLY]
            cells = [seed, row["round"], _tokens(e), e.get("floor"), _cell(e.get("ppl_report")),
                     _cell(row.get("early_over_adaptive")), _cell(row.get("early_over_fixed")),
                     f"{(e.get('ppl_wiki') or {}).get('ratio', float('nan')):.3f}", e.get("level")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        for key, other in (("early_over_adaptive", "adaptive_50"), ("early_over_fixed", "floor_50")):
            ends = [rows[-1].get(key) for rows in summary["per_seed"].values() if rows]
            ends = [c for c in ends if c]
            if ends:
                lines.append(f"\nLast round, adaptive_early / {other} on the report documents: mean x"
                             f"{statistics.fmean(c['ratio'] for c in ends):.3f}; per seed "
                             + ", ".join(_cell(c) for c in ends) + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="?", default="runs/floor_equal_tokens_cpu", type=Path)
    parser.add_argument("--out", default=RESULTS, type=Path, help="writes <out>.json and <out>.md")
    args = parser.parse_args()
    if not args.runs.is_dir():
        parser.error(f"{args.runs} is not a folder: run "
                     "`collapse-guard run recipes/floor_equal_tokens_cpu.yaml` first.")
    summary = summarise(args.runs)
    if not summary["seeds"]:
        parser.error(f"{args.runs} holds no seed that both arms ({', '.join(ARMS)}) finished.")
    command = f"python benchmarks/floor_equal_tokens.py {args.runs}"
    atomic_write_json(args.out.with_suffix(".json"), {"command": command, **summary})
    atomic_write_text(args.out.with_suffix(".md"), markdown(summary, command))
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
