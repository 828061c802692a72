"""What the real-data floor costs: collator time per batch and SFTTrainer step time, side by side.

    python benchmarks/mixing.py                  # tiny model + SmolLM2-135M-Instruct (a few minutes on CPU)
    python benchmarks/mixing.py --skip-smollm2   # tiny model only

Writes benchmarks/results/mixing.json. Both arms pad every batch to the same shape (pad_to_multiple_of =
max_length), so a step-time difference is the collator's overhead, not different sequence lengths.
Arms alternate within each repeat; medians over steps and repeats. Goal: <= 2% step-time overhead.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from collapse_guard import MixingCollator, MixingCollatorCallback, mix_datasets
from collapse_guard.io import atomic_write_json
from collapse_guard.provenance import tokenize_like_sft


class StepTimer(TrainerCallback):
    """Wall time between consecutive step ends: includes data loading and collation."""

    def __init__(self):
        self.times: list[float] = []
        self._last: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def data(tokenizer, n_real: int, n_synthetic: int):
    from collapse_guard.resources import human_texts
    from collapse_guard.testing import human_like_sentences

    try:
        real_texts = human_texts("lee_background")[:n_real]
    except ModuleNotFoundError:
        real_texts = human_like_sentences(n_real)
    from datasets import Dataset

    real = Dataset.from_dict({"text": real_texts})
    synthetic = Dataset.from_dict({"text": [f"{t.split('.')[0]}. The model repeats itself." for t in real_texts[::-1]]
                                   * (n_synthetic // max(len(real_texts), 1) + 1)}).select(range(n_synthetic))
    return real, synthetic


def collator_time(tokenizer, real, synthetic, max_length: int, batch_size: int, repeats: int) -> dict:
    base = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=max_length)
    mixing = MixingCollator(base, real_dataset=real, tokenizer=tokenizer, min_real_fraction=0.5, max_length=max_length)
    feats = [tokenize_like_sft(ex, tokenizer, max_length=max_length) for ex in synthetic]
    batches = [feats[i : i + batch_size] for i in range(0, len(feats) - batch_size + 1, batch_size)]
    out = {"base_ms": [], "mixing_ms": []}
    for _ in range(repeats):
        for name, fn in (("base_ms", base), ("mixing_ms", mixing)):
            start = time.perf_counter()
            for b in batches:
                fn(b)
            out[name].append(1000 * (time.perf_counter() - start) / len(batches))
    base_ms, mixing_ms = statistics.median(out["base_ms"]), statistics.median(out["mixing_ms"])
    return {"base_collator_ms_per_batch": base_ms, "mixing_collator_ms_per_batch": mixing_ms,
            "collator_overhead_ms_per_batch": mixing_ms - base_ms, "batches": len(batches), "batch_size": batch_size}


def step_time(make_model, tokenizer, real, synthetic, max_length: int, batch_size: int, steps: int, repeats: int,
              workdir: Path) -> dict:
    train = mix_datasets(real, synthetic, mode="replace", min_real_fraction=0.1)
    medians = {"base": [], "mixing": []}
    for repeat in range(repeats):
        for arm in ("base", "mixing"):
            model = make_model()
            base = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=max_length)
            collator = base if arm == "base" else MixingCollator(
                base, real_dataset=real, tokenizer=tokenizer, min_real_fraction=0.5, max_length=max_length)
            args = SFTConfig(output_dir=str(workdir / f"{arm}{repeat}"), max_steps=steps + 2,
                             per_device_train_batch_size=batch_size, max_length=max_length, report_to=[],
                             use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, logging_steps=10_000,
                             learning_rate=1e-5, seed=repeat)
            trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                                 data_collator=collator)
            timer = StepTimer()
            trainer.add_callback(timer)
            if arm == "mixing":
                trainer.add_callback(MixingCollatorCallback(collator))
            trainer.train()
            medians[arm].append(statistics.median(timer.times[2:]))  # first steps warm up
    base_s, mixing_s = statistics.median(medians["base"]), statistics.median(medians["mixing"])
    return {"base_step_s": base_s, "mixing_step_s": mixing_s, "overhead": mixing_s / base_s - 1.0,
            "per_repeat_base_s": medians["base"], "per_repeat_mixing_s": medians["mixing"],
            "steps_timed_per_run": steps, "batch_size": batch_size, "max_length": max_length}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smollm2-steps", type=int, default=4)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "mixing.json"))
    args = parser.parse_args()
    import tempfile

    from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer

    results: dict = {"machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                                 "torch": torch.__version__}, "goal": "step-time overhead <= 2%"}
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer()
        real, synthetic = data(tok, 200, 400)
        results["tiny"] = {
            "collator": collator_time(tok, real, synthetic, max_length=128, batch_size=16, repeats=args.repeats),
            "sft_step": step_time(lambda: tiny_causal_lm(tok), tok, real, synthetic, 128, 16, args.steps,
                                  args.repeats, Path(tmp) / "tiny"),
        }
        print(json.dumps(results["tiny"], indent=1))
        if not args.skip_smollm2:
            from collapse_guard.resources import load_smollm2

            model, tok = load_smollm2()
            real, synthetic = data(tok, 100, 200)
            results["smollm2_135m_instruct"] = {
                "collator": collator_time(tok, real, synthetic, max_length=128, batch_size=4, repeats=args.repeats),
                "sft_step": step_time(lambda: load_smollm2()[0], tok, real, synthetic, 128, 4, args.smollm2_steps,
                                      args.repeats, Path(tmp) / "smollm2"),
            }
            print(json.dumps(results["smollm2_135m_instruct"], indent=1))
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
