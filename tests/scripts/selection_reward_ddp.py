"""2-process check of RewardModelSelector: every rank returns the same scores as one process would.

Run: torchrun --nproc_per_node 2 tests/scripts/selection_reward_ddp.py OUT_DIR
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from collapse_guard.selection import RewardModelSelector
from collapse_guard.testing import human_like_sentences, tiny_reward_model, tiny_tokenizer


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_reward_model(tok)
    texts = [" ".join(human_like_sentences(1 + i % 4, seed=i)) for i in range(37)]
    selector = RewardModelSelector(model, tok, top_k=5, batch_size=16, forward_batch_size=4)
    kept = selector([{"text": t} for t in texts])
    scores = selector.score({"text": texts})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"scores": scores, "kept": kept["text"][:], "report": selector.report}, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
