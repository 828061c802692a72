"""One sampling step over SmolLM2's vocabulary: `torch.multinomial` vs the inverse-CDF sampler (issue 24).

Rows of probabilities (softmax of scaled normal logits, 32 rows x 49,152 tokens: one generation step of the
guard's prompt set) are drawn from with each sampler; the two run interleaved and the median of `--repeats`
timings (each the mean of `--inner` draws) is reported, on the current torch thread count.

Usage:

```bash
python benchmarks/sampler.py                 # ~10 s
python benchmarks/sampler.py --threads 1 --rows 32 --vocab 49152
```
Writes benchmarks/results/sampler.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from collapse_guard.generation.backends import inverse_cdf_sample
from collapse_guard.io import atomic_write_json

OUT = Path(__file__).resolve().parent / "results" / "sampler.json"


def _time(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    probs = torch.softmax(3.0 * torch.randn(args.rows, args.vocab), dim=-1)
    generator = torch.Generator().manual_seed(0)
    samplers = {"multinomial": lambda: torch.multinomial(probs, 1, generator=generator),
                "inverse_cdf": lambda: inverse_cdf_sample(probs, generator)}
    for fn in samplers.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(args.repeats):  # interleaved: both see the same machine load
        for name, fn in samplers.items():
            times[name].append(_time(fn, args.inner))
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "rows": args.rows, "vocab": args.vocab, "repeats": args.repeats, "inner": args.inner,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "median_ms": {name: round(1e3 * m, 3) for name, m in median.items()},
        "speedup": round(median["multinomial"] / median["inverse_cdf"], 2),
        "note": "one sampling step, softmax excluded; medians of interleaved repeats on a shared CPU",
    }
    atomic_write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
