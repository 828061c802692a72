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
from typing import Any

from collapse_guard.generation.backends import Decoding, generate_texts, make_backend
from collapse_guard.provenance import SYNTHETIC, make_provenance


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
