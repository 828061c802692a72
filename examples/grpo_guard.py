"""TRL's GRPO quickstart + the guard: the diversity of the policy's own completions, and a stop when it \
collapses.

    python examples/grpo_guard.py                     # the offline tiny model, a minute on a CPU
    python examples/grpo_guard.py --reward noise      # the control: nothing to hack, no policy alarm

TRL's quickstart trains a policy with GRPOTrainer on prompts and a reward function. Two added lines
attach the guard: at every logging step it reads the completions the trainer already generated
(no extra generation), measures their distinct-n, unigram entropy and self-BLEU and TRL's token
entropy against the first step, and stops training on an alarm (collapse_guard/policy.py). The
default reward here is easy to hack (it pays for one letter), so the policy collapses onto a few
tokens within ~20 steps and the guard stops it; `--reward noise` has no shortcut to exploit. Both
verdicts are printed: the policy's, and the held-out guard's (human-text perplexity before and after).
"""

import argparse
import random
import warnings
import zlib

import torch
from datasets import Dataset
from transformers import PrinterCallback, ProgressCallback
from trl import GRPOConfig, GRPOTrainer

from collapse_guard import CollapseGuardCallback
from collapse_guard.testing import human_like_sentences, tiny_causal_lm, tiny_tokenizer


def letter_e(completions, **kwargs):  # hackable: repeating one token full of e's pays
    return [c.count("e") / max(len(c), 1) for c in completions]


def noise(completions, **kwargs):  # crc32, not hash(): the same reward in every process
    return [random.Random(zlib.crc32(c.encode())).random() for c in completions]


# GRPOTrainer itself (TRL 1.16) toggles checkpointing around generation through the old names, which
# transformers 5 deprecates; nothing this script passes causes it.
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated",
                        category=FutureWarning)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reward", choices=["letter_e", "noise"], default="letter_e")
    parser.add_argument("--output-dir", default="runs/example_grpo")
    parser.add_argument("--max-steps", type=int, default=30)
    args = parser.parse_args(argv)

    tokenizer = tiny_tokenizer()
    prompts = Dataset.from_dict({"prompt": [" ".join(s.split()[:3])
                                            for s in human_like_sentences(64, seed=3)]})
    config = GRPOConfig(output_dir=args.output_dir, per_device_train_batch_size=16, num_generations=8,
                        max_completion_length=12, learning_rate=1.5e-2, lr_scheduler_type="constant",
                        max_steps=args.max_steps, logging_steps=1, report_to=[], beta=0.0, save_strategy="no",
                        use_cpu=not torch.cuda.is_available(), bf16=False,
                        activation_checkpointing=True)  # TRL's default, under transformers' new name
    trainer = GRPOTrainer(model=tiny_causal_lm(tokenizer),
                          reward_funcs={"letter_e": letter_e, "noise": noise}[args.reward], args=config,
                          train_dataset=prompts, processing_class=tokenizer)
    for printer in (ProgressCallback, PrinterCallback):  # the bar or, without it, raw log dicts
        trainer.remove_callback(printer)
    guard = CollapseGuardCallback(human_like_sentences(16, seed=99)).attach(trainer)
    trainer.train()
    print(f"trained {trainer.state.global_step} of {args.max_steps} steps")
    print(f"policy verdict (the policy's own completions): {guard.policy_verdict}")
    print(f"held-out verdict (human-text perplexity): {guard.last_verdict}")
    return trainer, guard


if __name__ == "__main__":
    main()
