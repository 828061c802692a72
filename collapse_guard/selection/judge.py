"""An LLM judge: any chat model tags instruction/response pairs; `JudgeSelector` keeps them by tag.

Magpie tags every pair (quality, difficulty, task category, ...) with a judge model and filters on the
tags; distilabel has QualityScorer / ComplexityScorer. `LLMJudge` does the same with any chat model
(SmolLM2-135M-Instruct on CPU by default in the examples, a bigger one on a GPU), batched:

- `quality` (1-5) of the response to the instruction, `difficulty` (1-5) of the instruction, and
  `category` (one of `CATEGORIES`), each asked with the rubric below;
- `method="probabilities"` (default) reads the judge's next-token probabilities of the rating tokens
  ("1".."5", or the category letters) after the question and returns the expected rating: there is
  nothing to parse, so nothing fails to parse, and a small judge still gives a graded score;
- `method="generate"` lets the judge answer freely (greedy, a few tokens) and parses the first rating;
  answers without one are counted in `stats["parse_failures"]` and tagged NaN (such rows fail any
  threshold, with the reason `judge_unparsed`).

Rubric (the text the judge sees, `RUBRICS`):

| rating | quality (of the response) | difficulty (of the instruction) |
|---|---|---|
| 1 | wrong, off-topic, incoherent or empty | trivial: one fact or one step anyone knows |
| 2 | mostly wrong or unhelpful, major errors | easy: common knowledge, a couple of steps |
| 3 | partly right, with errors or omissions | medium: some knowledge or several steps |
| 4 | correct and helpful, minor issues | hard: specialised knowledge or careful reasoning |
| 5 | correct, complete, clear and well written | very hard: expert knowledge or many reasoning steps |

What a 135M judge can and cannot do, measured with SmolLM2-135M-Instruct on the 60 hand-labelled pairs
of `tests/data/judge_labelled.jsonl` (20 instructions x a correct, a wrong and an off-topic or garbled
answer; `benchmarks/judge.py`, `benchmarks/results/judge.json`):

| variant | quality pairwise acc. | quality rho | difficulty rho | category acc. | unparsed |
|---|---|---|---|---|---|
| probabilities | 0.567 | 0.21 | -0.27 | 0.05 (says "A" = math 48/60) | 0 |
| probabilities, calibrated (default) | 0.55 | 0.22 | -0.21 | 0.20 | 0 |
| generate | 0.008 | - | - | 0.05 | 53/60 quality, 51/60 difficulty |

Chance is 0.5 for pairwise accuracy (responses to the same instruction ordered like the labels), 0 for
Spearman's rho and 0.125 for the category.

So a 135M judge does not tell a correct answer from a wrong or off-topic one much better than a coin,
has no idea of difficulty, and needs calibration to stop answering "A" to every category question.
Free generation is worse: it rarely answers with a digit at all, which is why `probabilities` is the
default (no parse failures by construction). The selector, the batching and the provenance work the
same with any chat model: use a judge of a few billion parameters (on a GPU) for real filtering; the
small one is a plumbing default and a smoke test.

Example:

```python
>>> from collapse_guard.selection import JudgeSelector, LLMJudge
>>> from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer
>>> tok = tiny_tokenizer()
>>> judge = LLMJudge(tiny_causal_lm(tok), tok, aspects=("quality",))
>>> rows = [{"prompt": "Name a river.", "completion": "The Nile."}, {"prompt": "2+2?", "completion": "4"}]
>>> kept = JudgeSelector(judge, min_quality=1.0)(rows)
>>> len(kept), sorted(c for c in kept.column_names if c.startswith("judge_"))
(2, ['judge_quality'])

```
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from collapse_guard.data import prompts_and_responses
from collapse_guard.provenance import PROVENANCE_COLUMN
from collapse_guard.selection.base import Selector, _as_dataset

ASPECTS = ("quality", "difficulty", "category")
METHODS = ("probabilities", "generate")
CATEGORIES = ("math", "coding", "translation", "creative writing", "information seeking", "advice",
              "reasoning", "other")
_LETTERS = "ABCDEFGHIJKLMNOP"

RUBRICS = {
    "quality": (
        "Rate the quality of the assistant's response to the user's instruction on a scale of 1 to 5:\n"
        "1 = wrong, off-topic, incoherent or empty\n2 = mostly wrong or unhelpful, with major errors\n"
        "3 = partly right, with errors or omissions\n4 = correct and helpful, with minor issues\n"
        "5 = correct, complete, clear and well written"
    ),
    "difficulty": (
        "Rate how difficult the user's instruction is to answer well, on a scale of 1 to 5:\n"
        "1 = trivial: one fact or one step anyone knows\n2 = easy: common knowledge, a couple of steps\n"
        "3 = medium: some knowledge or several steps\n4 = hard: specialised knowledge or careful reasoning\n"
        "5 = very hard: expert knowledge or many reasoning steps"
    ),
}


def _question(aspect: str, instruction: str, response: str, categories: Sequence[str]) -> str:
    if aspect == "category":
        options = "\n".join(f"{_LETTERS[i]}. {c}" for i, c in enumerate(categories))
        return (f"Which category does this user instruction belong to?\n\nInstruction: {instruction}\n\n"
                f"Options:\n{options}\n\nAnswer with the letter only.")
    shown = f"Instruction: {instruction}" + (f"\n\nResponse: {response}" if aspect == "quality" else "")
    return f"{RUBRICS[aspect]}\n\n{shown}\n\nAnswer with a single digit from 1 to 5."


class LLMJudge:
    """Tags instruction/response pairs with a chat model: quality, difficulty (1-5) and task category.

    Args:
        model: a causal LM (any `AutoModelForCausalLM`; PEFT / DDP wrappers are unwrapped), a model
            directory, or `"smollm2"` for the embedded SmolLM2-135M-Instruct (recipes name it so).
        tokenizer: its tokenizer, with a chat template (the question is asked as a user turn); loaded
            with the model when `model` is a name or a directory.
        aspects: which tags to produce, from `ASPECTS`.
        method: `"probabilities"` (expected rating from the rating tokens' probabilities) or `"generate"`
            (free answer, parsed; failures counted).
        categories: the task categories offered (answered by letter).
        batch_size: questions per forward pass.
        max_length: questions are cut to this many tokens (the end, where the question is, is kept).
        max_response_chars: responses are shortened to this many characters before judging.
        calibrate: with `method="probabilities"`, divide the label probabilities by those the judge gives
            a content-free question ("N/A" instruction and response), then renormalise ("contextual
            calibration", Zhao et al. 2021): small judges prefer some digits or letters whatever
            they read, and this removes that prior.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        aspects: Sequence[str] = ("quality", "difficulty"),
        method: str = "probabilities",
        categories: Sequence[str] = CATEGORIES,
        batch_size: int = 8,
        max_length: int = 1024,
        max_response_chars: int = 2000,
        calibrate: bool = True,
    ):
        aspects = tuple(aspects)
        if not aspects or any(a not in ASPECTS for a in aspects):
            raise ValueError(f"aspects must be a non-empty subset of {ASPECTS}, got {aspects!r}.")
        if method not in METHODS:
            raise ValueError(f"method={method!r} is unknown; choose one of {METHODS}.")
        if not 2 <= len(categories) <= len(_LETTERS):
            raise ValueError(f"categories needs 2 to {len(_LETTERS)} entries, got {len(categories)}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if isinstance(model, (str, os.PathLike)):
            model, tokenizer = _load_judge(str(model), tokenizer)
        if tokenizer is None:
            raise ValueError("LLMJudge needs tokenizer=... (the judge model's own tokenizer).")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the judge's tokenizer has no chat_template; the judge is asked as a chat "
                             "model. "
                             "Set tokenizer.chat_template (or use an instruct model).")
        self.model = model
        self.tokenizer = tokenizer
        self.aspects = aspects
        self.method = method
        self.categories = tuple(categories)
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_response_chars = max_response_chars
        self.calibrate = calibrate
        self._prior: dict[str, np.ndarray] = {}
        self.name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        self.reset_stats()
        self._labels = {a: self._label_token_ids(a) for a in aspects}

    def reset_stats(self) -> None:
        """Zero the counters (`questions` asked, `parse_failures` per aspect)."""
        self.stats: dict[str, Any] = {"parse_failures": Counter(), "questions": 0}

    # ----- label tokens ---------------------------------------------------------------------------
    def labels(self, aspect: str) -> list[str]:
        return list(_LETTERS[: len(self.categories)]) if aspect == "category" else ["1", "2", "3", "4", "5"]

    def _label_token_ids(self, aspect: str) -> list[list[int]]:
        """Token ids that start each label, with and without a leading space (BPE spells them differently)."""
        out = []
        for label in self.labels(aspect):
            ids = set()
            for spelling in (label, " " + label):
                encoded = self.tokenizer.encode(spelling, add_special_tokens=False)
                if encoded:
                    ids.add(encoded[0] if spelling == label or len(encoded) == 1 else encoded[-1])
            out.append(sorted(ids))
        return out

    # ----- prompts --------------------------------------------------------------------------------
    def prompt(self, aspect: str, instruction: str, response: str) -> str:
        response = response[: self.max_response_chars]
        messages = [{"role": "user", "content": _question(aspect, instruction, response, self.categories)}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        return [x[-self.max_length:] for x in ids]  # the question is at the end: keep it

    # ----- rating ---------------------------------------------------------------------------------
    def rate(self, instructions: Sequence[str], responses: Sequence[str]) -> dict[str, list]:
        """`{"judge_<aspect>": [...]}` for every aspect: floats (NaN = unparsed) and category names."""
        if len(instructions) != len(responses):
            raise ValueError(f"{len(instructions)} instructions but {len(responses)} responses.")
        out: dict[str, list] = {}
        for aspect in self.aspects:
            prompts = [self.prompt(aspect, i, r) for i, r in zip(instructions, responses, strict=True)]
            self.stats["questions"] += len(prompts)
            if self.method == "probabilities":
                probs = self._label_probabilities(prompts, aspect)
                if self.calibrate:
                    prior = self._content_free_prior(aspect)
                    probs = [p / prior / (p / prior).sum() for p in probs]
                if aspect == "category":
                    out["judge_category"] = [self.categories[int(np.argmax(p))] for p in probs]
                else:
                    out[f"judge_{aspect}"] = [float(np.dot(p, np.arange(1, 6))) for p in probs]
            else:
                answers = self._generate(prompts)
                parsed = [self._parse(aspect, a) for a in answers]
                self.stats["parse_failures"][aspect] += sum(p is None for p in parsed)
                if aspect == "category":
                    out["judge_category"] = [self.categories[p] if p is not None else "unparsed"
                                             for p in parsed]
                else:
                    out[f"judge_{aspect}"] = [float(p + 1) if p is not None else math.nan for p in parsed]
        return out

    def _content_free_prior(self, aspect: str) -> np.ndarray:
        if aspect not in self._prior:
            self._prior[aspect] = self._label_probabilities([self.prompt(aspect, "N/A", "N/A")], aspect)[0]
        return np.maximum(self._prior[aspect], 1e-6)

    def _parse(self, aspect: str, answer: str) -> int | None:
        """Index of the first label in a free answer ("4", "Rating: 4/5", "B. coding", "coding")."""
        if aspect == "category":
            match = re.search(rf"\b([{_LETTERS[: len(self.categories)]}])\b", answer)
            if match:
                return _LETTERS.index(match.group(1))
            lowered = answer.lower()
            return next((i for i, c in enumerate(self.categories) if c in lowered), None)
        match = re.search(r"(?<![\d.])([1-5])(?![\d.])", answer)
        return int(match.group(1)) - 1 if match else None

    def _model(self):
        from collapse_guard.generation.backends import unwrap_model

        model = self.model
        get_base = getattr(model, "get_base_model", None)
        return unwrap_model(get_base() if callable(get_base) else model)

    def _label_probabilities(self, prompts: list[str], aspect: str) -> list[np.ndarray]:
        """Probabilities over the labels (renormalised) of the token after each prompt; length-sorted."""
        import torch

        model = self._model()
        sequences = self._encode(prompts)
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        groups = self._labels[aspect]
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[np.ndarray] = [np.zeros(len(groups))] * len(sequences)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                width = max(len(sequences[i]) for i in idx)
                # left padding: every question ends in the last column, where the rating token is predicted
                ids = torch.full((len(idx), width), int(pad), dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, width - len(sequences[i]):] = torch.tensor(sequences[i])
                    mask[row, width - len(sequences[i]):] = 1
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=position_ids.to(device)).logits[:, -1].float()
                logp = torch.log_softmax(logits, dim=-1).cpu()
                for row, i in enumerate(idx):
                    scores = np.array([torch.logsumexp(logp[row, g], 0).item() for g in groups])
                    p = np.exp(scores - scores.max())
                    out[i] = p / p.sum()
        model.train(was_training)
        return out

    def _generate(self, prompts: list[str]) -> list[str]:
        from collapse_guard.generation.backends import Decoding, TransformersBackend, generate_texts

        backend = TransformersBackend(self._model(), self.tokenizer, batch_size=self.batch_size)
        stops = [t for t in (self.tokenizer.eos_token,) if t]
        completions = generate_texts(backend, prompts, Decoding(max_new_tokens=8, temperature=0.0), seed=0,
                                     stops=stops, batch_size=self.batch_size,
                                     prompt_ids=self._encode(prompts))
        return [c.text for c in completions]


def _load_judge(name: str, tokenizer: Any):
    if name == "smollm2":
        from collapse_guard.resources import load_smollm2

        return load_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name), tokenizer or AutoTokenizer.from_pretrained(name)


