"""Verifier selection on a task with a free oracle: SmolLM2-135M-Instruct does arithmetic.

Feng et al. 2024 ("Beyond Model Collapse") show that training on a model's own samples stops
degrading the model when a verifier selects them, and that a verifier is good enough while the
generator's error rate p stays below the breakdown point p* = 1 / (1 + psi / phi), with
phi = P(keep | correct) and psi = P(keep | wrong).

This script samples several answers per addition question from SmolLM2-135M-Instruct (batched
generation with left padding), labels them with the free oracle (the true sum), and selects with
two verifiers:

1. `exact_answer_match` against the known answer: every kept sample is correct (phi = 1, psi = 0);
2. majority vote over the samples of each question (self-consistency, no ground truth needed):
   cheaper to have, with psi > 0 and a finite breakdown point.

Run (a few minutes on CPU):

    python examples/select_arithmetic.py --questions 16 --samples 6 --output-dir select_arithmetic_out
"""

from __future__ import annotations

import argparse
import random
import warnings
from collections import Counter
from pathlib import Path

import torch
from datasets import Dataset

from collapse_guard.io import atomic_write_json
from collapse_guard.resources import load_smollm2
from collapse_guard.selection import SelectionPipeline, VerifierSelector, exact_answer_match
from collapse_guard.selection.verifier import extract_answer, normalize_answer


def make_questions(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    pairs = [(rng.randint(2, 49), rng.randint(2, 49)) for _ in range(n)]
    return [(f"What is {a} + {b}? Answer with the number.", a + b) for a, b in pairs]


@torch.inference_mode()
def sample_answers(model, tokenizer, questions: list[str], samples: int, max_new_tokens: int,
                   seed: int) -> list[str]:
    """`samples` completions per question, sampled in one batched, left-padded `generate` call."""
    tokenizer.padding_side = "left"  # decoder-only generation: new tokens follow the prompt directly
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      tokenize=False)
        for q in questions
    ]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    out = model.generate(
        **enc,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=max_new_tokens,
        num_return_sequences=samples,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = out[:, enc["input_ids"].shape[1] :]
    # small chat models often append chatter after a blank line; the answer is what comes before it
    return [t.strip().split("\n\n")[0] for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def majority_vote(completions, question, **kwargs) -> list[float]:
    """Self-consistency: 1.0 when a sample's answer is its question's most common answer (TRL signature)."""
    answers = [extract_answer(c[-1]["content"] if isinstance(c, list) else c) for c in completions]
    answers = [normalize_answer(a) if a is not None else None for a in answers]
    votes: dict[str, Counter] = {}
    for q, a in zip(question, answers, strict=True):
        if a is not None:
            votes.setdefault(q, Counter())[a] += 1
    majority = {q: c.most_common(1)[0][0] for q, c in votes.items()}
    return [float(a is not None and a == majority.get(q)) for q, a in zip(question, answers, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--samples", type=int, default=6, help="sampled answers per question")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="select_arithmetic_out")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    model.eval()
    questions = make_questions(args.questions, args.seed)
    completions = sample_answers(model, tokenizer, [q for q, _ in questions], args.samples,
                                 args.max_new_tokens, args.seed)
    # generate() returns the samples of each question next to each other
    rows = [(q, truth, c) for i, (q, truth) in enumerate(questions)
            for c in completions[i * args.samples : (i + 1) * args.samples]]
    data = Dataset.from_dict({
        "messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": c}]
                     for q, _, c in rows],
        "question": [q for q, _, _ in rows],
        "answer": [str(t) for _, t, _ in rows],
    })
    # the free oracle: the true sum is known, so every sample gets a ground-truth label
    data = data.add_column("correct", [bool(x) for x in exact_answer_match()(
        [[m[-1]] for m in data["messages"]], answer=data["answer"])])

    out_dir = Path(args.output_dir)
    results = {}
    for name, verifier in (("exact_answer_match", exact_answer_match()), ("majority_vote", majority_vote)):
        # one batch holds every sample, so majority_vote sees all samples of each question together
        selector = VerifierSelector(verifier, name=name, batch_size=len(data))
        pipeline = SelectionPipeline([selector], rejects_path=out_dir / f"rejects_{name}.jsonl")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kept = pipeline(data)
        pipeline.write_report(out_dir / f"report_{name}.json")
        step = pipeline.report["steps"][0]
        results[name] = {k: step[k] for k in ("input", "kept", "phi", "psi", "breakdown_point", "error_rate",
                                              "correct_share_before", "correct_share_kept")}
        results[name]["warning"] = str(caught[0].message) if caught else None
        results[name]["kept_all_correct"] = bool(len(kept)) and all(kept["correct"])

    print(f"{len(data)} samples ({args.questions} questions x {args.samples}) from SmolLM2-135M-Instruct\n")
    for i in range(min(4, len(data))):
        print(f"  {data[i]['question']!r} -> {data[i]['messages'][-1]['content']!r}  "
              f"correct={data[i]['correct']}")
    print(f"\n{'verifier':<20}{'kept':>8}{'correct before':>16}{'correct kept':>14}"
          f"{'phi':>7}{'psi':>7}{'p*':>7}{'p':>7}")
    for name, r in results.items():
        print(f"{name:<20}{r['kept']:>5}/{r['input']:<3}{r['correct_share_before']:>15.1%}"
              f"{r['correct_share_kept']:>14.1%}{r['phi']:>7.2f}{r['psi']:>7.2f}{r['breakdown_point']:>7.2f}"
              f"{r['error_rate']:>7.2f}")
        if r["warning"]:
            print(f"  warning: {r['warning']}")
    atomic_write_json(out_dir / "summary.json", results)
    print(f"\nreports and rejects in {out_dir}/")


if __name__ == "__main__":
    main()
