"""Held-out perplexity: exp(sum NLL / sum predicted tokens) over a fixed set of human documents.

The evaluator tokenizes once, cuts every document into windows at a fixed context (non-overlapping blocks,
or sliding windows with a stride where only the new tokens of each window are scored, as in the
Hugging Face perplexity guide), sorts the windows by length and cuts the sorted list into batches of at
most `max_batch_tokens` padded tokens where padding plus a per-forward cost is smallest (an exact dynamic
program). The model's decoder runs once per batch; the output head and the cross-entropy then run over
chunks of the scored positions only, into one reused logits buffer, so the full [B, L, V] fp32 logits are
never built. Under `torch.distributed` every rank scores a shard of the windows and the per-document sums
are all-reduced in float64, so every rank returns the identical result.

With `signals=True` the same pass also gives the early-warning signals of `SIGNAL_NAMES` (the guard's
`Probe` turns them on): the predictive entropy and top-1 mass of every scored position, the NLL of the
rarest held-out tokens, the worst decile of documents and the share of tokens below probability 1e-4. They
come from the logits chunks the cross-entropy already builds (one more exp and multiply-add over each, in
cache-sized blocks, for the entropy; the perplexity stays identical to the bit), are summed per document in
float64 and all-reduced with the NLL sums.

Example:

```python
>>> from collapse_guard.testing import tiny_tokenizer, tiny_causal_lm, human_like_sentences
>>> tok = tiny_tokenizer()
>>> evaluator = HeldoutPerplexity(human_like_sentences(8), tok, context_length=64)
>>> result = evaluator.compute(tiny_causal_lm(tok))
>>> len(result.per_document), result.n_tokens > 0
(8, True)

```
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from collapse_guard.data import check_tokenizer_fits, require_tokenizer, tokenizer_facts
from collapse_guard.distributed import all_reduce_max, all_reduce_sum, rank_world

logger = logging.getLogger(__name__)

# Bytes of the fp32 logits buffer the head writes into, one chunk of scored positions at a time: one
# buffer for the whole pass, so its size costs memory once; 128 MiB (682 rows of a 49k vocabulary) keeps
# the head matmul near the speed of the decoder's (341 rows: -10% on CPU).
_LOGITS_CHUNK_BYTES = 128 << 20
# The fixed cost of one forward pass, in padded-token equivalents, that batching trades against padding.
# CPU: streaming the weights once (SmolLM2-135M, fp32: a 8-token forward costs as much as ~50 tokens of a
# large batch). Accelerators: kernel launches; a guess, not measured here.
_FORWARD_COST_TOKENS = {"cpu": 64}
_ACCELERATOR_FORWARD_COST_TOKENS = 1024
# On CPU a batch larger than this runs no faster per token (its activations leave the cache) and only
# takes memory, so `max_batch_tokens` is capped there.
_CPU_BATCH_TOKENS = 2048

# The early-warning signals (`signals=True`), in the order of `PerplexityResult.signals`.
SIGNAL_NAMES = ("heldout_entropy", "heldout_top1_mass", "heldout_tail_nll", "heldout_worst_decile_nll",
                "heldout_low_prob_share")
# A human token the model gives less than this probability counts toward `heldout_low_prob_share`.
LOW_PROBABILITY = 1e-4
# The rarest held-out tokens, ranked by their type's unigram count, that make up at least this share of the
# held-out tokens are the "tail" of `heldout_tail_nll`.
TAIL_SHARE = 0.10
# `heldout_worst_decile_nll`: the NLL of this share of the scored documents, those with the highest mean NLL.
WORST_DOCUMENT_SHARE = 0.10
# Scratch rows of exp(logits) for the entropy (`_scores_in_place`): small enough to stay in cache.
_SCRATCH_BYTES = 1 << 20
# Per-document float64 sums behind the signals, after the NLL and token counts (`document_sums` keys).
_SUM_NAMES = ("entropy", "top1_mass", "low_prob_tokens", "tail_nll", "tail_tokens")


@dataclass
class PerplexityResult:
    """Corpus and per-document perplexity; identical on every rank."""

    perplexity: float = field(metadata={"help": "exp(nll_sum / n_tokens)."})
    nll_sum: float = field(metadata={"help": "Summed token negative log-likelihood (nats), all-reduced."})
    n_tokens: int = field(metadata={"help": "Number of predicted (scored) tokens, all-reduced across ranks."})
    per_document: list[float] = field(
        metadata={"help": "Perplexity of each document in input order; NaN for documents under 2 tokens."}
    )
    n_skipped: int = field(default=0, metadata={"help": "Documents under 2 tokens (nothing to predict)."})
    document_nll: list[float] = field(
        default_factory=list,
        metadata={"help": "Summed NLL (nats) of each document in input order, all-reduced; 0 if unscored."},
    )
    document_tokens: list[int] = field(
        default_factory=list, metadata={"help": "Scored tokens of each document in input order, all-reduced."}
    )
    diverged: str | None = field(
        default=None,
        metadata={"help": "Why the perplexity is not finite, in words starting 'model diverged: ' (NaN/inf "
                          "logits, or a mean NLL too large to exponentiate); None when it is finite."},
    )
    signals: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "The early-warning signals (`SIGNAL_NAMES`; empty unless the evaluator was built "
                          "with signals=True): heldout_entropy (mean predictive entropy, nats per token), "
                          "heldout_top1_mass (mean probability of the most likely token), heldout_tail_nll "
                          "(mean NLL of the rarest held-out tokens), heldout_worst_decile_nll (mean NLL of "
                          "the 10% of documents with the highest NLL) and heldout_low_prob_share (share of "
                          "tokens given probability < 1e-4). Token means are sums over all scored tokens "
                          "divided by their count, all-reduced; NaN when nothing was scored or the model "
                          "diverged (NaN logits)."},
    )
    document_sums: dict[str, list[float]] = field(
        default_factory=dict,
        metadata={"help": "Per-document float64 sums behind `signals`, in input order, all-reduced: entropy, "
                          "top1_mass, low_prob_tokens, tail_nll, tail_tokens (empty without signals=True)."},
    )
    sums: torch.Tensor | None = field(
        default=None, repr=False, compare=False,
        metadata={"help": "The all-reduced float64 sums everything above is divided from ([nll, tokens, "
                          "signal sums...] x documents): what `HeldoutPerplexity.combine` adds."},
    )

    @property
    def finite(self) -> bool:
        """Whether the corpus perplexity is a finite number (False: the model diverged, see `diverged`)."""
        return math.isfinite(self.perplexity)


@dataclass(frozen=True)
class _Window:
    doc: int  # index of the document in the input list
    start: int  # first token of the window in the document
    end: int  # one past the last token
    score_from: int  # first window position whose token is scored (>= 1: position 0 has no context)


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, L], right padded
    lengths: torch.Tensor  # [B] real tokens of each row: the padding mask, when the model needs one
    score_mask: torch.Tensor  # [B, L - 1]: hidden state at p predicts token p + 1
    targets: torch.Tensor  # [N] token ids of the scored positions, in score_mask order
    doc_index: torch.Tensor  # [N] document of each scored position


class HeldoutPerplexity:
    """Perplexity of a model on a fixed held-out set, at a fixed context, identical across rounds.

    Args:
        texts: the held-out documents (human text). Fixed for the lifetime of the evaluator.
        tokenizer: tokenizer of the models to evaluate; used once, here.
        context_length: tokens per window. Without `stride`, documents are cut into non-overlapping blocks
            of this length (the first token of each block is context only).
        stride: when set, sliding windows of `context_length` advance by `stride` tokens and only the tokens
            new to each window are scored, so every token after the first sees up to `context_length - stride`
            tokens of context. Must be in [1, context_length].
        max_batch_tokens: most padded tokens (batch size x longest window) per forward pass; on CPU at most
            max(2048, context_length) are used, as larger batches are no faster there.
        signals: also compute the early-warning signals (`PerplexityResult.signals`) in the same pass; costs
            one more exp and multiply-add over each logits chunk (benchmarks/early_signals.py).

    Example:

    ```python
    >>> from collapse_guard.testing import tiny_tokenizer, tiny_causal_lm
    >>> tok = tiny_tokenizer()
    >>> texts = ["The river crossed the valley at dusk."] * 3
    >>> ppl = HeldoutPerplexity(texts, tok, context_length=4, stride=2)
    >>> ppl.compute(tiny_causal_lm(tok)).perplexity > 1
    True

    ```
    """

    def __init__(
        self,
        texts: list[str],
        tokenizer,
        context_length: int = 512,
        stride: int | None = None,
        max_batch_tokens: int = 16384,
        *,
        allow_empty: bool = False,
        signals: bool = False,
    ) -> None:
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(
                f"texts must be a list of strings, got {type(texts).__name__}; wrap a single text in a list."
            )
        if not texts and not allow_empty:
            raise ValueError("texts is empty: pass at least one held-out document (a list of strings).")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"texts[{bad}] is {type(texts[bad]).__name__}, expected str.")
        if context_length < 2:
            raise ValueError(
                f"context_length must be >= 2 (one context token + one predicted), got {context_length}."
            )
        if stride is not None and not 1 <= stride <= context_length:
            raise ValueError(
                f"stride must be in [1, context_length={context_length}] or None for blocks, got {stride}."
            )
        if max_batch_tokens < context_length:
            raise ValueError(
                f"max_batch_tokens={max_batch_tokens} is smaller than context_length={context_length}; "
                "raise max_batch_tokens to at least one window."
            )
        require_tokenizer(tokenizer, "HeldoutPerplexity")
        if not isinstance(signals, bool):
            raise TypeError(f"signals must be True or False, got {signals!r}.")
        self.context_length = context_length
        self.stride = stride
        self.signals = signals
        self.max_batch_tokens = max_batch_tokens
        self.pad_token_id = _pad_id(tokenizer)
        encoded = tokenizer(list(texts), verbose=False)["input_ids"] if texts else []
        self.token_ids: list[list[int]] = [list(ids) for ids in encoded]
        # compared with each model once (`compute`): another model's tokenizer scores nonsense, silently
        self._tokenizer_facts = tokenizer_facts(tokenizer, max((max(ids) for ids in self.token_ids if ids),
                                                               default=None))
        self._fits_checked: set[int] = set()
        self.windows = [w for doc, ids in enumerate(self.token_ids) for w in self._windows(doc, len(ids))]
        # Longest first: batches hold windows of similar length, so padding stays small.
        self.windows.sort(key=lambda w: (-(w.end - w.start), w.doc, w.start))
        self.n_documents = len(self.token_ids)
        self.n_skipped = sum(len(ids) < 2 for ids in self.token_ids)
        if texts and self.n_skipped == len(texts) and not allow_empty:
            raise ValueError(
                f"all {len(texts)} documents are shorter than 2 tokens: nothing to predict; pass longer ones."
            )
        # Fixed here, from the held-out set itself, so every measurement scores the same tail tokens.
        self.tail_tokens = _tail_lookup(self.token_ids, TAIL_SHARE)
        self._batches: dict[tuple[int, int, str, frozenset[int] | None], list[_Batch]] = {}
        self._split_ok: dict[int, bool] = {}
        self._needs_mask: dict[int, bool] = {}

    def _windows(self, doc: int, n: int) -> list[_Window]:
        if n < 2:
            return []
        size = self.context_length
        if self.stride is None:
            # A trailing 1-token block predicts nothing (its token would need the previous block as context).
            starts = [s for s in range(0, n, size) if min(s + size, n) - s >= 2]
            return [_Window(doc, s, min(s + size, n), 1) for s in starts]
        windows, prev_end = [], 0
        for begin in range(0, n, self.stride):
            end = min(begin + size, n)
            windows.append(_Window(doc, begin, end, max(prev_end - begin, 1)))
            prev_end = end
            if end == n:
                break
        return windows

    def compute(self, model, documents: Sequence[int] | None = None) -> PerplexityResult:
        """Scores the held-out set with `model` (plain, PEFT, DDP/FSDP/DeepSpeed); keeps its train mode.

        `documents`: score only these (indices into `texts`, the same on every rank); the others keep 0 NLL
        and 0 tokens in the per-document lists. Results of disjoint subsets add up exactly (`combine`), so a
        measurement can score part of the set, look, and score the rest only when it needs to.
        """
        if id(model) not in self._fits_checked:
            check_tokenizer_fits(self._tokenizer_facts, model, "HeldoutPerplexity")
            self._fits_checked.add(id(model))
        rank, world = rank_world()
        if world > 1:
            _check_same_documents(self.n_documents, _comm_device(model))
        chosen = None if documents is None else frozenset(self._check_documents(documents))
        nll, count, *extra = self._local_sums(model, world, rank, sync_steps=world > 1 and _is_sharded(model),
                                              documents=chosen)
        sums = torch.cat([nll, count, *extra])
        if world > 1:
            # one collective for everything: [nll, count, extra sums...], each n_documents long
            sums = all_reduce_sum(sums.to(_comm_device(model))).cpu()
        return self._finish(model, sums, world)

    def combine(self, model, first: PerplexityResult, second: PerplexityResult) -> PerplexityResult:
        """The result of scoring both parts' documents (disjoint `compute(documents=...)` calls of this
        evaluator): sums added, then divided, as if scored in one pass. Collective like `compute`."""
        if first.sums is None or second.sums is None:
            raise ValueError("combine takes results of this evaluator's compute(), which carry their sums.")
        overlap = [d for d, (a, b) in enumerate(zip(first.document_tokens, second.document_tokens,
                                                    strict=True)) if a and b]
        if overlap:
            raise ValueError(f"combine: documents {overlap[:5]} were scored in both parts; pass disjoint "
                             "ones.")
        return self._finish(model, first.sums + second.sums, rank_world()[1])

    def _check_documents(self, documents: Sequence[int]) -> list[int]:
        chosen = list(documents)
        bad = [d for d in chosen
               if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < self.n_documents]
        if bad or not chosen:
            raise ValueError(f"documents must be indices in [0, {self.n_documents}), got {chosen[:8]!r}.")
        return chosen

    def _finish(self, model, sums: torch.Tensor, world: int) -> PerplexityResult:
        nll, count, *extra = sums.split(self.n_documents)
        result = _result(nll, count, self.n_skipped)
        result.sums = sums
        if extra:
            _add_signals(result, torch.stack(extra))
        if not result.finite and result.n_tokens:
            # Every rank holds the same all-reduced sums, so all take this branch (a collective is safe).
            result.diverged = _divergence_reason(model, result, world)
        return result

    def _local_sums(self, model, world: int, rank: int, sync_steps: bool, signals: bool | None = None,
                    documents: frozenset[int] | None = None) -> tuple[torch.Tensor, ...]:
        """Per-document (nll, scored tokens, *signal sums) for this rank's shard of `documents` (None: all),
        float64 on CPU; the signal sums (`_SUM_NAMES` order) only when `signals` (default: the evaluator's
        setting)."""
        signals = self.signals if signals is None else signals
        inner = unwrap_causal_lm(model)
        device = _input_device(inner)
        nll = torch.zeros(self.n_documents, dtype=torch.float64, device=_acc_device(device))
        count = torch.zeros(self.n_documents, dtype=torch.float64, device=nll.device)
        extra = torch.zeros((len(_SUM_NAMES), self.n_documents) if signals else (0, 0), dtype=torch.float64,
                            device=nll.device)
        tail = self.tail_tokens.to(nll.device)
        batches = self._shard_batches(world, rank, device, documents)
        # Sharded models (FSDP) gather parameters collectively inside forward: every rank must run the same
        # number of forwards, so ranks with fewer batches run throwaway ones.
        n_steps = len(batches)
        if sync_steps:
            n_steps = max(len(self._shard_batches(world, r, device, documents)) for r in range(world))
        split = not sync_steps and self._can_split(inner, device)
        masked = self._padding_needs_mask(inner if split else model, device)
        logits = _logits_buffer(inner, batches, device) if split else None
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for step in range(n_steps):
                    spare = batches or self._shard_batches(1, 0, device)
                    batch = batches[step] if step < len(batches) else spare[0]
                    if split:
                        scores = _score_split(inner, batch, device, logits, masked, signals)
                    else:
                        scores = _score_full(model, batch, device, masked, signals)
                    if step < len(batches):
                        doc_index = batch.doc_index.to(nll.device)
                        batch_nll = scores[0].to(nll.device, torch.float64)
                        nll.index_add_(0, doc_index, batch_nll)
                        count.index_add_(0, doc_index, torch.ones_like(doc_index, dtype=torch.float64))
                        if signals:
                            extra.index_add_(1, doc_index, _token_signals(scores, batch_nll,
                                                                          tail[batch.targets.to(nll.device)]))
        finally:
            model.train(was_training)
        return nll.cpu(), count.cpu(), *extra.cpu()

    def _shard_batches(self, world: int, rank: int, device: torch.device,
                       documents: frozenset[int] | None = None) -> list[_Batch]:
        key = (world, rank, device.type, documents)
        if key not in self._batches:
            windows = self.windows if documents is None else [w for w in self.windows if w.doc in documents]
            # Round-robin over length-sorted windows: every rank gets the same mix of long and short windows.
            self._batches[key] = self._pack(windows[rank::world], device) if windows[rank::world] else []
        return self._batches[key]

    def _pack(self, windows: list[_Window], device: torch.device) -> list[_Batch]:
        budget = self.max_batch_tokens
        if device.type == "cpu":
            budget = min(budget, max(_CPU_BATCH_TOKENS, self.context_length))
        overhead = _FORWARD_COST_TOKENS.get(device.type, _ACCELERATOR_FORWARD_COST_TOKENS)
        lengths = [w.end - w.start for w in windows]
        return [self._collate(windows[i:j]) for i, j in _cut_sorted(lengths, budget, overhead)]

    def _collate(self, windows: list[_Window]) -> _Batch:
        length = max(w.end - w.start for w in windows)
        input_ids = torch.full((len(windows), length), self.pad_token_id, dtype=torch.long)
        score_mask = torch.zeros((len(windows), length - 1), dtype=torch.bool)
        docs = torch.empty(len(windows), dtype=torch.long)
        lengths = torch.tensor([w.end - w.start for w in windows], dtype=torch.long)
        for row, w in enumerate(windows):
            n = w.end - w.start
            input_ids[row, :n] = torch.tensor(self.token_ids[w.doc][w.start : w.end])
            score_mask[row, w.score_from - 1 : n - 1] = True
            docs[row] = w.doc
        targets = input_ids[:, 1:][score_mask]
        doc_index = docs[:, None].expand_as(score_mask)[score_mask]
        return _Batch(input_ids, lengths, score_mask, targets, doc_index)

    def _padding_needs_mask(self, model, device: torch.device) -> bool:
        """Whether the pads after a row's real tokens change their logits when no padding mask is given.

        Not for a causal LM: a real token attends only to the tokens before it, so batches run maskless
        (see `_forward_inputs`). A model that also attends forward (bidirectional attention) would be scored
        wrongly, and silently, so this is checked once per model: one forward of two rows that share 5 real
        tokens and differ only in what follows them. Causal models give the same logits to the bit, fp32 or
        bf16; a bidirectional one differs by ~3% of the logits' scale.
        """
        if id(model) not in self._needs_mask:
            real = [i % 7 + 3 for i in range(5)]
            ids = torch.tensor([real + [self.pad_token_id] * 3, real + [(self.pad_token_id + 1) % 7 + 3] * 3],
                               device=device)
            was_training = model.training
            model.eval()
            try:
                with torch.inference_mode():
                    logits = model(input_ids=ids, use_cache=False).logits[:, :5].float()
            finally:
                model.train(was_training)
            finite = torch.isfinite(logits)
            if torch.isnan(logits).any() or torch.isposinf(logits).any():
                # A diverged model (NaN weights, overflowed activations): nothing to compare, and its
                # perplexity is not finite with or without a mask. Not cached: ask again when it is healthy.
                return False
            # -inf logits (tokens a model rules out) are fine where both rows rule out the same tokens
            scale = float(logits[finite].abs().max()) if finite.any() else 0.0
            needs = not (torch.equal(finite[0], finite[1]) and torch.allclose(
                logits[0][finite[0]], logits[1][finite[1]], rtol=0.0, atol=1e-4 * max(scale, 1e-6)))
            if needs:
                logger.info("HeldoutPerplexity: padding changes this model's logits (it attends forward); "
                            "batches carry a padding mask.")
            self._needs_mask[id(model)] = needs
        return self._needs_mask[id(model)]

    def _can_split(self, inner, device: torch.device) -> bool:
        """Whether decoder -> head reproduces the model's own logits (no softcapping, scaling, ...)."""
        if id(inner) not in self._split_ok:
            parts = _decoder_and_head(inner)
            ok = False
            if parts is not None:
                ids = torch.tensor([[i % 7 + 3 for i in range(8)]], device=device)
                was_training = inner.training
                inner.eval()
                try:
                    with torch.inference_mode():
                        full = inner(input_ids=ids, use_cache=False).logits.float()
                        hidden = parts[0](input_ids=ids, use_cache=False)[0]
                        split = parts[1](hidden).float()
                    ok = full.shape == split.shape and torch.allclose(full, split, rtol=1e-4, atol=1e-4)
                    if not ok and full.shape == split.shape and not torch.isfinite(full).all():
                        # a diverged model: undecidable, so score it with the model's own forward this once
                        return False
                except (TypeError, AttributeError, RuntimeError, ValueError):
                    ok = False
                finally:
                    inner.train(was_training)
            self._split_ok[id(inner)] = ok
        return self._split_ok[id(inner)]


