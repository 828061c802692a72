"""Sequential measurements on two processes (torchrun, gloo on CPU): a healthy run whose in-training
measurements stop at the first look. Writes OUT/rank{r}.json (the history: scored documents, per-document
sums, estimate, level; and the trained model's first look scored by both processes) and OUT/single.json: the
same first look scored by rank 0 alone after the process group is gone, for the test to compare.
"""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from collapse_guard.callbacks import CollapseGuardCallback, GuardConfig
from collapse_guard.metrics.perplexity import HeldoutPerplexity
from collapse_guard.probe import ProbeConfig
from collapse_guard.testing import human_like_sentences, tiny_causal_lm, tiny_tokenizer

HELDOUT = human_like_sentences(25, seed=99)  # odd count: the ranks score different numbers of windows


def main(out: str) -> None:
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, seed=0)
    train = Dataset.from_dict({"text": human_like_sentences(256, seed=5)})
    train = train.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    guard = CollapseGuardCallback(HELDOUT, probe=ProbeConfig(context_length=64),
                                  config=GuardConfig(eval_steps=2, cost_budget=None))
    args = TrainingArguments(out, max_steps=6, per_device_train_batch_size=8, learning_rate=1e-6,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                             ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tok,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    guard.attach(trainer)
    trainer.train()
    rank = torch.distributed.get_rank()
    look = guard.probe.first_look_documents()
    evaluator = HeldoutPerplexity(HELDOUT, tok, 64, signals=True)
    both = evaluator.compute(model, documents=look)  # the trained model's first look, on both ranks
    keys = ("step", "heldout_doc_index", "heldout_doc_nll", "heldout_doc_tokens", "heldout_ppl", "level")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"world_size": torch.distributed.get_world_size(), "first_look": look,
                   "two_processes": [both.document_nll, both.document_tokens],
                   "history": [{k: e.get(k) for k in keys} for e in guard.history.entries]}, fh)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if rank == 0:  # the same first look, scored by this process alone
        alone = evaluator.compute(model, documents=look)
        with open(os.path.join(out, "single.json"), "w") as fh:
            json.dump([alone.document_nll, alone.document_tokens], fh)


if __name__ == "__main__":
    main(sys.argv[1])
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
