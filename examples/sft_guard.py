"""sft_plain.py + the guard: a real-data floor in every batch and held-out perplexity watching for collapse.

    python examples/sft_guard.py                      # the offline tiny model, seconds on a CPU
    python examples/sft_guard.py --model path/to/model --max-steps 200

Three added lines (diff against sft_plain.py): a MixingCollator that keeps >= 50% real examples in
every batch, passed as the data collator, and a CollapseGuardCallback that measures held-out human
perplexity (baseline before the first step, then every few steps) and stops training on an alarm.
"""

import argparse

import torch
from datasets import concatenate_datasets
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from collapse_guard import MixingCollator
from collapse_guard.callbacks import CollapseGuardCallback
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
                       use_cpu=not torch.cuda.is_available(), bf16=False)
    collator = MixingCollator(real_dataset=real, tokenizer=tokenizer, min_real_fraction=0.5, max_length=128)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                         data_collator=collator)
    trainer.add_callback(CollapseGuardCallback(heldout, tokenizer, eval_steps=4, collator=collator))
    trainer.train()
    return trainer, heldout


if __name__ == "__main__":
    main()
