"""Keep samples a verifier accepts; measure how good the verifier is (Feng et al. 2024).

Verifiers use TRL's reward-function signature, `(completions, **kwargs) -> list[float]`, so any
GRPO reward function works here and the built-ins work in `GRPOTrainer`: `kwargs` carry `prompts`
and every other dataset column (e.g. `answer`).

Math answers: `math_answer_match()` checks them with Hugging Face's math-verify when it is installed
(`pip install 'collapse-guard[math]'`: symbolic equality, so `0.5` = `\\frac{1}{2}`, `\\sqrt{8}` =
`2\\sqrt{2}`, `\\{3,2,1\\}` = `\\{1,2,3\\}`, `50\\%` = 0.5) and falls back to fast built-in rules
otherwise; on the 12 equal LaTeX answer pairs of `examples/verify_latex_answers.py` math-verify matches
12, the built-in fallback 7, `exact_answer_match` 3, and none accepts any of the 6 unequal pairs.
TRL's own `trl.rewards.accuracy_reward` (math-verify inside; reference answers in a `solution`
column; chat-format completions) plugs into `VerifierSelector` unchanged:

```python
from trl.rewards import accuracy_reward
selector = VerifierSelector(accuracy_reward)  # rows: messages + solution
```

With ground truth (a boolean column such as `correct`, or an `oracle` callable), the selector
estimates phi = P(keep | correct), psi = P(keep | wrong) and the breakdown point
p* = 1 / (1 + psi / phi) ("Beyond Model Collapse", Feng et al. 2024): selection keeps the training
data mostly correct only while the generator's error rate stays below p*.

Example:

```python
>>> from datasets import Dataset
>>> from collapse_guard.selection import VerifierSelector, exact_answer_match
>>> data = Dataset.from_dict({"prompt": ["What is 2 + 3?"] * 2, "completion": ["It is 5.", "It is 6."],
...                           "answer": ["5", "5"]})
>>> selector = VerifierSelector(exact_answer_match(), label_column=None)
>>> selector(data)["completion"][:], selector.report["reasons"]
(['It is 5.'], {'verifier_rejected': 1})

```
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from collapse_guard.data import content, data_format
from collapse_guard.selection.base import Selector

Verifier = Callable[..., list]

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[i:j]
            depth -= 1
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last \\boxed{} content, else the last number."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: Any) -> str:
    """Lower-cased, without spaces, `$`, thousands separators and trailing `.`; 42.0 -> 42."""
    s = str(answer).strip().lower().replace("$", "").replace("\\!", "")
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    value = _to_number(s)
    if value is not None and math.isfinite(value) and value == int(value) and "/" not in s:
        return str(int(value))
    return s


def _to_number(s: str) -> float | None:
    s = s.replace(",", "").strip()
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def exact_answer_match(answer_column: str = "answer") -> Verifier:
    """1.0 when the completion's final answer (last \\boxed{} or last number) equals `answer`, else 0.0."""

    def exact_answer(completions: list, **kwargs: Any) -> list[float]:
        answers = _column(kwargs, answer_column, "exact_answer_match")
        out = []
        for completion, answer in zip(completions, answers, strict=True):
            predicted = extract_answer(content(completion))
            same = predicted is not None and normalize_answer(predicted) == normalize_answer(answer)
            out.append(float(same))
        return out

    exact_answer.required_columns = (answer_column,)  # type: ignore[attr-defined]
    return exact_answer


