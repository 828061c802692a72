"""Two-process adaptive floor (torchrun, gloo on CPU): both ranks must apply the same floor at the same step.

Writes OUT/rank{r}.json with the floor recorded at each measurement and the collator's floor at every step.
"""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from collapse_guard.callbacks import CollapseGuardCallback, GuardConfig
from collapse_guard.detector import DetectorConfig
from collapse_guard.floor import FloorConfig
from collapse_guard.mixing import MixingCollator, mix_datasets
from collapse_guard.probe import ProbeConfig
from collapse_guard.testing import degenerate_sentences, human_like_sentences, tiny_causal_lm, tiny_tokenizer


class Applied(TrainerCallback):
    def __init__(self, collator):
        self.collator, self.seen = collator, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append([state.global_step, self.collator.min_real_fraction])


def main(out: str) -> None:
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    real = Dataset.from_dict({"text": human_like_sentences(64, seed=1)})
    synthetic = Dataset.from_dict({"text": degenerate_sentences(64)})
    args = SFTConfig(out, max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, max_length=32,
                     ddp_backend="gloo", seed=0)
    trainer = SFTTrainer(model=tiny_causal_lm(tok), args=args, processing_class=tok,
                         train_dataset=mix_datasets(real, synthetic, mode="accumulate",
                                                    min_real_fraction=0.3))
    collator = MixingCollator(real_dataset=real, min_real_fraction=0.1, allow_low_real_fraction=True)
    # a hair-trigger warn: any rise of held-out ppl (all-reduced, so identical on both ranks) raises the floor
    detector = DetectorConfig(ppl_ratio_warn=1.0, ppl_ratio_alarm=50.0, ppl_rises_warn=0,
                              diversity_signals=())
    guard = CollapseGuardCallback(human_like_sentences(9, seed=9), collator=collator,
                                  probe=ProbeConfig(context_length=32), detector=detector,
                                  config=GuardConfig(eval_steps=2, cost_budget=None),
                                  floor=FloorConfig(minimum=0.1, maximum=0.9, decay_after=1)).attach(trainer)
    applied = Applied(collator)
    trainer.add_callback(applied)
    trainer.train()
    rank = torch.distributed.get_rank()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"floors": [[e["step"], e["floor"]] for e in guard.history.entries],
                   "applied": applied.seen}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
    if torch.distributed.is_initialized():
        # A rank that exits while gloo's threads still run can abort ("terminate called without an active
        # exception"), failing the launch after the test's work is done.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
