"""sft_plain.py + Magpie: the model writes its own instructions and answers, mixed with real chat data.

    python examples/sft_magpie.py                     # the offline tiny model, seconds on a CPU
    python examples/sft_magpie.py --model path/to/instruct-model --max-steps 200

Changed lines (diff against sft_plain.py): the data is chat (`messages`) and the synthetic half comes
from MagpieGenerator, which derives the pre-query prefix from the tokenizer's chat template. The
random tiny model writes noise, so cleaning is turned off for it; a real instruct model keeps it on.
"""

import argparse

import torch
from datasets import concatenate_datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback
from trl import SFTConfig, SFTTrainer

from collapse_guard.generation import MagpieConfig, MagpieGenerator
from collapse_guard.testing import human_like_sentences, tiny_causal_lm, tiny_chat_datasets, tiny_tokenizer


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
    real = tiny_chat_datasets(n_real=64)[0]
    magpie = MagpieConfig(instruction_max_new_tokens=24, response_max_new_tokens=48,
                          clean=args.model is not None)
    generator = MagpieGenerator(model, tokenizer, magpie)
    synthetic = generator.generate(32, seed=0).select_columns(["messages"])
    print(f"magpie: {len(synthetic)} conversations kept of {generator.stats.get('attempted', '?')} "
          f"attempted; dropped: {generator.stats.get('dropped', {})}")
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
