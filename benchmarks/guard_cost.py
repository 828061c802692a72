"""What the whole guard costs: training wall time with and without CollapseGuardCallback + MixingCollator.

    python benchmarks/guard_cost.py                  # full: tiny (~10 min) + SmolLM2 (~100 min), quiet CPU
    python benchmarks/guard_cost.py --quick          # smoke run (~2-4 min): tiny model, short SmolLM2
    python benchmarks/guard_cost.py --skip-smollm2   # tiny model only
    python benchmarks/guard_cost.py --models smollm2 --repeats 2
    # SmolLM2 at the real defaults, nothing scaled (~35 min): results/guard_cost_smollm2_long.json
    python benchmarks/guard_cost.py --models smollm2 --repeats 1 --smollm2-steps 300 --smollm2-eval-steps 50 \
        --arms collator_only,guard_defaults --out benchmarks/results/guard_cost_smollm2_long.json

Writes benchmarks/results/guard_cost.json (--quick: a scratch file under $TMPDIR/collapse_guard_bench/).

The same training job (TRL SFTTrainer, the same data, seed and max_steps) runs in five arms:

1. no_guard          the trainer's own collator, no callback;
2. collator_only     MixingCollator(real_dataset=real, min_real_fraction=0.5).attach(trainer);
3. guard_defaults    CollapseGuardCallback(heldout, prompts, collator=...), GuardConfig() (cost_budget=0.03)
                     and ProbeConfig() (context 512, 32 prompts x 48 sampled tokens), 32 held-out documents;
4. guard_no_budget   the same with cost_budget=None (a measurement every eval_steps, whatever it costs);
5. guard_demo        recipes/demo.yaml's settings: evaluation (context 128, 16 prompt tokens, 48 new tokens,
                     temperature 1, 32 prompts) and guard.eval_steps=1000, held-out documents cut to 50 words.

The arms alternate within each repeat (the order rotates between repeats); medians over repeats. Every guard
arm sets stop_training_on_alarm=False so all arms train the same steps (the switch costs nothing).

What is reported per arm: training wall time (`trainer.train()`), the guard's share of it (the wall-clock
difference against collator_only and against no_guard, paired within a repeat), the guard's own time
(every guard callback event and the pieces inside it, timed by wrapping them in this script, exclusive of
nested pieces) over training time, the guard's own accounting (`guard.spent`, `guard.cost_share()`), the
number of measurements and the split: held-out set preparation, held-out perplexity
(`probe.evaluator().compute`), generation (`probe.generate`), diversity metrics, the detector
(`detector.check`), the history file, logging (`on_log`), and the rest of the callback. The collator's own
time is measured the same way (a wrapper around the trainer's data collator).

Tiny model: steps take milliseconds, so the guard's shares are large there by construction; it checks the
mechanism on a job with the real default eval_steps=50. SmolLM2 on CPU: a step takes seconds, a measurement
tens of seconds, so eval_steps is scaled down with the job (see the JSON). The JSON ends with a GPU
extrapolation: an ESTIMATE from stated assumptions and the CPU measurements, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCH_CACHE = Path(
    os.environ.get("COLLAPSE_GUARD_BENCH_CACHE", Path(tempfile.gettempdir()) / "collapse_guard_bench")
)
ARMS = ("no_guard", "collator_only", "guard_defaults", "guard_no_budget", "guard_demo")
GUARD_ARMS = ARMS[2:]
FLOOR = 0.5


def load(label: str) -> list[float]:
    value = [round(x, 2) for x in os.getloadavg()]
    print(f"[{time.strftime('%H:%M:%S')}] load average {value} ({label})", flush=True)
    return value


# ----- timing the guard's pieces ----------------------------------------------------------------------------
class Split:
    """Exclusive wall time per piece: a wrapped call's time minus the wrapped calls nested inside it."""

    def __init__(self):
        self.seconds: Counter = Counter()
        self.calls: Counter = Counter()
        self._stack: list[float] = []

    def wrap(self, obj, name: str, key: str) -> None:
        original = getattr(obj, name)
        split = self

        def timed(*args, **kwargs):
            split._stack.append(0.0)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                nested = split._stack.pop()
                split.seconds[key] += elapsed - nested
                split.calls[key] += 1
                if split._stack:
                    split._stack[-1] += elapsed

        setattr(obj, name, timed)


