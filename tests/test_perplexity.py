import copy
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from collapse_guard.metrics import HeldoutPerplexity, document_perplexities, load_metric, perplexity
from collapse_guard.metrics.perplexity import unwrap_causal_lm
from collapse_guard.testing import human_like_sentences

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from ppl_dist import heldout_texts  # noqa: E402


def naive_perplexity(model, tokenizer, texts, context_length, stride=None, sums=None):
    """Independent reference: one window at a time through the model's own loss, weighted by token counts.

    Appends each document's (summed NLL, scored tokens) to `sums` when given.
    """
    nll, n, per_doc = 0.0, 0, []
    with torch.no_grad():
        for ids in tokenizer(texts)["input_ids"]:
            doc_nll, doc_n, prev_end = 0.0, 0, 0
            starts = range(0, len(ids), stride or context_length)
            for begin in starts if len(ids) >= 2 else []:
                end = min(begin + context_length, len(ids))
                labels = list(ids[begin:end])
                if stride is not None:  # HF perplexity guide: only the tokens new to this window are scored
                    for j in range(len(labels) - (end - prev_end)):
                        labels[j] = -100
                scored = sum(label != -100 for label in labels[1:])
                if scored:
                    loss = model(input_ids=torch.tensor([ids[begin:end]]), labels=torch.tensor([labels])).loss
                    doc_nll += loss.item() * scored
                    doc_n += scored
                prev_end = end
                if stride is not None and end == len(ids):
                    break
            per_doc.append(math.exp(doc_nll / doc_n) if doc_n else math.nan)
            if sums is not None:
                sums.append((doc_nll, doc_n))
            nll, n = nll + doc_nll, n + doc_n
    return math.exp(nll / n), n, per_doc


def assert_same_docs(ours, reference, rel=1e-4):
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference, strict=True):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel)


@pytest.mark.parametrize("stride", [None, 5])
def test_matches_naive_token_weighted_loss(tokenizer, tiny_model, stride):
    texts = heldout_texts()
    evaluator = HeldoutPerplexity(texts, tokenizer, context_length=16, stride=stride, max_batch_tokens=64)
    result = evaluator.compute(tiny_model)
    sums = []
    ppl, n, per_doc = naive_perplexity(tiny_model, tokenizer, texts, 16, stride, sums)
    assert result.n_tokens == n
    assert result.perplexity == pytest.approx(ppl, rel=1e-4)
    assert result.nll_sum == pytest.approx(math.log(ppl) * n, rel=1e-4)
    assert result.n_skipped == 1 and math.isnan(result.per_document[-1])
    assert_same_docs(result.per_document, per_doc)
    # per-document sums, for a bootstrap over documents: they add up to the corpus sums
    assert result.document_tokens == [doc_n for _, doc_n in sums]
    assert result.document_nll == pytest.approx([doc_nll for doc_nll, _ in sums], rel=1e-4, abs=1e-6)
    assert sum(result.document_nll) == pytest.approx(result.nll_sum, rel=1e-12)
    assert sum(result.document_tokens) == result.n_tokens


def test_batching_does_not_change_the_result(tokenizer, tiny_model):
    texts = heldout_texts()
    small = HeldoutPerplexity(texts, tokenizer, context_length=16, max_batch_tokens=16).compute(tiny_model)
    large = HeldoutPerplexity(texts, tokenizer, context_length=16, max_batch_tokens=4096).compute(tiny_model)
    assert small.perplexity == pytest.approx(large.perplexity, rel=1e-6)
    assert_same_docs(small.per_document, large.per_document, rel=1e-6)


