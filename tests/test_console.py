"""The console a user reads (issue 25 item 7, issue 24's budget line): the project's own lines, no library
progress bars or chatter unless `-v`; the guard's schedule said once up front, and an over-budget warning
only when a setting of the guard could have avoided it. The examples print readable lines, no
deprecation warnings nor raw log dicts.

From the user's side: the CLI and the examples run as processes, their stdout and stderr read back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "collapse-guard"
# what tqdm draws: "45%|████▌     | 11/24 [00:00<00:00, 27.50it/s]"
BAR_FRAGMENTS = ("%|", "it/s]", "s/it]", "examples/s]")


def _env() -> dict[str, str]:
    """The caller's environment without the switches the CLI sets itself (an earlier in-process CLI call in
    this test session may have set them)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TQDM_DISABLE", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
                        "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _cli(*args: str, cwd: Path) -> tuple[int, str]:
    done = subprocess.run([str(CLI), *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout + done.stderr


def _bars(text: str) -> list[str]:
    return [line for line in text.replace("\r", "\n").splitlines() if any(f in line for f in BAR_FRAGMENTS)]


def test_run_console_has_no_library_bars_and_says_the_guard_schedule_once(tmp_path):
    out = tmp_path / "run"
    code, text = _cli("run", str(REPO / "recipes" / "tiny_loop.yaml"), f"output_dir={out}", cwd=tmp_path)
    assert code == 0, text[-3000:]
    assert not _bars(text), _bars(text)[:5]  # no generation, Trainer, datasets nor weight-loading bar
    assert "round 2/2: verdict" in text and "MixingCollator: at least 2 real of 4 rows" in text  # own lines
    # the guard says when it measures once, up front, although each of the 2 rounds starts a trainer ...
    schedule = [line for line in text.splitlines() if line.startswith("collapse guard: measures at")]
    assert schedule == ["collapse guard: measures at the start and the end of training (step 24) only: "
                        "eval_steps=1000 leaves no measurement in between on a run of 24 steps."]
    assert text.index(schedule[0]) < text.index("round 1/2: scoring")
    # ... and no warning about the cost of its two required measurements, which the user cannot act on;
    # the figure stays in the round's record
    assert "cost_budget" not in text
    share = json.loads((out / "round_1" / "train.json").read_text())["guard_cost_share"]
    assert share > 0.03


def test_verbose_turns_the_library_bars_on(tmp_path):
    """The quiet default is asserted above (the same generation bar included)."""
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"The river crossed the valley near mill {i} at dawn." for i in range(5)))
    args = ["generate", "continuation", "--model", "tiny", "--texts", str(texts), "--n", "4",
            "--prefix-tokens", "4", "--max-new-tokens", "4"]
    code, verbose = _cli("-v", *args, "--out", str(tmp_path / "verbose"), cwd=tmp_path)
    assert code == 0 and any("continuation:" in line for line in _bars(verbose)), verbose[-2000:]


def test_a_warning_about_the_budget_only_when_optional_measurements_went_over(tmp_path, caplog):
    """The Trainer's evaluation asks for a measurement at every step: those are the guard's to skip (a
    setting the user can change), so going over the budget with them is worth a warning."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from collapse_guard import CollapseGuardCallback, GuardConfig, ProbeConfig
    from collapse_guard.testing import human_like_sentences, tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    rows = [tokenizer(t, truncation=True, max_length=32) for t in human_like_sentences(64, seed=3)]
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=8, use_cpu=True,
                             report_to=[], save_strategy="no", eval_strategy="steps", eval_steps=1,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=tiny_causal_lm(tokenizer), args=args, train_dataset=rows, eval_dataset=rows[:8],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      processing_class=tokenizer)
    guard = CollapseGuardCallback(human_like_sentences(8, seed=99),
                                  probe=ProbeConfig(context_length=32, max_new_tokens=4),
                                  config=GuardConfig(eval_steps=1000, cost_budget=0.01, budget_unit="tokens",
                                                     stop_training_on_alarm=False)).attach(trainer)
    with caplog.at_level("INFO", logger="collapse_guard"):
        trainer.train()
    assert [e["step"] for e in guard.history.entries] == [0, 1, 2, 3, 4]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "over its cost_budget of 1%: 3 measurement(s) beyond the first and the " \
                                  "final one" in warnings[0], warnings


EXAMPLES = [("sft_plain", ["--max-steps", "2"], "trained 2 steps, mean training loss"),
            ("sft_guard", ["--max-steps", "2"], "verdict: OK"),
            ("sft_selector", ["--max-steps", "2"], "selection kept"),
            ("sft_magpie", ["--max-steps", "2"], "magpie:"),
            ("sft_adaptive_floor", ["--max-steps", "6"], "floor decisions: step 0: ok: floor held at 0.10; "),
            ("grpo_guard", ["--max-steps", "2"], "policy verdict")]


def test_examples_print_readable_lines_without_deprecation_warnings_or_log_dicts(tmp_path, capsys):
    """transformers deprecates with FutureWarning, which Python shows by default; every one raised while an
    example runs is recorded (not only the first per place, which an earlier test may have used up)."""
    import importlib.util
    import warnings

    for name, args, line in EXAMPLES:
        spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FutureWarning)
            spec.loader.exec_module(module)
            module.main(["--output-dir", str(tmp_path / name), *args])
        future = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if w.category is FutureWarning]
        assert not future, (name, future)
        out = capsys.readouterr().out
        assert line in out and not [row for row in out.splitlines() if row.startswith("{'")], (name, out)