def _with_judge_meta(provenance: list[dict], tags: dict[str, list], judge: LLMJudge) -> list[dict]:
    """Each row's provenance with `meta["judge"]` = its tags, the judge model and the method."""
    out = []
    for i, record in enumerate(provenance):
        if not isinstance(record, dict):
            out.append(record)
            continue
        meta = json.loads(record.get("meta") or "{}")
        values = {k.removeprefix("judge_"): (None if isinstance(v[i], float) and math.isnan(v[i]) else v[i])
                  for k, v in tags.items()}
        meta["judge"] = {"model": judge.name, "method": judge.method, **values}
        out.append({**record, "meta": json.dumps(meta, sort_keys=True, default=str)})
    return out


class JudgeSelector(Selector):
    """Tags every pair with an `LLMJudge` (columns `judge_quality`, ...) and keeps pairs by tag thresholds.

    Args:
        judge: the `LLMJudge`, or a dict of its arguments (`{"model": "smollm2", "aspects": [...]}`, as a
            recipe writes it); None when the dataset already holds the `judge_*` columns.
        min_quality / max_quality / min_difficulty / max_difficulty: bounds on the 1-5 tags (None = no bound).
        categories: keep only these task categories (None = any).
        retag: tag again even when the `judge_*` columns exist.
        **kwargs: further `Selector` options (`name`, `batch_size`, `rejects_path`, `target` is unused).

    Reasons: `low_quality`, `high_quality`, `too_easy`, `too_hard`, `category:<name>`, `judge_unparsed`.
    The tags go into the `provenance` column's `meta["judge"]` when the dataset has one, and their
    distribution (mean, quantiles, category counts, parse failures) into `report["tags"]`.
    """

    def __init__(
        self,
        judge: LLMJudge | None = None,
        min_quality: float | None = None,
        max_quality: float | None = None,
        min_difficulty: float | None = None,
        max_difficulty: float | None = None,
        categories: Sequence[str] | None = None,
        retag: bool = False,
        **kwargs: Any,
    ):
        kwargs.setdefault("name", "judge")
        super().__init__(**kwargs)
        for name, value in (("min_quality", min_quality), ("max_quality", max_quality),
                            ("min_difficulty", min_difficulty), ("max_difficulty", max_difficulty)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 1 <= value <= 5):
                raise ValueError(f"{name} must be a rating in [1, 5] or None, got {value!r}.")
        if isinstance(judge, dict):
            judge = LLMJudge(**judge)
        if judge is not None and not isinstance(judge, LLMJudge):
            raise TypeError(f"judge must be an LLMJudge (or None with precomputed judge_* columns), got "
                            f"{type(judge).__name__}.")
        if isinstance(categories, str):
            raise TypeError("categories must be a list of category names, got a single string; wrap it in a "
                            "list.")
        self.judge = judge
        self.bounds = {"quality": (min_quality, max_quality), "difficulty": (min_difficulty, max_difficulty)}
        self.categories = None if categories is None else set(categories)
        self.retag = retag

    def _needed(self) -> list[str]:
        needed = [a for a, (lo, hi) in self.bounds.items() if lo is not None or hi is not None]
        return needed + (["category"] if self.categories is not None else [])

    def tag(self, dataset):
        """The dataset with `judge_*` columns (and judge tags in provenance); skips tagging when present."""
        dataset = _as_dataset(dataset)
        aspects = list(self.judge.aspects) if self.judge is not None else self._needed()
        present = all(f"judge_{a}" in dataset.column_names for a in aspects)
        if present and not self.retag:
            return dataset
        if self.judge is None:
            missing = [f"judge_{a}" for a in aspects if f"judge_{a}" not in dataset.column_names]
            raise ValueError(f"{self.name}: judge=None but the dataset lacks {missing}; pass "
                             "judge=LLMJudge(...).")
        tags: dict[str, list] = {}
        for start in range(0, len(dataset), self.batch_size):
            prompts, responses = prompts_and_responses(dataset[start : start + self.batch_size])
            for k, v in self.judge.rate(prompts, responses).items():
                tags.setdefault(k, []).extend(v)
        for column, values in tags.items():
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
            dataset = dataset.add_column(column, values)
        if PROVENANCE_COLUMN in dataset.column_names:
            records = _with_judge_meta(list(dataset[PROVENANCE_COLUMN]), tags, self.judge)
            dataset = dataset.remove_columns(PROVENANCE_COLUMN).add_column(PROVENANCE_COLUMN, records)
        return dataset

    def validate(self, dataset) -> None:
        missing = [a for a in self._needed() if f"judge_{a}" not in dataset.column_names]
        if missing:
            raise ValueError(f"{self.name}: no judge tags for {missing}: the judge's aspects must include "
                             "them "
                             f"(LLMJudge(aspects=...)).")

    def __call__(self, dataset):
        if not self._needed():
            raise ValueError(f"{self.name}: no keep rule given (min/max quality, min/max difficulty, "
                             "categories); "
                             "pass one, e.g. min_quality=3.")
        if self.judge is not None:
            self.judge.reset_stats()  # the report counts this call's parse failures only
        dataset = self.tag(dataset)
        kept = super().__call__(dataset)
        self.report["tags"] = _tag_summary(dataset, self.judge)
        return kept

    def keep(self, batch: dict[str, list]) -> list[str | None]:
        n = len(next(iter(batch.values())))
        if self.judge is not None and any(f"judge_{a}" not in batch for a in self._needed()):
            # a batch filter inside MixingCollator sees raw texts: tag them here
            batch = {**batch, **self.judge.rate(*prompts_and_responses(batch))}
        reasons: list[str | None] = [None] * n
        for i in range(n):
            for aspect, (lo, hi) in self.bounds.items():
                if lo is None and hi is None:
                    continue
                value = batch[f"judge_{aspect}"][i]
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    reasons[i] = "judge_unparsed"
                elif lo is not None and value < lo:
                    reasons[i] = "low_quality" if aspect == "quality" else "too_easy"
                elif hi is not None and value > hi:
                    reasons[i] = "high_quality" if aspect == "quality" else "too_hard"
                if reasons[i]:
                    break
            if reasons[i] is None and self.categories is not None:
                category = batch["judge_category"][i]
                if category not in self.categories:
                    reasons[i] = "judge_unparsed" if category == "unparsed" else f"category:{category}"
        return reasons