CURRENT_SPLIT: Split | None = None  # the diversity metrics are a module function: patched once, routed here


def _patch_diversity() -> None:
    import collapse_guard.metrics.diversity as diversity

    if getattr(diversity.diversity_metrics, "_bench", False):
        return
    original = diversity.diversity_metrics

    def timed(*args, **kwargs):
        split = CURRENT_SPLIT
        if split is None:
            return original(*args, **kwargs)
        holder = type("H", (), {"f": staticmethod(original)})
        split.wrap(holder, "f", "diversity")
        return holder.f(*args, **kwargs)

    timed._bench = True  # type: ignore[attr-defined]
    diversity.diversity_metrics = timed


GUARD_EVENTS = (
    "on_train_begin",
    "on_step_end",
    "on_evaluate",
    "on_save",
    "on_train_end",
    "on_epoch_end",
    "on_substep_end",
)


def instrument_guard(guard, split: Split) -> None:
    probe = guard.probe
    split.wrap(probe, "measure", "probe_other")
    split.wrap(probe, "generate", "generation")
    original_evaluator = probe.evaluator

    def evaluator():
        ev = original_evaluator()
        if not getattr(ev, "_bench_timed", False):
            split.wrap(ev, "compute", "heldout_ppl")
            ev._bench_timed = True
        return ev

    probe.evaluator = evaluator
    split.wrap(probe, "evaluator", "heldout_setup")
    split.wrap(guard.detector, "check", "detector")
    split.wrap(guard, "_save", "history_file")
    split.wrap(guard, "on_log", "logging")
    for event in GUARD_EVENTS:
        split.wrap(guard, event, "callback_other")


PIECES = (
    "heldout_setup",
    "heldout_ppl",
    "generation",
    "diversity",
    "probe_other",
    "detector",
    "history_file",
    "logging",
    "callback_other",
)


# ----- the job ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    name: str
    steps: int
    batch_size: int
    max_length: int
    eval_steps: int
    logging_steps: int
    learning_rate: float
    scaling: str
    make_model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    real: Any = field(repr=False)
    train: Any = field(repr=False)
    heldout: list[str] = field(repr=False)
    demo_heldout: list[str] = field(repr=False)

    def describe(self) -> dict:
        d = {
            k: v
            for k, v in asdict(self).items()
            if k
            in (
                "name",
                "steps",
                "batch_size",
                "max_length",
                "eval_steps",
                "logging_steps",
                "learning_rate",
                "scaling",
            )
        }
        d.update(
            training_rows=len(self.train),
            real_pool_rows=len(self.real),
            heldout_documents=len(self.heldout),
            training_tokens_per_step=self.batch_size * self.max_length,
        )
        return d


def job_data(n_real: int):
    from datasets import Dataset

    from collapse_guard import mix_datasets
    from collapse_guard.resources import human_texts

    real_texts = human_texts("lee_background")[:n_real]
    real = Dataset.from_dict({"text": real_texts})
    # stand-in synthetic rows: a real article's first sentence and a model's habit (never in the real pool)
    synthetic = Dataset.from_dict(
        {
            "text": [
                f"{t.split('.')[0]}. The model repeats itself, and it repeats itself."
                for t in real_texts[::-1]
            ]
        }
    )
    train = mix_datasets(real, synthetic, mode="replace", min_real_fraction=FLOOR, seed=0)
    heldout = human_texts("lee")[:32]
    demo_heldout = [" ".join(t.split()[:50]) for t in heldout]  # demo.yaml: data.max_words 50
    return real, train, heldout, demo_heldout


