"""The self-improvement loop (expert iteration) and equal compute: tokens counted at the model input, the task
score in every round, the task-regression rule, and the recipe end to end on the offline tiny model."""

from pathlib import Path

import pytest
import torch

from collapse_guard.config import ConfigError, load_config
from collapse_guard.detector import CollapseDetector
from collapse_guard.history import FILENAME as HISTORY
from collapse_guard.history import History
from collapse_guard.io import read_json
from collapse_guard.loop import run_recipe
from collapse_guard.token_budget import TokenBudgetCallback

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "self_improve_cpu.yaml"

# The recipe scaled to the tiny model. The tiny model answers no problem right, so the verifier keeps every
# answer (threshold 0): the kept answers still take the whole path (chat rows rendered as text, mixed with
# human text under the floor, trained, counted).
TINY = [
    "model.name_or_path=tiny", "data.real=tiny:human", "data.heldout=tiny:heldout", "data.max_heldout=8",
    "data.report_heldout=8", "data.extra_heldout=null", "rounds=2", "seeds=[0]", "generation.n_samples=8",
    "generation.decision_problems=10", "generation.report_problems=12", "mixing.tokens_per_round=600",
    "training.max_length=64", "training.per_device_train_batch_size=4", "evaluation.context_length=64",
    "evaluation.n_prompts=8", "evaluation.prompt_tokens=4", "evaluation.max_new_tokens=8",
    "selectors=[{class: collapse_guard.selection.VerifierSelector, verifiers: numeric_match, "
    "threshold: 0.0}]",
]


def _tiny_trainer(tmp_path, rows, budget, batch_size=4, epochs=50):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok)
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch_size,
                     num_train_epochs=epochs, max_length=32, report_to=[], use_cpu=True, save_strategy="no",
                     logging_steps=1000, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": rows}),
                         processing_class=tok)
    callback = TokenBudgetCallback(budget)
    trainer.add_callback(callback)
    return trainer, model, callback


def test_token_budget_counts_what_reaches_the_model_and_stops_there(tmp_path):
    rows = [" ".join(f"w{(i * 7 + j) % 97}" for j in range(5 + i % 9)) for i in range(24)]
    trainer, model, budget = _tiny_trainer(tmp_path, rows, budget=700)
    seen = {"tokens": 0, "supervised": 0}

    def independent(module, args, kwargs):  # the user's own hook at the model input
        if module.training:
            seen["tokens"] += int(kwargs["attention_mask"].sum())
            seen["supervised"] += int((kwargs["labels"][:, 1:] != -100).sum())

    handle = model.register_forward_pre_hook(independent, with_kwargs=True)
    trainer.train()
    handle.remove()
    counts = budget.counts
    assert counts["input_tokens"] == seen["tokens"] and counts["supervised_tokens"] == seen["supervised"]
    # stopped at the first optimizer step past the budget: less than one more batch of 4 rows of <= 32 tokens
    assert 700 <= counts["input_tokens"] < 700 + 4 * 32
    assert trainer.state.global_step < trainer.state.max_steps