def numeric_match(answer_column: str = "answer", rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> Verifier:
    """1.0 when the completion's final number is within tolerance of `answer`, else 0.0."""

    def numeric(completions: list, **kwargs: Any) -> list[float]:
        answers = _column(kwargs, answer_column, "numeric_match")
        out = []
        for completion, answer in zip(completions, answers, strict=True):
            predicted = extract_answer(content(completion))
            p = _to_number(normalize_answer(predicted)) if predicted is not None else None
            a = answer if isinstance(answer, (int, float)) else _to_number(normalize_answer(answer))
            close = p is not None and a is not None and math.isclose(p, a, rel_tol=rel_tol, abs_tol=abs_tol)
            out.append(float(close))
        return out

    numeric.required_columns = (answer_column,)  # type: ignore[attr-defined]
    return numeric


_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")


def _builtin_math_value(answer: str) -> str:
    """A light LaTeX normalization for the fallback: \\frac{a}{b} -> a/b, 50\\% -> 0.5, x = 2 -> 2."""
    s = normalize_answer(answer)
    s = _LATEX_FRAC.sub(r"(\1)/(\2)", s).replace("\\left", "").replace("\\right", "")
    s = re.sub(r"^[a-z]=", "", s)
    percent = re.fullmatch(r"(-?[\d.]+)\\?%", s)
    if percent:
        return repr(float(percent.group(1)) / 100)
    return s.replace("(", "").replace(")", "") if re.fullmatch(r"\(?-?[\d.]+\)?/\(?[\d.]+\)?", s) else s


def _builtin_math_equal(predicted: str | None, answer: Any) -> bool:
    if predicted is None:
        return False
    p, a = _builtin_math_value(predicted), _builtin_math_value(str(answer))
    if p == a:
        return True
    pv, av = _to_number(p), _to_number(a)
    return pv is not None and av is not None and math.isclose(pv, av, rel_tol=1e-6, abs_tol=1e-9)


def math_verify_available() -> bool:
    """Whether the `math-verify` package (Hugging Face's LaTeX answer checker) is installed."""
    return importlib.util.find_spec("math_verify") is not None


def math_answer_match(answer_column: str = "answer", backend: str = "auto") -> Verifier:
    r"""1.0 when the completion's final answer is mathematically equal to `answer`, else 0.0.

    Args:
        answer_column: the column holding the reference answer (LaTeX or plain).
        backend: `"math_verify"` (symbolic equality with Hugging Face's math-verify: `\frac{1}{2}` = 0.5,
            `\sqrt{8}` = `2\sqrt{2}`, sets in any order, `50\%` = 0.5, intervals, `x = 2` = 2),
            `"builtin"` (fast string / numeric rules: last `\boxed{}` or number, fractions and percent), or
            `"auto"` (math-verify when installed, the built-ins otherwise). `None` is returned for a
            reference math-verify cannot parse (left out of the verifier mean, as in TRL's accuracy_reward).

    Example:

    ```python
    >>> from collapse_guard.selection import math_answer_match
    >>> verify = math_answer_match(backend="builtin")
    >>> verify([r"It is \boxed{\frac{1}{2}}.", "I get 0.4"], answer=["0.5", "0.5"])
    [1.0, 0.0]

    ```

    TRL's own `trl.rewards.accuracy_reward` (math-verify inside, reference column `solution`) also works
    unchanged in `VerifierSelector` for chat data: `VerifierSelector(accuracy_reward)`.
    """
    if backend not in ("auto", "math_verify", "builtin"):
        raise ValueError(f"backend={backend!r} is unknown; choose 'auto', 'math_verify' or 'builtin'.")
    if backend == "math_verify" and not math_verify_available():
        raise ModuleNotFoundError("math_answer_match(backend='math_verify') needs math-verify: "
                                  "`pip install 'collapse-guard[math]'` (or `pip install math-verify`).")
    use_math_verify = backend == "math_verify" or (backend == "auto" and math_verify_available())

    def math_answer(completions: list, **kwargs: Any) -> list[float | None]:
        answers = _column(kwargs, answer_column, "math_answer_match")
        texts = [content(c) for c in completions]
        if use_math_verify:
            return _math_verify_scores(texts, answers)
        return [float(_builtin_math_equal(extract_answer(t), a)) for t, a in zip(texts, answers, strict=True)]

    math_answer.required_columns = (answer_column,)  # type: ignore[attr-defined]
    math_answer.backend = "math_verify" if use_math_verify else "builtin"  # type: ignore[attr-defined]
    return math_answer


def _math_verify_scores(texts: list[str], answers: list) -> list[float | None]:
    import threading

    from math_verify import parse, verify

    # math-verify times out with signal.alarm, which only the main thread may use
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    out: list[float | None] = []
    for text, answer in zip(texts, answers, strict=True):
        gold_text = str(answer)
        gold = parse(gold_text if "$" in gold_text or "\\boxed" in gold_text else f"${gold_text}$",
                     parsing_timeout=timeout) or parse(gold_text, parsing_timeout=timeout)
        if not gold:
            out.append(None)
            continue
        predicted = parse(text, parsing_timeout=timeout)
        out.append(float(bool(predicted) and verify(gold, predicted, timeout_seconds=timeout)))
    return out


def regex_format(pattern: str, flags: int = re.DOTALL, full_match: bool = False) -> Verifier:
    """1.0 when the completion matches `pattern` (`re.search`, or `re.fullmatch` with full_match=True)."""
    compiled = re.compile(pattern, flags)
    match = compiled.fullmatch if full_match else compiled.search

    def regex(completions: list, **kwargs: Any) -> list[float]:
        return [float(match(content(c).strip() if full_match else content(c)) is not None)
                for c in completions]

    regex.__name__ = "regex_format"
    return regex


def _column(kwargs: dict[str, Any], name: str, who: str) -> list:
    if name not in kwargs:
        raise KeyError(f"{who} needs the dataset column '{name}' (got columns {sorted(kwargs)}).")
    return kwargs[name]


def breakdown_point(phi: float, psi: float) -> float:
    """p* = 1 / (1 + psi / phi): the generator error rate above which kept data is mostly wrong."""
    if phi <= 0:
        return 0.0
    return 1.0 / (1.0 + psi / phi)


def selection_quality(correct: Sequence[bool], kept: Sequence[bool]) -> dict[str, float]:
    """phi, psi, p* and the share of correct samples before and after selection."""
    correct_a, kept_a = np.asarray(correct, dtype=bool), np.asarray(kept, dtype=bool)
    n_correct, n_wrong = int(correct_a.sum()), int((~correct_a).sum())
    phi = float((kept_a & correct_a).sum() / n_correct) if n_correct else float("nan")
    psi = float((kept_a & ~correct_a).sum() / n_wrong) if n_wrong else float("nan")
    p_star = breakdown_point(phi, 0.0 if math.isnan(psi) else psi) if not math.isnan(phi) else float("nan")
    n_kept = int(kept_a.sum())
    return {
        "phi": phi,
        "psi": psi,
        "breakdown_point": p_star,
        "error_rate": n_wrong / len(correct_a) if len(correct_a) else float("nan"),
        "correct_share_before": n_correct / len(correct_a) if len(correct_a) else float("nan"),
        "correct_share_kept": float((kept_a & correct_a).sum() / n_kept) if n_kept else float("nan"),
        "n_correct": n_correct,
        "n_wrong": n_wrong,
    }


# The verifiers a recipe can name (`verifiers: numeric_match`), each built with its defaults.
NAMED_VERIFIERS = {"numeric_match": numeric_match, "exact_answer_match": exact_answer_match,
                   "math_answer_match": math_answer_match}


def _named_verifier(name: str) -> Verifier:
    if name not in NAMED_VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}: name one of {sorted(NAMED_VERIFIERS)} or pass a "
                         "callable with TRL's reward-function signature.")
    return NAMED_VERIFIERS[name]()


