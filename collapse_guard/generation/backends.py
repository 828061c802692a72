"""Batched, seeded, data-parallel text generation: transformers `generate` or (optionally) vLLM.

`generate_texts` is the one entry point the generators use. It tokenizes the prompts, sorts them by
length (less padding), cuts them into batches, gives batch `b` to rank `b % world_size`, seeds each
batch from `(seed, b)` and gathers every rank's results in the original order with
`torch.distributed.all_gather_object`, so every rank returns the same list and the result does not
depend on the number of processes. Finished sequences are cut at the first stop token or string.

Backend selection (`resolve_backend`): "transformers" always works; "vllm" needs the `vllm` extra,
a CUDA GPU, a model saved in a local directory and a single process (vLLM manages its own GPU
parallelism); "auto" picks vLLM when all of that holds and transformers otherwise.

Example:

```python
>>> from collapse_guard.testing import tiny_tokenizer, tiny_causal_lm
>>> from collapse_guard.generation.backends import Decoding, TransformersBackend, generate_texts
>>> tok = tiny_tokenizer(); model = tiny_causal_lm(tok)
>>> outs = generate_texts(TransformersBackend(model, tok), ["The river"], Decoding(max_new_tokens=4), seed=0)
>>> len(outs)
1

```
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from collapse_guard.distributed import rank_world

BACKENDS = ("auto", "transformers", "vllm")


class ModelDivergedError(FloatingPointError):
    """The model's next-token logits held NaN or +inf while generating: it diverged (NaN weights, activations
    that overflowed). Raised on every rank alike by `generate_texts`, after the gather, so no rank waits on
    another; its message starts with "model diverged" and says for how many prompts."""


@dataclass(frozen=True)
class Decoding:
    """Decoding settings shared by both backends (temperature 0 means greedy)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off; transformers' own default (50) would silently truncate "pure" sampling
    num_beams: int = 1
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    suppress_tokens: tuple[int, ...] = ()  # never generated (e.g. chat-template role tokens in continuations)

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}.")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Completion:
    """One generated continuation, cut at its stop marker."""

    text: str
    token_ids: list[int]
    stopped: bool  # ended on a stop token/string (False: ran into max_new_tokens)

    @property
    def truncated(self) -> bool:
        return not self.stopped


class Backend(Protocol):
    tokenizer: Any
    default_batch_size: int

    def generate_batch(
        self,
        prompts: list[list[int]],
        decoding: Decoding,
        seed: int,
        stop_ids: list[int],
        stop_strings: list[str],
    ) -> list[tuple[list[int], bool]]: ...


