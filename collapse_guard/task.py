"""Task score: what users make synthetic data for, measured beside what it may cost them.

People run self-training loops (STaR, ReST-EM, expert iteration: sample, keep what a verifier accepts,
fine-tune, repeat) to get better at a task. A guard is worth keeping only if the task still improves under
it, so the task is measured the same way as the harm: on a fixed held-out set, every round, with an
interval.

- `arithmetic_problems`: procedurally generated problems with a free oracle. Whether a problem is a
  training or a held-out problem is a property of the problem itself (a stable hash of its text), so the
  two sets never overlap, whatever sizes and seeds are asked for.
- `TaskEvaluator`: greedy answers to the held-out prompts, scored by any verifier with TRL's
  reward-function signature (`(completions, **kwargs) -> list[float]`; `numeric_match()` by default), as
  an accuracy with a Wilson interval.
- `accuracy_change`: the paired change between two evaluations of the same items, with a percentile
  bootstrap interval over items (the same items are scored every round, so item difficulty cancels).

Example:

```python
>>> from collapse_guard.task import accuracy_change, accuracy_interval, arithmetic_problems
>>> train, heldout = arithmetic_problems(50, split="train"), arithmetic_problems(20, split="heldout")
>>> set(train["prompt"]) & set(heldout["prompt"])
set()
>>> score = accuracy_interval([True] * 12 + [False] * 8)
>>> print(f"{score.accuracy:.2f} [{score.low:.2f}, {score.high:.2f}] over {score.n} problems")
0.60 [0.39, 0.78] over 20 problems
>>> change = accuracy_change([False] * 20, [True] * 12 + [False] * 8)
>>> print(f"{change.change:+.2f} [{change.low:+.2f}, {change.high:+.2f}]")
+0.60 [+0.40, +0.80]

```
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

SPLITS = ("train", "heldout")
# A quarter of the problem space is held out: large enough that a held-out set of a few hundred problems
# never has to repeat one, small enough that training draws rarely need to reject a candidate.
_HELDOUT_SHARE = 0.25


def _split_of(prompt: str) -> str:
    return "heldout" if zlib.crc32(prompt.encode()) % 1000 < _HELDOUT_SHARE * 1000 else "train"


def arithmetic_problems(n: int, seed: int = 0, split: Literal["train", "heldout"] = "train",
                        low: int = 10, high: int = 99, operations: Sequence[str] = ("+", "-", "*")):
    """`n` distinct arithmetic problems (`prompt`, `answer` columns) from one side of a fixed split.

    Args:
        n: problems to draw.
        seed: seeds the draw (the split itself does not depend on it).
        split: "train" or "heldout"; a problem's side is fixed by a hash of its text, so the sides never
            share a problem.
        low, high: operand range (inclusive).
        operations: any of "+", "-", "*".

    Returns:
        A `datasets.Dataset` with `prompt` (a question asking for the number) and `answer` (str).
    """
    from datasets import Dataset

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1 (problems to draw), got {n!r}.")
    bad = [op for op in operations if op not in ("+", "-", "*")]
    if bad or not operations:
        raise ValueError(f"operations must be a non-empty subset of '+', '-', '*', got {list(operations)!r}.")
    if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
        raise ValueError(f"need integers 0 <= low <= high, got low={low!r}, high={high!r}.")
    space = (high - low + 1) ** 2 * len(set(operations))
    share = _HELDOUT_SHARE if split == "heldout" else 1.0 - _HELDOUT_SHARE
    if n > 0.75 * share * space:  # rejection sampling slows down as the side runs out
        raise ValueError(f"asked for {n} {split} problems but operands {low}..{high} with {list(operations)} "
                         f"give about {int(share * space)}: widen the operand range.")
    rng = random.Random(f"{seed}:{split}")
    prompts: list[str] = []
    answers: list[str] = []
    seen: set[str] = set()
    while len(prompts) < n:
        a, b, op = rng.randint(low, high), rng.randint(low, high), rng.choice(list(operations))
        prompt = f"What is {a} {op} {b}? Answer with the number."
        if prompt in seen or _split_of(prompt) != split:
            continue
        seen.add(prompt)
        prompts.append(prompt)
        answers.append(str(a + b if op == "+" else a - b if op == "-" else a * b))
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


@dataclass(frozen=True)
class TaskScore:
    """Accuracy over `n` items with its Wilson `confidence` interval; `correct` keeps the item outcomes
    (in the evaluator's order) for paired comparisons between rounds."""

    accuracy: float
    low: float
    high: float
    n: int
    confidence: float
    correct: tuple[bool, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "correct": [int(c) for c in self.correct]}


def accuracy_interval(correct: Sequence[bool], confidence: float = 0.95) -> TaskScore:
    """Accuracy and its Wilson score interval (which, unlike the normal one, stays inside [0, 1] and keeps
    its coverage at 0 or n successes, where a self-training loop often starts or ends)."""
    items = tuple(bool(c) for c in correct)
    if not items:
        raise ValueError("accuracy of no items: the task set is empty.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
    n, k = len(items), sum(items)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # clamped to contain p: at 0 or n successes the formula's bound equals p up to rounding (2.8e-17 at p=0)
    low, high = min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))
    return TaskScore(p, low, high, n, confidence, items)


