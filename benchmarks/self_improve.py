"""Does the guard pay off? The self-improvement experiment's arms, compared at equal compute on text and
problems the run never decided on (recipes/self_improve_cpu.yaml).

    collapse-guard run recipes/self_improve_cpu.yaml   # 5 arms x 3 seeds x 4 rounds (hours on 2 CPU cores)
    python benchmarks/self_improve.py runs/self_improve_cpu

Reads every run folder (<arm>/seed_<s>; the seeds present are used) and writes
benchmarks/results/self_improve/{comparison.json, comparison.md, task_and_ppl.png}:

- task: accuracy on the 160 report problems (never read by the verdicts or the floor), per round, and its
  paired change from round 0 (bootstrap over problems; with several seeds, the mean and each seed's value);
- harm: held-out perplexity of the 26 report documents (in domain, never read by the guard) and of a
  Wikipedia sample (out of domain) as a ratio to round 0, with a paired bootstrap interval over documents,
  next to the real-only control's;
- compute: the tokens each arm trained per round, counted at the model input (top-ups included);
- the verifier: the share of sampled answers that were right (p) and the selector's phi, psi and breakdown
  point p* (Feng et al. 2024), per round.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from collapse_guard.history import FILENAME, History
from collapse_guard.io import atomic_write_json, atomic_write_text, read_json
from collapse_guard.stats import ppl_ratio_interval
from collapse_guard.task import accuracy_change, accuracy_interval

ARMS = ("guard", "floor_50", "no_real", "no_verifier", "real_only")
ROLE = {"guard": "verifier + adaptive floor (the guard)", "floor_50": "verifier + fixed 50% floor",
        "no_real": "verifier, no human text", "no_verifier": "all samples, no human text",
        "real_only": "human text only (control)"}
GOAL_GAIN, GOAL_PPL = 0.10, 1.05


def _finished(run: Path) -> bool:
    return bool((read_json(run / "run_state.json", default={}) or {}).get("finished"))


def seed_runs(root: Path) -> dict[str, list[Path]]:
    """Each arm's finished runs (a run still going is left out, so every seed of an arm has every round)."""
    out: dict[str, list[Path]] = {}
    for arm in ARMS:
        folders = sorted(p for p in (root / arm).glob("seed_*") if (p / FILENAME).exists()) \
            or ([root / arm] if (root / arm / FILENAME).exists() else [])  # a single-seed recipe
        folders = [f for f in folders if _finished(f)]
        if folders:
            out[arm] = folders
    return out


def _ppl_ratio(run: Path, r: int, corpus: str) -> dict[str, float] | None:
    """Round r's perplexity on `corpus` ("" = the decision set) over round 0's, with its paired interval."""
    key_nll = f"heldout_doc_nll{corpus}" if corpus else "heldout_doc_nll"
    key_tok = f"heldout_doc_tokens{corpus}" if corpus else "heldout_doc_tokens"

    def per_doc(round_index: int):
        payload = read_json(run / f"round_{round_index}" / "eval.json", default=None)
        if not payload:
            return None
        source = payload if corpus else payload.get("metrics", {})
        return source.get(key_nll), source.get(key_tok)

    base, new = per_doc(0), per_doc(r)
    if not base or not new or None in base or None in new:
        return None
    est = ppl_ratio_interval(base[0], base[1], new[0], new[1])
    return {"ratio": est.ratio, "low": est.low, "high": est.high, "n": est.n}