def make_job(
    name: str, quick: bool, smollm2_steps: int | None = None, smollm2_eval_steps: int | None = None
) -> Job:
    real, train, heldout, demo_heldout = job_data(300)
    if name == "tiny":
        from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer

        tok = tiny_tokenizer()
        steps = 100 if quick else 400
        return Job(
            "tiny",
            steps,
            8,
            128,
            50,
            10,
            1e-3,
            f"none: the defaults (eval_steps=50) on a job of {steps} steps of 8 x 128 tokens",
            lambda: tiny_causal_lm(tok),
            tok,
            real,
            train,
            heldout,
            demo_heldout,
        )
    from collapse_guard.resources import load_smollm2

    _, tok = load_smollm2()
    steps, eval_steps = (2, 1) if quick else (60, 10)
    steps, eval_steps = smollm2_steps or steps, smollm2_eval_steps or eval_steps
    scaling = "none: the defaults (eval_steps=50, cost_budget=0.03, ProbeConfig(), 32 documents / 32 prompts)"
    if eval_steps != 50:
        scaling = (
            f"eval_steps scaled 50 -> {eval_steps} for a {steps}-step CPU job (batch 4 x 128 tokens): "
            f"without the budget it takes {steps // eval_steps} interim measurements plus the start and the "
            f"end, as a {steps * 50 // eval_steps}-step job would at the default eval_steps=50. ProbeConfig "
            "and the 32 documents / 32 prompts are NOT scaled (the defaults)."
        )
    return Job(
        "smollm2_135m_instruct",
        steps,
        4,
        128,
        eval_steps,
        max(1, eval_steps // 2),
        1e-5,
        scaling,
        lambda: load_smollm2()[0],
        tok,
        real,
        train,
        heldout,
        demo_heldout,
    )


def guard_for(arm: str, job: Job, collator):
    from collapse_guard.callbacks import CollapseGuardCallback, GuardConfig
    from collapse_guard.probe import ProbeConfig

    if arm == "guard_demo":  # recipes/demo.yaml: evaluation section, guard.eval_steps, data.max_words
        config = GuardConfig(eval_steps=1000, stop_training_on_alarm=False)
        probe = ProbeConfig(context_length=128, prompt_tokens=16, max_new_tokens=48, temperature=1.0)
        heldout = job.demo_heldout
    else:
        config = GuardConfig(
            eval_steps=job.eval_steps,
            stop_training_on_alarm=False,
            cost_budget=GuardConfig().cost_budget if arm == "guard_defaults" else None,
        )
        probe = ProbeConfig()
        heldout = job.heldout
    return CollapseGuardCallback(heldout, prompts=heldout[:32], collator=collator, config=config, probe=probe)


def run_arm(arm: str, job: Job, repeat: int, workdir: Path) -> dict:
    import torch
    from trl import SFTConfig, SFTTrainer

    from collapse_guard import MixingCollator

    global CURRENT_SPLIT
    torch.manual_seed(repeat % 1000)
    model = job.make_model()
    args = SFTConfig(
        output_dir=str(workdir / f"{arm}_{repeat}"),
        max_steps=job.steps,
        per_device_train_batch_size=job.batch_size,
        max_length=job.max_length,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=job.logging_steps,
        learning_rate=job.learning_rate,
        seed=repeat % 1000,
    )
    split = Split()
    start = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=job.train, processing_class=job.tokenizer)
    guard = collator = None
    if arm != "no_guard":
        collator = MixingCollator(real_dataset=job.real, min_real_fraction=FLOOR)
    if arm in GUARD_ARMS:
        guard = guard_for(arm, job, collator).attach(trainer)
        instrument_guard(guard, split)
    elif collator is not None:
        collator.attach(trainer)
    setup_s = time.perf_counter() - start
    holder = type("H", (), {"f": staticmethod(trainer.data_collator)})
    split.wrap(holder, "f", "collator")
    trainer.data_collator = holder.f
    CURRENT_SPLIT = split
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
    CURRENT_SPLIT = None
    guard_s = sum(split.seconds[k] for k in PIECES)
    out = {
        "arm": arm,
        "repeat": repeat,
        "train_s": train_s,
        "setup_s": setup_s,
        "steps": trainer.state.global_step,
        "collator_s": split.seconds["collator"],
        "guard_s": guard_s,
        "split_s": {k: split.seconds[k] for k in PIECES},
        "calls": dict(split.calls),
    }
    if guard is not None:
        entries = [e for e in guard.history.entries if e["round"] == guard.config.round_index]
        out.update(
            measurements=guard.spent["measurements"],
            measured_at_steps=[e["step"] for e in entries],
            spent=dict(guard.spent),
            cost_share_own_accounting=guard.cost_share(),
            levels=[e.get("level") for e in entries],
        )
    if collator is not None:
        out["real_fraction"] = collator.real_fraction
    print(
        f"  {job.name} {arm} r{repeat}: train {train_s:.1f}s, guard {guard_s:.1f}s "
        f"({out.get('measurements', 0)} measurements), collator {out['collator_s']:.2f}s",
        flush=True,
    )
    return out