@dataclass(frozen=True)
class AccuracyChange:
    """Paired change in accuracy (new - base) over the same `n` items, with a bootstrap interval."""

    base: float
    new: float
    change: float
    low: float
    high: float
    n: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def accuracy_change(base: Sequence[bool], new: Sequence[bool], confidence: float = 0.95,
                    resamples: int = 2000, seed: int = 0) -> AccuracyChange:
    """The change in accuracy between two evaluations of the same items, and a paired percentile
    bootstrap interval over items (deterministic: a seeded local generator, the same on every rank)."""
    b = np.asarray([bool(x) for x in base], dtype=float)
    a = np.asarray([bool(x) for x in new], dtype=float)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"paired accuracy needs the same non-empty items in both evaluations, got {len(b)} "
                         f"and {len(a)}.")
    diff = a - b
    draws = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[draws].mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return AccuracyChange(float(b.mean()), float(a.mean()), float(diff.mean()), float(low), float(high),
                          len(diff), confidence)


class TaskEvaluator:
    """Scores a model on a fixed held-out task set: greedy answers, checked by a verifier.

    Args:
        prompts: the held-out questions (plain text; rendered with the tokenizer's chat template when it
            has one).
        answers: the reference answers, one per prompt (handed to the verifier as the `answer` column).
        tokenizer: the model's tokenizer.
        verifier: `(completions, **kwargs) -> list[float]` (TRL's reward-function signature); a score
            >= 0.5 counts as correct. Default: `numeric_match()`.
        max_new_tokens: answer length budget.
        batch_size: prompts per `generate` call.

    Example:

    ```python
    >>> from collapse_guard.task import TaskEvaluator, arithmetic_problems
    >>> from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> problems = arithmetic_problems(8, split="heldout")
    >>> evaluator = TaskEvaluator(problems["prompt"], problems["answer"], tok, max_new_tokens=4)
    >>> score = evaluator.score(tiny_causal_lm(tok))
    >>> score.n, 0.0 <= score.low <= score.accuracy <= score.high <= 1.0
    (8, True)

    ```
    """

    def __init__(self, prompts: Sequence[str], answers: Sequence[Any], tokenizer,
                 verifier: Callable[..., list] | None = None, max_new_tokens: int = 24, batch_size: int = 32):
        prompts, answers = list(prompts), list(answers)
        if not prompts:
            raise ValueError("TaskEvaluator got no prompts: pass the held-out task questions.")
        if len(prompts) != len(answers):
            raise ValueError(f"TaskEvaluator got {len(prompts)} prompts but {len(answers)} answers: one "
                             "reference answer per prompt.")
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise TypeError("TaskEvaluator prompts must be non-empty strings.")
        if not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}.")
        for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        if verifier is None:
            from collapse_guard.selection.verifier import numeric_match

            verifier = numeric_match()
        self.prompts, self.answers, self.tokenizer = prompts, answers, tokenizer
        self.verifier, self.max_new_tokens, self.batch_size = verifier, max_new_tokens, batch_size
        self._ids: list[list[int]] | None = None
        self._backend, self._backend_model = None, None

    def _prompt_ids(self) -> list[list[int]]:
        if self._ids is None:  # tokenized once: the same ids every round
            tok = self.tokenizer
            if getattr(tok, "chat_template", None):
                texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=False) for p in self.prompts]
                self._ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            else:
                self._ids = [tok(p)["input_ids"] for p in self.prompts]
        return self._ids

    def completions(self, model) -> list[str]:
        """Greedy answers through the project's generation backend: batched with left padding, data-parallel
        over ranks (every rank gets every answer, in prompt order). A diverged model raises
        `ModelDivergedError` ("model diverged: ...") rather than being scored on noise."""
        from collapse_guard.generation.backends import Decoding, generate_texts, make_backend

        if self._backend is None or self._backend_model is not model:
            self._backend, self._backend_model = make_backend(model, self.tokenizer, "transformers",
                                                              self.batch_size), model
        eos = self.tokenizer.eos_token
        decoding = Decoding(max_new_tokens=self.max_new_tokens, temperature=0.0)
        was_training = model.training
        model.eval()
        try:
            outs = generate_texts(self._backend, [], decoding, seed=0, stops=[eos] if eos else [],
                                  batch_size=self.batch_size, stage="task", prompt_ids=self._prompt_ids())
        finally:
            model.train(was_training)
        return [c.text.strip() for c in outs]

    def score(self, model, confidence: float = 0.95) -> TaskScore:
        completions = self.completions(model)
        scores = self.verifier(completions, prompts=self.prompts, answer=self.answers)
        if len(scores) != len(completions):
            raise ValueError(f"the verifier returned {len(scores)} scores for {len(completions)} "
                             "completions: it must return one score per completion.")
        return accuracy_interval([s is not None and s >= 0.5 for s in scores], confidence)
