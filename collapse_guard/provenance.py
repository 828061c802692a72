"""Where each example came from, and how that survives TRL's preprocessing.

Every example carries a `provenance` struct column: `source` ("real" | "synthetic"), `round`
(the self-training round that produced it; -1 for human data) and `meta` (a JSON string with
generator / selector details, one schema for every row so real and synthetic sets concatenate).

TRL's `SFTTrainer` keeps only `input_ids`, `labels` and `seq_lengths` with default settings, so by
the time a batch reaches the data collator the column is gone. `ProvenanceIndex` recovers it from
the tokens themselves: it fingerprints the token ids of known examples (tokenized exactly as
SFTTrainer tokenizes them, or read from a prepared dataset that still holds both columns) and
looks batches up by fingerprint.

Example:

```python
>>> from datasets import Dataset
>>> from collapse_guard.provenance import ProvenanceIndex, with_provenance
>>> from collapse_guard.testing import tiny_tokenizer
>>> tok = tiny_tokenizer()
>>> real = with_provenance(Dataset.from_dict({"text": ["The river crossed the valley."]}), "real")
>>> index = ProvenanceIndex.from_dataset(real, tok)
>>> index.source_of(tokenize_like_sft(real[0], tok)["input_ids"])
'real'
```
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PROVENANCE_COLUMN = "provenance"
REAL = "real"
SYNTHETIC = "synthetic"
SOURCES = (REAL, SYNTHETIC)
HUMAN_ROUND = -1

# SFTConfig.max_length defaults to 1024; sequences are truncated (keep_start) before the collator sees them.
DEFAULT_MAX_LENGTH = 1024


def make_provenance(source: str, round_index: int = HUMAN_ROUND, **meta: Any) -> dict[str, Any]:
    if source not in SOURCES:
        raise ValueError(f"provenance source must be one of {SOURCES}, got {source!r}.")
    return {"source": source, "round": int(round_index), "meta": json.dumps(meta, sort_keys=True, default=str)}


def with_provenance(dataset, source: str, round_index: int = HUMAN_ROUND, overwrite: bool = False, **meta: Any):
    """Returns `dataset` with a `provenance` column; rows that already carry one keep it unless `overwrite`."""
    record = make_provenance(source, round_index, **meta)
    if PROVENANCE_COLUMN in dataset.column_names:
        if not overwrite:
            return dataset
        dataset = dataset.remove_columns(PROVENANCE_COLUMN)
    return dataset.add_column(PROVENANCE_COLUMN, [record] * len(dataset))


def source_of_example(example: dict[str, Any]) -> str | None:
    record = example.get(PROVENANCE_COLUMN)
    if isinstance(record, dict):
        return record.get("source")
    source = example.get("source")
    return source if source in SOURCES else None


def fingerprint(input_ids: Sequence[int] | np.ndarray, max_length: int | None = DEFAULT_MAX_LENGTH) -> bytes:
    """A 16-byte digest of a token sequence (first `max_length` tokens, as SFTTrainer truncates)."""
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    if max_length is not None:
        ids = ids[:max_length]
    return hashlib.blake2b(ids.tobytes(), digest_size=16).digest()


def _chat_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"])


def tokenize_like_sft(
    example: dict[str, Any], tokenizer, text_field: str = "text", max_length: int | None = DEFAULT_MAX_LENGTH
) -> dict[str, list[int]]:
    """Tokenizes one raw example the way TRL's SFTTrainer does with default settings.

    Language modeling text gets the EOS token appended; `messages` go through the chat template;
    prompt-completion pairs get the prompt masked out of `labels` (completion-only loss, TRL's default).
    The test suite checks this against SFTTrainer itself.
    """
    if "input_ids" in example:
        ids = list(example["input_ids"])
        labels = list(example.get("labels") or ids)
    elif "messages" in example:
        ids = _chat_ids(tokenizer, example["messages"])
        labels = list(ids)
    elif "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, list):
            prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
            ids = _chat_ids(tokenizer, prompt + completion)
        else:
            if not completion.endswith(tokenizer.eos_token):
                completion = completion + tokenizer.eos_token
            prompt_ids = tokenizer(prompt)["input_ids"]
            ids = tokenizer(prompt + completion)["input_ids"]
        n_prompt = 0
        for a, b in zip(prompt_ids, ids, strict=False):
            if a != b:
                break
            n_prompt += 1
        labels = [-100] * n_prompt + ids[n_prompt:]
    elif text_field in example:
        text = example[text_field]
        if not text.endswith(tokenizer.eos_token):
            text = text + tokenizer.eos_token
        ids = tokenizer(text)["input_ids"]
        labels = list(ids)
    else:
        raise ValueError(
            f"cannot tokenize an example with columns {sorted(example)}: expected '{text_field}', 'messages', "
            "'prompt'+'completion' or 'input_ids'. Pass text_field=... if your text column has another name."
        )
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


class ProvenanceIndex:
    """Maps token-sequence fingerprints to a source ("real" / "synthetic")."""

    def __init__(self, max_length: int | None = DEFAULT_MAX_LENGTH):
        self.max_length = max_length
        self._sources: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._sources)

    def add(self, input_ids: Sequence[int], source: str) -> None:
        key = fingerprint(input_ids, self.max_length)
        # A sequence seen as both real and synthetic counts as real: it is human text.
        if self._sources.get(key) != REAL:
            self._sources[key] = source

    def add_many(self, sequences: Iterable[Sequence[int]], source: str) -> None:
        for ids in sequences:
            self.add(ids, source)

    def source_of(self, input_ids: Sequence[int]) -> str | None:
        return self._sources.get(fingerprint(input_ids, self.max_length))

    @classmethod
    def from_dataset(
        cls,
        dataset,
        tokenizer=None,
        source: str | None = None,
        text_field: str = "text",
        max_length: int | None = DEFAULT_MAX_LENGTH,
    ) -> ProvenanceIndex:
        """Indexes a raw dataset (tokenized like SFTTrainer) or a prepared one (`input_ids` column).

        The source comes from each row's `provenance` column, else from `source`.
        Passing `trainer.train_dataset` after SFTTrainer preparation is exact: it still holds both
        `input_ids` and `provenance` (columns are dropped only when the dataloader is built).
        """
        index = cls(max_length)
        has_ids = "input_ids" in dataset.column_names
        if not has_ids and tokenizer is None:
            raise ValueError("ProvenanceIndex.from_dataset needs a tokenizer for a dataset without 'input_ids'.")
        for example in dataset:
            row_source = source_of_example(example) or source
            if row_source is None:
                raise ValueError(
                    "ProvenanceIndex.from_dataset: a row has no 'provenance' column and no source was given; "
                    "pass source='real' or 'synthetic', or build the dataset with with_provenance()/mix_datasets()."
                )
            ids = example["input_ids"] if has_ids else tokenize_like_sft(example, tokenizer, text_field)["input_ids"]
            index.add(ids, row_source)
        return index