class VerifierSelector(Selector):
    """Keeps samples whose weighted mean verifier score reaches `threshold` (default 1.0: all pass).

    Args:
        verifiers: one callable or a list, each `(completions, **kwargs) -> list[float | None]` (TRL's
            reward-function signature; `None` = not applicable to that sample, left out of its mean); a
            recipe may name a built-in one instead ("numeric_match", "exact_answer_match",
            "math_answer_match").
        weights: one weight per verifier (default: equal).
        threshold: minimum weighted mean score to keep a sample.
        label_column: a boolean column saying whether each sample is correct (ground truth); used
            only to measure phi / psi / p*, never to select. Ignored when the column is absent.
        oracle: a callable with the verifier signature returning truthy values for correct samples,
            used instead of `label_column` when labels must be computed.
        **kwargs: further `Selector` options (`name`, `batch_size`, `rejects_path`, ...).
    """

    def __init__(
        self,
        verifiers: Verifier | str | Sequence[Verifier | str],
        weights: Sequence[float] | None = None,
        threshold: float = 1.0,
        label_column: str | None = "correct",
        oracle: Verifier | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("name", "verifier")
        super().__init__(threshold=threshold, **kwargs)
        verifiers = [verifiers] if callable(verifiers) or isinstance(verifiers, str) else list(verifiers)
        verifiers = [_named_verifier(v) if isinstance(v, str) else v for v in verifiers]
        if not verifiers or not all(callable(v) for v in verifiers):
            raise TypeError(f"verifiers must be a callable or a non-empty list of callables, got "
                            f"{verifiers!r}.")
        for v in verifiers + ([oracle] if oracle is not None else []):
            params = inspect.signature(v).parameters
            if "completions" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                raise TypeError(
                    f"verifier {getattr(v, '__name__', v)!r} must accept completions=... and **kwargs "
                    "(TRL reward-function signature: def f(completions, **kwargs) -> list[float])."
                )
        if weights is not None and len(weights) != len(verifiers):
            raise ValueError(f"weights has {len(weights)} entries for {len(verifiers)} verifiers.")
        self.verifiers = verifiers
        weights = weights if weights is not None else [1.0] * len(verifiers)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.label_column = label_column
        self.oracle = oracle
        self.required_columns = tuple(c for v in verifiers for c in getattr(v, "required_columns", ()))

    def _inputs(self, batch: dict[str, list]) -> dict[str, Any]:
        """TRL-style arguments: conversational completions for chat data, strings otherwise."""
        fmt = data_format(list(batch))
        columns = {k: v for k, v in batch.items() if k not in ("prompt", "completion", "messages")}
        if fmt == "messages":
            prompts, completions = [], []
            for messages in batch["messages"]:
                end = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"),
                          default=len(messages))
                prompts.append(list(messages[:end]))
                completions.append(list(messages[end : end + 1]))
        elif fmt == "prompt_completion":
            prompts, completions = list(batch["prompt"]), list(batch["completion"])
        else:
            prompts, completions = [""] * len(batch["text"]), list(batch["text"])
        return {"prompts": prompts, "completions": completions, **columns}

    def score(self, batch: dict[str, list]) -> list[float]:
        inputs = self._inputs(batch)
        n = len(inputs["completions"])
        table = np.full((len(self.verifiers), n), np.nan)
        for j, verifier in enumerate(self.verifiers):
            out = list(verifier(**inputs))
            if len(out) != n:
                name = getattr(verifier, "__name__", verifier)
                raise ValueError(f"verifier {name!r} returned {len(out)} scores for {n}.")
            table[j] = [np.nan if s is None else float(s) for s in out]
        present = ~np.isnan(table)
        weight = (self.weights[:, None] * present).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return list(np.where(weight > 0, np.nansum(self.weights[:, None] * table, 0) / weight, np.nan))

    def _labels(self, dataset) -> list[bool] | None:
        if self.oracle is not None:
            labels: list[bool] = []
            for batch in self._batches(dataset):
                labels.extend(bool(x) for x in self.oracle(**self._inputs(batch)))
            return labels
        if self.label_column and self.label_column in dataset.column_names:
            return [bool(x) for x in dataset[self.label_column]]
        return None

    def decide(self, scores: np.ndarray, dataset) -> list[str | None]:
        reasons = super().decide(scores, dataset)
        renamed = {"below_threshold": "verifier_rejected", "above_threshold": "verifier_rejected",
                   "invalid_score": "unverifiable"}
        return [renamed.get(r, r) if r is not None else None for r in reasons]

    def after(self, dataset, reasons: list[str | None]) -> None:
        labels = self._labels(dataset)
        if labels is None:
            return
        quality = selection_quality(labels, [r is None for r in reasons])
        self.stats.update(quality)
        if quality["error_rate"] > quality["breakdown_point"]:
            warnings.warn(
                f"{self.name}: the generator's error rate {quality['error_rate']:.3f} is above the "
                f"verifier's "
                f"breakdown point p* = {quality['breakdown_point']:.3f} (phi={quality['phi']:.3f}, "
                f"psi={quality['psi']:.3f}): most kept samples are wrong, so training on them degrades the "
                f"model "
                "(Feng et al. 2024). Use a stricter verifier or a stronger generator.",
                stacklevel=3,
            )
