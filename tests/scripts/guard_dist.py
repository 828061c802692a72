"""Two-process CollapseGuardCallback run (torchrun / accelerate launch, gloo on CPU).

Each rank trains on its shard of degenerate data; the guard must stop both at the same step with the
same verdict. Writes OUT/rank{r}.json for the test to compare.
"""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from collapse_guard.callbacks import CollapseGuardCallback, GuardConfig
from collapse_guard.probe import ProbeConfig
from collapse_guard.testing import degenerate_sentences, human_like_sentences, tiny_causal_lm, tiny_tokenizer


def pretrained_model(tok):
    # identical on every rank (same seed, no communication): a baseline that already knows the language
    model = tiny_causal_lm(tok)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    texts = human_like_sentences(1600, seed=7)
    for step in range(100):
        batch = tok(texts[16 * step: 16 * step + 16], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def main(out: str) -> None:
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    model = pretrained_model(tok)
    train = Dataset.from_dict({"text": degenerate_sentences(256)})
    train = train.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    guard = CollapseGuardCallback(
        human_like_sentences(25, seed=99),  # odd count: ranks score different numbers of windows
        prompts=["The river", "A farmer", "The council"],
        probe=ProbeConfig(context_length=64, max_new_tokens=6, prompt_tokens=None),
        config=GuardConfig(eval_steps=5, cost_budget=0.5),  # time-budgeted: rank 0 decides for both
    )
    args = TrainingArguments(out, max_steps=40, per_device_train_batch_size=8, learning_rate=1e-2,
                             lr_scheduler_type="constant", use_cpu=True, report_to=[], logging_steps=5,
                             save_strategy="no", disable_tqdm=True, seed=0, ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tok,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    guard.attach(trainer)
    trainer.train()
    rank = torch.distributed.get_rank()
    verdict = guard.last_verdict
    result = {
        "world_size": torch.distributed.get_world_size(),
        "global_step": trainer.state.global_step,
        "stopped_at": guard.stopped_at,
        "level": verdict.level,
        "reasons": verdict.reasons,
        # the documents each measurement scored (a sequential first look decides alike on both ranks)
        "history": [[e["step"], e["heldout_ppl"], e.get("distinct_1"), e.get("heldout_doc_index")]
                    for e in guard.history.entries],
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1])
    if torch.distributed.is_initialized():
        # A rank that exits while gloo's threads still run can abort ("terminate called without an active
        # exception"), failing the launch after the test's work is done.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