def _tiny_model(arch: str, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    from collapse_guard.testing import tiny_causal_lm

    torch.manual_seed(0)
    if arch == "gpt2":  # learned absolute positions
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                                          n_positions=64, pad_token_id=tokenizer.pad_token_id))
    if arch == "mistral_sliding_window":  # a window shorter than the documents
        return MistralForCausalLM(MistralConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
            pad_token_id=tokenizer.pad_token_id))
    return tiny_causal_lm(tokenizer)  # rotary positions


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral_sliding_window"])
def test_padded_batches_without_a_padding_mask_score_like_single_documents(tokenizer, arch):
    # The evaluator runs right-padded batches with no padding mask (causal attention keeps every real token
    # away from the pads after it), so attention can take its causal-only kernels. That must hold for rotary,
    # learned absolute and sliding-window attention alike: seen from the model's own forward.
    model = _tiny_model(arch, tokenizer).eval()
    texts = heldout_texts()
    evaluator = HeldoutPerplexity(texts, tokenizer, context_length=16, max_batch_tokens=64)
    evaluator.compute(model)  # the first pass also checks, once, that decoder -> head gives its logits
    seen = []
    decoder = perplexity._decoder_and_head(model)[0]
    decoder.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    result = evaluator.compute(model)
    batches = evaluator._shard_batches(1, 0, torch.device("cpu"))
    assert any(len(set(b.score_mask.sum(1).tolist())) > 1 for b in batches)  # rows of unequal length: padding
    assert len(seen) == len(batches) and all(kwargs.get("attention_mask") is None for kwargs in seen)
    ppl, n, per_doc = naive_perplexity(model, tokenizer, texts, 16)
    assert result.n_tokens == n
    assert result.perplexity == pytest.approx(ppl, rel=1e-5)
    assert_same_docs(result.per_document, per_doc, rel=1e-5)