def summarize(runs: list[dict], repeats: int) -> dict:
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}
    by_arm = {k: v for k, v in by_arm.items() if v}

    def med(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in by_arm[arm])

    def paired(arm: str, ref: str) -> float | None:
        if ref not in by_arm:
            return None
        ref_s = {r["repeat"]: r["train_s"] for r in by_arm[ref]}
        diffs = [
            (r["train_s"] - ref_s[r["repeat"]]) / ref_s[r["repeat"]]
            for r in by_arm[arm]
            if r["repeat"] in ref_s
        ]
        return statistics.median(diffs) if diffs else None

    out = {}
    for arm, rs in by_arm.items():
        train_s = med(arm, "train_s")
        entry: dict[str, Any] = {
            "train_s_median": train_s,
            "train_s_runs": [r["train_s"] for r in rs],
            "steps": rs[0]["steps"],
            "collator_s_median": med(arm, "collator_s"),
            "wall_share_vs_no_guard": paired(arm, "no_guard") if arm != "no_guard" else None,
        }
        if arm in GUARD_ARMS:
            guard_s = med(arm, "guard_s")
            shares = [r["guard_s"] / (r["train_s"] - r["guard_s"]) for r in rs]
            entry.update(
                {
                    "wall_share_vs_collator_only": paired(arm, "collator_only"),
                    "guard_s_median": guard_s,
                    "guard_own_share_of_training": statistics.median(shares),
                    "guard_own_share_definition": "guard seconds (every callback event, timed here) / "
                    "(train_s - guard seconds)",
                    "cost_share_own_accounting": med(arm, "cost_share_own_accounting"),
                    "spent_seconds_median": statistics.median(r["spent"]["seconds"] for r in rs),
                    "spent_forward_tokens": rs[0]["spent"]["tokens"],
                    "measurements": [r["measurements"] for r in rs],
                    "measured_at_steps": rs[0]["measured_at_steps"],
                    "seconds_per_measurement": statistics.median(
                        r["spent"]["seconds"] / max(r["measurements"], 1) for r in rs
                    ),
                    "split_s_median": {k: statistics.median(r["split_s"][k] for r in rs) for k in PIECES},
                    "split_share_of_guard": {
                        k: statistics.median(r["split_s"][k] / r["guard_s"] for r in rs) for k in PIECES
                    },
                    "levels": rs[0]["levels"],
                }
            )
        if arm == "collator_only":
            entry["collator_share_of_training"] = statistics.median(
                r["collator_s"] / r["train_s"] for r in rs
            )
        out[arm] = entry
    if "guard_defaults" in out and "guard_no_budget" in out:
        d, n = out["guard_defaults"], out["guard_no_budget"]
        out["budget_effect"] = {
            "measurements_with_budget": d["measurements"],
            "measurements_without_budget": n["measurements"],
            "guard_s_with_budget": d["guard_s_median"],
            "guard_s_without_budget": n["guard_s_median"],
            "own_share_with_budget": d["guard_own_share_of_training"],
            "own_share_without_budget": n["guard_own_share_of_training"],
            "wall_share_vs_collator_only_with_budget": d["wall_share_vs_collator_only"],
            "wall_share_vs_collator_only_without_budget": n["wall_share_vs_collator_only"],
            "note": "the start and the end are always measured, whatever the budget: on a job shorter than "
            "about "
            "2 x (seconds per measurement) / cost_budget these two alone exceed the budget",
        }
    steps = by_arm[next(iter(by_arm))][0]["steps"]
    ref = "collator_only" if "collator_only" in by_arm else next(iter(by_arm))
    out["step_s_median_without_guard"] = med(ref, "train_s") / max(steps, 1)
    return out


