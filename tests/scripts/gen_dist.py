"""Run by tests/test_generation.py under torchrun: every rank generates its shard and writes what it got back.

Usage: torchrun --nproc_per_node 2 tests/scripts/gen_dist.py MODEL_DIR OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from collapse_guard.generation import ContinuationConfig, ContinuationGenerator, MagpieConfig, MagpieGenerator
from collapse_guard.testing import human_like_sentences

MAGPIE = {"instruction_max_new_tokens": 24, "response_max_new_tokens": 24, "batch_size": 2,
          "show_progress": False, "backend": "transformers"}
CONTINUATION = {"prefix_tokens": 4, "max_new_tokens": 6, "batch_size": 2, "decoding": "sample",
                "show_progress": False, "backend": "transformers"}
N_MAGPIE, N_TEXTS, SEED = 6, 5, 3


def run(model_dir: str) -> dict:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    magpie = MagpieGenerator(model, tok, MagpieConfig(**MAGPIE)).generate(N_MAGPIE, seed=SEED)
    cont = ContinuationGenerator(model, tok, ContinuationConfig(**CONTINUATION))
    texts = cont.generate(human_like_sentences(N_TEXTS, seed=5), seed=SEED)
    return {"magpie": magpie.to_list(), "continuation": texts.to_list()}


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    result = run(sys.argv[1])
    rank = torch.distributed.get_rank()
    result["world_size"] = torch.distributed.get_world_size()
    Path(sys.argv[2], f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()