def batch_seed(seed: int, *parts: int | str) -> int:
    """A 31-bit seed for one batch, a stable function of the run seed and the batch's global position."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def unwrap_model(model):
    """The bare model inside a DDP / accelerate wrapper (generate lives there)."""
    while hasattr(model, "module") and not hasattr(model, "generate"):
        model = model.module
    return model


SAMPLERS = ("multinomial", "inverse_cdf")


def inverse_cdf_sample(probs, generator=None):
    """One token id per row of `probs` ([rows, vocab], rows need not sum to 1), drawn with one uniform per
    row: the first index whose cumulative probability exceeds u x the row's total (`searchsorted`).

    The same distribution as `torch.multinomial(probs, 1)`, drawn differently (multinomial's CPU kernel
    spends ~40 ms on 32 x 49k rows; this ~4 ms). A zero-probability token is never drawn: its cumulative
    value equals its predecessor's, and the search is right-sided.

    Example:

    ```python
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> inverse_cdf_sample(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]), g).tolist()
    [[1], [2]]

    ```
    """
    import torch

    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return index.clamp_(max=probs.shape[-1] - 1)


class _InverseCdfSampler:
    """Samples inside the logits processors and hands greedy decoding a row with one finite score.

    transformers calls `torch.multinomial` itself; with `do_sample=False` it takes the argmax instead, so this
    processor applies the warpers sampling would have applied (temperature, top-k, top-p, in transformers'
    order), draws with `inverse_cdf_sample` and leaves 0 at the drawn token and -inf elsewhere.
    """

    def __init__(self, decoding: Decoding, seed: int, device):
        import torch
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.warpers = []
        if decoding.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(decoding.temperature))
        if decoding.top_k:
            self.warpers.append(TopKLogitsWarper(decoding.top_k))
        if decoding.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(decoding.top_p))
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, input_ids, scores):
        import torch

        for warper in self.warpers:
            scores = warper(input_ids, scores)
        drawn = inverse_cdf_sample(torch.softmax(scores, dim=-1), self.generator)
        return torch.full_like(scores, -math.inf).scatter_(1, drawn, 0.0)


class TransformersBackend:
    """`model.generate` on left-padded batches (`batch_size` prompts at a time).

    `sampler="inverse_cdf"` draws sampled tokens with one uniform per row (`inverse_cdf_sample`) instead of
    `torch.multinomial`: the same distribution, other draws for a seed. It is off by default here (what
    transformers does); the guard's probe uses it by default (`ProbeConfig.sampler`). Beam search always
    uses transformers' own sampling.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, sampler: str = "multinomial"):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}.")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is unknown; choose one of {SAMPLERS}.")
        self.sampler = sampler
        self.model = unwrap_model(model)
        self.tokenizer = tokenizer
        self.default_batch_size = batch_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; "
                             "set tokenizer.pad_token first.")
        self.pad_id = int(pad)
        # prompts whose logits were NaN/+inf at some step (a diverged model); `generate_texts` reads it
        self.nonfinite_prompts = 0

    def generate_batch(
        self,
        prompts: list[list[int]],
        decoding: Decoding,
        seed: int,
        stop_ids: list[int],
        stop_strings: list[str],
    ) -> list[tuple[list[int], bool]]:
        import torch
        from transformers import LogitsProcessorList

        device = self.model.device
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends at the same position, so new tokens line up in one column.
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        kwargs: dict[str, Any] = {
            "max_new_tokens": decoding.max_new_tokens,
            "min_new_tokens": decoding.min_new_tokens or None,
            "do_sample": decoding.do_sample,
            "num_beams": decoding.num_beams,
            "repetition_penalty": decoding.repetition_penalty,
            "eos_token_id": stop_ids or None,
            "pad_token_id": self.pad_id,
        }
        if decoding.do_sample:
            kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k)
        if decoding.suppress_tokens:
            kwargs["suppress_tokens"] = list(decoding.suppress_tokens)
        if stop_strings:
            kwargs.update(stop_strings=stop_strings, tokenizer=self.tokenizer)
        guard = _NonFiniteLogits(len(prompts), self.pad_id)
        processors: list[Any] = [guard]
        if self.sampler == "inverse_cdf" and decoding.do_sample and decoding.num_beams == 1:
            # greedy over a row with one finite score picks the token the sampler drew
            processors.append(_InverseCdfSampler(decoding, seed, device))
            kwargs["do_sample"] = False
            for name in ("temperature", "top_p", "top_k"):
                kwargs.pop(name, None)
        kwargs["logits_processor"] = LogitsProcessorList(processors)
        devices = [device] if device.type == "cuda" else []
        # the caller's RNG stays untouched
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        self.nonfinite_prompts += guard.count()
        new = out[:, width:].tolist()
        stops = set(stop_ids)
        results = []
        for row in new:
            cut = next((i for i, t in enumerate(row) if t in stops), None)
            results.append((row, False) if cut is None else (row[:cut], True))
        return results


