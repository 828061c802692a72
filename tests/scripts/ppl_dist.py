"""Multi-process held-out perplexity on CPU (gloo).

    accelerate launch --multi_gpu --num_processes 2 ppl_dist.py OUT_DIR ddp  # model prepared by accelerate
    torchrun --nproc_per_node 2 ppl_dist.py OUT_DIR fsdp                     # FSDP2-sharded model

Each rank writes OUT_DIR/rank<k>.json with the blocks and stride results of the plain model and of the
wrapped one; the test compares them across ranks and with one process.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from collapse_guard.metrics import HeldoutPerplexity
from collapse_guard.testing import human_like_sentences, tiny_causal_lm, tiny_tokenizer


def heldout_texts() -> list[str]:
    # Variable lengths (1 to 6 sentences), plus one text too short to score.
    return [" ".join(human_like_sentences(i % 6 + 1, seed=i)) for i in range(23)] + ["a"]


def results(model, texts, tok) -> dict:
    out = {}
    for name, stride in (("blocks", None), ("stride", 5)):
        evaluator = HeldoutPerplexity(texts, tok, context_length=16, stride=stride, max_batch_tokens=64)
        r = evaluator.compute(model)
        out[name] = {"perplexity": r.perplexity, "nll_sum": r.nll_sum, "n_tokens": r.n_tokens,
                     "per_document": r.per_document, "n_skipped": r.n_skipped,
                     "document_nll": r.document_nll, "document_tokens": r.document_tokens}
    return out


def main() -> None:
    out_dir, mode = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ddp"
    accelerator = None
    if mode == "ddp":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok)
    texts = heldout_texts()
    report = {"world_size": dist.get_world_size(), "plain": results(model, texts, tok)}
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        report["fsdp"] = results(model, texts, tok)
    else:
        ddp = accelerator.prepare(model)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel), type(ddp)
        ddp.train()
        report["ddp"] = results(ddp, texts, tok)
        report["ddp_training_after"] = ddp.training
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