def run_rows(run: Path) -> list[dict[str, Any]]:
    """One row per finished round of one run."""
    finals = {e["round"]: e for e in History.load(run / FILENAME).finals()}
    base = finals.get(0)
    rows = []
    for r in sorted(finals):
        e = finals[r]
        row: dict[str, Any] = {"round": r, "level": e.get("level")}
        for suffix, name in (("@report", "report"), ("", "decision")):
            acc = e.get(f"task_accuracy{suffix}")
            row[f"task_{name}"] = acc
            outcomes = f"task_correct{suffix}"
            if base and acc is not None and base.get(outcomes) and e.get(outcomes):
                change = accuracy_change(base[outcomes], e[outcomes])
                row[f"task_{name}_change"] = {"change": change.change, "low": change.low, "high": change.high,
                                             "n": change.n}
                score = accuracy_interval(e[outcomes])
                row[f"task_{name}_interval"] = [score.low, score.high]
        for corpus, name in (("@report", "ppl_report"), ("@wiki", "ppl_wiki"), ("", "ppl_decision")):
            row[name] = _ppl_ratio(run, r, corpus) if r else {"ratio": 1.0, "low": 1.0, "high": 1.0}
        if r:
            train = read_json(run / f"round_{r}" / "train.json", default={}) or {}
            row["tokens_trained"] = train.get("input_tokens_trained")
            row["real_tokens_share"] = (train["real_tokens_trained"] / max(1, train["real_tokens_trained"]
                                                                          + train["synthetic_tokens_trained"])
                                        if "real_tokens_trained" in train else None)
            row["floor"] = train.get("floor")
            selection = read_json(run / f"round_{r}" / "selection.json", default={}) or {}
            generation = read_json(run / f"round_{r}" / "generation.json", default={}) or {}
            row["sampled_accuracy"] = generation.get("accuracy")
            row["kept"], row["generated"] = selection.get("selected"), selection.get("generated")
            verifier = next((s for s in selection.get("steps", []) if s.get("name") == "verifier"), {})
            row.update({k: verifier.get(k) for k in ("phi", "psi", "breakdown_point")})
        rows.append(row)
    return rows


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarise(root: Path) -> dict[str, Any]:
    arms = {arm: {f.name: run_rows(f) for f in folders} for arm, folders in seed_runs(root).items()}
    rounds = sorted({row["round"] for seeds in arms.values() for rows in seeds.values() for row in rows})
    table: dict[str, list[dict[str, Any]]] = {}
    for arm, seeds in arms.items():
        table[arm] = []
        for r in rounds:
            rows = [row for rows in seeds.values() for row in rows if row["round"] == r]
            if len(rows) < len(seeds):
                continue  # a seed has not finished this round: compare only rounds every seed has
            table[arm].append({
                "round": r, "seeds": len(rows),
                "task_report": _mean([row.get("task_report") for row in rows]),
                "task_report_change": _mean([(row.get("task_report_change") or {}).get("change")
                                             for row in rows]),
                "task_report_change_per_seed": [row.get("task_report_change") for row in rows],
                "ppl_report_ratio": _mean([(row.get("ppl_report") or {}).get("ratio") for row in rows]),
                "ppl_report_per_seed": [row.get("ppl_report") for row in rows],
                "ppl_wiki_ratio": _mean([(row.get("ppl_wiki") or {}).get("ratio") for row in rows]),
                "ppl_wiki_per_seed": [row.get("ppl_wiki") for row in rows],
                "tokens_trained": _mean([row.get("tokens_trained") for row in rows]),
                "real_tokens_share": _mean([row.get("real_tokens_share") for row in rows]),
                "sampled_accuracy": _mean([row.get("sampled_accuracy") for row in rows]),
                "phi": _mean([row.get("phi") for row in rows]),
                "psi": _mean([row.get("psi") for row in rows]),
                "breakdown_point": _mean([row.get("breakdown_point") for row in rows]),
                "levels": [row.get("level") for row in rows],
            })
    return {"runs": {arm: sorted(seeds) for arm, seeds in arms.items()}, "per_run": arms, "table": table,
            "goals": goals(table)}


