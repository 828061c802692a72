"""Run under 2 processes: the floor per optimizer step on every rank, each synthetic row fed once across
ranks.

accelerate launch --multi_gpu --num_processes 2 tests/scripts/mixing_dist.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from trl import SFTConfig, SFTTrainer

from collapse_guard.mixing import MixingCollator, mix_datasets
from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer


def main(out_dir: str) -> None:
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok)
    real = [f"real {i} the river crossed the valley near the old mill" for i in range(48)]
    synthetic = [f"synthetic {i} the model said the same thing" for i in range(48)]
    # 96 rows = 12 micro-batches of 4 per rank: no row repeated by accelerate's even_batches padding
    train = mix_datasets(real, synthetic, mode="accumulate", min_real_fraction=0.5, seed=1)
    args = SFTConfig(output_dir=f"{out_dir}/trainer", num_train_epochs=1, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, max_length=32, report_to=[], use_cpu=True, bf16=False,
                     save_strategy="no", disable_tqdm=True, ddp_backend="gloo")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    collator = MixingCollator(real_dataset=real, min_real_fraction=0.5, seed=3).attach(trainer)
    fed, top_ups = [], []
    base = collator.base_collator

    def spy(rows):
        top_ups.extend(tok.decode(r["input_ids"]) for r in rows if "real" in tok.decode(r["input_ids"][:2]))
        return base(rows)

    collator.base_collator = spy

    def hook(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        rows = [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]
        fed.append([(tok.decode(r, skip_special_tokens=True), len(r)) for r in rows])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    trainer.train()
    rank = dist.get_rank()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"fed": fed, "top_ups": top_ups,
                                                              "metrics": collator.metrics()}))


if __name__ == "__main__":
    main(sys.argv[1])
    if dist.is_initialized():
        # A rank that exits while gloo's threads still run can abort ("terminate called without an active
        # exception"), failing the launch after the test's work is done.
        dist.barrier()
        dist.destroy_process_group()
