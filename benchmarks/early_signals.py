"""What the early-warning signals of held-out perplexity cost: the evaluator with and without them.

`HeldoutPerplexity(..., signals=True)` (what the guard's `Probe` uses) computes predictive entropy, top-1
mass, tail NLL, the worst-decile document NLL and the share of tokens below probability 1e-4 from the logits
chunks the cross-entropy already builds (the exp of each chunk runs through a small cache-sized scratch
block, plus one multiply-add pass for the entropy and a few per-token sums). This measures that cost on the
same model, the same held-out set and the same evaluator settings, in one process, side by side:

- `tiny`: the test suite's 2-layer Llama (hidden 32, vocabulary 512) on 64 human-like documents;
- `smollm2`: SmolLM2-135M-Instruct (fp32; `collapse_guard.resources.smollm2_dir()`, offline) on every k-th
  of gensim's Lee news articles (`--docs`, 12 by default), at the guard's default context (512 tokens).

Each model is warmed up once per arm, then `--runs` rounds each time both arms, alternating which goes first,
so a change in machine load hits both alike. Reported: the median seconds of each arm, the ratio of the
medians, the median of the per-round ratios (the goal: <= 1.10) and the largest share of the CPU other
processes took during a pass. On a busy machine wall-clock seconds are noisy; the process's own CPU time
(`time.process_time`, one torch thread by default) is measured too and its per-round ratio is the steadier
figure. The goal holds when both median ratios are <= 1.10. The perplexity of the two arms must be
identical to the bit (the signals ride on the same pass).

Usage:

```bash
python benchmarks/early_signals.py                                  # tiny + smollm2, 5 rounds, 1 thread
python benchmarks/early_signals.py --models tiny --runs 3 --out /tmp/es.json
```
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from perplexity import Contention  # noqa: E402  (the throughput benchmark's CPU-contention meter)

RESULTS = Path(__file__).parent / "results" / "early_signals.json"
MODELS = ("tiny", "smollm2")
GOAL_RATIO = 1.10


def _setup(name: str, docs: int) -> tuple[object, object, list[str], int, str]:
    """(model, tokenizer, texts, context_length, description)."""
    if name == "tiny":
        from collapse_guard.testing import human_like_sentences, tiny_causal_lm, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        texts = [" ".join(human_like_sentences(4 + i % 8, seed=i)) for i in range(64)]
        return (tiny_causal_lm(tokenizer).eval(), tokenizer, texts, 64,
                "tiny Llama (2 layers, hidden 32, vocabulary 512), 64 human-like documents, context 64")
    from collapse_guard.loop import load_model, load_tokenizer
    from collapse_guard.resources import human_texts, smollm2_dir

    directory = smollm2_dir()
    pool = human_texts("lee_background")
    texts = pool[:: max(1, len(pool) // docs)][:docs]
    return (load_model(directory), load_tokenizer(directory), texts, 512,
            f"SmolLM2-135M-Instruct (fp32), {len(texts)} Lee news articles (every k-th), context 512")


def measure(name: str, runs: int, docs: int) -> dict:
    import torch

    from collapse_guard.metrics import HeldoutPerplexity

    model, tokenizer, texts, context, description = _setup(name, docs)
    device = next(model.parameters()).device
    arms = {arm: HeldoutPerplexity(texts, tokenizer, context_length=context, signals=arm == "with_signals")
            for arm in ("without_signals", "with_signals")}
    results = {arm: evaluator.compute(model) for arm, evaluator in arms.items()}  # warm-up (one-time checks)
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu_seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    other_cpu: list[float] = []
    for round_index in range(runs):
        order = list(arms) if round_index % 2 == 0 else list(arms)[::-1]
        for arm in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            cpu_start = time.process_time()
            with Contention() as run:
                results[arm] = arms[arm].compute(model)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            cpu_seconds[arm].append(time.process_time() - cpu_start)
            seconds[arm].append(run.seconds)
            other_cpu.append(run.other_cpu_share)
    plain, rich = results["without_signals"], results["with_signals"]
    if plain.nll_sum != rich.nll_sum or plain.document_nll != rich.document_nll:
        raise AssertionError(f"{name}: the signals changed the perplexity ({plain.perplexity!r} vs "
                             f"{rich.perplexity!r}); they must ride on the same pass.")
    def round_ratios(values: dict[str, list[float]]) -> list[float]:
        return [b / a for a, b in zip(values["without_signals"], values["with_signals"], strict=True)]

    ratios, cpu_ratios = round_ratios(seconds), round_ratios(cpu_seconds)
    medians = {arm: statistics.median(s) for arm, s in seconds.items()}
    return {
        "setup": description,
        "device": str(device),
        "scored_tokens": plain.n_tokens,
        "perplexity": plain.perplexity,
        "signals": rich.signals,
        "seconds": {arm: [round(s, 4) for s in values] for arm, values in seconds.items()},
        "median_seconds": {arm: round(s, 4) for arm, s in medians.items()},
        "ratio_of_medians": round(medians["with_signals"] / medians["without_signals"], 4),
        "median_of_round_ratios": round(statistics.median(ratios), 4),
        "round_ratios": [round(r, 4) for r in ratios],
        "cpu_seconds": {arm: [round(s, 4) for s in values] for arm, values in cpu_seconds.items()},
        "median_cpu_seconds": {arm: round(statistics.median(s), 4) for arm, s in cpu_seconds.items()},
        "median_of_round_cpu_ratios": round(statistics.median(cpu_ratios), 4),
        "max_other_cpu_share": round(max(other_cpu), 3),
        "goal_met": statistics.median(cpu_ratios) <= GOAL_RATIO and statistics.median(ratios) <= GOAL_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--runs", type=int, default=5, help="interleaved rounds (each times both arms)")
    parser.add_argument("--docs", type=int, default=12, help="Lee articles for smollm2")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a shared machine: 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON written here")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        parser.error(f"--models must name some of {', '.join(MODELS)}, got {args.models!r}")
    if args.runs < 1 or args.docs < 1 or args.threads < 1:
        parser.error(f"--runs, --docs and --threads must be >= 1, got {args.runs}, {args.docs}, "
                     f"{args.threads}")

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = {"config": {"runs": args.runs, "torch_threads": args.threads, "torch": torch.__version__,
                      "python": platform.python_version(), "goal": f"median round ratio <= {GOAL_RATIO}",
                      "notes": "with_signals / without_signals seconds of HeldoutPerplexity.compute, same "
                               "evaluator settings and model, interleaved rounds alternating the first arm"},
           "models": {}}
    for name in models:
        out["models"][name] = result = measure(name, args.runs, args.docs)
        seconds = result["median_seconds"]
        print(f"{name}: without {seconds['without_signals']:.3f}s, with {seconds['with_signals']:.3f}s, "
              f"ratio {result['median_of_round_ratios']:.3f}, CPU-time ratio "
              f"{result['median_of_round_cpu_ratios']:.3f} (medians of {args.runs} rounds; others took <= "
              f"{result['max_other_cpu_share']:.0%} of the CPU)", flush=True)
    out["config"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, allow_nan=True, default=lambda v: None if
                                   isinstance(v, float) and math.isnan(v) else str(v)) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["goal_met"] for r in out["models"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