class _ForwardLooking(torch.nn.Module):
    """A toy LM that is not causal: every position also sees the mean embedding of its whole unmasked row."""

    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        x = self.embed(input_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        row = (x * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
        return SimpleNamespace(logits=self.head(x + row))


def test_a_model_that_attends_forward_gets_a_padding_mask(tokenizer):
    # Without a mask, the pads would leak into such a model's real tokens, silently. The evaluator checks each
    # model once and masks the batches of one that needs it: the same result as one window per forward.
    model = _ForwardLooking(len(tokenizer))
    texts = heldout_texts()
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    batched = HeldoutPerplexity(texts, tokenizer, context_length=16, max_batch_tokens=64)
    result = batched.compute(model)
    batches = batched._shard_batches(1, 0, torch.device("cpu"))
    assert any(len(set(b.lengths.tolist())) > 1 for b in batches)  # rows of unequal length: padding
    assert all(kwargs.get("attention_mask") is not None for kwargs in seen[1:])  # seen[0]: the check itself
    one_window_each = HeldoutPerplexity(texts, tokenizer, context_length=16, max_batch_tokens=16)
    one_window_each = one_window_each.compute(model)
    assert result.perplexity == pytest.approx(one_window_each.perplexity, rel=1e-6)
    assert_same_docs(result.per_document, one_window_each.per_document, rel=1e-6)


def test_small_logits_chunks_and_a_biased_head_give_the_same_result(tokenizer, tiny_model, monkeypatch):
    texts = heldout_texts()
    reference = HeldoutPerplexity(texts, tokenizer, context_length=16).compute(tiny_model)
    # 7-row chunks: every batch spans several chunks of the reused logits buffer, the last one partial
    monkeypatch.setattr(perplexity, "_LOGITS_CHUNK_BYTES", 4 * len(tokenizer) * 7)
    chunked = HeldoutPerplexity(texts, tokenizer, context_length=16).compute(tiny_model)
    assert chunked.perplexity == pytest.approx(reference.perplexity, rel=1e-6)
    # a head that is not a bias-free fp32 Linear takes the allocating path: same numbers
    biased = copy.deepcopy(tiny_model)
    weight = biased.lm_head.weight.detach().clone()
    biased.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    biased.lm_head.weight.data.copy_(weight)
    biased.lm_head.bias.data.zero_()
    assert perplexity._plain_head_weight(biased.lm_head, torch.device("cpu")) is None
    other = HeldoutPerplexity(texts, tokenizer, context_length=16).compute(biased)
    assert other.perplexity == pytest.approx(reference.perplexity, rel=1e-6)
    assert_same_docs(other.per_document, reference.per_document, rel=1e-6)


def test_in_place_cross_entropy_matches_float64():
    torch.manual_seed(0)
    logits = torch.randn(37, 1000) * 8 + 30  # large offsets: the max must be subtracted first
    targets = torch.randint(0, 1000, (37,))
    expected = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none")
    got = perplexity._nll_in_place(logits.clone(), targets)
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("seed", range(20))
def test_batch_cuts_are_optimal_and_within_budget(seed):
    rng = random.Random(seed)
    lengths = sorted((rng.randint(2, 40) for _ in range(rng.randint(1, 9))), reverse=True)
    budget, overhead = rng.randint(40, 120), rng.choice([0, 8, 64])
    cuts = perplexity._cut_sorted(lengths, budget, overhead)
    assert [i for i, _ in cuts] == [0] + [j for _, j in cuts[:-1]] and cuts[-1][1] == len(lengths)
    assert all((j - i) * lengths[i] <= budget for i, j in cuts)

    def cost(parts):
        return sum((j - i) * lengths[i] + overhead for i, j in parts)

    def partitions(start):  # every split of lengths[start:] into contiguous batches within the budget
        if start == len(lengths):
            yield []
        for end in range(start + 1, len(lengths) + 1):
            if (end - start) * lengths[start] <= budget:
                for rest in partitions(end):
                    yield [(start, end), *rest]

    assert cost(cuts) == min(cost(p) for p in partitions(0))


def test_stride_gives_more_context_and_scores_every_token_once(tokenizer, tiny_model):
    texts = heldout_texts()
    blocks = HeldoutPerplexity(texts, tokenizer, context_length=8).compute(tiny_model)
    strided = HeldoutPerplexity(texts, tokenizer, context_length=8, stride=2).compute(tiny_model)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    assert strided.n_tokens == sum(n - 1 for n in lengths if n >= 2)  # each token after the first, once
    assert blocks.n_tokens < strided.n_tokens  # block starts are context only


def test_repeated_compute_is_identical_and_restores_train_mode(tokenizer, tiny_model):
    evaluator = HeldoutPerplexity(heldout_texts(), tokenizer, context_length=16)
    tiny_model.train()
    first, second = evaluator.compute(tiny_model), evaluator.compute(tiny_model)
    assert first == second
    assert tiny_model.training
    tiny_model.eval()
    evaluator.compute(tiny_model)
    assert not tiny_model.training


def test_training_changes_perplexity(tokenizer, tiny_model):
    texts = human_like_sentences(8)
    evaluator = HeldoutPerplexity(texts, tokenizer, context_length=32)
    before = evaluator.compute(tiny_model).perplexity
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(20):
        optimizer.zero_grad()
        tiny_model(**batch, labels=labels).loss.backward()
        optimizer.step()
    assert evaluator.compute(tiny_model).perplexity < before / 2


def test_document_perplexities(tokenizer, tiny_model):
    texts = ["The river crossed the valley at dusk.", "", "A farmer opened the new school after lunch."]
    ppl = document_perplexities(tiny_model, tokenizer, texts, context_length=16)
    _, _, reference = naive_perplexity(tiny_model, tokenizer, texts, 16)
    assert_same_docs(ppl, reference)
    assert math.isnan(ppl[1])
    assert document_perplexities(tiny_model, tokenizer, []) == []
    assert all(math.isnan(p) for p in document_perplexities(tiny_model, tokenizer, ["", ""]))


def test_peft_lora_equals_merged_model(tokenizer, tiny_model):
    peft = pytest.importorskip("peft")
    texts = heldout_texts()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)  # random B: the adapter really changes the outputs
    base_ppl = HeldoutPerplexity(texts, tokenizer, context_length=16).compute(tiny_model).perplexity
    wrapped = peft.get_peft_model(copy.deepcopy(tiny_model), config)
    assert unwrap_causal_lm(wrapped) is wrapped.get_base_model()
    peft_result = HeldoutPerplexity(texts, tokenizer, context_length=16).compute(wrapped)
    merged = copy.deepcopy(wrapped).merge_and_unload()
    merged_result = HeldoutPerplexity(texts, tokenizer, context_length=16).compute(merged)
    assert peft_result.perplexity == pytest.approx(merged_result.perplexity, rel=1e-4)
    assert peft_result.perplexity != pytest.approx(base_ppl, rel=1e-3)


def test_post_processed_logits_fall_back_to_the_full_forward(tokenizer, tiny_model):
    class ScaledLogits(type(tiny_model)):  # like Gemma2 softcapping / Cohere logit_scale: head != logits
        def forward(self, *args, labels=None, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            if labels is not None:
                out.loss = self.loss_function(
                    logits=out.logits, labels=labels, vocab_size=self.config.vocab_size
                )
            return out

    model = ScaledLogits(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    texts = heldout_texts()
    evaluator = HeldoutPerplexity(texts, tokenizer, context_length=16)
    result = evaluator.compute(model)
    assert evaluator._split_ok == {id(model): False}
    assert result.perplexity == pytest.approx(naive_perplexity(model, tokenizer, texts, 16)[0], rel=1e-4)
    HeldoutPerplexity(texts, tokenizer, context_length=16).compute(tiny_model)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"texts": []}, ValueError, "texts is empty"),
        ({"texts": "one text"}, TypeError, "list of strings"),
        ({"texts": ["ok text here", 3]}, TypeError, r"texts\[1\]"),
        ({"texts": ["", ""]}, ValueError, "shorter than 2 tokens"),
        ({"context_length": 1}, ValueError, "context_length"),
        ({"stride": 0}, ValueError, "stride"),
        ({"stride": 64, "context_length": 32}, ValueError, "stride"),
        ({"max_batch_tokens": 8, "context_length": 32}, ValueError, "max_batch_tokens"),
    ],
)
def test_bad_input_is_refused_before_any_work(tokenizer, kwargs, error, match):
    args = {"texts": ["The river crossed the valley."], "tokenizer": tokenizer} | kwargs
    with pytest.raises(error, match=match):
        HeldoutPerplexity(**args)


