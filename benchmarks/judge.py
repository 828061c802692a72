"""How well does a small LLM judge agree with labels? SmolLM2-135M-Instruct on the labelled pairs in tests/.

Three judging variants (`probabilities`: expected rating from the rating tokens' probabilities;
`probabilities_calibrated`: the same divided by the judge's answer to a content-free question;
`generate`: free answer, parsed) rate quality, difficulty and task category of the 60 labelled pairs
(20 instructions x a good, a wrong and an off-topic / garbled response, labelled by hand). With
--magpie, the calibrated probabilities judge also tags the task category of the Magpie pairs written
by benchmarks/magpie_steering.py. Writes benchmarks/results/judge.json.

Run:

    nice -n 10 python benchmarks/judge.py --magpie
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mean_by_label(scores: list[float], rows: list[dict]) -> dict[int, float]:
    """The judge's mean quality for the rows of each labelled quality."""
    out = {}
    for label in sorted({r["quality"] for r in rows}):
        values = [s for s, r in zip(scores, rows, strict=True) if r["quality"] == label and s == s]
        out[label] = round(sum(values) / len(values), 3) if values else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--magpie", action="store_true", help="also tag the saved Magpie pairs' categories")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default="probabilities,probabilities_calibrated,generate",
                        help="comma-separated variants to run; other variants in the JSON are kept")
    args = parser.parse_args()
    import torch

    from collapse_guard.resources import load_smollm2
    from collapse_guard.selection import LLMJudge
    from collapse_guard.selection.judge import judge_agreement

    torch.set_num_threads(2)
    model, tok = load_smollm2()
    rows = [json.loads(line) for line in (ROOT / "tests/data/judge_labelled.jsonl").read_text().splitlines()]
    instructions, responses = [r["instruction"] for r in rows], [r["response"] for r in rows]
    out_path = ROOT / "benchmarks/results/judge.json"
    results: dict = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.update({"model": "SmolLM2-135M-Instruct", "n": len(rows),
                    "labels": {k: dict(Counter(r[k] for r in rows))
                               for k in ("quality", "difficulty", "category")},
                    "chance": {"quality_pairwise_accuracy": 0.5, "category_accuracy": 1 / 8,
                               "spearman": 0.0}})
    for variant in filter(None, args.variants.split(",")):
        method = "generate" if variant == "generate" else "probabilities"
        judge = LLMJudge(model, tok, aspects=("quality", "difficulty", "category"), method=method,
                         batch_size=args.batch_size, calibrate=variant.endswith("calibrated"))
        start = time.perf_counter()
        tags = judge.rate(instructions, responses)
        seconds = time.perf_counter() - start
        results[variant] = {**judge_agreement(rows, tags), "seconds": round(seconds, 1),
                           "parse_failures": dict(judge.stats["parse_failures"]),
                           "mean_quality_by_label": mean_by_label(tags["judge_quality"], rows)}
        print(variant, json.dumps(results[variant]))
    if args.magpie:
        # the calibrated judge: without calibration SmolLM2 answers "A" (math) to most category questions
        judge = LLMJudge(model, tok, aspects=("category",), batch_size=args.batch_size, calibrate=True)
        for path in sorted((ROOT / "benchmarks/results/magpie_steering").glob("*.jsonl")):
            out = path.with_name(f"judged_{path.name}")
            if path.name.startswith("judged_") or out.exists():  # delete a judged_ file to tag again
                continue
            pairs = [json.loads(line) for line in path.read_text().splitlines()]
            tags = judge.rate([p["instruction"] for p in pairs], [p["response"] for p in pairs])
            out.write_text("".join(json.dumps({"judge_category": c}) + "\n" for c in tags["judge_category"]))
            counts = dict(Counter(tags["judge_category"]).most_common())
            results.setdefault("magpie_categories", {})[path.stem] = counts
            print(path.stem, results["magpie_categories"][path.stem])
    out_path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
