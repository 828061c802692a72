"""Duplicates and contamination: exact/near-duplicate removal and n-gram overlap with evaluation text.

- `DedupSelector`: exact duplicates (hash of the normalized text) and near duplicates (MinHash-LSH
  over word shingles, datasketch) within the synthetic set and against the real set. Repeated
  samples shrink the effective data and over-weight a few modes, the first step of collapse.
- `ContaminationFilter`: drops samples sharing a word n-gram (13 by default, the GPT-3 / Llama
  decontamination rule) with evaluation or benchmark texts, including the held-out human set the
  guard measures perplexity on: training on it would hide collapse from the guard.

Example:

```python
>>> from collapse_guard.selection import ContaminationFilter, DedupSelector
>>> dedup = DedupSelector(real_texts=["The river crossed the valley at dusk."])
>>> dedup(["the river crossed the valley at dusk", "A new sentence.", "a new sentence!"])["text"][:]
['A new sentence.']
>>> dedup.report["reasons"]
{'duplicate_of_real': 1, 'exact_duplicate': 1}

```
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from collapse_guard.selection.base import Selector

_WORD = re.compile(r"\w+")


def normalize_words(text: str) -> list[str]:
    """Lower-cased word tokens without punctuation: 'The  End!' and 'the end' compare equal."""
    return _WORD.findall(text.lower())


def _digest(words: Sequence[str]) -> bytes:
    return hashlib.blake2b(" ".join(words).encode(), digest_size=16).digest()


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (the pre-mix datasketch's affine32 scheme applies)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class ShingleMinHasher:
    """MinHash signatures of many texts at once, as datasketch `MinHash` objects (affine32 scheme).

    datasketch hashes one document per Python call; here each distinct word is hashed once, the
    word-shingle hashes are rolled in numpy and the permutations and minimum run over a whole chunk
    of documents, which is what makes 100k documents take seconds. The permutations are datasketch's
    own (same seed), so the sketches work with `MinHashLSH` and `MinHash.jaccard`.
    """

    _ROLL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: a bijective polynomial roll

    def __init__(self, num_perm: int = 128, shingle_size: int = 3, seed: int = 1):
        from datasketch import MinHash

        self.num_perm = num_perm
        self.shingle_size = shingle_size
        self.permutations = MinHash(num_perm=num_perm, seed=seed).permutations
        self._a, self._b = (np.asarray(p, dtype=np.uint32) for p in self.permutations)
        self._word_hash: dict[str, int] = {}

    def _ids(self, words: list[str]) -> list[int]:
        table = self._word_hash
        out = []
        for w in words:
            h = table.get(w)
            if h is None:
                h = table[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            out.append(h)
        return out

    def signatures(self, docs: list[list[str]], chunk: int = 2048) -> np.ndarray:
        """[len(docs), num_perm] uint32 signatures of word lists."""
        out = np.empty((len(docs), self.num_perm), dtype=np.uint32)
        for start in range(0, len(docs), chunk):
            out[start : start + chunk] = self._chunk(docs[start : start + chunk])
        return out

    def _chunk(self, docs: list[list[str]]) -> np.ndarray:
        k = self.shingle_size
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        words = np.fromiter((h for d in docs for h in self._ids(d)), dtype=np.uint64,
                            count=int(lengths.sum()))
        words = np.concatenate([words, np.zeros(k, dtype=np.uint64)])  # room for the last window
        doc_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        n_shingles = np.maximum(lengths - k + 1, 1)
        shingle_doc = np.repeat(np.arange(len(docs)), n_shingles)
        shingle_offsets = np.concatenate([[0], np.cumsum(n_shingles)[:-1]])
        first = doc_start[shingle_doc] + (np.arange(n_shingles.sum()) - shingle_offsets[shingle_doc])
        width = np.minimum(lengths, k)[shingle_doc]  # short docs: one shingle of all their words
        acc = np.zeros(len(first), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(k):
                used = j < width
                acc = np.where(used, acc * self._ROLL + words[first + j], acc)
            acc = acc + width.astype(np.uint64)  # the empty text is a shingle too
            hashed = _fmix32((acc ^ (acc >> np.uint64(32))).astype(np.uint32))
            permuted = hashed[:, None] * self._a[None, :] + self._b[None, :]
        return np.minimum.reduceat(permuted, shingle_offsets, axis=0)

    def minhashes(self, docs: list[list[str]]):
        from datasketch import MinHash

        for row in self.signatures(docs):
            yield MinHash(hashvalues=row, permutations=self.permutations, scheme="affine32")


class DedupSelector(Selector):
    """Drops exact and near-duplicate samples, within the set and against `real_texts`.

    Rows are visited in order; the first of a group of duplicates is kept. Reasons:
    `exact_duplicate`, `near_duplicate`, `duplicate_of_real`, `near_duplicate_of_real`.

    Args:
        real_texts: human texts the synthetic samples must not repeat (optional).
        threshold: estimated Jaccard similarity of word shingles at which two texts are near duplicates.
        shingle_size: words per shingle (3 suits short chat turns; 5 is common for documents).
        num_perm: MinHash permutations (more = more accurate, slower).
        exact / near: enable the exact-hash and the MinHash-LSH checks.
        target: `"response"` (default), `"prompt"` (Magpie instruction dedup) or `"both"`.
        **kwargs: further `Selector` options (`name`, `batch_size`, `rejects_path`).

    State persists across the batches of one call (and across calls of `as_batch_filter()`, so a
    training stream is deduplicated as a whole); each dataset call starts fresh.
    """

    def __init__(
        self,
        real_texts: Iterable[str] | None = None,
        threshold: float = 0.8,
        shingle_size: int = 3,
        num_perm: int = 128,
        exact: bool = True,
        near: bool = True,
        **kwargs: Any,
    ):
        kwargs.setdefault("name", "dedup")
        kwargs.setdefault("batch_size", 4096)
        super().__init__(**kwargs)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be a Jaccard similarity in (0, 1], got {threshold!r}. "
                             "Use e.g. 0.8.")
        if not isinstance(shingle_size, int) or shingle_size < 1:
            raise ValueError(f"shingle_size must be a positive integer, got {shingle_size!r}.")
        if not (exact or near):
            raise ValueError("exact and near are both False: DedupSelector would check nothing.")
        if isinstance(real_texts, str):
            raise TypeError("real_texts must be a list of strings, got a single string; wrap it in a list.")
        self.threshold = float(threshold)
        self.shingle_size = shingle_size
        self.num_perm = num_perm
        self.exact = exact
        self.near = near
        # datasketch only when needed
        self._hasher = ShingleMinHasher(num_perm, shingle_size) if near else None
        self._real_hashes: set[bytes] = set()
        self._real_lsh = None
        if real_texts is not None:
            texts = list(real_texts)
            words = [normalize_words(t) for t in texts]
            self._real_hashes = {_digest(w) for w in words}
            if near and texts:
                self._real_lsh = self._new_lsh()
                for i, m in enumerate(self._minhashes(words)):
                    self._real_lsh.insert(i, m, check_duplication=False)
        self.reset()

    def _new_lsh(self):
        from datasketch import MinHashLSH

        return MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)

    def _minhashes(self, words: list[list[str]]):
        return self._hasher.minhashes(words)

    def reset(self) -> None:
        self._seen: set[bytes] = set()
        self._lsh = self._new_lsh() if self.near else None
        self._n_inserted = 0

    def keep(self, batch: dict[str, list]) -> list[str | None]:
        words = [normalize_words(t) for t in self.texts(batch)]
        reasons: list[str | None] = [None] * len(words)
        todo = []
        for i, w in enumerate(words):
            digest = _digest(w)
            if self.exact and digest in self._real_hashes:
                reasons[i] = "duplicate_of_real"
            elif self.exact and digest in self._seen:
                reasons[i] = "exact_duplicate"
            else:
                self._seen.add(digest)
                todo.append(i)
        if not self.near:
            return reasons
        for i, m in zip(todo, self._minhashes([words[i] for i in todo]), strict=True):
            if self._real_lsh is not None and self._real_lsh.query(m):
                reasons[i] = "near_duplicate_of_real"
            elif self._lsh.query(m):
                reasons[i] = "near_duplicate"
            else:
                self._lsh.insert(self._n_inserted, m, check_duplication=False)
                self._n_inserted += 1
        return reasons


class ContaminationFilter(Selector):
    """Drops samples that share a word n-gram with evaluation / benchmark / held-out texts.

    Texts are normalized (lower case, punctuation removed) and compared by word `n`-grams; a prompt
    or response shorter than `n` words is contaminated when it equals a normalized evaluation text.
    Reason: `contamination`.

    Args:
        eval_texts: texts that must stay unseen in training: benchmark questions and answers, and the
            held-out human set passed to `CollapseGuardCallback`.
        n: n-gram length in words (13 by default).
        min_overlap: n-grams a sample must share to be dropped (1 = any overlap).
        target: `"both"` by default (a prompt can leak a benchmark question as well as a response).
        **kwargs: further `Selector` options.
    """

    def __init__(self, eval_texts: Iterable[str], n: int = 13, min_overlap: int = 1, **kwargs: Any):
        kwargs.setdefault("name", "contamination")
        kwargs.setdefault("target", "both")
        kwargs.setdefault("batch_size", 4096)
        super().__init__(**kwargs)
        if isinstance(eval_texts, str):
            raise TypeError("eval_texts must be a list of strings, got a single string; wrap it in a list.")
        eval_texts = list(eval_texts)
        if not eval_texts:
            raise ValueError("eval_texts is empty: pass the benchmark / held-out texts to protect.")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer (words per n-gram), got {n!r}. "
                             "13 is the standard.")
        if not isinstance(min_overlap, int) or min_overlap < 1:
            raise ValueError(f"min_overlap must be a positive integer, got {min_overlap!r}.")
        self.n = n
        self.min_overlap = min_overlap
        self._ngrams: set[int] = set()
        self._whole: set[bytes] = set()
        for text in eval_texts:
            words = normalize_words(text)
            self._whole.add(_digest(words))
            self._ngrams.update(self._hashes(words))

    def _hashes(self, words: list[str]) -> set[int]:
        # Python's tuple hash: fast, 64-bit, and stable within the process that builds and queries the set
        return {hash(tuple(words[i : i + self.n])) for i in range(len(words) - self.n + 1)}

    def keep(self, batch: dict[str, list]) -> list[str | None]:
        prompts, responses = self.prompts_and_responses(batch)
        parts = {"prompt": [prompts], "response": [responses], "both": [prompts, responses]}[self.target]
        reasons: list[str | None] = []
        for i, text in enumerate(self.texts(batch)):
            hit = len(self._hashes(normalize_words(text)) & self._ngrams) >= self.min_overlap
            for column in parts:  # a short prompt or response that *is* an evaluation text
                words = normalize_words(column[i])
                hit = hit or (0 < len(words) < self.n and _digest(words) in self._whole)
            reasons.append("contamination" if hit else None)
        return reasons
