"""The `Selector` base: batching, score columns, keep/drop policy, counts with reasons, a reject sink.

A selector is one small class with one method:

- a *score selector* implements `score(batch) -> list[float]`; the base adds a `<name>_score`
  column and keeps rows by policy (threshold, top-k, top-fraction, best-of-n per prompt);
- a *filter* implements `keep(batch) -> list[str | None]`: `None` keeps the row, a string drops it
  and is the reason ("exact_duplicate", "pii:email", ...).

`batch` is a dict of columns (`datasets` batched format). `self.texts(batch)` and
`self.prompts_and_responses(batch)` read the text of any supported format: chat `messages`,
`prompt`/`completion` (strings or conversations) or plain `text`.

Example:

```python
>>> from datasets import Dataset
>>> from collapse_guard.selection import Selector
>>> class Shortest(Selector):
...     def score(self, batch):
...         return [-len(t) for t in self.texts(batch)]
>>> kept = Shortest(top_k=1)(Dataset.from_dict({"text": ["a long sentence", "short"]}))
>>> kept["text"][:], kept["shortest_score"][:]
(['short'], [-5.0])

```
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from collapse_guard.data import as_dataset, prompts_and_responses, require_format
from collapse_guard.io import atomic_write_json, atomic_write_text

REASON_COLUMN = "reject_reason"
REJECTED_BY_COLUMN = "rejected_by"
TARGETS = ("response", "prompt", "both")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass
class SelectionPolicy:
    """How a score selector turns scores into keep/drop decisions (applied in the order listed)."""

    threshold: float | None = field(
        default=None, metadata={"help": "Keep rows scoring >= threshold (<= when higher_is_better=False)."}
    )
    top_k: int | None = field(default=None, metadata={"help": "Keep only the k best-scoring rows overall."})
    top_fraction: float | None = field(
        default=None, metadata={"help": "Keep only this share (0, 1] of the best-scoring rows overall."}
    )
    best_of_n: int | None = field(
        default=None,
        metadata={"help": "Keep the n best rows of each prompt group (rejection sampling / best-of-n)."},
    )
    group_column: str | None = field(
        default=None,
        metadata={"help": "Column that defines the groups for best_of_n; default: the prompt text of each "
                          "row."},
    )
    higher_is_better: bool = field(
        default=True,
        metadata={"help": "Whether a larger score is a better sample."},
    )

    def __post_init__(self):
        if self.threshold is not None and (not _is_number(self.threshold) or math.isnan(self.threshold)):
            raise TypeError(
                f"threshold must be a number, got {self.threshold!r} ({type(self.threshold).__name__}). "
                "Pass e.g. threshold=0.5, or threshold=None to keep every row that passes the other rules."
            )
        for name in ("top_k", "best_of_n"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        if self.top_fraction is not None and (not _is_number(self.top_fraction)
                                              or not 0 < self.top_fraction <= 1):
            raise ValueError(f"top_fraction must be a number in (0, 1], got {self.top_fraction!r}. "
                             "Use e.g. 0.5.")

    @property
    def is_empty(self) -> bool:
        return all(v is None for v in (self.threshold, self.top_k, self.top_fraction, self.best_of_n))


def _snake(name: str) -> str:
    name = re.sub(r"(Selector|Filter)$", "", name) or name
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _as_dataset(data: Any):
    dataset = as_dataset(data, "a selector's input")
    if dataset is None or not hasattr(dataset, "select"):
        raise TypeError(
            f"a selector takes a datasets.Dataset (or a list of strings / dicts), got {type(data).__name__}."
        )
    return dataset


def _json_row(row: dict[str, Any]) -> str:
    return json.dumps(row, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v),
                      ensure_ascii=False)


def write_rejects(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Rejected rows with their `reject_reason` / `rejected_by`, as JSONL, written atomically."""
    atomic_write_text(path, "".join(_json_row(r) + "\n" for r in rows))


