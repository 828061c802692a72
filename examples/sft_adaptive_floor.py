"""sft_guard.py + an adaptive floor: the guard raises the real-data share when it sees drift, and lowers it \
back.

    python examples/sft_adaptive_floor.py             # the offline tiny model, seconds on a CPU
    python examples/sft_adaptive_floor.py --model path/to/model --max-steps 200 --learning-rate 2e-5

Against sft_guard.py: the floor starts at the user's minimum (10% real) and the guard moves it with
its verdicts (a warning raises it x1.5, an alarm to the maximum 90% and one more look before any
stop, two healthy measurements lower it x0.8); every decision is logged as collapse/floor with its
reason, to every report_to backend and to the history file (collapse_guard/floor.py).

So that the controller has something to act on in seconds, the tiny-model setting is unstable on
purpose: learning rate 0.2 and a measurement every 2 steps (cost_budget=None: whatever it costs).
The first steps overshoot, held-out perplexity jumps and the guard alarms at step 2: the floor goes
0.10 -> 0.90 and, because the re-measurement is healthy, training goes on; two healthy measurements
later it is lowered (0.72, then 0.58). With a real model use a normal learning rate; the floor then
moves only when the data drift.

Three changed lines (diff against sft_plain.py): the training set is built with mix_datasets (it
records each row's provenance), a CollapseGuardCallback with a MixingCollator is attached to the
trainer (the collator keeps >= 50% real rows in every optimizer step and trains every synthetic row
once per epoch; the guard measures held-out human perplexity before the first step and as often as
3% of training time allows, and stops training on an alarm), and the guard's summary is printed.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback
from trl import SFTConfig, SFTTrainer

from collapse_guard import CollapseGuardCallback, GuardConfig, MixingCollator, mix_datasets
from collapse_guard.floor import FloorConfig
from collapse_guard.testing import human_like_sentences, tiny_causal_lm, tiny_text_datasets, tiny_tokenizer


def load(model_path):
    if model_path is None:
        tokenizer = tiny_tokenizer()
        return tiny_causal_lm(tokenizer), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(model_path), tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a model directory (default: the offline tiny model)")
    parser.add_argument("--output-dir", default="runs/example")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=0.2, help="0.2: unstable on purpose (above)")
    parser.add_argument("--eval-steps", type=int, default=2, help="steps between the guard's measurements")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model)
    real, synthetic = tiny_text_datasets(n_real=64, n_synthetic=64)
    heldout = human_like_sentences(16, seed=123)
    train = mix_datasets(real, synthetic, mode="accumulate", min_real_fraction=0.5, seed=0)
    config = SFTConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=8,
                       learning_rate=args.learning_rate, max_length=128, logging_steps=2, save_strategy="no",
                       report_to=[], use_cpu=not torch.cuda.is_available(), bf16=False,
                       activation_checkpointing=True)  # TRL's default, under transformers' new name
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    for printer in (ProgressCallback, PrinterCallback):  # the bar or, without it, raw log dicts
        trainer.remove_callback(printer)
    collator = MixingCollator(real_dataset=real, min_real_fraction=0.1)
    measure = GuardConfig(eval_steps=args.eval_steps, cost_budget=None)
    guard = CollapseGuardCallback(heldout, collator=collator, floor=FloorConfig(minimum=0.1),
                                  config=measure).attach(trainer)
    result = trainer.train()
    print(f"trained {result.global_step} steps, mean training loss {result.training_loss:.3f}")
    print(guard.summary())
    print("floor decisions: " + "; ".join(f"step {e['step']}: {e['floor_reason']}"
                                          for e in guard.history.entries))
    return trainer, heldout


if __name__ == "__main__":
    main()