def goals(table: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The issue's goals, checked on the last round every arm has (report set only)."""
    out: dict[str, Any] = {}
    guard = table.get("guard") or []
    if not guard:
        return out
    last = guard[-1]
    seeds = last["task_report_change_per_seed"]
    out["round"] = last["round"]
    out["guard_task_gain"] = last["task_report_change"]
    out["guard_task_gain_interval_above_0_every_seed"] = all(s and s["low"] > 0 for s in seeds)
    out["guard_task_gain_at_least_10_points"] = (last["task_report_change"] or 0) >= GOAL_GAIN
    ppl = last["ppl_report_per_seed"]
    out["guard_ppl_report_upper_bounds"] = [p and p["high"] for p in ppl]
    out["guard_ppl_report_within_1.05"] = all(p and p["high"] <= GOAL_PPL for p in ppl)
    control = next((row for row in table.get("real_only", []) if row["round"] == last["round"]), None)
    if control:
        bands = [p for p in control["ppl_report_per_seed"] if p]
        out["real_only_ppl_report_band"] = [min(p["low"] for p in bands), max(p["high"] for p in bands)] \
            if bands else None
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _fmt_change(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "-"
    return f"{cell['change'] * 100:+.1f} [{cell['low'] * 100:+.1f}, {cell['high'] * 100:+.1f}]"


def _fmt_ratio(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "-"
    return f"x{cell['ratio']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"


def markdown(summary: dict[str, Any], command: str) -> str:
    lines = ["# Self-improvement at equal compute: task gain and what it costs human text", "",
             f"Made by `{command}` from the run folders of "
             "`collapse-guard run recipes/self_improve_cpu.yaml` (SmolLM2-135M-Instruct, CPU). "
             "Seeds per arm: "
             + ", ".join(f"{arm} {len(seeds)}" for arm, seeds in summary["runs"].items()) + ".", "",
             "Everything below is measured on what no decision read: the 160 report problems (task), the "
             "26 report documents of lee (in domain) and the Wikipedia sample (out of domain). Intervals are "
             "95% paired bootstraps over problems / documents of one seed; with several seeds each seed's "
             "value is listed.", ""]
    for arm, rows in summary["table"].items():
        lines += [f"## {arm}: {ROLE[arm]}", "",
                  "| round | task acc (report) | change from round 0, points | ppl@report ratio | "
                  "ppl@wiki ratio | tokens trained | real share of tokens | sampled acc p | phi / psi / p* | "
                  "verdicts |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            cells = [str(row["round"]), f"{row['task_report']:.1%}",
                     "; ".join(_fmt_change(c) for c in row["task_report_change_per_seed"]) or "-",
                     "; ".join(_fmt_ratio(c) for c in row["ppl_report_per_seed"]),
                     "; ".join(_fmt_ratio(c) for c in row["ppl_wiki_per_seed"]),
                     _fmt(row["tokens_trained"], "{:,.0f}"), _fmt(row["real_tokens_share"], "{:.0%}"),
                     _fmt(row["sampled_accuracy"], "{:.1%}"),
                     " / ".join(_fmt(row[k], "{:.2f}") for k in ("phi", "psi", "breakdown_point")),
                     ", ".join(str(v) for v in row["levels"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    g = summary["goals"]
    if g:
        above = g["guard_task_gain_interval_above_0_every_seed"]
        bounds = ", ".join(f"{h:.3f}" for h in g["guard_ppl_report_upper_bounds"] if h)
        lines += ["## Goals (issue 20), on the report set", "",
                  f"- guard, round {g['round']}: task accuracy change "
                  f"{g['guard_task_gain'] * 100:+.1f} points "
                  f"(goal >= +10; interval above 0 in every seed: {above})",
                  f"- guard: ppl@report upper bounds {bounds} (goal <= {GOAL_PPL}: "
                  f"{g['guard_ppl_report_within_1.05']}); real-only control's band "
                  f"{_band(g.get('real_only_ppl_report_band'))}", ""]
    return "\n".join(lines) + "\n"


def _band(band: list[float] | None) -> str:
    return f"x{band[0]:.3f}-x{band[1]:.3f}" if band else "-"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (task, ppl) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, rows in summary["table"].items():
        rounds = [row["round"] for row in rows]
        task.plot(rounds, [row["task_report"] for row in rows], marker="o", label=arm)
        ppl.plot(rounds, [row["ppl_report_ratio"] for row in rows], marker="o", label=arm)
    task.set(xlabel="round", ylabel="task accuracy (report problems)", title="What self-training is for")
    ppl.set(xlabel="round", ylabel="held-out ppl / round 0 (report documents)", title="What it costs")
    ppl.axhline(GOAL_PPL, color="grey", linestyle=":", linewidth=1)
    for ax in (task, ppl):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    task.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="?", default="runs/self_improve_cpu", type=Path)
    parser.add_argument("--out", default=Path(__file__).parent / "results" / "self_improve", type=Path)
    args = parser.parse_args()
    if not args.runs.is_dir():
        parser.error(f"{args.runs} is not a folder: run `collapse-guard run recipes/self_improve_cpu.yaml` "
                     "first.")
    summary = summarise(args.runs)
    if not summary["table"]:
        parser.error(f"{args.runs} holds no finished round of any arm ({', '.join(ARMS)}).")
    args.out.mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/self_improve.py {args.runs}"
    atomic_write_json(args.out / "comparison.json", {"command": command, **summary})
    atomic_write_text(args.out / "comparison.md", markdown(summary, command))
    plot(summary, args.out / "task_and_ppl.png")
    print(f"wrote {args.out}/comparison.json, comparison.md, task_and_ppl.png")


if __name__ == "__main__":
    main()
