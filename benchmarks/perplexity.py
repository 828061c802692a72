"""Held-out perplexity throughput: our evaluator vs the `evaluate` library's perplexity metric vs a naive loop.

Side by side in one run, on the same variable-length human documents (the Lee news corpus shipped with
gensim) and the same model (SmolLM2-135M-Instruct, fp32, CPU):

- ours: `collapse_guard.metrics.HeldoutPerplexity` (blocks of 1024 tokens, so every document is whole,
  length-bucketed batches of <= 16384 padded tokens, chunked cross-entropy);
- evaluate: the perplexity metric script of huggingface/evaluate (metrics/perplexity/perplexity.py,
  commit a7dd338386a4fae9a1767e05eb9ef9479513d9e8), run from a local copy with `evaluate.load(<dir>)`
  and `model_id=<local SmolLM2 directory>`, its defaults (batch_size=16, add_start_token=True). The
  script is not vendored here: pass `--evaluate-script PATH`, or let the benchmark download it once into
  ~/.cache/collapse_guard/third_party/. It runs unmodified under transformers 5 (SmolLM2's tokenizer has
  a pad token, so the `special_tokens_map_extended` branch that transformers 5 removed is never reached);
- naive: batches of 8 documents in input order, padded to the longest, full [B, L, V] logits.

Every timed pass runs in a fresh subprocess (interleaved across methods, so a change in machine load
hits all three alike); peak memory is that process's peak resident set (`/proc/self/status` VmHWM), also
reported above the process's resident set after imports. Throughput counts the same document tokens for
every method (BOS tokens evaluate adds and padding are not counted). FLOP/s = 2 x parameters x tokens / s
with all 134.5M parameters (the tied embedding counted once: it is the output head's matmul; attention
score FLOPs are not counted), compared with the best of several large fp32 `torch.matmul`s measured here
with the same thread count.

Usage:

```bash
python benchmarks/perplexity.py                 # 40 documents, 3 runs, torch threads = CPU count
python benchmarks/perplexity.py --docs 16 --runs 1 --threads 2
```
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

EVALUATE_COMMIT = "a7dd338386a4fae9a1767e05eb9ef9479513d9e8"
EVALUATE_URL = f"https://raw.githubusercontent.com/huggingface/evaluate/{EVALUATE_COMMIT}/metrics/perplexity/perplexity.py"
METHODS = ("ours", "evaluate", "naive")
RESULTS = Path(__file__).parent / "results" / "perplexity.json"


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _ours(texts: list[str], model_dir: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from collapse_guard.metrics import HeldoutPerplexity

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    start = time.perf_counter()
    result = HeldoutPerplexity(texts, tokenizer, context_length=1024, max_batch_tokens=16384).compute(model)
    return {"seconds": time.perf_counter() - start, "perplexity": result.perplexity, "model": model}


def _naive(texts: list[str], model_dir: str, batch_size: int = 8) -> dict:
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    start = time.perf_counter()
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            batch = tokenizer(texts[s : s + batch_size], padding=True, return_tensors="pt")
            logits = model(**batch).logits
            labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="sum")
            nll, count = nll + loss.item(), count + int((labels != -100).sum())
    return {"seconds": time.perf_counter() - start, "perplexity": math.exp(nll / count), "model": model}


def _evaluate(texts: list[str], model_dir: str, script: str) -> dict:
    import evaluate
    from transformers import AutoModelForCausalLM

    metric = evaluate.load(str(Path(script).parent))
    # The metric loads the model inside compute(); time one load on its own (file cache warm) to report
    # its throughput with and without that cost.
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    load_seconds = time.perf_counter() - start
    del model
    start = time.perf_counter()
    out = metric.compute(predictions=texts, model_id=model_dir, device="cpu")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "load_seconds": load_seconds, "perplexity": out["mean_perplexity"], "model": None}


def worker(method: str, docs_file: str, threads: int, script: str) -> None:
    import torch

    torch.set_num_threads(threads)
    import evaluate  # noqa: F401  (import cost is part of the baseline, not of the measurement)
    import transformers  # noqa: F401

    from collapse_guard.resources import smollm2_dir

    payload = json.loads(Path(docs_file).read_text())
    baseline = _rss_mb("VmRSS")
    model_dir = str(smollm2_dir())
    if method == "ours":
        out = _ours(payload["texts"], model_dir)
    elif method == "naive":
        out = _naive(payload["texts"], model_dir)
    else:
        out = _evaluate(payload["texts"], model_dir, script)
    out.pop("model")
    out.update(peak_rss_mb=_rss_mb("VmHWM"), baseline_rss_mb=baseline)
    print("RESULT " + json.dumps(out))


def matmul_peak(threads: int, n: int = 2048, reps: int = 8) -> float:
    """Best fp32 matmul FLOP/s over `reps` repetitions (after a warm-up)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def evaluate_script(path: str | None) -> Path:
    if path:
        script = Path(path)
    else:
        script = Path.home() / ".cache" / "collapse_guard" / "third_party" / f"evaluate-{EVALUATE_COMMIT[:7]}" / "perplexity" / "perplexity.py"
        if not script.exists():
            script.parent.mkdir(parents=True, exist_ok=True)
            try:
                urllib.request.urlretrieve(EVALUATE_URL, script)
            except OSError as err:
                raise SystemExit(
                    f"could not download the evaluate perplexity metric ({err}); save {EVALUATE_URL} "
                    "as .../perplexity/perplexity.py and pass --evaluate-script PATH."
                ) from err
    if script.name != "perplexity.py" or script.parent.name != "perplexity":
        raise SystemExit(f"--evaluate-script must be a file perplexity/perplexity.py (evaluate.load needs it), got {script}.")
    return script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=40, help="human documents (spread over the corpus)")
    parser.add_argument("--runs", type=int, default=3, help="timed passes per method; the median is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads for every method")
    parser.add_argument("--evaluate-script", default=None, help="local copy of evaluate's metrics/perplexity/perplexity.py")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of ours,evaluate,naive")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--docs-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.docs_file, args.threads, args.evaluate_script)
        return
    methods = [m for m in args.methods.split(",") if m]
    script = evaluate_script(args.evaluate_script) if "evaluate" in methods else None

    from transformers import AutoTokenizer

    from collapse_guard.resources import human_texts, load_smollm2, smollm2_dir

    corpus = human_texts("lee_background")
    step = max(1, len(corpus) // args.docs)
    texts = corpus[::step][: args.docs]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    model, _ = load_smollm2()
    n_params = sum(p.numel() for p in model.parameters())
    n_embedding = model.get_input_embeddings().weight.numel()
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    del model

    peak_before = matmul_peak(args.threads)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        docs_file = Path(tmp) / "docs.json"
        docs_file.write_text(json.dumps({"texts": texts}))
        for run in range(args.runs):
            for method in methods:
                cmd = [sys.executable, __file__, "--worker", method, "--docs-file", str(docs_file),
                       "--threads", str(args.threads)]
                if script:
                    cmd += ["--evaluate-script", str(script)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    raise SystemExit(f"{method} worker failed:\n{proc.stderr[-4000:]}")
                runs[method].append(json.loads(line[len("RESULT "):]))
                print(f"run {run + 1}/{args.runs} {method}: {runs[method][-1]['seconds']:.1f}s", flush=True)
    peak = max(peak_before, matmul_peak(args.threads))

    tokens = sum(lengths)
    results = {}
    for method, items in runs.items():
        seconds = statistics.median(x["seconds"] for x in items)
        peak_rss = max(x["peak_rss_mb"] for x in items)
        above = max(x["peak_rss_mb"] - x["baseline_rss_mb"] for x in items)
        entry = {
            "seconds": [round(x["seconds"], 3) for x in items],
            "median_seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1),
            "share_of_matmul_peak": round(2 * n_params * tokens / seconds / peak, 4),
            "peak_rss_mb": round(peak_rss, 1),
            "peak_rss_above_imports_mb": round(above, 1),
            "perplexity": items[0]["perplexity"],
        }
        if method == "evaluate":
            without_load = statistics.median(x["seconds"] - x["load_seconds"] for x in items)
            entry["tokens_per_second_excluding_model_load"] = round(tokens / without_load, 1)
        results[method] = entry

    report = {
        "config": {
            "model": "SmolLM2-135M-Instruct (fp32, CPU)",
            "documents": len(texts),
            "document_tokens": tokens,
            "document_tokens_min_median_max": [min(lengths), int(statistics.median(lengths)), max(lengths)],
            "runs": args.runs,
            "torch_threads": args.threads,
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "parameters": n_params,
            "non_embedding_parameters": n_params - n_embedding,
            "model_mb": round(model_mb, 1),
            "flops_per_token": 2 * n_params,
            "matmul_peak_gflops": round(peak / 1e9, 1),
            "evaluate_script": f"huggingface/evaluate@{EVALUATE_COMMIT} metrics/perplexity/perplexity.py",
            "notes": "ours: blocks of 1024 tokens (documents whole), max_batch_tokens=16384; evaluate: its defaults "
            "(batch_size=16, BOS prepended, reports the mean of per-document perplexities); naive: batch 8, "
            "padded to the longest, full logits, token-weighted perplexity (must equal ours).",
        },
        "methods": results,
    }
    if "ours" in results:
        ours = results["ours"]
        goals = {
            "ours_over_naive_throughput": None,
            "ours_over_evaluate_throughput": None,
            "ours_share_of_matmul_peak": ours["share_of_matmul_peak"],
            "ours_peak_above_imports_below_model_plus_1gb": ours["peak_rss_above_imports_mb"] <= model_mb + 1024,
        }
        for other in ("naive", "evaluate"):
            if other in results:
                goals[f"ours_over_{other}_throughput"] = round(
                    ours["tokens_per_second"] / results[other]["tokens_per_second"], 2
                )
        if "evaluate" in results:
            goals["ours_over_evaluate_excluding_its_model_load"] = round(
                ours["tokens_per_second"] / results["evaluate"]["tokens_per_second_excluding_model_load"], 2
            )
        report["goals"] = goals
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    from collapse_guard.io import atomic_write_json

    atomic_write_json(output, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
