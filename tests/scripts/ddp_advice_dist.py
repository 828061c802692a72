"""Run under 2 processes: the README's DDP advice against rows repeated by `even_batches`, applied to a
training set whose shards are uneven (18 rows, 4 a rank per step), with the MixingCollator attached.

accelerate launch --multi_gpu --num_processes 2 tests/scripts/ddp_advice_dist.py \
    OUT '{"dataloader_drop_last":true}'
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from trl import SFTConfig, SFTTrainer

from collapse_guard.mixing import MixingCollator, mix_datasets
from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer


def main(out_dir: str, advice: dict) -> None:
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok)
    real = [f"real {i} the river crossed the valley near the old mill" for i in range(9)]
    synthetic = [f"synthetic {i} the model said the same thing" for i in range(9)]
    pool = [f"pool {i} a walk along the quiet shore at dawn" for i in range(32)]
    train = mix_datasets(real, synthetic, mode="accumulate", min_real_fraction=0.5, seed=1)
    args = SFTConfig(output_dir=f"{out_dir}/trainer", num_train_epochs=1, per_device_train_batch_size=4,
                     max_length=32, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                     disable_tqdm=True, ddp_backend="gloo", **advice)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    MixingCollator(real_dataset=pool, min_real_fraction=0.5, seed=3).attach(trainer)
    fed = []

    def hook(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        fed.extend(tok.decode(ids[i][mask[i].bool()].tolist(), skip_special_tokens=True)
                   for i in range(ids.shape[0]))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    trainer.train()
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(
        json.dumps({"fed": fed, "steps": trainer.state.global_step}))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
    if dist.is_initialized():
        # A rank that exits while gloo's threads still run can abort ("terminate called without an active
        # exception"), failing the launch after the test's work is done.
        dist.barrier()
        dist.destroy_process_group()