def _tag_summary(dataset, judge: LLMJudge | None) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for column in dataset.column_names:
        if not column.startswith("judge_"):
            continue
        values = dataset[column]
        if column == "judge_category":
            summary["category"] = dict(Counter(values).most_common())
            continue
        array = np.asarray([np.nan if v is None else v for v in values], dtype=float)
        finite = array[np.isfinite(array)]
        summary[column.removeprefix("judge_")] = {
            "mean": float(finite.mean()) if finite.size else None,
            "quantiles": {q: float(np.quantile(finite, q / 100)) for q in (10, 50, 90)}
            if finite.size else None,
            "unparsed": int((~np.isfinite(array)).sum()),
        }
    if judge is not None:
        summary["judge"] = {"model": judge.name, "method": judge.method, "calibrated": judge.calibrate,
                            "questions": judge.stats["questions"],
                            "parse_failures": dict(judge.stats["parse_failures"])}
    return summary


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks with ties averaged (what Spearman's rho needs)."""
    array = np.asarray(values, dtype=float)
    order = np.argsort(array, kind="stable")
    ranks = np.empty(len(array))
    ranks[order] = np.arange(len(array), dtype=float)
    for value in np.unique(array):
        tied = array == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and not math.isnan(x)]
    if len(pairs) < 3 or len({x for x, _ in pairs}) < 2 or len({y for _, y in pairs}) < 2:
        return float("nan")
    ra, rb = _ranks([x for x, _ in pairs]), _ranks([y for _, y in pairs])
    return float(np.corrcoef(ra, rb)[0, 1])


