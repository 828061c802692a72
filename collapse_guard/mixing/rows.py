"""How a trainer turns a raw example into a token row, so top-ups and fingerprints match what it feeds.

`RowFormat.for_sft(args)` mirrors TRL's `SFTTrainer` preparation (EOS appended to text, chat template
for messages, completion-only labels for prompt-completion pairs, truncation at `max_length`);
`RowFormat.infer(rows, tokenizer)` reads the conventions off a plain `Trainer`'s own tokenized rows
(BOS present? EOS appended? longest row = its truncation). The test suite checks `tokenize_row`
against SFTTrainer's prepared datasets for every format.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from collapse_guard.data import data_format
from collapse_guard.provenance import SourceIndex, arrow_fingerprints, fingerprints

IGNORE_INDEX = -100
CACHE_VERSION = 1


@dataclass(frozen=True)
class RowFormat:
    """The trainer's tokenization conventions."""

    max_length: int | None = field(default=None, metadata={
        "help": "Rows are cut to this many tokens (None: not)."})
    truncation_mode: Literal["keep_start", "keep_end"] = field(default="keep_start", metadata={
        "help": "Which end truncation keeps (SFTConfig.truncation_mode)."})
    add_eos: bool = field(default=True, metadata={"help": "Text rows end with EOS (SFTTrainer appends it)."})
    add_bos: bool | None = field(default=None, metadata={
        "help": "Text rows start with BOS: None follows the tokenizer's own add_special_tokens behaviour."})
    completion_only_loss: bool = field(default=True, metadata={
        "help": "Prompt-completion rows mask the prompt out of the labels (TRL's default)."})
    assistant_only_loss: bool = field(default=False, metadata={
        "help": "Chat rows mask everything but assistant turns (SFTConfig.assistant_only_loss)."})
    text_field: str = field(default="text", metadata={"help": "The text column of language-modeling data."})

    @classmethod
    def for_sft(cls, args) -> RowFormat:
        """SFTTrainer's conventions from its `SFTConfig`. Packed rows are not truncated before packing, but
        BFD packing cuts every sequence to `max_length`, so the same cut applies."""
        completion_only = getattr(args, "completion_only_loss", None)
        return cls(
            max_length=getattr(args, "max_length", None),
            truncation_mode=getattr(args, "truncation_mode", "keep_start") or "keep_start",
            add_eos=True,
            completion_only_loss=True if completion_only is None else bool(completion_only),
            assistant_only_loss=bool(getattr(args, "assistant_only_loss", False)),
            text_field=getattr(args, "dataset_text_field", "text") or "text",
        )

    @classmethod
    def infer(cls, rows: Sequence[Sequence[int]], tokenizer, max_length: int | None = None) -> RowFormat:
        """Conventions read off a sample of the trainer's own rows (plain `Trainer`, user tokenization)."""
        rows = [list(r) for r in rows if len(r)]
        eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
        ends_with_eos = sum(r[-1] == eos for r in rows) * 2 > len(rows) if rows and eos is not None else False
        starts_with_bos = sum(r[0] == bos for r in rows) * 2 > len(rows) if rows and bos is not None \
            else False
        longest = max((len(r) for r in rows), default=None)
        return cls(max_length=max_length or longest, add_eos=ends_with_eos, add_bos=starts_with_bos)

    @property
    def truncations(self) -> tuple[int, ...]:
        """Lengths a canonical row may have been cut to (with and without a BOS counted in max_length)."""
        if self.max_length is None:
            return ()
        return (self.max_length, self.max_length - 1) if self.max_length > 1 else (self.max_length,)


def _chat_ids(tokenizer, messages, add_generation_prompt: bool = False, assistant_mask: bool = False):
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt,
                                        return_assistant_tokens_mask=assistant_mask)
    return list(out["input_ids"]), (list(out["assistant_masks"]) if assistant_mask else None)


def _text_ids(tokenizer, text: str, fmt: RowFormat) -> list[int]:
    if fmt.add_bos is None:
        ids = list(tokenizer(text)["input_ids"])
    else:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if fmt.add_bos and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
    if fmt.add_eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_row(example: dict[str, Any], tokenizer, fmt: RowFormat = RowFormat()) -> dict[str, list[int]]:
    """One raw example -> {"input_ids", "labels"} as the trainer described by `fmt` would feed it."""
    if "input_ids" in example:
        ids = list(example["input_ids"])
        labels = list(example["labels"]) if example.get("labels") is not None else list(ids)
    elif "messages" in example:
        ids, mask = _chat_ids(tokenizer, example["messages"], assistant_mask=fmt.assistant_only_loss)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)] if mask is not None \
            else list(ids)
    elif "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, list):
            prompt_ids, _ = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
            ids, _ = _chat_ids(tokenizer, prompt + completion)
        else:
            if fmt.add_eos and tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
                completion = completion + tokenizer.eos_token
            prompt_ids = list(tokenizer(prompt)["input_ids"])
            ids = list(tokenizer(prompt + completion)["input_ids"])
        n_prompt = _common_prefix(prompt_ids, ids) if fmt.completion_only_loss else 0
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    elif fmt.text_field in example:
        ids = _text_ids(tokenizer, example[fmt.text_field], fmt)
        labels = list(ids)
    else:
        raise ValueError(
            f"cannot tokenize a row with columns {sorted(example)}: expected '{fmt.text_field}', 'messages', "
            "'prompt'+'completion' or 'input_ids'."
        )
    if fmt.max_length is not None and len(ids) > fmt.max_length:
        cut = slice(None, fmt.max_length) if fmt.truncation_mode == "keep_start" \
            else slice(-fmt.max_length, None)
        ids, labels = ids[cut], labels[cut]
    return {"input_ids": ids, "labels": labels}


