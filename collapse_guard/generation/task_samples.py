"""Samples k answers per training problem: the generate step of expert iteration (STaR, ReST-EM).

The model answers each problem of a verifiable task `k` times (sampling); a verifier (`VerifierSelector`)
later keeps the accepted answers, and the floor mixes them with human text. Rows are conversational
prompt/completion pairs, so TRL's `SFTTrainer` trains on the answer only; the `answer` column feeds the
verifier and `correct` (the oracle's label, when an oracle is given) lets the selector measure phi, psi and
the breakdown point p* (Feng et al. 2024).

Example:

```python
>>> from collapse_guard.generation.task_samples import TaskSampler
>>> from collapse_guard.task import arithmetic_problems
>>> from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer
>>> tok = tiny_tokenizer()
>>> sampler = TaskSampler(tiny_causal_lm(tok), tok, samples_per_problem=2, max_new_tokens=4)
>>> rows = sampler.generate(arithmetic_problems(3))
>>> len(rows), rows.column_names
(6, ['prompt', 'completion', 'answer', 'correct', 'provenance'])

```
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from collapse_guard.generation.backends import Decoding, generate_texts, make_backend
from collapse_guard.provenance import SYNTHETIC, make_provenance


@dataclass
class TaskConfig:
    """`generation:` with `method: task`: the verifiable task of an expert-iteration loop (STaR, ReST-EM), how
    the model samples its answers, and the task's two held-out sets.

    A round samples `samples_per_problem` answers to each of `n_samples x pool_factor / samples_per_problem`
    fresh training problems; the recipe's verifier selector keeps the correct ones. The held-out problems are
    never trained on (the split is a property of each problem's text): the `decision_problems` are what the
    loop's verdict (the task-regression rule) reads, the `report_problems` are only reported, so what steers
    the run is not what its results are judged on.
    """

    task: Literal["arithmetic"] = field(default="arithmetic", metadata={
        "help": "'arithmetic': 'What is a + b? Answer with the number.' (free oracle, no download)."})
    operations: list[str] = field(default_factory=lambda: ["+"], metadata={
        "help": "Any of '+', '-', '*'."})
    low: int = field(default=1, metadata={"help": "Smallest operand."})
    high: int = field(default=40, metadata={
        "help": "Largest operand. Addition up to 30-40: SmolLM2-135M-Instruct answers ~1 in 3 greedily and "
                "~1 in 7 sampled: well below its ceiling, and right often enough to learn from."})
    samples_per_problem: int = field(default=4, metadata={
        "help": "Answers sampled per training problem (k)."})
    max_new_tokens: int = field(default=16, metadata={
        "help": "Answer length budget (sampling and the held-out scoring); 'a + b = c' needs ~10."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature (STaR/ReST: 0.7-1.0)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus top_p of the sampling."})
    batch_size: int = field(default=32, metadata={"help": "Prompts per generate call."})
    decision_problems: int = field(default=60, metadata={
        "help": "Held-out problems the verdict reads every round (greedy answers)."})
    report_problems: int = field(default=160, metadata={
        "help": "Further held-out problems, only reported (task_accuracy@report); 0: none."})
    show_progress: bool = field(default=False, metadata={"help": "Progress lines while sampling."})

    def __post_init__(self) -> None:
        from collapse_guard.config import _fail

        self.operations = list(self.operations)
        bad = [op for op in self.operations if op not in ("+", "-", "*")]
        if bad or not self.operations:
            _fail("generation.operations", self.operations, "use a non-empty list of '+', '-', '*'.")
        for key in ("samples_per_problem", "max_new_tokens", "batch_size", "decision_problems"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(f"generation.{key}", value, "use an int >= 1.")
        if isinstance(self.report_problems, bool) or not isinstance(self.report_problems, int) \
                or self.report_problems < 0:
            _fail("generation.report_problems", self.report_problems, "use an int >= 0.")
        if not (isinstance(self.low, int) and isinstance(self.high, int) and 0 <= self.low <= self.high):
            _fail("generation.low/high", (self.low, self.high), "use integers 0 <= low <= high.")
        if not (0.0 < self.temperature <= 5.0) or not (0.0 < self.top_p <= 1.0):
            _fail("generation.temperature/top_p", (self.temperature, self.top_p),
                  "task answers are sampled: use 0 < temperature <= 5 and 0 < top_p <= 1.")

    def training_problems(self, n: int, seed: int):
        """`n` training problems, a fresh draw for each seed (the loop passes seed and round)."""
        from collapse_guard.task import arithmetic_problems

        return arithmetic_problems(n, seed=seed, split="train", low=self.low, high=self.high,
                                   operations=self.operations)

    def heldout_sets(self):
        """(decision, report) problems: one fixed draw from the held-out side, cut in two, so they never
        share a problem with each other or with any training draw."""
        from collapse_guard.task import arithmetic_problems

        both = arithmetic_problems(self.decision_problems + self.report_problems, seed=0, split="heldout",
                                   low=self.low, high=self.high, operations=self.operations)
        decision = both.select(range(self.decision_problems))
        report = both.select(range(self.decision_problems, len(both))) if self.report_problems else None
        return decision, report


class TaskSampler:
    """`samples_per_problem` sampled answers to each problem (`prompt`, `answer` columns).

    Args:
        model, tokenizer: the policy that answers (its chat template renders the question).
        samples_per_problem: k answers per problem.
        max_new_tokens: answer length budget.
        temperature, top_p: sampling settings (STaR/ReST sample at temperature ~0.7-1.0).
        oracle: `(completions, **columns) -> list[float]` labelling each answer correct (>= 0.5); default
            `numeric_match()` on the `answer` column. The label is data for measuring the selector, not a
            filter.
        batch_size: prompts per generate call.
    """

    def __init__(self, model, tokenizer, samples_per_problem: int = 4, max_new_tokens: int = 24,
                 temperature: float = 0.8, top_p: float = 0.95, oracle: Callable[..., list] | None = None,
                 batch_size: int = 32, backend: str = "auto"):
        if isinstance(samples_per_problem, bool) or not isinstance(samples_per_problem, int) \
                or samples_per_problem < 1:
            raise ValueError(f"samples_per_problem must be an int >= 1, got {samples_per_problem!r}.")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"TaskSampler needs a tokenizer with a chat template to pose the questions; "
                             f"{type(tokenizer).__name__} has none. Use an instruct model's tokenizer.")
        if oracle is None:
            from collapse_guard.selection.verifier import numeric_match

            oracle = numeric_match()
        self.tokenizer, self.samples_per_problem, self.oracle = tokenizer, samples_per_problem, oracle
        self.decoding = Decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        self.batch_size = batch_size
        self.backend = make_backend(model, tokenizer, backend, batch_size)
        self.stats: dict[str, Any] = {}

    def generate(self, problems, seed: int = 0, round_index: int = 0):
        """Rows: `prompt` (a user turn), `completion` (an assistant turn), `answer`, `correct`,
        `provenance`."""
        from datasets import Dataset

        missing = [c for c in ("prompt", "answer") if c not in problems.column_names]
        if missing:
            raise ValueError(f"task problems need 'prompt' and 'answer' columns; missing {missing} (got "
                             f"{problems.column_names}).")
        start = time.perf_counter()
        questions = [q for q in problems["prompt"] for _ in range(self.samples_per_problem)]
        answers = [a for a in problems["answer"] for _ in range(self.samples_per_problem)]
        tok = self.tokenizer
        rendered = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=False) for q in questions]
        # the same question k times in one batch: sampling gives k different answers (seeded per batch)
        outs = generate_texts(self.backend, rendered, self.decoding, seed,
                              stops=[tok.eos_token] if tok.eos_token else [], batch_size=self.batch_size,
                              stage="task samples")
        completions = [c.text.strip() for c in outs]
        labels = self.oracle(completions, prompts=questions, answer=answers)
        correct = [s is not None and s >= 0.5 for s in labels]
        meta = {"generator": "task_samples", "samples_per_problem": self.samples_per_problem,
                "decoding": self.decoding.to_dict(), "seed": seed}
        rows = Dataset.from_dict({
            "prompt": [[{"role": "user", "content": q}] for q in questions],
            "completion": [[{"role": "assistant", "content": c}] for c in completions],
            "answer": [str(a) for a in answers],
            "correct": correct,
            "provenance": [make_provenance(SYNTHETIC, round_index, **meta, sample=i)
                           for i in range(len(completions))],
        })
        self.stats = {"problems": len(problems), "samples": len(completions), "correct": sum(correct),
                      "accuracy": sum(correct) / len(correct),
                      "seconds": round(time.perf_counter() - start, 3)}
        return rows