class Selector:
    """Base class: subclasses implement `score(batch)` (score selectors) or `keep(batch)` (filters).

    Args:
        name: the selector's name in reports and score columns (default: from the class name).
        threshold / top_k / top_fraction / best_of_n / group_column / higher_is_better:
            the keep policy for score selectors (see `SelectionPolicy`); ignored by filters.
        batch_size: rows handed to `score` / `keep` at a time.
        target: which text filters look at: `"response"` (default), `"prompt"` or `"both"`.
        rejects_path: when set, every call writes the dropped rows with their reason to this JSONL file.

    After a call, `report` holds `{"name", "input", "kept", "dropped", "reasons": {reason: count}, ...}`.
    """

    required_columns: tuple[str, ...] = ()

    def __init__(
        self,
        name: str | None = None,
        threshold: float | None = None,
        top_k: int | None = None,
        top_fraction: float | None = None,
        best_of_n: int | None = None,
        group_column: str | None = None,
        higher_is_better: bool = True,
        batch_size: int = 256,
        target: Literal["response", "prompt", "both"] = "response",
        rejects_path: str | os.PathLike | None = None,
    ):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
        is_scorer = type(self).score is not Selector.score
        is_filter = type(self).keep is not Selector.keep
        if is_scorer == is_filter:
            raise TypeError(f"{type(self).__name__} must implement exactly one of "
                            "score(batch) or keep(batch).")
        self.is_filter = is_filter
        self.name = name or _snake(type(self).__name__)
        self.policy = SelectionPolicy(threshold, top_k, top_fraction, best_of_n, group_column,
                                      higher_is_better)
        self.batch_size = batch_size
        self.target = target
        self.rejects_path = rejects_path
        self.report: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}  # selector-specific figures merged into the report
        self.last_rejects: list[dict[str, Any]] = []

    # ----- the one method subclasses implement ---------------------------------------------------
    def score(self, batch: dict[str, list]) -> list[float]:
        raise NotImplementedError

    def keep(self, batch: dict[str, list]) -> list[str | None]:
        raise NotImplementedError

    # ----- optional hooks ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Called at the start of every dataset call (filters with state across batches clear it here)."""

    def validate(self, dataset) -> None:
        """Extra checks before any scoring; raise with the field, the value and the fix."""

    def decide(self, scores: np.ndarray, dataset) -> list[str | None]:
        """Turns all scores into drop reasons by `self.policy`; score selectors may override it."""
        policy, n = self.policy, len(scores)
        reasons: list[str | None] = ["invalid_score" if not math.isfinite(s) else None for s in scores]
        sign = 1.0 if policy.higher_is_better else -1.0
        if policy.threshold is not None:
            for i, s in enumerate(scores):
                if reasons[i] is None and sign * s < sign * policy.threshold - 1e-12:
                    reasons[i] = "below_threshold" if policy.higher_is_better else "above_threshold"
        if policy.best_of_n is not None:
            groups = (dataset[policy.group_column] if policy.group_column else
                      prompts_and_responses(dataset[:])[0])
            members: dict[str, list[int]] = {}
            for i, g in enumerate(groups):
                if reasons[i] is None:
                    members.setdefault(json.dumps(g, sort_keys=True, default=str), []).append(i)
            for idx in members.values():
                ranked = sorted(idx, key=lambda i: (-sign * scores[i], i))
                for i in ranked[policy.best_of_n:]:
                    reasons[i] = "not_best_of_n"
        alive = [i for i in range(n) if reasons[i] is None]
        limit = len(alive)
        if policy.top_fraction is not None:
            limit = min(limit, math.ceil(policy.top_fraction * len(alive) - 1e-9))
        if policy.top_k is not None:
            limit = min(limit, policy.top_k)
        if limit < len(alive):
            ranked = sorted(alive, key=lambda i: (-sign * scores[i], i))
            for i in ranked[limit:]:
                reasons[i] = "not_top_k" if policy.top_k is not None and limit == policy.top_k \
                    else "not_top_fraction"
        return reasons

    # ----- text helpers -----------------------------------------------------------------------------
    @staticmethod
    def prompts_and_responses(batch: dict[str, list]) -> tuple[list[str], list[str]]:
        return prompts_and_responses(batch)

    def texts(self, batch: dict[str, list]) -> list[str]:
        """The text each filter examines, per `self.target`."""
        prompts, responses = prompts_and_responses(batch)
        if self.target == "prompt":
            return prompts
        if self.target == "both":
            return [f"{p}\n{r}" if p else r for p, r in zip(prompts, responses, strict=True)]
        return responses

    # ----- running --------------------------------------------------------------------------------
    @property
    def score_column(self) -> str:
        return f"{self.name}_score"

    def _check(self, dataset) -> None:
        if len(dataset) == 0:
            raise ValueError(f"{self.name}: the dataset is empty (0 rows); there is nothing to select.")
        require_format(dataset, f"{self.name}'s input", ("text", "messages", "prompt_completion"))
        missing = [c for c in self.required_columns if c not in dataset.column_names]
        if self.policy.group_column and self.policy.group_column not in dataset.column_names:
            missing.append(self.policy.group_column)
        if missing:
            raise ValueError(
                f"{self.name}: the dataset lacks column(s) {missing} (it has {dataset.column_names}). "
                "Add them (dataset.add_column(...)) or configure the selector to use existing columns."
            )
        if not self.is_filter and self.policy.is_empty and type(self).decide is Selector.decide:
            raise ValueError(
                f"{self.name}: no keep rule given (threshold, top_k, top_fraction and best_of_n are all "
                "None), so every row would be kept. Pass one, e.g. threshold=0.0 or top_fraction=0.5."
            )
        self.validate(dataset)

    def _batches(self, dataset):
        for start in range(0, len(dataset), self.batch_size):
            yield dataset[start : start + self.batch_size]

    def _scores(self, dataset) -> np.ndarray:
        scores: list[float] = []
        for batch in self._batches(dataset):
            out = list(self.score(batch))
            n = len(next(iter(batch.values())))
            if len(out) != n:
                raise ValueError(f"{type(self).__name__}.score returned {len(out)} scores for {n} rows.")
            scores.extend(float("nan") if s is None else float(s) for s in out)
        return np.asarray(scores, dtype=np.float64)

    def _reasons(self, dataset) -> list[str | None]:
        reasons: list[str | None] = []
        for batch in self._batches(dataset):
            out = list(self.keep(batch))
            n = len(next(iter(batch.values())))
            if len(out) != n:
                raise ValueError(f"{type(self).__name__}.keep returned {len(out)} verdicts for {n} rows.")
            reasons.extend(None if r is None else str(r) for r in out)
        return reasons

    def __call__(self, dataset):
        """Returns the kept rows (score selectors add a `<name>_score` column); fills `self.report`."""
        dataset = _as_dataset(dataset)
        self._check(dataset)
        self.reset()
        self.stats = {}
        if self.is_filter:
            reasons = self._reasons(dataset)
        else:
            scores = self._scores(dataset)
            if self.score_column in dataset.column_names:
                dataset = dataset.remove_columns(self.score_column)
            dataset = dataset.add_column(self.score_column, scores.tolist())
            reasons = self.decide(scores, dataset)
        self.after(dataset, reasons)
        kept_idx = [i for i, r in enumerate(reasons) if r is None]
        rejected_idx = [i for i, r in enumerate(reasons) if r is not None]
        self.last_rejects = [
            {**dataset[i], REASON_COLUMN: reasons[i], REJECTED_BY_COLUMN: self.name} for i in rejected_idx
        ]
        counts = Counter(r for r in reasons if r is not None)
        self.report = {
            "name": self.name,
            "selector": type(self).__name__,
            "input": len(dataset),
            "kept": len(kept_idx),
            "dropped": len(rejected_idx),
            "reasons": dict(sorted(counts.items())),
            "policy": None if self.is_filter else asdict(self.policy),
            **self.stats,
        }
        if self.rejects_path is not None:
            write_rejects(self.last_rejects, self.rejects_path)
        return dataset.select(kept_idx)

    def after(self, dataset, reasons: list[str | None]) -> None:
        """Called with every row's verdict before the report is built (e.g. to estimate phi/psi)."""

    def write_report(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.report)

    def as_batch_filter(
        self, columns: Callable[[list[str]], dict[str, list]] | None = None
    ) -> Callable[[list[str]], list[str | None]]:
        """A `(texts) -> list[str | None]` callable for `MixingCollator(synthetic_filter=...)`.

        The collator hands over decoded training texts; they are seen as plain `text` rows. `columns`
        may add the extra columns a selector needs (e.g. look up the `answer` of each text). Score
        selectors apply their threshold (or top-k / top-fraction within the batch).
        """
        if not self.is_filter and self.policy.is_empty and type(self).decide is Selector.decide:
            raise ValueError(f"{self.name}: as_batch_filter needs a keep rule, e.g. threshold=0.0.")

        def batch_filter(texts: list[str]) -> list[str | None]:
            if not texts:
                return []
            extra = columns(texts) if columns is not None else {}
            # without a chat structure the whole decoded text is both what filters see and the response
            batch = {"text": list(texts), **extra}
            if self.is_filter:
                return [None if r is None else str(r) for r in self.keep(batch)]
            from datasets import Dataset

            scores = np.asarray([float("nan") if s is None else float(s) for s in self.score(batch)])
            return self.decide(scores, Dataset.from_dict(batch))

        batch_filter.__name__ = f"{self.name}_batch_filter"
        return batch_filter