def _shares(measurements: int, per_measurement: float, train_s: float) -> dict:
    # the budget holds the share of the run (GuardConfig.cost_share: guard / (training + guard))
    guard_s = measurements * per_measurement
    return {"measurements": measurements, "share_of_run": guard_s / (train_s + guard_s),
            "share_of_training": guard_s / train_s}


def gpu_estimate(smollm2: dict | None, tiny: dict | None) -> dict | None:
    """An ESTIMATE of the default guard's share on a GPU, from stated assumptions and measured CPU ratios."""
    source = smollm2 or tiny
    if source is None:
        return None
    name = "smollm2_135m_instruct" if smollm2 else "tiny"
    arm = "guard_no_budget" if "guard_no_budget" in source["summary"] else "guard_defaults"
    nb = source["summary"][arm]
    runs = [r for r in source["runs"] if r["arm"] == arm]
    step_s = source["summary"]["step_s_median_without_guard"]
    tokens_per_step = source["job"]["training_tokens_per_step"]
    n_meas = statistics.median(r["measurements"] for r in runs)
    # forward tokens per measurement: held-out + prompt and generated tokens (32 x (16 + 48))
    forward_tokens = statistics.median(r["spent"]["tokens"] for r in runs) / max(n_meas, 1)
    heldout_tokens = max(forward_tokens - 32 * (16 + 48), 1)
    split = nb["split_s_median"]
    heldout_s = split["heldout_ppl"] / n_meas
    host = ("diversity", "detector", "history_file", "logging", "callback_other", "probe_other",
            "heldout_setup")
    python_s = sum(split[k] for k in host) / n_meas
    generation_s_cpu = split["generation"] / n_meas
    # the held-out forward's cost per token relative to a training token (forward + backward), measured on CPU
    r_cpu = (heldout_s / heldout_tokens) / (step_s / tokens_per_step)
    a = {"optimizer_step_s": 1.0, "training_tokens_per_step": 16 * 512, "heldout_tokens": 32 * 512,
         "generation": "32 prompts x 48 new tokens, one batch", "decode_latency_s_per_token": 0.025,
         "eval_steps": 50, "cost_budget": 0.03, "run_steps": [1000, 5000]}
    heldout_gpu = a["heldout_tokens"] * r_cpu * a["optimizer_step_s"] / a["training_tokens_per_step"]
    generation_gpu = 48 * a["decode_latency_s_per_token"]
    per_measurement = heldout_gpu + generation_gpu + python_s
    scenarios = {}
    for steps in a["run_steps"]:
        train_s = steps * a["optimizer_step_s"]
        no_budget_n = steps // a["eval_steps"] + 1  # the start, every eval_steps, the end
        # with the budget (GuardConfig._due): due when this one and the final one fit the budget's share of
        # the projected job: spent + 2 next <= budget x (projected training + spent + 2 next)
        n, spent = 1, per_measurement
        for _step in range(a["eval_steps"], steps, a["eval_steps"]):
            planned = spent + 2 * per_measurement
            if planned <= a["cost_budget"] * (train_s + planned):
                n += 1
                spent += per_measurement
        n += 1
        scenarios[f"{steps}_steps"] = {
            "no_budget": _shares(no_budget_n, per_measurement, train_s),
            "with_budget": _shares(n, per_measurement, train_s),
            "start_and_end_only_share_of_run": _shares(2, per_measurement, train_s)["share_of_run"],
        }
    return {
        "ESTIMATE": "not a measurement: the assumptions below, scaled by ratios measured on CPU",
        "measured_on": name,
        "assumptions": a,
        "cpu_heldout_forward_cost_per_token_over_training_cost_per_token": r_cpu,
        "note_on_ratio": "theory: a forward token costs ~1/3 of a training (forward + backward) token; the "
                         "ratio is used as measured on CPU (with the evaluator's batching and padding)",
        "heldout_s_per_measurement": heldout_gpu,
        "generation_s_per_measurement": generation_gpu,
        "generation_note": f"decoding is latency-bound on a GPU (one forward per new token, batch 32): 48 x "
                           f"the assumed per-token latency; on CPU: {generation_s_cpu:.1f} s a measurement",
        "host_python_s_per_measurement": python_s,
        "host_python_note": "diversity metrics, detector, history file, logging, callback: measured on this "
                            "CPU; they run on the host on a GPU machine too",
        "seconds_per_measurement": per_measurement,
        "share_per_measurement_at_eval_steps_50": per_measurement / (a["eval_steps"] * a["optimizer_step_s"]),
        "scenarios": scenarios,
    }

