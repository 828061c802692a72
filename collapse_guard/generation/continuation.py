"""Continuations of real text: the pretraining-style setup of Shumailov et al. (2023/2024).

Each real document (or each fixed-length token block of it) is cut to its first `prefix_tokens`
tokens; the model continues it for exactly `max_new_tokens` tokens (beam search with 5 beams by
default, or sampling / greedy). The next generation trains on these texts.

Example:

```python
>>> from collapse_guard.testing import tiny_tokenizer, tiny_causal_lm, human_like_sentences
>>> from collapse_guard.generation import ContinuationConfig, ContinuationGenerator
>>> tok = tiny_tokenizer(); model = tiny_causal_lm(tok)
>>> gen = ContinuationGenerator(model, tok, ContinuationConfig(prefix_tokens=4, max_new_tokens=6,
...                             show_progress=False))
>>> gen.generate(human_like_sentences(3)).column_names
['text', 'prefix', 'provenance']

```
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from collapse_guard.generation.backends import BACKENDS, Decoding, generate_texts, make_backend
from collapse_guard.provenance import SYNTHETIC, make_provenance

DECODINGS = ("beam", "sample", "greedy")
SPLITS = ("documents", "blocks")
OUTPUTS = ("full", "continuation")


@dataclass
class ContinuationConfig:
    """Settings of `ContinuationGenerator` (defaults: Shumailov et al., 64-token prefix, 64 new tokens,
    5 beams)."""

    prefix_tokens: int = field(default=64, metadata={"help": "Tokens of real text in each prompt."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per prompt."})
    fixed_length: bool = field(
        default=True,
        metadata={"help": "Always generate exactly max_new_tokens (EOS suppressed), as in the paper."},
    )
    split: str = field(
        default="documents",
        metadata={
            "help": "'documents': one prompt per text; 'blocks': one per block_size-token block of each text."
        },
    )
    block_size: int | None = field(
        default=None, metadata={"help": "Block length for split='blocks' (default prefix_tokens)."}
    )
    decoding: str = field(default="beam", metadata={"help": f"One of {DECODINGS}."})
    num_beams: int = field(default=5, metadata={"help": "Beams for decoding='beam'."})
    temperature: float = field(default=1.0, metadata={"help": "Temperature for decoding='sample'."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus top_p for decoding='sample'."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty (1.0 = off)."})
    output: str = field(
        default="full",
        metadata={"help": "'full': text = prefix + continuation; 'continuation': only the new text."},
    )
    max_prompts: int | None = field(
        default=None, metadata={"help": "Use at most this many prompts (in input order)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call (per process)."})
    backend: str = field(default="auto", metadata={"help": f"Generation backend: one of {BACKENDS}."})
    show_progress: bool = field(default=True, metadata={"help": "tqdm progress bar (rank 0 only)."})

    def __post_init__(self) -> None:
        for name, allowed in (
            ("decoding", DECODINGS),
            ("split", SPLITS),
            ("output", OUTPUTS),
            ("backend", BACKENDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"ContinuationConfig.{name}={getattr(self, name)!r} is unknown; choose one of {allowed}."
                )
        for name in ("prefix_tokens", "max_new_tokens", "num_beams", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ContinuationConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.block_size is not None and self.block_size < self.prefix_tokens:
            raise ValueError(
                f"ContinuationConfig.block_size={self.block_size} is shorter than "
                f"prefix_tokens={self.prefix_tokens}; use block_size >= prefix_tokens or leave it None."
            )
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"ContinuationConfig.max_prompts must be >= 1 or None, got {self.max_prompts}.")
        self.to_decoding()

    def to_decoding(self) -> Decoding:
        return Decoding(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature if self.decoding == "sample" else 0.0,
            top_p=self.top_p,
            num_beams=self.num_beams if self.decoding == "beam" else 1,
            repetition_penalty=self.repetition_penalty,
            min_new_tokens=self.max_new_tokens if self.fixed_length else 0,
        )


class ContinuationGenerator:
    """Continues prefixes of real texts; `generate` returns `text`, `prefix` (the real prompt) and
    `provenance` columns."""

    def __init__(self, model, tokenizer, config: ContinuationConfig | None = None):
        self.config = config or ContinuationConfig()
        self.tokenizer = tokenizer
        self.backend = make_backend(model, tokenizer, self.config.backend, self.config.batch_size)
        self.model_name = str(
            getattr(getattr(model, "config", None), "_name_or_path", "") or model.__class__.__name__
        )
        self.stats: dict[str, Any] = {}

    def prompts(self, texts: list[str]) -> list[list[int]]:
        """Token-id prompts: the first `prefix_tokens` of each text (or of each block); short ones are
        skipped."""
        cfg = self.config
        prompts: list[list[int]] = []
        for text in texts:
            ids = self.tokenizer(text)["input_ids"]
            step = (cfg.block_size or cfg.prefix_tokens) if cfg.split == "blocks" else max(len(ids), 1)
            for start in range(0, len(ids), step):
                block = ids[start: start + step]
                if len(block) >= cfg.prefix_tokens:
                    prompts.append(block[: cfg.prefix_tokens])
        return prompts[: cfg.max_prompts] if cfg.max_prompts else prompts

    def generate(self, texts: list[str], seed: int = 0, round_index: int = 0):
        from datasets import Dataset, Features, Value

        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("ContinuationGenerator.generate: texts must be a non-empty list of strings.")
        cfg = self.config
        start = time.perf_counter()
        prompt_ids = self.prompts(texts)
        if not prompt_ids:
            raise ValueError(
                f"no text has prefix_tokens={cfg.prefix_tokens} tokens; pass longer texts or a smaller "
                "prefix_tokens."
            )
        # an instruct model may open a chat turn mid-text: its role tokens would leave "system\n\nuser" words
        tok = self.tokenizer
        roles = tuple(i for i in (tok.all_special_ids or []) if i not in (tok.eos_token_id, tok.pad_token_id))
        decoding = dataclasses.replace(cfg.to_decoding(), suppress_tokens=roles)
        prompt_texts = [self.tokenizer.decode(p, skip_special_tokens=True) for p in prompt_ids]
        stops = [] if cfg.fixed_length or not self.tokenizer.eos_token else [self.tokenizer.eos_token]
        completions = generate_texts(
            self.backend, prompt_texts, decoding, seed, stops=stops, batch_size=cfg.batch_size,
            stage="continuation", show_progress=cfg.show_progress, prompt_ids=prompt_ids,
        )
        outputs = [
            self.tokenizer.decode((p if cfg.output == "full" else []) + c.token_ids, skip_special_tokens=True)
            for p, c in zip(prompt_ids, completions, strict=True)
        ]
        meta = {
            "generator": "continuation",
            "model": self.model_name,
            "prefix_tokens": cfg.prefix_tokens,
            "split": cfg.split,
            "output": cfg.output,
            "decoding": {"strategy": cfg.decoding, **decoding.to_dict()},
            "seed": seed,
        }
        features = Features({
            "text": Value("string"),
            "prefix": Value("string"),
            "provenance": {"source": Value("string"), "round": Value("int64"), "meta": Value("string")},
        })
        dataset = Dataset.from_dict(
            {
                "text": outputs,
                "prefix": prompt_texts,
                "provenance": [
                    make_provenance(SYNTHETIC, round_index, **meta, sample=i) for i in range(len(outputs))
                ],
            },
            features=features,
        )
        new_tokens = sum(len(c.token_ids) for c in completions)
        seconds = time.perf_counter() - start
        self.stats = {
            "texts": len(texts),
            "prompts": len(prompt_ids),
            "new_tokens": new_tokens,
            "empty_continuations": sum(not c.token_ids for c in completions),
            "seconds": round(seconds, 3),
            "tokens_per_second": round(new_tokens / max(seconds, 1e-9), 2),
            "seed": seed,
            "round": round_index,
        }
        return dataset
