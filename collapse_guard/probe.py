"""What the guard measures, in one place for the in-training guard and the loop's evaluation step:
held-out human perplexity (with per-document sums, for the detector's intervals) and the diversity of
a fixed prompt set's generations, at fixed settings, identical across rounds.

Collective under `torch.distributed`: call it on every rank. Perplexity sums are all-reduced and
generations are data-parallel and gathered, so every rank returns the same numbers.

Example:

```python
>>> from collapse_guard.probe import Probe, ProbeConfig
>>> from collapse_guard.testing import tiny_tokenizer, tiny_causal_lm, human_like_sentences
>>> tok = tiny_tokenizer()
>>> probe = Probe(human_like_sentences(8), tok, ProbeConfig(context_length=64, max_new_tokens=4),
...               prompts=human_like_sentences(4, seed=1))
>>> signals = probe.measure(tiny_causal_lm(tok))
>>> sorted(k for k in signals if k.startswith("heldout"))[:2], len(signals["generations"])
(['heldout_doc_nll', 'heldout_doc_tokens'], 4)

```
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from collapse_guard.signals import finite


@dataclass
class ProbeConfig:
    """Settings of the measurement, fixed for a run so its numbers compare across steps and rounds."""

    context_length: int = field(default=512, metadata={
        "help": "Held-out perplexity context (tokens per window)."})
    stride: int | None = field(default=None, metadata={
        "help": "Sliding-window stride (None: non-overlapping blocks)."})
    max_batch_tokens: int = field(default=16384, metadata={"help": "Padded tokens per forward pass."})
    prompt_tokens: int | None = field(default=16, metadata={
        "help": "Each prompt is cut to its first N tokens (the model continues it); None keeps it whole."})
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per prompt."})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature of the fixed-prompt generations (0 = greedy). Sampling, seeded, keeps "
                "the tails visible; greedy text sits in the low-perplexity band by construction."})
    seed: int = field(default=0, metadata={"help": "Seeds the generations (the same every measurement)."})
    sampler: str = field(default="inverse_cdf", metadata={
        "help": "How sampled tokens are drawn: 'inverse_cdf' (one uniform per row; the same distribution as "
                "'multinomial', about 10x cheaper per step on CPU, other draws for a seed) or 'multinomial' "
                "(torch.multinomial, what transformers does)."})
    batch_size: int = field(default=32, metadata={"help": "Prompts per generate() call."})
    chat_template: bool = field(default=False, metadata={
        "help": "Render each prompt as a user turn with the tokenizer's chat template."})
    embedding_model: str | None = field(default=None, metadata={
        "help": "Sentence-embedding model for embedding diversity ('all-MiniLM-L6-v2' or a folder); "
                "expensive."})
    autocast: bool = field(default=True, metadata={
        "help": "On a CUDA GPU, measure under bfloat16 autocast (about half the cost; perplexity then "
                "differs from fp32 by ~1e-3, the same for every measurement of a run). Ignored on CPU."})

    def __post_init__(self) -> None:
        for name in ("context_length", "max_batch_tokens", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int)
                    or value < (2 if name == "context_length" else 1)):
                raise ValueError(f"ProbeConfig.{name} must be a positive int (context_length >= 2), got "
                                 f"{value!r}.")
        if self.stride is not None and not (isinstance(self.stride, int)
                                            and 1 <= self.stride <= self.context_length):
            raise ValueError("ProbeConfig.stride must be None or an int in [1, context_length], got "
                             f"{self.stride!r}.")
        if self.max_batch_tokens < self.context_length:
            raise ValueError(f"ProbeConfig.max_batch_tokens={self.max_batch_tokens} must be >= "
                             f"context_length={self.context_length} (one window).")
        if self.prompt_tokens is not None and (not isinstance(self.prompt_tokens, int)
                                               or self.prompt_tokens < 1):
            raise ValueError("ProbeConfig.prompt_tokens must be None or a positive int, got "
                             f"{self.prompt_tokens!r}.")
        from collapse_guard.generation.backends import SAMPLERS

        if self.sampler not in SAMPLERS:
            raise ValueError(f"ProbeConfig.sampler must be one of {SAMPLERS}, got {self.sampler!r}.")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"ProbeConfig.temperature must be >= 0 (0 = greedy), got {self.temperature!r}.")


def _check_texts(texts: Any, name: str) -> list[str]:
    if texts is None or isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"{name} must be a list of strings, got {type(texts).__name__}; e.g. "
                        "collapse_guard.resources.human_texts('lee').")
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{name} is empty: pass human documents the model does not train on.")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"{name}[{bad}] is {type(texts[bad]).__name__}, expected str.")
    return list(texts)


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off while measuring; the model's training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class Probe:
    """Measures one model: `measure(model)` -> signals (see module docstring).

    Args:
        heldout_texts: human documents never trained on.
        tokenizer: the model's tokenizer.
        config: `ProbeConfig`.
        prompts: the fixed prompt set whose generations give the diversity signals (None: perplexity only).
        reference_model: a frozen model (round 0's) that scores the generations and the held-out set for the
            low-/high-perplexity concentration signal (needs sampling: temperature > 0).
    """

    def __init__(self, heldout_texts: list[str], tokenizer, config: ProbeConfig | None = None,
                 prompts: list[str] | None = None, reference_model=None):
        self.heldout_texts = _check_texts(heldout_texts, "heldout_texts")
        self.prompts = _check_texts(prompts, "prompts") if prompts is not None else None
        self.config = config or ProbeConfig()
        if not isinstance(self.config, ProbeConfig):
            raise TypeError(f"config must be a ProbeConfig, got {type(self.config).__name__}.")
        if reference_model is not None and self.config.temperature == 0:
            raise ValueError("the low-perplexity concentration signal needs sampled generations (temperature "
                             "> 0): greedy text sits below the human 25th percentile by construction.")
        self.tokenizer = tokenizer
        self.reference_model = reference_model
        self._evaluator = None
        self._prompt_ids: list[list[int]] | None = None
        self._first_look: list[int] | None = None
        self._human_reference_ppl: list[float] | None = None

    # ----- pieces ---------------------------------------------------------------------------------------
    def evaluator(self):
        if self._evaluator is None:
            from collapse_guard.metrics.perplexity import HeldoutPerplexity

            c = self.config
            # signals=True: the early-warning signals come from the same pass (observe-only, not judged)
            self._evaluator = HeldoutPerplexity(self.heldout_texts, self.tokenizer, c.context_length,
                                                c.stride, c.max_batch_tokens, signals=True)
        return self._evaluator

    def first_look_documents(self) -> list[int]:
        """The held-out documents a sequential measurement scores first (`first_look_documents` of the
        scorable ones, with the probe's seed)."""
        if self._first_look is None:
            scorable = [d for d, ids in enumerate(self.evaluator().token_ids) if len(ids) >= 2]
            self._first_look = first_look_documents(scorable, self.config.seed)
        return self._first_look

    def prompt_ids(self) -> list[list[int]]:
        if self._prompt_ids is None:
            tok, c = self.tokenizer, self.config
            texts = self.prompts or []
            if c.chat_template:
                texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in texts]
                ids = [tok.encode(t, add_special_tokens=False) for t in texts]
            else:
                ids = [tok.encode(t) for t in texts]
            if c.prompt_tokens is not None and not c.chat_template:
                ids = [x[: c.prompt_tokens] for x in ids]
            self._prompt_ids = [x for x in ids if x] or [[tok.eos_token_id or 0]]
        return self._prompt_ids

    def generate(self, model) -> list[str]:
        """The fixed prompts' continuations (seeded; chat-template role tokens suppressed).

        Raises `ModelDivergedError` (on every rank alike) when the model's logits are NaN/inf.
        """
        from collapse_guard.generation.backends import Decoding, TransformersBackend, generate_texts

        c, tok = self.config, self.tokenizer
        eos = [tok.eos_token] if tok.eos_token else []
        special = [i for i in (tok.all_special_ids or []) if i != tok.eos_token_id and i != tok.pad_token_id]
        decoding = Decoding(max_new_tokens=c.max_new_tokens, temperature=float(c.temperature),
                            suppress_tokens=tuple(special))
        backend = TransformersBackend(model, tok, batch_size=c.batch_size, sampler=c.sampler)
        completions = generate_texts(backend, [], decoding, c.seed, stops=eos, stage="probe",
                                     prompt_ids=self.prompt_ids())
        return [comp.text for comp in completions]

    def _concentration(self, generations: list[str]) -> dict[str, float]:
        from collapse_guard.metrics.diversity import perplexity_concentration
        from collapse_guard.metrics.perplexity import document_perplexities

        c = self.config
        if self._human_reference_ppl is None:
            self._human_reference_ppl = document_perplexities(self.reference_model, self.tokenizer,
                                                              self.heldout_texts, c.context_length,
                                                              c.max_batch_tokens)
        scored = document_perplexities(self.reference_model, self.tokenizer, [g if g.strip() else " "
                                       for g in generations], c.context_length, c.max_batch_tokens)
        return perplexity_concentration(scored, self._human_reference_ppl)

    def _precision(self, model):
        import torch

        device = next(model.parameters()).device
        if self.config.autocast and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----- the measurement --------------------------------------------------------------------------------
    def measure(self, model, generations: bool = True,
                first_look: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Signals of `model` (collective: call on every rank). `generations=False` skips the prompt set.

        `first_look`: score `first_look_documents()` first and call `first_look(signals)` on what they give
        (the held-out keys below, plus `heldout_doc_index`, the documents scored); when it returns True the
        rest of the held-out set is not scored, the early signals (over all documents) are left out and the
        per-document lists hold 0 for the unscored documents. It must decide alike on every rank.
        """
        from collapse_guard.generation.backends import ModelDivergedError
        from collapse_guard.metrics.diversity import diversity_metrics

        start = time.perf_counter()
        with eval_mode(model), self._precision(model):
            evaluator = self.evaluator()
            signals: dict[str, Any] | None = None  # the first look's, when it decided
            if first_look is None:
                result = evaluator.compute(model)
            else:
                look = self.first_look_documents()
                result = evaluator.compute(model, documents=look)
                partial = _heldout(result, look)
                if result.diverged is not None or first_look(partial):
                    signals = partial
                else:
                    rest = sorted(set(range(evaluator.n_documents)) - set(look))
                    if rest:
                        result = evaluator.combine(model, result, evaluator.compute(model, documents=rest))
            if signals is None:
                signals = _heldout(result, None)
                signals.update(getattr(result, "signals", None) or {})  # heldout_entropy, ... (NaN: diverged)
            forward_tokens = result.n_tokens
            split = {"perplexity_seconds": time.perf_counter() - start}
            diverged = getattr(result, "diverged", None)
            if diverged is None and not math.isfinite(result.perplexity):  # an evaluator without the reason
                diverged = f"model diverged: held-out perplexity is {result.perplexity}"
            texts = None
            # a diverged model cannot generate meaningfully: its divergence is the signal, not its text
            if generations and self.prompts is not None and diverged is None:
                try:
                    texts = self.generate(model)
                except ModelDivergedError as error:  # finite perplexity, non-finite logits while sampling
                    diverged = str(error)
                split["generation_seconds"] = time.perf_counter() - start - split["perplexity_seconds"]
            if diverged is not None:
                signals["diverged"] = diverged
            if texts is not None:
                signals["generations"] = texts
                signals.update(diversity_metrics(texts, human_texts=self.heldout_texts,
                                                 embedding_model=self.config.embedding_model))
                if self.reference_model is not None:
                    signals.update(self._concentration(texts))
                forward_tokens += (sum(len(p) for p in self.prompt_ids())
                                   + len(texts) * self.config.max_new_tokens)
                split["signals_seconds"] = time.perf_counter() - start - sum(split.values())
        signals["cost"] = {"seconds": time.perf_counter() - start, "forward_tokens": int(forward_tokens),
                           "heldout_tokens": int(result.n_tokens), **split}
        return signals


def _heldout(result, scored: list[int] | None) -> dict[str, Any]:
    """The held-out keys of an entry from a `PerplexityResult`; `scored`: the documents a partial one
    scored."""
    signals: dict[str, Any] = {"heldout_ppl": result.perplexity, "heldout_nll": result.nll_sum,
                               "heldout_tokens": float(result.n_tokens)}
    doc_nll = getattr(result, "document_nll", None)
    if doc_nll is not None:
        signals["heldout_doc_nll"] = [float(x) for x in doc_nll]
        signals["heldout_doc_tokens"] = [int(x) for x in result.document_tokens]
    if scored is not None:
        signals["heldout_doc_index"] = list(scored)
    return signals


def estimate_whole_set(signals: dict[str, Any], baseline: dict[str, Any]) -> None:
    """A partial (sequential) measurement's heldout_ppl becomes the whole set's estimate, the baseline's
    whole-set ppl times the ratio on the documents scored, so the series stays comparable; the scored
    documents' own ppl stays as heldout_ppl_scored."""
    signals["heldout_ppl_scored"] = signals["heldout_ppl"]
    scored = signals["heldout_doc_index"]
    base_nll, base_tokens = baseline.get("heldout_doc_nll"), baseline.get("heldout_doc_tokens")
    if base_nll is None or base_tokens is None or not finite(baseline.get("heldout_ppl")):
        return  # a diverged first look (it stops there) against a baseline without per-document sums
    base_nll = math.fsum(base_nll[d] for d in scored)
    base_tokens = math.fsum(base_tokens[d] for d in scored)
    if base_tokens > 0 and signals["heldout_tokens"] > 0 and finite(signals["heldout_nll"]):
        shift = signals["heldout_nll"] / signals["heldout_tokens"] - base_nll / base_tokens
        signals["heldout_ppl"] = float(baseline["heldout_ppl"]) * math.exp(shift)


def first_look_documents(scorable: list[int], seed: int) -> list[int]:
    """The documents a sequential measurement scores first: a random half of `scorable` (rounded up),
    drawn with `seed`, sorted; random, so their paired ratio estimates the whole set's."""
    import random

    return sorted(random.Random(seed).sample(list(scorable), (len(scorable) + 1) // 2))