def tokenize_like_sft(example: dict[str, Any], tokenizer, text_field: str = "text",
                      max_length: int | None = 1024) -> dict[str, list[int]]:
    """`tokenize_row` with SFTTrainer's default conventions (SFTConfig.max_length defaults to 1024)."""
    return tokenize_row(example, tokenizer, RowFormat(max_length=max_length, text_field=text_field))


def _token_ids_batch(batch: dict[str, list], tokenizer, fmt: RowFormat) -> list[list[int]]:
    """input_ids of a batch of raw rows (tokenizer batch calls where the format allows)."""
    kind = data_format(list(batch))
    if kind == "tokens":
        return [list(x) for x in batch["input_ids"]]
    if kind == "text" and fmt.text_field == "text" or fmt.text_field in batch and kind == "text":
        texts = batch[fmt.text_field]
        if fmt.add_eos and tokenizer.eos_token:
            texts = [t if t.endswith(tokenizer.eos_token) else t + tokenizer.eos_token for t in texts]
        if fmt.add_bos is None:
            return [list(x) for x in tokenizer(texts)["input_ids"]]
        ids = [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        if fmt.add_bos and tokenizer.bos_token_id is not None:
            ids = [[tokenizer.bos_token_id] + x for x in ids]
        return ids
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    return [tokenize_row(row, tokenizer, RowFormat(max_length=None, add_eos=fmt.add_eos, add_bos=fmt.add_bos,
                                                   text_field=fmt.text_field))["input_ids"] for row in rows]


def _cache_key(dataset, tokenizer, fmt: RowFormat) -> str | None:
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is None:  # IterableDataset, list: nothing stable to key on
        return None
    vocab = getattr(tokenizer, "vocab_size", None)
    template = getattr(tokenizer, "chat_template", None) or ""
    parts = [CACHE_VERSION, fingerprint, type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""),
             vocab, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, template, repr(fmt)]
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:24]


def cache_dir() -> Path:
    from collapse_guard.resources import CACHE_DIR

    return Path(CACHE_DIR) / "fingerprints"


def real_pool_index(dataset, tokenizer, fmt: RowFormat, batch_size: int = 2000) -> SourceIndex:
    """Fingerprints of every real example tokenized like the trainer (canonical and truncated forms).

    Batched tokenisation and numpy hashing; the keys (8 bytes each) are cached on disk between runs,
    keyed by the data set's and the tokenizer's fingerprints.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    key = _cache_key(dataset, tokenizer, fmt)
    path = cache_dir() / f"{key}.npy" if key else None
    if path is not None and path.exists():
        try:
            return SourceIndex(np.load(path), bos_id=bos, eos_id=eos, origin="real pool (cached)")
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt
    parts: list[np.ndarray] = []
    if "input_ids" in (getattr(dataset, "column_names", None) or []) and hasattr(dataset, "with_format"):
        table = dataset.with_format("arrow")
        for start in range(0, len(dataset), 50_000):
            parts += arrow_fingerprints(table[start: start + 50_000]["input_ids"], bos, eos, fmt.truncations,
                                        keep_end=fmt.truncation_mode == "keep_end")
    else:
        iterator = dataset.iter(batch_size=batch_size) if hasattr(dataset, "iter") \
            else _batches(dataset, batch_size)
        for batch in iterator:
            ids = _token_ids_batch(batch, tokenizer, fmt)
            parts.append(fingerprints(ids, bos, eos))
            for cut in fmt.truncations:
                long = [x for x in ids if len(x) > cut]
                if long:
                    parts.append(fingerprints(long, bos, eos, cut,
                                              keep_end=fmt.truncation_mode == "keep_end"))
    keys = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
        np.save(tmp, keys)
        os.replace(tmp, path)
    return SourceIndex(keys, bos_id=bos, eos_id=eos, origin="real pool")


def _batches(rows, batch_size: int):
    batch: dict[str, list] = {}
    for row in rows:
        for k, v in row.items():
            batch.setdefault(k, []).append(v)
        if len(next(iter(batch.values()))) >= batch_size:
            yield batch
            batch = {}
    if batch:
        yield batch
