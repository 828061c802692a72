"""Run under 2 processes: every rank's batches, as fed to the model, must meet the real floor.

accelerate launch --multi_gpu --num_processes 2 tests/scripts/mixing_dist.py OUT_DIR
"""

import json
import math
import sys
from pathlib import Path

import torch.distributed as dist
from trl import SFTConfig, SFTTrainer

from collapse_guard import MixingCollator, MixingCollatorCallback, mix_datasets
from collapse_guard.provenance import REAL, ProvenanceIndex, tokenize_like_sft
from collapse_guard.testing import tiny_causal_lm, tiny_text_datasets, tiny_tokenizer


def main(out_dir: str) -> None:
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok)
    real, synthetic = tiny_text_datasets(40, 120)
    train = mix_datasets(real, synthetic, mode="replace", min_real_fraction=0.1)
    collator = MixingCollator(real_dataset=real, tokenizer=tok, min_real_fraction=0.5, seed=3)
    args = SFTConfig(output_dir=f"{out_dir}/trainer", max_steps=5, per_device_train_batch_size=6, report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, ddp_backend="gloo")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok, data_collator=collator)
    trainer.add_callback(MixingCollatorCallback(collator))
    index = ProvenanceIndex(None)
    index.add_many((tokenize_like_sft(ex, tok)["input_ids"] for ex in real), REAL)
    fed = []

    def hook(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        rows = [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]
        fed.append({"size": len(rows), "real": sum(index.source_of(r) == REAL for r in rows),
                    "real_rows": [r for r in rows if index.source_of(r) == REAL]})

    model.register_forward_pre_hook(hook, with_kwargs=True)
    trainer.train()
    rank, world = dist.get_rank(), dist.get_world_size()
    for batch in fed:
        assert batch["real"] >= math.ceil(0.5 * batch["size"]), batch
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"world": world, "batches": fed}))


if __name__ == "__main__":
    main(sys.argv[1])
