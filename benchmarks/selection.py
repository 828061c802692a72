"""Selection throughput: reward-model scoring (batched vs one at a time) and MinHash dedup at 100k docs.

1. `RewardModelSelector.score` against a naive loop that formats, tokenizes and scores one sample
   per forward pass, on the same model and data, measured side by side (goal: >= 4x on CPU). The
   reward model is SmolLM2-135M-Instruct with a freshly initialized 1-logit head
   (`AutoModelForSequenceClassification.from_pretrained(smollm2_dir(), num_labels=1)`): its scores
   mean nothing, but the compute is that of a real 135M reward model. Both paths must agree.
2. `DedupSelector` (exact hash + MinHash-LSH) on 100k short documents (goal: < 60 s on 2 cores).

Medians over several runs; JSON to benchmarks/results/selection.json.

Run: python benchmarks/selection.py [--rm-samples 32] [--runs 3] [--dedup-docs 100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from datasets import Dataset

from collapse_guard.io import atomic_write_json
from collapse_guard.resources import human_texts, smollm2_dir
from collapse_guard.selection import DedupSelector, RewardModelSelector

RESULTS = Path(__file__).parent / "results" / "selection.json"


def chat_samples(n: int, seed: int, min_words: int = 5, max_words: int = 40) -> Dataset:
    """Questions with answers of min..max words cut from real news text (varied lengths, as generations
    are)."""
    rng = random.Random(seed)
    docs = human_texts("lee_background")
    rows = []
    for i in range(n):
        words = rng.choice(docs).split()
        start = rng.randrange(max(1, len(words) - max_words))
        answer = " ".join(words[start : start + rng.randint(min_words, max_words)])
        rows.append([{"role": "user", "content": f"Question {i}: tell me about the news."},
                     {"role": "assistant", "content": answer}])
    return Dataset.from_dict({"messages": rows})


def naive_scores(selector: RewardModelSelector, data: Dataset) -> list[float]:
    """The loop people write first: one sample, one tokenizer call, one forward pass."""
    model, tok = selector.model, selector.tokenizer
    out = []
    with torch.no_grad():
        for row in data:
            text = tok.apply_chat_template(row["messages"], tokenize=False)
            inputs = tok(text, return_tensors="pt", add_special_tokens=False, truncation=True,
                         max_length=1024)
            out.append(model(**inputs).logits[0, 0].item())
    return out


def bench_reward_model(n: int, runs: int, forward_batch_size: int, max_words: int) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(smollm2_dir(), num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    selector = RewardModelSelector(model, tok, top_fraction=0.5, forward_batch_size=forward_batch_size)
    data = chat_samples(n, seed=0, max_words=max_words)
    batch = data[:]
    selector.score({"messages": batch["messages"][:4]})  # warm-up (allocator, kernels)
    naive_s, batched_s = [], []
    for _ in range(runs):  # interleaved, so both see the same machine load
        t0 = time.perf_counter()
        reference = naive_scores(selector, data)
        naive_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scores = selector.score(batch)
        batched_s.append(time.perf_counter() - t0)
    max_diff = max(abs(a - b) for a, b in zip(reference, scores, strict=True))
    tokens = sum(len(ids) for ids in selector.encode(selector.format(batch)))
    naive, batched = statistics.median(naive_s), statistics.median(batched_s)
    return {
        "model": "SmolLM2-135M-Instruct + random 1-logit head (throughput only)",
        "samples": n,
        "mean_tokens_per_sample": tokens / n,
        "answer_words": [5, max_words],
        "forward_batch_size": forward_batch_size,
        "naive_samples_per_s": n / naive,
        "selector_samples_per_s": n / batched,
        "speedup": naive / batched,
        "goal_speedup": 4.0,
        "max_abs_score_diff": max_diff,
        "naive_s_runs": naive_s,
        "selector_s_runs": batched_s,
    }


def short_documents(n: int, seed: int, near_duplicate_share: float = 0.1) -> list[str]:
    """Short documents of 8-30 words from the Lee corpus vocabulary; a share are edited copies of others."""
    rng = random.Random(seed)
    vocab = sorted({w for t in human_texts("lee_background") for w in t.split()})
    docs: list[str] = []
    for _ in range(n):
        if docs and rng.random() < near_duplicate_share:
            words = rng.choice(docs).split()
            words[rng.randrange(len(words))] = rng.choice(vocab)  # one word changed
            docs.append(" ".join(words))
        else:
            docs.append(" ".join(rng.choices(vocab, k=rng.randint(8, 30))))
    return docs


def bench_dedup(n: int, runs: int) -> dict:
    data = Dataset.from_dict({"text": short_documents(n, seed=0)})
    times, report = [], {}
    for _ in range(runs):
        selector = DedupSelector(threshold=0.8)
        t0 = time.perf_counter()
        selector(data)
        times.append(time.perf_counter() - t0)
        report = selector.report
    return {
        "documents": n,
        "threshold": 0.8,
        "num_perm": 128,
        "shingle_size": 3,
        "seconds": statistics.median(times),
        "docs_per_s": n / statistics.median(times),
        "goal_seconds": 60.0,
        "kept": report["kept"],
        "reasons": report["reasons"],
        "seconds_runs": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rm-samples", type=int, default=32)
    parser.add_argument("--forward-batch-size", type=int, default=16)
    parser.add_argument("--rm-max-words", type=int, default=40, help="answers have 5..this many words")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dedup-docs", type=int, default=100_000)
    parser.add_argument("--dedup-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier on a busy "
                             "machine")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "load_avg_1m_start": os.getloadavg()[0]},
        "reward_model": bench_reward_model(args.rm_samples, args.runs, args.forward_batch_size,
                                           args.rm_max_words),
        "dedup": bench_dedup(args.dedup_docs, args.dedup_runs),
    }
    results["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    atomic_write_json(args.output, results)
    rm, dd = results["reward_model"], results["dedup"]
    print(f"reward model: {rm['selector_samples_per_s']:.1f} samples/s batched vs "
          f"{rm['naive_samples_per_s']:.1f} naive = {rm['speedup']:.1f}x (goal 4x), "
          f"max score diff {rm['max_abs_score_diff']:.2e}")
    print(f"dedup: {dd['documents']} docs in {dd['seconds']:.1f} s (goal < 60 s), kept {dd['kept']}, "
          f"{dd['reasons']}")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
