"""Held-out perplexity throughput: our evaluator vs `evaluate`'s perplexity metric vs a naive loop.

One command, side by side, on the same model (SmolLM2-135M-Instruct, fp32, CPU) and two corpora of real
human text, each cut from its source by a fixed rule (every k-th document), not picked to favour anyone:

- `lee40`: 40 Lee news articles (gensim's lee_background.cor), the corpus of the earlier benchmark. Its
  lengths are narrow (max / mean ~ 1.8), so padding every document to the longest, as `evaluate` does,
  wastes relatively little here;
- `wiki48`: 48 Wikipedia paragraphs (gensim's enwiki sample): most paragraphs are short and a few are long
  (max / mean ~ 3.3), the shape of real held-out sets cut at paragraph boundaries (wikitext is the same
  kind of text: Wikipedia, one paragraph per line).

Arms:

- ours: `collapse_guard.metrics.HeldoutPerplexity` (blocks of 1024 tokens, so every document is whole);
- evaluate: the perplexity metric script of huggingface/evaluate (metrics/perplexity/perplexity.py,
  commit a7dd338386a4fae9a1767e05eb9ef9479513d9e8), run from a local copy with `evaluate.load(<dir>)`
  and `model_id=<local SmolLM2 directory>`, its defaults (batch_size=16, add_start_token=True). It pads
  every document to the longest of the whole corpus and builds full [16, L, V] logits. The script is not
  vendored: pass `--evaluate-script PATH`, or let the benchmark download it once into
  ~/.cache/collapse_guard/third_party/ (from a checkout: `git show a7dd338:metrics/perplexity/perplexity.py`).
  It runs unmodified under transformers 5 (SmolLM2's tokenizer has a pad token, so the
  `special_tokens_map_extended` branch that transformers 5 removed is never reached);
- naive: batches of 8 documents in input order, padded to the batch's longest, full [B, L, V] logits,
  fp32 cross-entropy, token-weighted: what one writes by hand.

Exactness: in its first round the naive arm also computes, untimed, an independent float64 reference (one
whole document per forward, no padding, float64 cross-entropy, token-weighted); ours must equal it within
1e-4 relative. (The naive loop itself is ~1e-4 off it: fp32 cross-entropy over [B, V, L] logits on CPU.)

Every timed pass runs in a fresh subprocess; rounds interleave arms and corpora, so a change in machine
load hits all alike, and the medians over rounds are reported along with the median of the per-round
ratios. Peak memory is that process's peak resident set (`/proc/self/status` VmHWM) above its resident set
after imports, i.e. model weights plus working memory. Throughput counts the same document tokens for every
arm (the BOS evaluate adds and padding are not counted). FLOP/s = 2 x parameters x tokens / s with all
134.5M parameters (the tied embedding counted once, as the output head's matmul; attention-score FLOPs are
not counted), compared with the best fp32 `torch.matmul` measured in this script at the same thread count.

Quietness: each timed pass records the load average and the share of the machine's CPU time that other
processes (and the hypervisor: steal) took during it, from /proc/stat; the report says whether every pass
was quiet (other processes below 5% of the CPU). Numbers from a busy machine are not the goal numbers.

Usage:

```bash
python benchmarks/perplexity.py                      # both corpora, 3 rounds, torch threads = CPU count
python benchmarks/perplexity.py --runs 1 --corpora lee40 --methods ours,naive
```
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
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
CORPORA = {"lee40": ("lee_background", 40), "wiki48": ("wiki", 48)}
NAIVE_BATCH = 8
EVALUATE_BATCH = 16  # the metric's default
CONTEXT = 1024
QUIET_OTHER_CPU = 0.05
RESULTS = Path(__file__).parent / "results" / "perplexity.json"


def corpus_texts(name: str) -> list[str]:
    from collapse_guard.resources import human_texts

    source, n = CORPORA[name]
    texts = human_texts(source)
    return texts[:: max(1, len(texts) // n)][:n]


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _machine_busy_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / hz, steal / hz


class Contention:
    """Share of the machine's CPU taken by other processes (and steal) while a block runs."""

    def __enter__(self) -> Contention:
        self.load_before = os.getloadavg()
        self.busy, self.steal = _machine_busy_seconds()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.own = usage.ru_utime + usage.ru_stime
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        busy, steal = _machine_busy_seconds()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        own = usage.ru_utime + usage.ru_stime - self.own
        capacity = self.seconds * (os.cpu_count() or 1)
        self.other_cpu_share = max(0.0, (busy - self.busy - own) / capacity)
        self.steal_share = (steal - self.steal) / capacity
        self.load_after = os.getloadavg()

    def report(self) -> dict:
        return {
            "other_cpu_share": round(self.other_cpu_share, 3),
            "steal_share": round(self.steal_share, 3),
            "load_average_before": [round(x, 2) for x in self.load_before],
            "load_average_after": [round(x, 2) for x in self.load_after],
        }