def test_token_budget_count_survives_a_resume(tmp_path):
    """A round killed after a checkpoint resumes with the tokens trained before it, so the round still ends
    at its budget (not at budget + what was trained before the kill)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer

    rows = [" ".join(f"w{(i * 5 + j) % 89}" for j in range(6 + i % 7)) for i in range(32)]
    tok = tiny_tokenizer()

    def trainer_for(budget: TokenBudgetCallback, max_steps: int):
        args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=max_steps,
                         max_length=32, report_to=[], use_cpu=True, save_strategy="steps", save_steps=3,
                         logging_steps=1000, disable_tqdm=True, seed=0)
        trainer = SFTTrainer(model=tiny_causal_lm(tok), args=args, processing_class=tok,
                             train_dataset=Dataset.from_dict({"text": rows}))
        trainer.add_callback(budget)
        return trainer

    first = TokenBudgetCallback()
    trainer_for(first, max_steps=3).train()  # "killed" right after the checkpoint at step 3
    saved = first.counts
    assert saved["input_tokens"] > 0 and (tmp_path / "out" / "checkpoint-3" / "collapse_guard" /
                                          "token_budget.json").exists()
    resumed = TokenBudgetCallback()
    trainer_for(resumed, max_steps=6).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    uninterrupted = TokenBudgetCallback()
    trainer_for(uninterrupted, max_steps=6).train()
    assert resumed.counts == uninterrupted.counts and resumed.counts["input_tokens"] > saved["input_tokens"]


def test_token_budget_refuses_a_bad_budget():
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1.*got 0"):
        TokenBudgetCallback(0)
    with pytest.raises(ValueError, match="got 1.5"):
        TokenBudgetCallback(1.5)


def test_task_regression_rule_fires_on_a_drop_and_not_on_noise():
    import random

    rng = random.Random(0)
    base = [rng.random() < 0.5 for _ in range(100)]
    gained = [c or rng.random() < 0.4 for c in base]  # ~70%
    entry = lambda correct, r: {"round": r, "step": 0, "heldout_ppl": 10.0,  # noqa: E731
                                "task_accuracy": sum(correct) / len(correct),
                                "task_correct": [int(c) for c in correct]}
    detector = CollapseDetector()
    # a forced drop: the model loses most of what it had gained and more
    dropped = [c and rng.random() < 0.6 for c in gained]
    verdict = detector.check([entry(base, 0), entry(gained, 1), entry(dropped, 2)])
    assert verdict.level == "warn"
    assert any("task accuracy" in reason and "fell from" in reason for reason in verdict.reasons)
    assert verdict.evidence["task_accuracy"]["level"] == "warn"
    assert verdict.evidence["task_accuracy"]["high"] < 0
    # noise: the same accuracy with 6 of 100 answers flipped each way is no fall
    noisy = list(gained)
    right = [i for i, c in enumerate(noisy) if c][:6]
    wrong = [i for i, c in enumerate(noisy) if not c][:6]
    for i in right:
        noisy[i] = False
    for i in wrong:
        noisy[i] = True
    verdict = detector.check([entry(base, 0), entry(gained, 1), entry(noisy, 2)])
    assert verdict.level == "ok" and verdict.evidence["task_accuracy"]["level"] == "ok"
    # a gain is never a warning
    assert detector.check([entry(base, 0), entry(gained, 1)]).level == "ok"


def test_task_settings_are_checked_before_any_work():
    with pytest.raises(ConfigError, match="generation.operations.*'/'"):
        load_config(RECIPE, ["generation.operations=['/']"])
    with pytest.raises(ConfigError, match="generation.samples_per_problem=0"):
        load_config(RECIPE, ["generation.samples_per_problem=0"])
    with pytest.raises(ConfigError, match="data.report_heldout.*max_heldout"):
        load_config(RECIPE, ["data.max_heldout=null"])
    with pytest.raises(ConfigError, match="mixing.tokens_per_round=-5"):
        load_config(RECIPE, ["mixing.tokens_per_round=-5"])


def test_verifier_selector_takes_a_named_verifier():
    from datasets import Dataset

    from collapse_guard.selection import VerifierSelector

    rows = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 2 + 3?"}]] * 2,
                              "completion": [[{"role": "assistant", "content": "2 + 3 = 5"}],
                                             [{"role": "assistant", "content": "2 + 3 = 6"}]],
                              "answer": ["5", "5"]})
    kept = VerifierSelector("numeric_match")(rows)
    assert [c[0]["content"] for c in kept["completion"]] == ["2 + 3 = 5"]
    with pytest.raises(ValueError, match="unknown verifier 'numeric'"):
        VerifierSelector("numeric")


@pytest.fixture(scope="module")
def tiny_self_improve(tmp_path_factory):
    out = tmp_path_factory.mktemp("self_improve")
    recipe = out / "arms.yaml"  # a recipe's own variants replace its parent's
    recipe.write_text(f"extends: {RECIPE}\nvariants:\n"
                      "  guard: {mixing.min_real_fraction: 0.1, guard.enabled: true,"
                      " guard.floor: {minimum: 0.1, maximum: 0.9}}\n"
                      "  floor_50: {mixing.min_real_fraction: 0.5}\n"
                      "  no_real: {mixing.min_real_fraction: 0.0, mixing.allow_low_real_fraction: true}\n")
    config = load_config(recipe, [*TINY, f"output_dir={out / 'run'}"])
    return out / "run", run_recipe(config)


def test_recipe_runs_end_to_end_and_scores_the_task_every_round(tiny_self_improve):
    out, results = tiny_self_improve
    assert set(results) == {"guard/seed_0", "floor_50/seed_0", "no_real/seed_0"}
    for arm in ("guard", "floor_50", "no_real"):
        finals = History.load(out / arm / "seed_0" / HISTORY).finals()
        assert [e["round"] for e in finals] == [0, 1, 2]
        for entry in finals:
            assert 0.0 <= entry["task_accuracy_low"] <= entry["task_accuracy"] <= entry["task_accuracy_high"]
            assert len(entry["task_correct"]) == 10 and len(entry["task_correct@report"]) == 12
            assert entry["heldout_ppl@report"] > 1 and entry["heldout_ppl"] > 1
        # decide on 8 documents, report on 8 others
        evaluation = read_json(out / arm / "seed_0" / "round_1" / "eval.json")
        assert len(evaluation["heldout_doc_nll@report"]) == 8
        generated = read_json(out / arm / "seed_0" / "round_1" / "generation.json")
        assert generated["samples"] == 32 and generated["problems"] == 8


def test_arms_train_the_same_tokens_at_the_model_input(tiny_self_improve):
    """Equal compute: the adaptive floor, a fixed floor and no floor train the same tokens per round (to
    within one optimizer step of 4 rows of <= 64 tokens), whatever real rows the floor added."""
    out, _ = tiny_self_improve
    for r in (1, 2):
        trained = {arm: read_json(out / arm / "seed_0" / f"round_{r}" / "train.json")
                   for arm in ("guard", "floor_50", "no_real")}
        for arm, info in trained.items():
            assert 600 <= info["input_tokens_trained"] < 600 + 4 * 64, (arm, info)
            assert info["train_steps"] < info["max_steps"]  # the budget ended the round, not the epochs
        assert trained["no_real"]["real_tokens_trained"] == 0 and trained["floor_50"]["real_fraction"] >= 0.5


def test_task_rows_train_as_chat_text_beside_human_text(tiny_self_improve):
    from datasets import load_from_disk

    out, _ = tiny_self_improve
    train = load_from_disk(str(out / "floor_50" / "seed_0" / "round_1" / "train"))
    sources = [p["source"] for p in train["provenance"]]
    synthetic = [t for t, s in zip(train["text"], sources, strict=True) if s == "synthetic"]
    assert synthetic and sources.count("real") >= sources.count("synthetic")
    assert all("<|im_start|>user\nWhat is " in t and "<|im_start|>assistant\n" in t for t in synthetic)


def test_task_score_survives_a_diverged_model():
    """A NaN model: the round's task score is None (not a crash), and the perplexity carries the alarm."""
    from types import SimpleNamespace

    from collapse_guard.generation.task_samples import TaskConfig
    from collapse_guard.loop import _task_scores
    from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok)
    settings = TaskConfig(decision_problems=4, report_problems=3, max_new_tokens=4)
    ctx = SimpleNamespace(config=SimpleNamespace(generation=SimpleNamespace(settings=settings)), cache={},
                          tokenizer=tok)
    healthy = _task_scores(ctx, model)
    assert len(healthy["task_correct"]) == 4 and len(healthy["task_correct@report"]) == 3
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    assert _task_scores(ctx, model) == {"task_accuracy": None, "task_accuracy@report": None}