def test_evaluate_module_matches_the_function(tokenizer, tiny_model, tiny_model_dir):
    texts = heldout_texts()
    direct = HeldoutPerplexity(texts, tokenizer, context_length=16, stride=5).compute(tiny_model)
    metric = load_metric("heldout_perplexity")
    out = metric.compute(
        predictions=texts, model=tiny_model, tokenizer=tokenizer, context_length=16, stride=5
    )
    assert out["perplexity"] == pytest.approx(direct.perplexity, rel=1e-9)
    assert out["n_tokens"] == direct.n_tokens
    by_dir = metric.compute(predictions=texts, model_id=str(tiny_model_dir), context_length=16, stride=5)
    assert by_dir["perplexity"] == pytest.approx(direct.perplexity, rel=1e-5)  # same seed-0 weights, saved


def _launch(tmp_path: Path, mode: str) -> list[dict]:
    script = [str(SCRIPTS / "ppl_dist.py"), str(tmp_path), mode]
    if mode == "ddp":  # the acceptance setting: 2 CPU processes under accelerate
        # the interpreter's own module, not a PATH lookup: CI runs without the venv activated
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               *script]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPTS)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _single_process(tokenizer, tiny_model) -> dict:
    texts = heldout_texts()
    return {
        name: HeldoutPerplexity(
            texts, tokenizer, context_length=16, stride=stride, max_batch_tokens=64
        ).compute(tiny_model)
        for name, stride in (("blocks", None), ("stride", 5))
    }


@pytest.mark.distributed
def test_two_processes_agree_with_each_other_and_with_one_process(tmp_path, tokenizer, tiny_model):
    rank0, rank1 = _launch(tmp_path, "ddp")
    assert rank0 == rank1  # identical on every rank, bit for bit
    assert rank0["world_size"] == 2 and rank0["ddp_training_after"] is True
    for name, single in _single_process(tokenizer, tiny_model).items():
        for variant in ("plain", "ddp"):
            got = rank0[variant][name]
            assert got["n_tokens"] == single.n_tokens
            assert got["perplexity"] == pytest.approx(single.perplexity, rel=1e-4)
            assert_same_docs(got["per_document"], single.per_document)
            assert got["document_tokens"] == single.document_tokens
            assert got["document_nll"] == pytest.approx(single.document_nll, rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_sharded_model_on_two_processes(tmp_path, tokenizer, tiny_model):
    rank0, rank1 = _launch(tmp_path, "fsdp")
    assert rank0 == rank1
    for name, single in _single_process(tokenizer, tiny_model).items():
        assert rank0["fsdp"][name]["perplexity"] == pytest.approx(single.perplexity, rel=1e-4)


@pytest.mark.slow
def test_smollm2_matches_its_own_loss():
    from collapse_guard.resources import human_texts, load_smollm2

    model, tokenizer = load_smollm2()
    texts = human_texts("lee")[:4]
    result = HeldoutPerplexity(texts, tokenizer, context_length=128, stride=64).compute(model)
    ppl, n, per_doc = naive_perplexity(model, tokenizer, texts, 128, 64)
    assert result.n_tokens == n
    assert result.perplexity == pytest.approx(ppl, rel=1e-4)
    assert_same_docs(result.per_document, per_doc)
    assert 2 < result.perplexity < 100  # a real model on real news text