class _NonFiniteLogits:
    """Keeps a diverged model's generation from crashing and remembers which prompts it hit.

    NaN or +inf logits make `torch.multinomial` raise on CPU and trip a device-side assert on CUDA (which
    poisons the whole CUDA context). A row whose scores hold a NaN or +inf, or only -inf, is replaced by a
    certain pad token, so sampling, greedy and beam search all run through; the prompts it happened to are
    counted, and `generate_texts` turns a non-zero count into `ModelDivergedError`. Runs before the
    temperature/top-k/top-p warpers (transformers appends those after the custom processors), which keep a
    one-hot row one-hot. Cost: one max over the scores per step (~0.3 ms for 32 x 49k on one CPU core,
    against ~40 ms for `multinomial`); the row fix runs only when a row is bad. A plain callable (what
    `LogitsProcessorList` calls), so importing this module does not import transformers.
    """

    def __init__(self, n_prompts: int, fallback_id: int):
        self.n_prompts, self.fallback_id = n_prompts, fallback_id
        self.bad = None

    def __call__(self, input_ids, scores):
        import torch

        # max is NaN if any entry is NaN, +inf if any is +inf, -inf if all are -inf: one pass finds all three
        bad = ~torch.isfinite(scores.amax(-1))
        if bool(bad.any()):  # generate() syncs every step on its stopping criteria anyway
            rows = bad.view(self.n_prompts, -1).any(1)  # beams of a prompt are contiguous rows
            self.bad = rows if self.bad is None else self.bad | rows
            scores = scores.masked_fill(bad[:, None], -math.inf)
            scores[bad, self.fallback_id] = 0.0
        return scores

    def count(self) -> int:
        return 0 if self.bad is None else int(self.bad.sum())


class VLLMBackend:
    """vLLM offline inference (`vllm.LLM`) on a model saved in `model_path`; needs the `vllm` extra and a
    GPU."""

    def __init__(self, model_path: str, tokenizer, dtype: str = "auto", gpu_memory_utilization: float = 0.8,
                 **llm_kwargs: Any):
        from vllm import LLM  # lazy: the extra is optional

        self.tokenizer = tokenizer
        self.default_batch_size = 1 << 20  # vLLM schedules its own batches: hand it everything at once
        self.llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       **llm_kwargs)

    def generate_batch(
        self,
        prompts: list[list[int]],
        decoding: Decoding,
        seed: int,
        stop_ids: list[int],
        stop_strings: list[str],
    ) -> list[tuple[list[int], bool]]:
        from vllm import SamplingParams

        if decoding.num_beams > 1:
            raise ValueError("the vLLM backend does not do beam search here; use backend='transformers'.")
        params = [
            SamplingParams(
                max_tokens=decoding.max_new_tokens,
                min_tokens=decoding.min_new_tokens,
                temperature=decoding.temperature,
                top_p=decoding.top_p,
                top_k=decoding.top_k if decoding.top_k > 0 else -1,
                repetition_penalty=decoding.repetition_penalty,
                stop_token_ids=stop_ids,
                stop=stop_strings or None,
                ignore_eos=decoding.min_new_tokens >= decoding.max_new_tokens,
                seed=batch_seed(seed, i),
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason == "stop") for o in outputs]