def document_perplexities(
    model, tokenizer, texts: list[str], context_length: int = 512, max_batch_tokens: int = 16384
) -> list[float]:
    """Perplexity of each text on this process only (no all-reduce); NaN for texts shorter than 2 tokens.

    Example:

    ```python
    >>> from collapse_guard.testing import tiny_tokenizer, tiny_causal_lm
    >>> tok = tiny_tokenizer()
    >>> ppl = document_perplexities(tiny_causal_lm(tok), tok, ["The river crossed the valley.", ""])
    >>> ppl[0] > 1, math.isnan(ppl[1])
    (True, True)

    ```
    """
    evaluator = HeldoutPerplexity(texts, tokenizer, context_length, None, max_batch_tokens, allow_empty=True)
    if not evaluator.windows:
        return [math.nan] * len(texts)
    # this process only (no all-reduce), and no early-warning signals: the NLL is all it returns
    nll, count = evaluator._local_sums(model, 1, 0, sync_steps=False, signals=False)
    return _result(nll, count, evaluator.n_skipped).per_document


def unwrap_causal_lm(model):
    """The causal LM inside DDP / FSDP / DeepSpeed / torch.compile / PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, FSDP1, DeepSpeed
            model = model.module
        elif callable(getattr(model, "get_base_model", None)):  # PEFT: LoRA layers stay inside
            model = model.get_base_model()
    return model


def _decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if decoder is None or decoder is model:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(head, torch.nn.Module) or not isinstance(decoder, torch.nn.Module) or decoder is model:
        return None
    return decoder, head


def _cut_sorted(lengths: list[int], budget: int, overhead: int) -> list[tuple[int, int]]:
    """Cuts windows sorted longest first into batches [i, j) of at most `budget` padded tokens.

    Minimises the padded tokens plus `overhead` per batch exactly: best[j] = min over i of
    best[i] + (j - i) * lengths[i] + overhead, where lengths[i] is the longest window of batch [i, j).
    A batch that may start at i must satisfy (j - i) * lengths[i] <= budget, so the first allowed start
    only moves forward as j grows.
    """
    n = len(lengths)
    length = np.asarray(lengths, dtype=np.int64)
    best = np.zeros(n + 1, dtype=np.float64)
    start = np.zeros(n + 1, dtype=np.int64)
    first = 0
    for j in range(1, n + 1):
        while (j - first) * length[first] > budget:
            first += 1
        i = np.arange(first, j)
        cost = best[first:j] + (j - i) * length[first:j] + overhead
        k = int(np.argmin(cost))
        best[j], start[j] = cost[k], first + k
    cuts, j = [], n
    while j > 0:
        cuts.append((int(start[j]), j))
        j = int(start[j])
    return cuts[::-1]


def _logits_buffer(inner, batches: list[_Batch], device: torch.device) -> torch.Tensor | None:
    """One fp32 [rows, vocab] buffer for every head chunk of a pass; None when the head is not a plain matmul.

    Reusing it matters on CPU: a fresh 64+ MiB tensor per chunk is a fresh mmap whose page faults cost as
    much as the log-softmax over it.
    """
    head = _decoder_and_head(inner)[1]
    weight = _plain_head_weight(head, device)
    if weight is None or not batches:
        return None
    rows = min(max(1, _LOGITS_CHUNK_BYTES // (4 * weight.shape[0])), max(len(b.targets) for b in batches))
    return torch.empty((rows, weight.shape[0]), dtype=torch.float32, device=device)


def _score_split(
    inner, batch: _Batch, device: torch.device, logits: torch.Tensor | None, masked: bool, signals: bool
) -> tuple[torch.Tensor, ...]:
    """(nll,) of each scored position, plus (entropy, top-1 probability) with `signals`."""
    decoder, head = _decoder_and_head(inner)
    hidden = decoder(**_forward_inputs(batch, device, masked))[0]
    selected = hidden[:, :-1][batch.score_mask.to(device)]  # [N, H]: only positions that predict a real token
    del hidden
    targets = batch.targets.to(device)
    weight = _plain_head_weight(head, device) if selected.dtype == torch.float32 else None
    if logits is None or weight is None:
        chunk = max(1, _LOGITS_CHUNK_BYTES // (4 * _vocab(head)))
        parts = [_scores_in_place(head(selected[s : s + chunk]).float(), targets[s : s + chunk], signals)
                 for s in range(0, selected.shape[0], chunk)]
        if not parts:
            return tuple(torch.zeros(0, device=device) for _ in range(3 if signals else 1))
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))
    scores = torch.empty((3 if signals else 1, selected.shape[0]), dtype=torch.float32, device=device)
    chunk = logits.shape[0]
    for s in range(0, selected.shape[0], chunk):
        rows = selected[s : s + chunk]
        out = torch.mm(rows, weight.t(), out=logits[: rows.shape[0]])
        for k, value in enumerate(_scores_in_place(out, targets[s : s + chunk], signals)):
            scores[k, s : s + rows.shape[0]] = value
    return tuple(scores)


def _score_full(model, batch: _Batch, device: torch.device, masked: bool,
                signals: bool = False) -> tuple[torch.Tensor, ...]:
    # Fallback for sharded models and heads that post-process logits: the model builds the logits itself.
    logits = model(**_forward_inputs(batch, device, masked)).logits
    selected = logits[:, :-1][batch.score_mask.to(logits.device)].float()  # boolean indexing copies
    return _scores_in_place(selected, batch.targets.to(logits.device), signals)


def _forward_inputs(batch: _Batch, device: torch.device, masked: bool) -> dict:
    """The forward's inputs: token ids, and a padding mask only for a model that needs one.

    Rows are right padded. In a causal LM a real token attends only to positions before it, all real, at the
    same position ids as unpadded: its hidden state is the same with or without a padding mask, and pad
    positions are never scored (tests: rotary, learned absolute and sliding-window attention). Without the
    mask, attention may run causal-only (SDPA `is_causal`, the flash kernels on GPU, which take no arbitrary
    mask) and no [B, 1, L, L] mask is built: 1-2% of a warm pass on CPU, results identical to every digit
    (SmolLM2, lee40 / wiki48); the GPU gain is not measured here. `masked`: see `_padding_needs_mask`.
    """
    inputs = {"input_ids": batch.input_ids.to(device), "use_cache": False}
    if masked:
        positions = torch.arange(batch.input_ids.shape[1])
        inputs["attention_mask"] = (positions[None, :] < batch.lengths[:, None]).long().to(device)
    return inputs


def _nll_in_place(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row, overwriting `logits` instead of allocating a second [N, V] tensor.

    logsumexp(x) - x[target] with the max subtracted first; in fp32 it is closer to a float64 reference
    than `F.cross_entropy` on CPU (mean error 5e-8 vs -8e-6 nats/token on SmolLM2 logits).
    """
    target_logit = logits.gather(1, targets[:, None])[:, 0]
    top = logits.amax(1, keepdim=True)
    total = logits.sub_(top).exp_().sum(1)
    return total.log_().add_(top[:, 0]).sub_(target_logit)


