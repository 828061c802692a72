"""Throughput of batched generation vs one prompt at a time (and vLLM vs transformers on a GPU).

Same model (SmolLM2-135M-Instruct), same chat prompts, same greedy decoding with a fixed number of
new tokens (EOS suppressed, so both sides generate exactly the same token count); runs are
interleaved and the median of `--repeats` is reported. Goal: batched >= 4x one-at-a-time on CPU.
The vLLM comparison runs only when vLLM is installed and a CUDA GPU is present (a note otherwise).

Usage:

```bash
python benchmarks/generation.py                       # ~2-3 minutes on 2 CPU cores
python benchmarks/generation.py --prompts 32 --max-new-tokens 64 --batch-size 32
```
Writes benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

from collapse_guard.generation.backends import Decoding, TransformersBackend, generate_texts
from collapse_guard.io import atomic_write_json
from collapse_guard.resources import load_smollm2, smollm2_dir

RESULTS = Path(__file__).resolve().parent / "results" / "generation.json"

INSTRUCTIONS = [
    "Write a short poem about the sea.",
    "Explain why the sky is blue.",
    "Give three tips for learning a new language.",
    "What is the capital of France, and what is it known for?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do plants make their food?",
    "List four healthy breakfast ideas.",
    "What are the main causes of climate change?",
    "Describe a cat to someone who has never seen one.",
    "How does a bicycle stay upright?",
    "Write a haiku about autumn leaves.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery and explain it.",
    "Why do we have seasons on Earth?",
    "Explain what a computer program is to a child.",
    "What should I pack for a weekend hiking trip?",
]


def chat_prompts(tokenizer, n: int) -> list[str]:
    items = [INSTRUCTIONS[i % len(INSTRUCTIONS)] + ("" if i < len(INSTRUCTIONS) else f" (variant {i})")
             for i in range(n)]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                      add_generation_prompt=True)
        for q in items
    ]


def timed(backend, prompts: list[str], decoding: Decoding, batch_size: int) -> tuple[float, list]:
    start = time.perf_counter()
    outs = generate_texts(backend, prompts, decoding, seed=0, batch_size=batch_size)
    return time.perf_counter() - start, outs


def bench_cpu_batching(args) -> dict:
    model, tokenizer = load_smollm2()
    model.eval()
    prompts = chat_prompts(tokenizer, args.prompts)
    # min_new_tokens = max_new_tokens: both sides produce exactly prompts x max_new_tokens tokens.
    decoding = Decoding(max_new_tokens=args.max_new_tokens, temperature=0.0,
                        min_new_tokens=args.max_new_tokens)
    backend = TransformersBackend(model, tokenizer, batch_size=args.batch_size)
    timed(backend, prompts[:2], Decoding(max_new_tokens=4, temperature=0.0), 2)  # warm-up
    runs: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, size in (("one_at_a_time", 1), ("batched", args.batch_size)):
            seconds, outs = timed(backend, prompts, decoding, size)
            runs[name].append(seconds)
            outputs[name] = [o.token_ids for o in outs]
    n_tokens = args.prompts * args.max_new_tokens
    tps = {name: n_tokens / statistics.median(times) for name, times in runs.items()}
    same = sum(a == b for a, b in zip(outputs["batched"], outputs["one_at_a_time"], strict=True))
    return {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "decoding": "greedy, fixed length",
        "repeats": args.repeats,
        "seconds": runs,
        "tokens_per_second": {k: round(v, 1) for k, v in tps.items()},
        "speedup": round(tps["batched"] / tps["one_at_a_time"], 2),
        "goal_speedup": 4.0,
        "meets_goal": tps["batched"] / tps["one_at_a_time"] >= 4.0,
        "identical_greedy_outputs": f"{same}/{args.prompts}",
    }


def bench_vllm(args) -> dict:
    missing = [why for ok, why in [(importlib.util.find_spec("vllm") is not None, "vLLM is not installed"),
                                   (torch.cuda.is_available(), "no CUDA GPU")] if not ok]
    if missing:
        return {"skipped": f"{' and '.join(missing)}: run on a GPU machine with "
                           "`pip install collapse-guard[vllm]`"}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from collapse_guard.generation.backends import VLLMBackend

    directory = str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = chat_prompts(tokenizer, args.gpu_prompts)
    decoding = Decoding(max_new_tokens=args.max_new_tokens, temperature=0.0,
                        min_new_tokens=args.max_new_tokens)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).cuda().eval()
    hf = TransformersBackend(model, tokenizer, batch_size=args.gpu_batch_size)
    vllm = VLLMBackend(directory, tokenizer, dtype="bfloat16", gpu_memory_utilization=0.5)
    runs: dict[str, list[float]] = {"transformers": [], "vllm": []}
    for _ in range(args.repeats):
        for name, backend in (("transformers", hf), ("vllm", vllm)):
            torch.cuda.synchronize()
            runs[name].append(timed(backend, prompts, decoding, backend.default_batch_size)[0])
    n_tokens = args.gpu_prompts * args.max_new_tokens
    tps = {name: n_tokens / statistics.median(times) for name, times in runs.items()}
    return {
        "device": torch.cuda.get_device_name(0),
        "prompts": args.gpu_prompts,
        "seconds": runs,
        "tokens_per_second": {k: round(v, 1) for k, v in tps.items()},
        "speedup_vllm_over_transformers": round(tps["vllm"] / tps["transformers"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-prompts", type=int, default=256)
    parser.add_argument("--gpu-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a busy shared "
                             "machine).")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"cpu_batching": bench_cpu_batching(args), "vllm_vs_transformers": bench_vllm(args)}
    result["load_average"] = os.getloadavg()
    result["cpu_count"] = os.cpu_count()
    atomic_write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