def _ours(texts: list[str], model_dir: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from collapse_guard.metrics import HeldoutPerplexity

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with Contention() as run:  # tokenizing is part of an evaluation from scratch, as it is in evaluate's
        evaluator = HeldoutPerplexity(texts, tokenizer, context_length=CONTEXT, max_batch_tokens=16384)
        result = evaluator.compute(model)
    return {"seconds": run.seconds, "perplexity": result.perplexity, **run.report()}


def profile_ours(corpus: str, threads: int, output: Path, compiled: bool) -> None:
    """Where our evaluator's time goes, and what bounds its share of the matmul peak. Writes `output`.

    In one process: the matmul peak; warm passes of the evaluator as the guard runs it (the evaluator built
    once, the model unchanged between passes), median of 3; one pass under torch.profiler (self CPU time
    per op; FLOP counting is left off, as it slows the pass by ~70%). From those: the matmuls' own rate
    inside the pass (their FLOPs counted from the batches: padding and the head's scored rows included),
    and the share of the peak a pass would reach if its non-matmul time were gone except attention. With
    `compiled`: the same warm passes with the decoder under `torch.compile` (inductor, default mode, no
    weight freezing: the guard measures a model whose weights change between measurements), and the
    compile time of the first pass.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from collapse_guard.io import atomic_write_json
    from collapse_guard.metrics import HeldoutPerplexity
    from collapse_guard.resources import smollm2_dir

    torch.set_num_threads(threads)
    model_dir = str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    texts = corpus_texts(corpus)
    tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    useful_flops = 2 * sum(p.numel() for p in model.parameters()) * tokens  # as in the comparison
    evaluator = HeldoutPerplexity(texts, tokenizer, context_length=CONTEXT, max_batch_tokens=16384)
    peak = matmul_gflops(threads) * 1e9

    def warm_seconds(runs: int = 3) -> list[float]:
        return [_timed(lambda: evaluator.compute(model)) for _ in range(runs)]

    evaluator.compute(model)  # warm-up: first-touch of buffers, kernel selection
    eager = warm_seconds()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled_s = _timed(lambda: evaluator.compute(model))
    ops = prof.key_averages()
    total = sum(op.self_cpu_time_total for op in ops)
    eager_s = statistics.median(eager)
    # the profiled pass runs a little slower than a timed one: scale its op times to the timed pass
    scale = eager_s / (total / 1e6)
    mm_s = sum(op.self_cpu_time_total for op in ops if op.key == "aten::mm") / 1e6 * scale
    attention_s = sum(op.self_cpu_time_total for op in ops if "attention" in op.key) / 1e6 * scale
    mm_flops = ours_matmul_flops(evaluator, sum(p.numel() for p in model.parameters()),
                                 model.get_output_embeddings().weight.numel())
    top = sorted(ops, key=lambda op: -op.self_cpu_time_total)[:15]
    report = {
        "command": " ".join(["python", "benchmarks/perplexity.py", *sys.argv[1:]]), "corpus": corpus,
        "torch_threads": threads, "document_tokens": tokens, "matmul_peak_gflops": round(peak / 1e9, 1),
        "warm_pass_seconds": [round(x, 2) for x in eager],
        "warm_pass_share_of_matmul_peak": round(useful_flops / eager_s / peak, 4),
        "profiled_pass_seconds": round(profiled_s, 2),
        "self_cpu_seconds": round(total / 1e6, 2),
        "share_of_self_cpu_time": {op.key: round(op.self_cpu_time_total / total, 4) for op in top},
        "matmuls_in_the_pass": {
            "gflop": round(mm_flops / 1e9, 1),
            "seconds": round(mm_s, 2),
            "rate_share_of_matmul_peak": round(mm_flops / mm_s / peak, 4),
            "useful_flops_over_matmul_time_share_of_peak": round(useful_flops / mm_s / peak, 4),
            "note": "the matmuls count padding and the head's chunked rows; useful FLOPs = 2 x parameters x "
                    "document tokens, as in the comparison. useful / matmul time is the share a pass made of "
                    "its matmuls alone would reach",
        },
        "attention_seconds": round(attention_s, 2),
        "bound_with_only_matmuls_and_attention_share_of_peak": round(
            useful_flops / (mm_s + attention_s) / peak, 4),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "note": "aten::mm is the matmuls; the rest is attention and unfused element-wise ops (RMSNorm, RoPE, "
                "SwiGLU). The bound assumes every element-wise op took no time at all",
    }
    if compiled:
        prefix = model.base_model_prefix  # the evaluator calls the decoder and the head separately
        setattr(model, prefix, torch.compile(getattr(model, prefix)))
        first = _timed(lambda: evaluator.compute(model))
        warm = warm_seconds()
        report["torch_compile"] = {
            "first_pass_seconds_with_compilation": round(first, 1),
            "warm_pass_seconds": [round(x, 2) for x in warm],
            "warm_pass_share_of_matmul_peak": round(useful_flops / statistics.median(warm) / peak, 4),
            "speedup_over_eager_warm": round(eager_s / statistics.median(warm), 3),
            "mode": "torch.compile(decoder), inductor defaults, weights not frozen",
        }
    atomic_write_json(output, report)
    print(json.dumps(report, indent=1))
    print(f"wrote {output}")


def reference_perplexity(model, tokenizer, texts: list[str]) -> float:
    """Independent float64 reference: one whole document per forward (no padding), token-weighted."""
    import torch

    nll, count = 0.0, 0
    with torch.inference_mode():
        for ids in tokenizer(texts)["input_ids"]:
            if len(ids) < 2:
                continue
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
            count += len(ids) - 1
    return math.exp(nll / count)


def _naive(texts: list[str], model_dir: str, reference: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, count = 0.0, 0
    with Contention() as run, torch.no_grad():
        for s in range(0, len(texts), NAIVE_BATCH):
            batch = tokenizer(texts[s : s + NAIVE_BATCH], padding=True, return_tensors="pt")
            logits = model(**batch).logits
            labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="sum")
            nll, count = nll + loss.item(), count + int((labels != -100).sum())
    out = {"seconds": run.seconds, "perplexity": math.exp(nll / count), **run.report()}
    if reference:  # after the timed pass, in the arm whose peak memory it cannot raise
        out["reference_perplexity"] = reference_perplexity(model, tokenizer, texts)
    return out


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
    with Contention() as run:
        out = metric.compute(predictions=texts, model_id=model_dir, device="cpu", batch_size=EVALUATE_BATCH)
    return {"seconds": run.seconds, "load_seconds": load_seconds, "perplexity": out["mean_perplexity"],
            **run.report()}


def matmul_gflops(threads: int, sizes: tuple[int, ...] = (2048, 4096), reps: int = 5) -> float:
    """Best fp32 matmul GFLOP/s over square sizes and repetitions (after a warm-up each)."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)
        for _ in range(reps):
            start = time.perf_counter()
            torch.matmul(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def model_shapes_gflops(config, threads: int, tokens: int = 1024, head_rows: int = 682,
                        reps: int = 5) -> float:
    """What fp32 `F.linear` reaches on this model's own weight shapes (FLOP-weighted, best of `reps`).

    A square 2048-4096 matmul is the machine's peak; a 576-wide decoder cannot reach it (small K, small
    weights). This is the ceiling for the evaluator's matmuls: every linear layer of one decoder layer at a
    batch of `tokens` rows, and the output head at the evaluator's chunk of `head_rows` scored positions.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    # (rows, in, out, count per token): q, k, v, o, gate, up, down per layer; the head once
    layers = config.num_hidden_layers
    shapes = [(tokens, hidden, hidden, 2 * layers), (tokens, hidden, kv, 2 * layers),
              (tokens, hidden, inter, 2 * layers), (tokens, inter, hidden, layers),
              (head_rows, hidden, config.vocab_size, 1)]
    flops = seconds = 0.0
    for rows, n_in, n_out, count in shapes:
        x, w = torch.randn(rows, n_in), torch.randn(n_out, n_in)
        F.linear(x, w)
        best = min(_timed(lambda x=x, w=w: F.linear(x, w)) for _ in range(reps))
        # per token: count matmuls of 2 * n_in * n_out FLOPs; time per token from the rows timed
        flops += count * 2 * n_in * n_out
        seconds += count * best / rows
    return flops / seconds / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker(method: str, docs_file: str, threads: int, script: str | None, reference: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    import transformers  # noqa: F401  (import cost is part of the baseline, not of the measurement)

    if method == "evaluate":
        import evaluate  # noqa: F401

    from collapse_guard.resources import smollm2_dir

    texts = json.loads(Path(docs_file).read_text())["texts"]
    model_dir = str(smollm2_dir())
    # The matmul rate just before the pass: what this run could get from the machine at that moment.
    nearby_peak = matmul_gflops(threads, sizes=(2048,), reps=3)
    baseline = _rss_mb("VmRSS")
    if method == "ours":
        out = _ours(texts, model_dir)
    elif method == "naive":
        out = _naive(texts, model_dir, reference)
    else:
        out = _evaluate(texts, model_dir, script)
    out.update(peak_rss_mb=_rss_mb("VmHWM"), baseline_rss_mb=baseline, matmul_gflops_before=nearby_peak)
    print("RESULT " + json.dumps(out))


def evaluate_script(path: str | None) -> Path:
    if path:
        script = Path(path)
    else:
        third_party = Path.home() / ".cache" / "collapse_guard" / "third_party"
        script = third_party / f"evaluate-{EVALUATE_COMMIT[:7]}" / "perplexity" / "perplexity.py"
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
        raise SystemExit(
            f"--evaluate-script must be a file perplexity/perplexity.py (for evaluate.load), got {script}."
        )
    return script


def ours_matmul_flops(evaluator, n_params: int, n_head: int) -> int:
    """The matmul FLOPs of one pass of our evaluator: the decoder over every padded token, the output head
    over the scored positions only."""
    import torch

    batches = evaluator._shard_batches(1, 0, torch.device("cpu"))
    padded = sum(b.input_ids.numel() for b in batches)
    scored = sum(len(b.targets) for b in batches)
    return 2 * ((n_params - n_head) * padded + n_head * scored)


def padding_and_flops(texts: list[str], tokenizer, n_params: int, n_head: int) -> dict:
    """Padded tokens each arm pushes through the model, and the matmul FLOPs that implies.

    The FLOP ratio evaluate / ours bounds the speed-up when both run their matmuls equally well: above it
    only evaluate's extra memory traffic (full logits, copies) can lift the ratio.
    """
    import torch

    from collapse_guard.metrics import HeldoutPerplexity

    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    ours = HeldoutPerplexity(texts, tokenizer, context_length=CONTEXT, max_batch_tokens=16384)
    batches = ours._shard_batches(1, 0, torch.device("cpu"))
    ours_padded = sum(b.input_ids.numel() for b in batches)
    evaluate_padded = len(texts) * (max(lengths) + 1)  # BOS, then everything padded to the corpus' longest
    naive_padded = sum(len(lengths[s : s + NAIVE_BATCH]) * max(lengths[s : s + NAIVE_BATCH])
                       for s in range(0, len(lengths), NAIVE_BATCH))
    ours_flops = ours_matmul_flops(ours, n_params, n_head)
    tokens = sum(lengths)
    return {
        "document_tokens": tokens,
        "document_tokens_min_median_max": [min(lengths), int(statistics.median(lengths)), max(lengths)],
        "max_over_mean_length": round(max(lengths) / (tokens / len(lengths)), 2),
        "ours_batches": len(batches),
        "padded_over_document_tokens": {
            "ours": round(ours_padded / tokens, 3),
            "evaluate": round(evaluate_padded / tokens, 3),
            "naive": round(naive_padded / tokens, 3),
        },
        "matmul_flops_over_ours": {
            "evaluate": round(2 * n_params * evaluate_padded / ours_flops, 2),
            "naive": round(2 * n_params * naive_padded / ours_flops, 2),
        },
    }


def summarize(
    method: str, items: list[dict], tokens: int, n_params: int, peak: float, model_mb: float
) -> dict:
    seconds = statistics.median(x["seconds"] for x in items)
    above = max(x["peak_rss_mb"] - x["baseline_rss_mb"] for x in items)
    entry = {
        "seconds": [round(x["seconds"], 2) for x in items],
        "median_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        "best_tokens_per_second": round(tokens / min(x["seconds"] for x in items), 1),
        "share_of_matmul_peak": round(2 * n_params * tokens / seconds / (peak * 1e9), 4),
        "peak_rss_above_imports_mb": round(above, 1),
        "working_memory_above_model_mb": round(above - model_mb, 1),
        "perplexity": items[0]["perplexity"],
        "other_cpu_share": [x["other_cpu_share"] for x in items],
        "load_average_before": [x["load_average_before"] for x in items],
        "matmul_gflops_just_before": [round(x["matmul_gflops_before"], 1) for x in items],
    }
    if method == "evaluate":
        without_load = statistics.median(x["seconds"] - x["load_seconds"] for x in items)
        entry["tokens_per_second_excluding_model_load"] = round(tokens / without_load, 1)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds of every arm on every corpus")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for every arm")
    parser.add_argument("--evaluate-script", default=None,
                        help="local copy of evaluate's metrics/perplexity/perplexity.py")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of these")
    parser.add_argument("--corpora", default=",".join(CORPORA), help="comma-separated subset of these")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--docs-file", help=argparse.SUPPRESS)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", metavar="CORPUS", choices=CORPORA,
                        help="instead of the comparison: our evaluator's warm passes, time per op and the "
                             "bound they set on CORPUS, to results/perplexity_profile.json")
    parser.add_argument("--compile", action="store_true",
                        help="with --profile: also time warm passes with the decoder under torch.compile")
    args = parser.parse_args()
    if args.profile:
        profile_ours(args.profile, args.threads, RESULTS.with_name("perplexity_profile.json"), args.compile)
        return
    if args.worker:
        worker(args.worker, args.docs_file, args.threads, args.evaluate_script, args.reference)
        return
    methods = [m for m in args.methods.split(",") if m]
    corpora = [c for c in args.corpora.split(",") if c]
    unknown = [x for x in methods if x not in METHODS] + [c for c in corpora if c not in CORPORA]
    if unknown:
        raise SystemExit(f"unknown methods/corpora: {unknown}")
    script = evaluate_script(args.evaluate_script) if "evaluate" in methods else None
    started = time.perf_counter()

    from transformers import AutoConfig, AutoTokenizer

    from collapse_guard.resources import load_smollm2, smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    model, _ = load_smollm2()
    n_params = sum(p.numel() for p in model.parameters())
    n_head = model.get_output_embeddings().weight.numel()
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    del model
    texts = {c: corpus_texts(c) for c in corpora}
    shapes = {c: padding_and_flops(texts[c], tokenizer, n_params, n_head) for c in corpora}

    peaks = [matmul_gflops(args.threads)]
    shape_ceilings = [model_shapes_gflops(AutoConfig.from_pretrained(smollm2_dir()), args.threads)]
    runs: dict[str, dict[str, list[dict]]] = {c: {m: [] for m in methods} for c in corpora}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for c in corpora:
            files[c] = Path(tmp) / f"{c}.json"
            files[c].write_text(json.dumps({"texts": texts[c]}))
        for run in range(args.runs):
            # Rotate the order every round so no arm always runs first (after the parent's matmul) or last.
            order = [(c, m) for c in corpora for m in methods]
            shift = run % len(order)
            for corpus, method in order[shift:] + order[:shift]:
                cmd = [sys.executable, __file__, "--worker", method, "--docs-file", str(files[corpus]),
                       "--threads", str(args.threads)]
                if script:
                    cmd += ["--evaluate-script", str(script)]
                if run == 0 and method == "naive":
                    cmd.append("--reference")
                env = os.environ | {"TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    raise SystemExit(f"{method} worker on {corpus} failed:\n{proc.stderr[-4000:]}")
                item = json.loads(line[len("RESULT "):])
                runs[corpus][method].append(item)
                others, load = item["other_cpu_share"], item["load_average_before"][0]
                print(f"round {run + 1}/{args.runs} {corpus} {method}: {item['seconds']:.1f}s "
                      f"(others {others:.0%} of the CPU, load {load})", flush=True)
    peaks.append(matmul_gflops(args.threads))
    shape_ceilings.append(model_shapes_gflops(AutoConfig.from_pretrained(smollm2_dir()), args.threads))
    shape_ceiling = max(shape_ceilings)
    peak = max(peaks + [x["matmul_gflops_before"] for c in runs.values() for m in c.values() for x in m])

    report_corpora = {}
    for corpus, by_method in runs.items():
        tokens = shapes[corpus]["document_tokens"]
        results = {m: summarize(m, items, tokens, n_params, peak, model_mb) for m, items in by_method.items()}
        entry = {**shapes[corpus], "methods": results}
        if "ours" in results:
            ours = results["ours"]
            goals = {
                "ours_share_of_matmul_peak": ours["share_of_matmul_peak"],
                # the same rate against what this model's own matmul shapes reach in isolation
                "ours_share_of_model_shapes_ceiling": round(
                    ours["share_of_matmul_peak"] * peak / shape_ceiling, 4),
                "ours_peak_rss_above_imports_below_model_plus_1gb":
                    ours["peak_rss_above_imports_mb"] <= model_mb + 1024,
            }
            for other in ("evaluate", "naive"):
                if other not in results:
                    continue
                goals[f"ours_over_{other}_throughput"] = round(
                    ours["tokens_per_second"] / results[other]["tokens_per_second"], 2)
                pairs = zip(by_method["ours"], by_method[other], strict=True)
                paired = [o["seconds"] / x["seconds"] for x, o in pairs]
                goals[f"ours_over_{other}_median_of_rounds"] = round(statistics.median(paired), 2)
            if "evaluate" in results:
                without_load = results["evaluate"]["tokens_per_second_excluding_model_load"]
                goals["ours_over_evaluate_excluding_its_model_load"] = round(
                    ours["tokens_per_second"] / without_load, 2)
            references = [x["reference_perplexity"] for x in by_method.get("naive", [])
                          if "reference_perplexity" in x]
            if references:
                reference = entry["reference_perplexity"] = references[0]
                goals["ours_vs_reference_relative_difference"] = float(
                    f"{abs(ours['perplexity'] / reference - 1):.2e}")
                # fp32 cross-entropy over [B, V, L] logits on CPU drifts by ~1e-4: the naive loop's own error
                goals["naive_vs_reference_relative_difference"] = float(
                    f"{abs(results['naive']['perplexity'] / reference - 1):.2e}")
            entry["goals"] = goals
        report_corpora[corpus] = entry

    others = [x["other_cpu_share"] for c in runs.values() for m in c.values() for x in m]
    quiet = max(others) <= QUIET_OTHER_CPU
    report = {
        "config": {
            "model": "SmolLM2-135M-Instruct (fp32, CPU)",
            "corpora": {
                "lee40": "40 Lee news articles, every k-th of gensim's lee_background.cor (earlier corpus)",
                "wiki48": "48 Wikipedia paragraphs, every k-th of gensim's enwiki sample (>= 20 words)",
            },
            "runs": args.runs,
            "torch_threads": args.threads,
            "cpu_count": os.cpu_count(),
            "parameters": n_params,
            "head_parameters": n_head,
            "model_mb": round(model_mb, 1),
            "flops_per_token": 2 * n_params,
            "matmul_peak_gflops": round(peak, 1),
            "matmul_peak_gflops_parent_before_after": [round(p, 1) for p in peaks],
            "model_shapes_gflops_before_after": [round(p, 1) for p in shape_ceilings],
            "model_shapes_share_of_matmul_peak": round(shape_ceiling / peak, 4),
            "evaluate_script": f"huggingface/evaluate@{EVALUATE_COMMIT} metrics/perplexity/perplexity.py",
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "machine_quiet": quiet,
            "max_other_cpu_share": max(others),
            "quiet_means": f"others and steal took <= {QUIET_OTHER_CPU:.0%} of the CPU in every pass",
            "wall_seconds": round(time.perf_counter() - started, 1),
            "notes": "ours: blocks of 1024 tokens (documents whole), max_batch_tokens=16384; evaluate: its "
            "defaults (batch_size=16, BOS prepended, every document padded to the corpus' longest; reports "
            "the mean of per-document perplexities, a different number); naive: batch 8 in input order, "
            "padded to the batch's longest, full fp32 logits, token-weighted; reference: float64, one "
            "document per forward.",
        },
        "corpora": report_corpora,
    }
    if not quiet:
        report["config"]["warning"] = (
            f"busy machine: other processes took up to {max(others):.0%} of the CPU during a timed pass; "
            "re-run on a quiet machine for the goal numbers."
        )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    from collapse_guard.io import atomic_write_json

    atomic_write_json(output, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
