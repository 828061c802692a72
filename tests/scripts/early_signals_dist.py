"""Early-warning signals of held-out perplexity on 2 CPU processes (gloo), for tests/test_early_signals.py.

    torchrun --nproc_per_node 2 --standalone early_signals_dist.py OUT_DIR

Each rank scores a shard of the windows and writes OUT_DIR/rank<k>.json with the all-reduced result.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from ppl_dist import heldout_texts

from collapse_guard.metrics import HeldoutPerplexity
from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok)
    report = {"world_size": dist.get_world_size()}
    for name, stride in (("blocks", None), ("stride", 5)):
        r = HeldoutPerplexity(heldout_texts(), tok, context_length=16, stride=stride, max_batch_tokens=64,
                              signals=True).compute(model)
        report[name] = {"signals": r.signals, "document_sums": r.document_sums,
                        "document_nll": r.document_nll, "document_tokens": r.document_tokens}
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
