"""A plain TRL SFT script: fine-tune a causal LM on a mix of human and model-written text.

    python examples/sft_plain.py                      # the offline tiny model, seconds on a CPU
    python examples/sft_plain.py --model path/to/model --max-steps 200

The other examples are this script plus one feature each (diff them against this file):
sft_guard.py (real-data floor + collapse guard), sft_selector.py (selection), sft_magpie.py
(Magpie data), sft_loop.py (the multi-round loop).
"""

import argparse

import torch
from datasets import concatenate_datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback
from trl import SFTConfig, SFTTrainer

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
    parser.add_argument("--max-steps", type=int, default=8)
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model)
    real, synthetic = tiny_text_datasets(n_real=64, n_synthetic=64)
    heldout = human_like_sentences(16, seed=123)
    train = concatenate_datasets([real, synthetic]).shuffle(seed=0)
    config = SFTConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=8,
                       learning_rate=1e-3, max_length=128, logging_steps=2, save_strategy="no", report_to=[],
                       use_cpu=not torch.cuda.is_available(), bf16=False,
                       activation_checkpointing=True)  # TRL's default, under transformers' new name
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    for printer in (ProgressCallback, PrinterCallback):  # the bar or, without it, raw log dicts
        trainer.remove_callback(printer)
    result = trainer.train()
    print(f"trained {result.global_step} steps, mean training loss {result.training_loss:.3f}")
    return trainer, heldout


if __name__ == "__main__":
    main()
