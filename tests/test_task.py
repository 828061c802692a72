"""The task score: held-out problems that never overlap training ones, accuracy with its interval, the
paired change between rounds, and the evaluator's answers as a verifier sees them."""

from __future__ import annotations

import math

import pytest
import torch

from collapse_guard.generation.backends import ModelDivergedError
from collapse_guard.task import TaskEvaluator, accuracy_change, accuracy_interval, arithmetic_problems
from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer


def test_train_and_heldout_problems_never_overlap_and_answers_are_right():
    train = arithmetic_problems(400, seed=1, split="train")
    heldout = arithmetic_problems(150, seed=2, split="heldout")
    assert not set(train["prompt"]) & set(heldout["prompt"])
    assert len(set(train["prompt"])) == 400
    for prompt, answer in zip(heldout["prompt"], heldout["answer"], strict=True):
        expression = prompt.removeprefix("What is ").split("?")[0]
        assert str(eval(expression)) == answer  # noqa: S307 - our own generated "a op b"
    # same seed, same problems: a loop's rounds and ranks see one task set
    assert arithmetic_problems(20, seed=1, split="train")["prompt"] == train["prompt"][:20]


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "n must be an int >= 1"),
    ({"n": 10, "split": "test"}, "split must be one of"),
    ({"n": 10, "operations": ["/"]}, "operations must be"),
    ({"n": 5000, "low": 1, "high": 9}, "widen the operand range"),
])
def test_bad_problem_requests_say_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        arithmetic_problems(**kwargs)


def test_wilson_interval_matches_the_closed_form_and_stays_in_range():
    score = accuracy_interval([True] * 12 + [False] * 8)
    assert score.accuracy == pytest.approx(0.6)
    assert (score.low, score.high) == pytest.approx((0.3866, 0.7812), abs=1e-4)
    none = accuracy_interval([False] * 30)
    assert none.low == 0.0 and 0.0 < none.high < 0.15  # a zero count still has an upper bound
    with pytest.raises(ValueError, match="empty"):
        accuracy_interval([])


def test_paired_change_cancels_item_difficulty():
    base = [i % 2 == 0 for i in range(40)]
    same = accuracy_change(base, base)
    assert same.change == 0.0 and same.low == 0.0 == same.high  # identical items: no noise at all
    better = accuracy_change(base, [True] * 40)
    assert better.change == pytest.approx(0.5) and better.low > 0.3
    with pytest.raises(ValueError, match="same non-empty items"):
        accuracy_change(base, base[:-1])


def test_evaluator_hands_the_verifier_greedy_answers_in_prompt_order():
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok)
    problems = arithmetic_problems(6, split="heldout")
    seen: dict = {}

    def every_other(completions, **kwargs):
        seen.update(kwargs, completions=completions)
        return [float(i % 2 == 0) for i in range(len(completions))]

    evaluator = TaskEvaluator(problems["prompt"], problems["answer"], tok, verifier=every_other,
                              max_new_tokens=3, batch_size=4)
    score = evaluator.score(model)
    assert score.correct == (True, False) * 3 and score.accuracy == 0.5
    assert seen["answer"] == problems["answer"] and seen["prompts"] == problems["prompt"]
    # greedy and batched: the same completions one prompt at a time, and again on a second call
    single = TaskEvaluator(problems["prompt"], problems["answer"], tok, verifier=every_other,
                           max_new_tokens=3, batch_size=1)
    assert single.completions(model) == seen["completions"] == evaluator.completions(model)


def test_evaluator_says_a_diverged_model_diverged_instead_of_scoring_noise():
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)
    problems = arithmetic_problems(4, split="heldout")
    with pytest.raises(ModelDivergedError, match="^model diverged: non-finite logits"):
        TaskEvaluator(problems["prompt"], problems["answer"], tok, max_new_tokens=3).score(model)


def test_evaluator_refuses_bad_input_before_generating():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        TaskEvaluator(["a?", "b?"], ["1"], tok)
    with pytest.raises(TypeError, match="Hugging Face tokenizer"):
        TaskEvaluator(["a?"], ["1"], "gpt2")
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        TaskEvaluator(["a?"], ["1"], tok, max_new_tokens=0)
