"""Checking math answers: math-verify against the built-in verifiers, on LaTeX answers (no model needed).

A verifier that rejects a correct answer written differently (`0.5` for `\\frac{1}{2}`) throws away good
samples (phi drops); one that accepts a wrong answer keeps bad ones (psi rises). This script scores
equal and unequal answer pairs with

- `exact_answer_match` (last `\\boxed{}` or number, string-normalized),
- `numeric_match` (the same answer read as a number, with a tolerance),
- `math_answer_match(backend="builtin")` (adds fractions, percent and `x = 2`),
- `math_answer_match(backend="math_verify")` (Hugging Face's math-verify: symbolic equality),
- `trl.rewards.accuracy_reward`, TRL's GRPO reward (math-verify inside), passed unchanged to
  `VerifierSelector` (it reads the reference from a `solution` column and needs chat-format completions),

prints the table and writes it to `--out` as JSON.

Run (seconds; needs `pip install 'collapse-guard[math]'` for the math-verify columns):

    python examples/verify_latex_answers.py --out verify_latex_answers.json
"""

from __future__ import annotations

import argparse
import json
import logging

from datasets import Dataset

from collapse_guard.selection import (
    VerifierSelector,
    exact_answer_match,
    math_answer_match,
    numeric_match,
)
from collapse_guard.selection.verifier import math_verify_available

# (reference answer, completion, equal?) -- the kinds of rewriting a model does to a correct answer,
# then wrong answers that look close.
PAIRS = [
    (r"\frac{1}{2}", "The answer is $0.5$.", True),
    (r"2\sqrt{2}", r"So the length is $\boxed{\sqrt{8}}$.", True),
    (r"\{1, 2, 3\}", r"The set is $\boxed{\{3, 2, 1\}}$.", True),
    (r"50\%", "The probability is $0.5$.", True),
    (r"\frac{3}{4}", r"$\boxed{\dfrac{3}{4}}$", True),
    ("2", "Solving gives $x = 2$.", True),
    (r"\frac{\pi}{2}", r"The angle is $\boxed{\pi/2}$.", True),
    ("1024", r"That is $\boxed{2^{10}}$.", True),
    ("(1, 2)", r"The solution set is the interval $\boxed{(1,2)}$.", True),
    ("x^2 + 2x + 1", r"Expanding, $\boxed{(x+1)^2}$.", True),
    ("1000", "We need 1,000 bricks.", True),
    ("0.25", r"It is \boxed{\frac{1}{4}}.", True),
    (r"\frac{1}{3}", "It is about 0.33.", False),
    (r"\sqrt{2}", r"$\boxed{2}$", False),
    (r"\{1, 2\}", r"$\boxed{\{1, 2, 3\}}$", False),
    ("12", "I think the answer is 13.", False),
    (r"\frac{2}{3}", r"$\boxed{\frac{3}{2}}$", False),
    ("-4", r"$\boxed{4}$", False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it logs every unparsable candidate

    data = Dataset.from_dict({
        "messages": [[{"role": "user", "content": "Solve it."}, {"role": "assistant", "content": c}]
                     for _, c, _ in PAIRS],
        "answer": [a for a, _, _ in PAIRS],
        "solution": [a if "$" in a else f"${a}$" for a, _, _ in PAIRS],  # TRL's reward reads `solution`
        "correct": [eq for *_, eq in PAIRS],
    })
    verifiers = {"exact_answer_match": exact_answer_match(), "numeric_match": numeric_match(),
                 "math_answer_match[builtin]": math_answer_match(backend="builtin")}
    if math_verify_available():
        from trl.rewards import accuracy_reward

        verifiers["math_answer_match[math_verify]"] = math_answer_match(backend="math_verify")
        verifiers["trl accuracy_reward"] = accuracy_reward
    else:
        print("math-verify is not installed: pip install 'collapse-guard[math]' for its columns.\n")

    table, summary = {}, {}
    for name, verifier in verifiers.items():
        selector = VerifierSelector(verifier, name=name.split("[")[0].replace(" ", "_"))
        scores = selector.score(data[:])
        kept = [bool(s == 1.0) for s in scores]
        table[name] = kept
        summary[name] = {
            "equal_pairs_matched": sum(k for k, eq in zip(kept, data["correct"], strict=True) if eq),
            "equal_pairs": sum(data["correct"]),
            "unequal_pairs_accepted": sum(k for k, eq in zip(kept, data["correct"], strict=True) if not eq),
            "unequal_pairs": len(PAIRS) - sum(data["correct"]),
        }

    names = list(verifiers)
    print(f"{'reference':<14}{'completion':<44}{'equal':<7}" + "".join(f"{n[:18]:>20}" for n in names))
    for i, (answer, completion, equal) in enumerate(PAIRS):
        marks = "".join(f"{'keep' if table[n][i] else '-':>20}" for n in names)
        print(f"{answer:<14}{completion[:42]:<44}{'yes' if equal else 'no':<7}{marks}")
    print()
    for name, s in summary.items():
        print(f"{name:<32} equal pairs matched {s['equal_pairs_matched']}/{s['equal_pairs']}, "
              f"unequal pairs accepted {s['unequal_pairs_accepted']}/{s['unequal_pairs']}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"pairs": PAIRS, "kept": table, "summary": summary}, fh, indent=1)


if __name__ == "__main__":
    main()
