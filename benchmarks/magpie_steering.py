"""Does a system-prompt list steer Magpie? 200 pairs from SmolLM2-135M-Instruct per list, topics counted.

Two steering lists (A: the `math` + `code` task prompts; B: the `translation` + `creative` prompts) and,
with --with-general, the unsteered baseline. Each generated instruction is put in a topic by keyword
counts (`topic_of`); when benchmarks/results/magpie_steering/judged_*.jsonl exist (written by
benchmarks/judge.py), the judge's task-category tags are summarised too. Token budgets are reduced so
the run fits in minutes on 2 CPU cores. Writes benchmarks/results/magpie_steering.json and the pairs
(JSONL) under benchmarks/results/magpie_steering/.

Run:

    nice -n 10 python benchmarks/magpie_steering.py --n 200
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/results"

TOPIC_KEYWORDS = {
    "math": r"\b(?:calculat\w*|solve|solving|equation|sum|integer|probabilit\w*|area|percent\w*|math\w*|"
            r"algebra|"
            r"geometr\w*|how many|total|average|fraction|multipl\w*|divid\w*|number|numbers|triangle|"
            r"perimeter|formula|\d+\s*[-+*/x×^=]\s*\d+)\b",
    "code": r"(?:\b(?:python|javascript|code|coding|function|program\w*|script|sql|java|algorithm|debug\w*|"
            r"class|"
            r"variable|array|loop|compile\w*|software|api|html|css|database|query|string|list)\b|c\+\+)",
    "translation": r"\b(?:translat\w*|french|spanish|german|chinese|english|italian|japanese|language\w*|"
                   r"sentence|phrase|into (?:french|spanish|german|english))\b",
    "creative": r"\b(?:story|stories|poem\w*|haiku|song|lyrics|slogan|creative|fiction|character\w*|"
                r"imagin\w*|"
                r"narrative|novel|tale|verse)\b",
}


def topic_of(text: str) -> str:
    counts = {t: len(re.findall(p, text.lower())) for t, p in TOPIC_KEYWORDS.items()}
    best = max(counts, key=lambda t: counts[t])
    return best if counts[best] else "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--instruction-tokens", type=int, default=40)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--with-general", action="store_true", help="also the unsteered baseline")
    parser.add_argument("--generate", default=None,
                        help="comma-separated lists to (re)generate; the others are only recounted from disk")
    parser.add_argument("--summarise-only", action="store_true",
                        help="recount saved pairs (e.g. after judging)")
    args = parser.parse_args()

    from collapse_guard.generation import TASKS, MagpieConfig, MagpieGenerator

    lists = {
        "A_math_code": list(TASKS["math"].system_prompts + TASKS["code"].system_prompts),
        "B_translation_creative": list(TASKS["translation"].system_prompts
                                       + TASKS["creative"].system_prompts),
    }
    if args.with_general:
        lists["general_unsteered"] = None
    pairs_dir = OUT / "magpie_steering"
    pairs_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": vars(args), "topic_keywords": TOPIC_KEYWORDS, "lists": {}}
    model = tok = None
    for name, prompts in lists.items():
        path = pairs_dir / f"{name}.jsonl"
        regenerate = not args.summarise_only and (args.generate is None or name in args.generate.split(","))
        if regenerate or not path.exists():
            if model is None:
                import torch

                from collapse_guard.resources import load_smollm2

                torch.set_num_threads(2)
                model, tok = load_smollm2()
            # clean=False keeps all n pairs (reasons are still counted): the topic is in the instruction,
            # and with these short budgets many responses are cut at the token limit
            config = MagpieConfig(system_prompts=prompts, instruction_max_new_tokens=args.instruction_tokens,
                                  response_max_new_tokens=args.response_tokens, batch_size=args.batch_size,
                                  clean=False, show_progress=False, instruction_temperature=1.0)
            gen = MagpieGenerator(model, tok, config)
            start = time.perf_counter()
            ds = gen.generate(args.n, seed=0)
            rows = [{"instruction": r["messages"][0]["content"], "response": r["messages"][1]["content"],
                     "system_prompt_index": json.loads(r["provenance"]["meta"])["system_prompt_index"]}
                    for r in ds]
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            (pairs_dir / f"{name}.stats.json").write_text(json.dumps(
                {**gen.stats, "wall_seconds": round(time.perf_counter() - start, 1)}, indent=1))
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        stats = json.loads((pairs_dir / f"{name}.stats.json").read_text())
        topics = Counter(topic_of(r["instruction"]) for r in rows)
        entry = {
            "system_prompts": prompts, "n": len(rows),
            "keyword_topics": {t: topics.get(t, 0) for t in [*TOPIC_KEYWORDS, "other"]},
            "keyword_topic_share": {t: round(topics.get(t, 0) / len(rows), 3)
                                    for t in [*TOPIC_KEYWORDS, "other"]},
            "would_be_dropped_by_cleaning": stats["dropped"], "seconds": stats["wall_seconds"],
            "tokens_per_second": stats["tokens_per_second"], "examples": [r["instruction"] for r in rows[:8]],
        }
        if prompts:  # the topics of the pairs each system prompt produced
            entry["keyword_topics_by_system_prompt"] = {
                str(j): dict(Counter(topic_of(r["instruction"]) for r in rows
                                     if r["system_prompt_index"] == j).most_common())
                for j in range(len(prompts))
            }
        judged = pairs_dir / f"judged_{name}.jsonl"
        if judged.exists():
            tags = [json.loads(line) for line in judged.read_text().splitlines()]
            entry["judge_task_category"] = dict(Counter(t["judge_category"] for t in tags).most_common())
        results["lists"][name] = entry
        print(name, entry["keyword_topics"], entry.get("judge_task_category", ""), f"{entry['seconds']}s")
    (OUT / "magpie_steering.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
