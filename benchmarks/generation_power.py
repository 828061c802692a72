"""Fewer generated tokens per prompt: do the verdicts keep their power? Re-judged on saved runs.

    python benchmarks/generation_power.py runs/early_warning_cpu runs/floor_equal_tokens_cpu \
        runs/self_improve_cpu

The guard's generation (the fixed prompts' sampled continuations) is most of a measurement's cost
(benchmarks/results/measurement_cost.json), and it grows with `max_new_tokens`. Sampling draws one token per
step from the model's distribution given the tokens before it, with one draw per step from a seeded stream,
so the first k tokens of a continuation are what a run with `max_new_tokens=k` would have generated. This
script cuts every saved generation to its first k tokens (the SmolLM2 tokenizer; decoded back to text) and
replays each run's verdicts with the run's own detector settings, for several k, against the full length:

- agreement: measurements whose verdict (level and firing rules) equals the full-length one;
- on runs without human text (replace, no_real, no_verifier): the first measurement that warned and the
  first that alarmed (lead lost or gained, in measurements);
- on the other arms: non-ok verdicts (more means more false alarms, fewer means less sensitivity).

Writes benchmarks/results/generation_power.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from collapse_guard.config import config_from_dict, recorded_config  # noqa: E402
from collapse_guard.detector import CollapseDetector  # noqa: E402
from collapse_guard.history import History, strip_verdict  # noqa: E402
from collapse_guard.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402

COLLAPSING = ("replace", "no_real", "no_verifier")


def firing(verdict) -> tuple[str, tuple[str, ...]]:
    return verdict.level, tuple(sorted(k for k, e in verdict.evidence.items() if e.get("level") != "ok"))


def replay(entries: list[dict], detector: CollapseDetector) -> list[tuple[str, tuple[str, ...]]]:
    history, out = History(), []
    for entry in entries:
        if "heldout_doc_nll" in entry:
            out.append(firing(detector.check([*history.context(entry["round"]), entry])))
        history.add(entry)
    return out


def cut(entries: list[dict], tokenizer, k: int | None, cache: dict) -> list[dict]:
    if k is None:
        return entries
    out = []
    for entry in entries:
        generations = entry.get("generations")
        if generations:
            texts = []
            for text in generations:
                key = (text, k)
                if key not in cache:
                    ids = tokenizer.encode(text, add_special_tokens=False)
                    cache[key] = tokenizer.decode(ids[:k]) if len(ids) > k else text
                texts.append(cache[key])
            entry = {**entry, "generations": texts}
        out.append(entry)
    return out


def first(levels: list[str], at_least: str) -> int | None:
    order = ("ok", "warn", "alarm")
    return next((i for i, level in enumerate(levels) if order.index(level) >= order.index(at_least)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path)
    parser.add_argument("--tokens", default="16,24,32", help="the cut lengths to compare with the full one")
    parser.add_argument("--out", default=str(HERE / "results" / "generation_power"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from collapse_guard.resources import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    lengths = [int(k) for k in args.tokens.split(",")]
    cache: dict = {}
    runs = []
    for root in args.roots:
        for path in sorted(root.rglob("collapse_history.json")):
            run = path.parent
            if not (run / "run_state.json").exists():
                continue
            config = config_from_dict(recorded_config(read_json(run / "run_state.json")["config"]))
            detector = CollapseDetector(config.detector)
            entries = [strip_verdict(e) for e in read_json(path)["entries"]]
            full = replay(entries, detector)
            arm = run.relative_to(root).parts[0]
            result = {"run": str(run), "group": f"{root.name}/{arm}", "collapsing": arm in COLLAPSING,
                      "max_new_tokens": config.evaluation.max_new_tokens,
                      "prompts": config.evaluation.n_prompts, "measurements": len(full), "by_length": {}}
            for k in lengths:
                judged = replay(cut(entries, tokenizer, k, cache), detector)
                result["by_length"][k] = {
                    "agree": sum(a == b for a, b in zip(full, judged, strict=True)),
                    "non_ok": sum(level != "ok" for level, _ in judged),
                    "first_warn": first([x[0] for x in judged], "warn"),
                    "first_alarm": first([x[0] for x in judged], "alarm")}
            result["full"] = {"non_ok": sum(level != "ok" for level, _ in full),
                              "first_warn": first([x[0] for x in full], "warn"),
                              "first_alarm": first([x[0] for x in full], "alarm")}
            runs.append(result)
            print(run, result["full"], {k: v["agree"] for k, v in result["by_length"].items()}, flush=True)
    if not runs:
        raise SystemExit(f"no run folders (collapse_history.json + run_state.json) under {args.roots}")
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["group"], []).append(r)
    lines = ["# Fewer generated tokens: the verdicts re-judged on saved runs", "",
             "`python benchmarks/generation_power.py " + " ".join(str(r) for r in args.roots) + "`", "",
             "Each saved generation cut to its first k tokens (what `max_new_tokens=k` would have sampled); "
             "verdicts replayed with each run's detector. Agreement: same level and firing rules as at full "
             "length. First warn / alarm: the measurement index, per run (`-`: never).", "",
             "| runs | n | full length | measurements | length | agree | non-ok (full) | first warn (full) | "
             "first alarm (full) |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    summary = {}
    for name, items in groups.items():
        for k in lengths:
            agree = sum(r["by_length"][k]["agree"] for r in items)
            total = sum(r["measurements"] for r in items)
            non_ok = sum(r["by_length"][k]["non_ok"] for r in items)
            non_ok_full = sum(r["full"]["non_ok"] for r in items)

            def shown(value: int | None) -> str:
                return "-" if value is None else str(value)

            def onsets(key: str, items: list[dict] = items, k: int = k) -> str:
                return ", ".join(f"{shown(r['by_length'][k][key])} ({shown(r['full'][key])})" for r in items)

            warns, alarms = onsets("first_warn"), onsets("first_alarm")
            summary.setdefault(name, {})[k] = {"agree": agree, "measurements": total, "non_ok": non_ok,
                                               "non_ok_full": non_ok_full}
            lines.append(f"| {name} | {len(items)} | {items[0]['max_new_tokens']} | {total} | {k} | "
                         f"{agree} ({agree / total:.0%}) | {non_ok} ({non_ok_full}) | {warns} | {alarms} |")
    atomic_write_json(Path(args.out).with_suffix(".json"), {"summary": summary, "runs": runs})
    atomic_write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