class SelectionPipeline:
    """Runs selectors in order; `report` gives each step's counts and reasons.

    Args:
        selectors: the steps, applied in order to what the previous step kept.
        rejects_path: when set, all steps' rejects (with `reject_reason` and `rejected_by`) go to this JSONL.

    Example:

    ```python
    >>> from collapse_guard.selection import DedupSelector, PrivacyFilter, SelectionPipeline
    >>> pipeline = SelectionPipeline([DedupSelector(), PrivacyFilter()])
    >>> kept = pipeline(["Mail me at ann@example.com.", "A fine answer.", "A fine answer."])
    >>> kept["text"][:], pipeline.report["steps"][0]["reasons"], pipeline.report["steps"][1]["reasons"]
    (['A fine answer.'], {'exact_duplicate': 1}, {'pii:email': 1})

    ```
    """

    def __init__(self, selectors: Sequence[Selector], rejects_path: str | os.PathLike | None = None):
        selectors = list(selectors)
        if not selectors:
            raise ValueError("SelectionPipeline needs at least one selector, got an empty list.")
        for s in selectors:
            if not isinstance(s, Selector):
                raise TypeError(f"SelectionPipeline takes Selector instances, got {type(s).__name__}.")
        names = [s.name for s in selectors]
        if len(set(names)) != len(names):
            raise ValueError(f"selector names must be unique within a pipeline, got {names}; "
                             "pass name=... to one.")
        self.selectors = selectors
        self.rejects_path = rejects_path
        self.report: dict[str, Any] = {}
        self.last_rejects: list[dict[str, Any]] = []

    def __call__(self, dataset):
        dataset = _as_dataset(dataset)
        n_input = len(dataset)
        steps, rejects = [], []
        for selector in self.selectors:
            if len(dataset) == 0:
                steps.append({"name": selector.name, "selector": type(selector).__name__, "input": 0,
                              "kept": 0, "dropped": 0, "reasons": {}, "skipped": "no rows left"})
                continue
            dataset = selector(dataset)
            steps.append(selector.report)
            rejects.extend(selector.last_rejects)
        self.last_rejects = rejects
        self.report = {
            "input": n_input,
            "kept": len(dataset),
            "dropped": n_input - len(dataset),
            "kept_fraction": len(dataset) / n_input if n_input else float("nan"),
            "steps": steps,
        }
        if self.rejects_path is not None:
            write_rejects(rejects, self.rejects_path)
        return dataset

    def write_report(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.report)

    def as_batch_filter(self) -> Callable[[list[str]], list[str | None]]:
        """All steps as one `MixingCollator` filter: the first step that drops a text names the reason."""
        filters = [s.as_batch_filter() for s in self.selectors]

        def batch_filter(texts: list[str]) -> list[str | None]:
            reasons: list[str | None] = [None] * len(texts)
            for f in filters:
                alive = [i for i, r in enumerate(reasons) if r is None]
                if not alive:
                    break
                for i, r in zip(alive, f([texts[i] for i in alive]), strict=True):
                    reasons[i] = r
            return reasons

        return batch_filter