def judge_agreement(rows: Sequence[dict], tags: dict[str, list]) -> dict[str, Any]:
    """How well judge tags agree with labelled rows (`id`, `quality`, `difficulty`, `category` keys).

    - quality: Spearman rho with the labels, and pairwise accuracy: for two responses to the same
      instruction with different labels, the share the judge orders like the labels (ties count 1/2,
      unparsed count 0; chance = 0.5);
    - difficulty: Spearman rho over the distinct instructions (their mean tag);
    - category: accuracy over the distinct instructions (chance = 1 / number of categories).
    """
    out: dict[str, Any] = {"n": len(rows)}
    if "judge_quality" in tags:
        q = tags["judge_quality"]
        correct, total = 0.0, 0
        by_id: dict[Any, list[int]] = {}
        for i, r in enumerate(rows):
            by_id.setdefault(r["id"], []).append(i)
        for members in by_id.values():
            for x in members:
                for y in members:
                    if rows[x]["quality"] > rows[y]["quality"]:
                        total += 1
                        if not (math.isnan(q[x]) or math.isnan(q[y])):
                            correct += 1.0 if q[x] > q[y] else 0.5 if q[x] == q[y] else 0.0
        out["quality_spearman"] = _spearman(q, [r["quality"] for r in rows])
        out["quality_pairwise_accuracy"] = correct / total if total else float("nan")
        out["quality_unparsed"] = int(sum(math.isnan(v) for v in q))
    ids = list(dict.fromkeys(r["id"] for r in rows))
    first = {r["id"]: r for r in reversed(rows)}
    if "judge_difficulty" in tags:
        d = tags["judge_difficulty"]
        mean = {}
        for k in ids:
            values = [d[i] for i, r in enumerate(rows) if r["id"] == k and not math.isnan(d[i])]
            mean[k] = float(np.mean(values)) if values else math.nan
        out["difficulty_spearman"] = _spearman([mean[k] for k in ids], [first[k]["difficulty"] for k in ids])
        out["difficulty_unparsed"] = int(sum(math.isnan(v) for v in d))
    if "judge_category" in tags:
        c = tags["judge_category"]
        hits = [c[i] == r["category"] for i, r in enumerate(rows)]
        out["category_accuracy"] = float(np.mean(hits))
        out["category_unparsed"] = int(sum(v == "unparsed" for v in c))
        out["category_predicted"] = dict(Counter(c).most_common())
    return out