def run_model(name: str, args, workdir: Path) -> dict:
    load(f"{name}: building the job")
    job = make_job(name, args.quick, args.smollm2_steps, args.smollm2_eval_steps)
    arms = list(ARMS)
    if args.quick and name != "tiny":
        arms = ["collator_only", "guard_defaults"]
    if args.arms:
        arms = args.arms
    repeats = args.repeats or (1 if args.quick else 3)
    result: dict = {"job": job.describe(), "arms": arms, "repeats": repeats, "load_average_start": load(name)}
    # warm-up (not recorded): first calls into torch, generation and the tokenizer
    if not args.quick:
        run_arm("guard_demo", Job(**{**job.__dict__, "steps": 2}), -1, workdir)
    runs = []
    for repeat in range(repeats):
        order = arms[repeat % len(arms) :] + arms[: repeat % len(arms)]
        for arm in order:
            runs.append(run_arm(arm, job, repeat, workdir))
        result[f"load_average_after_repeat_{repeat}"] = load(f"{name} repeat {repeat}")
    result["runs"] = runs
    result["summary"] = summarize(runs, repeats)
    result["load_average_end"] = load(f"{name} end")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--smollm2-steps", type=int, default=None, help="SmolLM2 job length (default 60)")
    parser.add_argument("--smollm2-eval-steps", type=int, default=None, help="scaled eval_steps (default 10)")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--arms",
        type=lambda value: value.split(","),
        default=None,
        help=f"comma-separated subset of {','.join(ARMS)} (default: all; --quick on SmolLM2: "
        "collator_only,guard_defaults), e.g. for a long SmolLM2 job at the real eval_steps",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's own; 1 is steadier on a machine loaded by others)",
    )
    args = parser.parse_args()
    unknown = [arm for arm in args.arms or [] if arm not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown arm(s) {unknown}; choose from {','.join(ARMS)}")

    import torch

    from collapse_guard.io import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)

    _patch_diversity()
    models = [m for m in args.models.split(",") if not (args.skip_smollm2 and m == "smollm2")]
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    out_path = (
        Path(args.out)
        if args.out
        else (BENCH_CACHE / "guard_cost_quick.json" if args.quick else HERE / "results" / "guard_cost.json")
    )
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "quick": args.quick,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "load_average_start": load("start"),
        "arms": list(ARMS),
        "floor": FLOOR,
        "goal": "whole-guard share <= 3% of training time at the defaults on a realistic recipe",
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            key = "tiny" if name == "tiny" else "smollm2_135m_instruct"
            results[key] = run_model(name, args, Path(tmp))
            atomic_write_json(out_path, results)
    results["gpu_extrapolation"] = gpu_estimate(results.get("smollm2_135m_instruct"), results.get("tiny"))
    results["load_average_end"] = load("end")
    results["wall_s"] = time.perf_counter() - started
    atomic_write_json(out_path, results)
    print(
        json.dumps(
            {k: v.get("summary") for k, v in results.items() if isinstance(v, dict) and "summary" in v},
            indent=1,
        )
    )
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