def resolve_backend(
    requested: str, *, vllm_installed: bool, cuda_available: bool, model_path: str | None, world_size: int
) -> str:
    """Which backend to use: pure decision logic, unit-tested without vLLM.

    "auto" -> "vllm" only if vLLM is installed, a CUDA GPU is present, the model is in a local
    directory and there is one process; otherwise "transformers". "vllm" raises when unusable.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend={requested!r} is unknown; choose one of {BACKENDS}.")
    missing = [
        why
        for ok, why in [
            (vllm_installed, "vLLM is not installed (pip install 'collapse-guard[vllm]')"),
            (cuda_available, "no CUDA GPU is available"),
            (model_path is not None and os.path.isdir(model_path),
             "the model is not saved in a local directory"),
            (world_size == 1, f"{world_size} processes are running (vLLM runs in a single process)"),
        ]
        if not ok
    ]
    if requested == "transformers" or (requested == "auto" and missing):
        return "transformers"
    if missing:
        raise ValueError(f"backend='vllm' cannot be used: {'; '.join(missing)}. Use backend='transformers'.")
    return "vllm"


def make_backend(model, tokenizer, backend: str = "auto", batch_size: int = 16) -> Backend:
    """Builds the backend `resolve_backend` picks for `model` (a model object or a model directory)."""
    import torch

    path = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
    choice = resolve_backend(
        backend,
        vllm_installed=importlib.util.find_spec("vllm") is not None,
        cuda_available=torch.cuda.is_available(),
        model_path=path or None,
        world_size=rank_world()[1],
    )
    if choice == "vllm":
        return VLLMBackend(path, tokenizer)
    if isinstance(model, str):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model)
    return TransformersBackend(model, tokenizer, batch_size=batch_size)


def stop_markers(tokenizer, stops: list[str],
                 extra_ids: list[int] | None = None) -> tuple[list[int], list[str]]:
    """Splits stop strings into single-token ids (fast `eos_token_id` stops) and multi-token strings."""
    ids: list[int] = list(extra_ids or [])
    strings: list[str] = []
    for stop in stops:
        encoded = tokenizer.encode(stop, add_special_tokens=False)
        if len(encoded) == 1:
            ids.append(int(encoded[0]))
        else:
            strings.append(stop)
    return sorted(set(ids)), strings


def generate_texts(
    backend: Backend,
    prompts: list[str],
    decoding: Decoding,
    seed: int,
    stops: list[str] | None = None,
    batch_size: int | None = None,
    stage: str = "",
    show_progress: bool = False,
    prompt_ids: list[list[int]] | None = None,
) -> list[Completion]:
    """Generates one completion per prompt, data-parallel over ranks; every rank gets the full list in order.

    Prompts are already-rendered strings (special tokens as text), tokenized without adding
    special tokens; pass `prompt_ids` instead to skip tokenization.
    """
    from tqdm.auto import tqdm
    from transformers.utils.logging import is_progress_bar_enabled

    tokenizer = backend.tokenizer
    if prompt_ids is None:
        prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("cannot generate from an empty prompt.")
    stop_ids, stop_strings = stop_markers(tokenizer, stops or [])
    rank, world = rank_world()
    size = batch_size or backend.default_batch_size
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    batches = [order[s: s + size] for s in range(0, len(order), size)]
    mine: dict[int, tuple[list[int], bool]] = {}
    mine_batches = range(rank, len(batches), world)
    nonfinite_before = getattr(backend, "nonfinite_prompts", 0)
    with tqdm(total=len(mine_batches), desc=stage or "generate",
              # transformers' switch: the CLI turns it off without -v, with the libraries' bars
              disable=not (show_progress and rank == 0 and is_progress_bar_enabled())) as bar:
        for b in mine_batches:
            rows = batches[b]
            outs = backend.generate_batch(
                [prompt_ids[i] for i in rows], decoding, batch_seed(seed, stage, b), stop_ids, stop_strings
            )
            mine.update(zip(rows, outs, strict=True))
            bar.update(1)
    nonfinite = getattr(backend, "nonfinite_prompts", 0) - nonfinite_before
    if world > 1:
        import torch

        gathered: list[tuple[dict[int, tuple[list[int], bool]], int] | None] = [None] * world
        torch.distributed.all_gather_object(gathered, (mine, nonfinite))
        mine = {k: v for part in gathered if part for k, v in part[0].items()}
        nonfinite = sum(part[1] for part in gathered if part)
    if nonfinite:  # every rank knows the gathered count: every rank raises alike, none waits on another
        raise ModelDivergedError(
            f"model diverged: non-finite logits (NaN/inf) while generating for {nonfinite} of "
            f"{len(prompt_ids)} prompts{f' ({stage})' if stage else ''}; its generations would be noise, so "
            "none are returned. Look for NaN weights or a too-high learning rate.")
    return [_finish(tokenizer, *mine[i], stop_strings) for i in range(len(prompt_ids))]


def _finish(tokenizer, token_ids: list[int], stopped: bool, stop_strings: list[str]) -> Completion:
    text = tokenizer.decode(token_ids, skip_special_tokens=False)
    hits = [text.index(s) for s in stop_strings if s in text]
    if hits:
        text, stopped = text[: min(hits)], True
    # Special tokens are removed after the cut: a multi-token stop string may contain one.
    for tok in getattr(tokenizer, "all_special_tokens", None) or []:
        if tok:
            text = text.replace(tok, "")
    return Completion(text=text, token_ids=token_ids, stopped=stopped)