def _scores_in_place(logits: torch.Tensor, targets: torch.Tensor, signals: bool) -> tuple[torch.Tensor, ...]:
    """`_nll_in_place`, plus each row's predictive entropy and top-1 probability when `signals`.

    With x' = x - max x, e = exp(x') and T = sum(e): the top-1 probability is 1 / T (the largest e is exp(0))
    and the entropy is log T - sum(e x') / T. sum(e x') is taken first, while the buffer still holds x': the
    exp runs into a scratch block of rows (cache-sized on CPU), multiplied by x' and summed there. Then the
    NLL runs exactly as `_nll_in_place` (the same operations on the same buffer, so the perplexity is
    identical to the bit with or without the signals, on any device and thread count). `xlogy(e, e)` over
    the exponentiated buffer instead was 18x slower than the exp on CPU (not vectorised).
    """
    if not signals:
        return (_nll_in_place(logits, targets),)
    rows, vocab = logits.shape
    top = logits.amax(1, keepdim=True)
    target_logit = logits.gather(1, targets[:, None])[:, 0]
    shifted = logits.sub_(top)
    dot = torch.empty(rows, dtype=logits.dtype, device=logits.device)
    # CPU: a block that stays in cache; accelerators: one block (kernel launches cost more than memory)
    block = max(1, _SCRATCH_BYTES // (logits.element_size() * vocab)) if logits.device.type == "cpu" else rows
    scratch = torch.empty((min(block, rows), vocab), dtype=logits.dtype, device=logits.device)
    for s in range(0, rows, block):
        x = shifted[s : s + block]
        e = torch.exp(x, out=scratch[: x.shape[0]])
        torch.sum(e.mul_(x), 1, out=dot[s : s + x.shape[0]])
    bad = ~torch.isfinite(dot)
    if bool(bad.any()):
        # e x' is 0 x -inf = NaN for a token the model rules out (a -inf logit); it contributes 0. A row of
        # NaN logits stays NaN.
        x = shifted[bad]
        e = x.exp()
        dot[bad] = torch.where(e > 0, e * x, torch.zeros_like(e)).sum(1)
    # from here on, `_nll_in_place`'s operations, with the max already subtracted
    total = shifted.exp_().sum(1)
    top1 = total.reciprocal()
    log_total = total.log_()
    entropy = log_total - dot.mul_(top1)
    return log_total.add_(top[:, 0]).sub_(target_logit), entropy, top1


def _token_signals(scores: tuple[torch.Tensor, ...], nll: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """[len(_SUM_NAMES), N] float64 per-token terms of the signal sums, from `_scores_in_place`'s columns."""
    entropy, top1 = (s.to(nll.device, torch.float64) for s in scores[1:])
    tail = tail.to(torch.float64)
    # p < LOW_PROBABILITY <=> NLL > -log(LOW_PROBABILITY); a NaN NLL compares False, the signal is made
    # NaN from the corpus sums then (a diverged model)
    low = (nll > -math.log(LOW_PROBABILITY)).to(torch.float64)
    return torch.stack([entropy, top1, low, nll * tail, tail])


def _tail_lookup(token_ids: list[list[int]], share: float) -> torch.Tensor:
    """A boolean table over token ids: True for the rarest token types of the held-out set that together make
    up at least `share` of its tokens (all types of the last count taken, so ties are never split)."""
    flat = np.fromiter((t for ids in token_ids for t in ids), dtype=np.int64)
    if flat.size == 0:
        return torch.zeros(1, dtype=torch.bool)
    counts = np.bincount(flat)
    seen = np.flatnonzero(counts)
    # occurrences of the types of each count, rarest count first
    values, types = np.unique(counts[seen], return_counts=True)
    covered = np.cumsum(values * types)
    cutoff = values[min(int(np.searchsorted(covered, share * flat.size)), len(values) - 1)]
    table = torch.zeros(len(counts), dtype=torch.bool)
    table[torch.from_numpy(seen[counts[seen] <= cutoff])] = True
    return table


def _add_signals(result: PerplexityResult, sums: torch.Tensor) -> None:
    """Fills `result.signals` / `document_sums` from the all-reduced [len(_SUM_NAMES), D] float64 sums."""
    result.document_sums = {name: row.tolist() for name, row in zip(_SUM_NAMES, sums, strict=True)}
    totals = dict(zip(_SUM_NAMES, sums.sum(1).tolist(), strict=True))
    n = result.n_tokens

    def mean(total: float, count: float) -> float:
        return total / count if count else math.nan

    scored = [(d, nll / c, nll, c) for d, (nll, c) in enumerate(zip(result.document_nll,
                                                                  result.document_tokens, strict=True)) if c]
    # Worst first; a NaN document NLL ranks as the worst (a diverged model: the value is NaN). Ties go to
    # the earlier document, so every rank picks the same set.
    scored.sort(key=lambda item: (-item[1] if not math.isnan(item[1]) else -math.inf, item[0]))
    worst = scored[: math.ceil(WORST_DOCUMENT_SHARE * len(scored))]
    result.signals = {
        "heldout_entropy": mean(totals["entropy"], n),
        "heldout_top1_mass": mean(totals["top1_mass"], n),
        "heldout_tail_nll": mean(totals["tail_nll"], totals["tail_tokens"]),
        "heldout_worst_decile_nll": mean(sum(w[2] for w in worst), sum(w[3] for w in worst)),
        "heldout_low_prob_share": mean(totals["low_prob_tokens"], n),
    }
    if math.isnan(result.nll_sum):
        # NaN logits: the comparisons behind the low-probability share read NaN as "not low"; say NaN instead
        result.signals = dict.fromkeys(result.signals, math.nan)


def _plain_head_weight(head, device: torch.device) -> torch.Tensor | None:
    """The head's weight when the head is a bias-free fp32 `nn.Linear` without forward hooks (a hook that
    rescales the logits would be skipped by the bare matmul): a matmul we may write in place."""
    weight = getattr(head, "weight", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or not isinstance(weight, torch.Tensor):
        return None
    if head._forward_hooks or head._forward_pre_hooks:
        return None
    return weight if weight.dtype == torch.float32 and weight.device == device else None


def _vocab(head) -> int:
    return head.out_features if hasattr(head, "out_features") else head.weight.shape[0]


def _result(nll: torch.Tensor, count: torch.Tensor, n_skipped: int) -> PerplexityResult:
    # Sum, then divide: the corpus perplexity weights every scored token alike, whatever its document.
    document_nll, document_tokens = nll.tolist(), [int(c) for c in count.tolist()]
    nll_sum, n_tokens = float(nll.sum()), sum(document_tokens)
    pairs = zip(document_nll, document_tokens, strict=True)
    per_document = [_exp(n / c) if c else math.nan for n, c in pairs]
    perplexity = _exp(nll_sum / n_tokens) if n_tokens else math.nan
    return PerplexityResult(
        perplexity, nll_sum, n_tokens, per_document, n_skipped, document_nll, document_tokens
    )


def _exp(mean_nll: float) -> float:
    """exp, but inf past float range: a diverged model's mean NLL of 1e20 nats is a perplexity, no error."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def nonfinite_parameters(model) -> tuple[int, int]:
    """(parameter tensors holding a NaN or inf, all parameter tensors) of `model`, on this process.

    Sharded models (FSDP, ZeRO-3) are counted over this rank's shards.

    Example:

    ```python
    >>> from collapse_guard.testing import tiny_tokenizer, tiny_causal_lm
    >>> model = tiny_causal_lm(tiny_tokenizer())
    >>> nonfinite_parameters(model)[0]
    0

    ```
    """
    bad = total = 0
    with torch.no_grad():
        for p in model.parameters():
            total += 1
            bad += int(p.numel() > 0 and not bool(torch.isfinite(p).all()))
    return bad, total


def _divergence_reason(model, result: PerplexityResult, world: int) -> str:
    """Why `result` is not finite, the same words on every rank: the held-out perplexity and where the
    non-finite numbers come from (weights, or activations that overflowed from finite weights)."""
    bad, total = nonfinite_parameters(model)
    if world > 1:  # DDP ranks hold the same weights and FSDP ones their shards: the worst rank speaks for all
        bad, total = int(all_reduce_max(float(bad))), int(all_reduce_max(float(total)))
    docs = sum(1 for n, c in zip(result.document_nll, result.document_tokens, strict=True)
               if c and not math.isfinite(n))
    if bad:
        source = f"non-finite weights in {bad} of {total} parameter tensors"
    elif docs:
        source = "non-finite logits from finite weights: activations overflowed"
    else:
        mean = result.nll_sum / result.n_tokens
        source = f"mean NLL {mean:.3g} nats per token, past float range"
    scored = sum(1 for c in result.document_tokens if c)
    where = f"; {docs} of {scored} documents non-finite" if docs else ""
    return f"model diverged: held-out perplexity is {result.perplexity} ({source}{where})"


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0  # padded positions come after every real one and are never scored: any valid id works


def _is_sharded(model) -> bool:
    """Whether forward passes are collective (FSDP, DeepSpeed ZeRO-3): all ranks must run the same number."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - very old torch
        return False
    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()):
        return True
    # DeepSpeed ZeRO-3 partitions parameters (marked with ds_id) and gathers them collectively in forward.
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _input_device(model) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _acc_device(device: torch.device) -> torch.device:
    return device if device.type == "cuda" else torch.device("cpu")  # float64 accumulators (MPS has none)


def _comm_device(model) -> torch.device:
    backend = str(torch.distributed.get_backend())
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_same_documents(n_documents: int, device: torch.device) -> None:
    sizes = torch.tensor([n_documents, -n_documents], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX)
    if int(sizes[0]) != -int(sizes[1]):
        raise ValueError(
            f"ranks hold different held-out sets ({-int(sizes[1])} to {int(sizes[0])} documents); "
            "pass the same texts on every rank."
        )
