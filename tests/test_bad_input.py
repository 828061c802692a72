"""Bad data and model input is refused before any work starts, in one clear line (issue 23 §4, data side).

From the user's side: the command line's exit status, its single stderr line and an untouched output folder
(before, these failed after round 0 had written its files, with a traceback, or not at all); through the
API, the exception and its message, raised before a training step or a measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from collapse_guard.cli import main
from collapse_guard.data import DataFormatError, check_source, load_source

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_loop.yaml"
TEXTS = ["The river crossed the valley at dusk and the birds flew home.",
         "A quiet town kept its old bridge, and the children walked over it each morning."] * 4


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _chatless_model(folder: Path) -> Path:
    from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer(chat_template=None)
    tiny_causal_lm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


MESSAGES = json.dumps({"messages": [{"role": "user", "content": "Hi there"},
                                    {"role": "assistant", "content": "Hello, how can I help?"}]})
CASES = {
    # name: (override key, file name, content, what the one line says)
    "empty held-out file": ("data.heldout", "heldout.txt", "", "is an empty file (0 bytes)"),
    "blank held-out file": ("data.heldout", "heldout.txt", " \n\t\n\n", "holds only whitespace"),
    "blank real file": ("data.real", "real.txt", "\n   \n", "holds only whitespace"),
    "empty .jsonl": ("data.real", "real.jsonl", "\n\n", "holds only whitespace"),
    "[] .json": ("data.real", "real.json", "[]", "holds []: expected a non-empty list"),
    "blank rows .jsonl": ("data.real", "real.jsonl", '{"text": " "}\n{"text": ""}\n',
                          "every one of its 2 rows has blank text"),
    "binary held-out file": ("data.heldout", "heldout.txt", bytes(range(256)) * 8,
                             "is not a text file (byte 0 is NUL: binary data?)"),
    "latin-1 held-out file": ("data.heldout", "heldout.txt", "caf\xe9 au lait\n".encode("latin-1"),
                              "is not UTF-8 text"),
    "wrong columns .jsonl": ("data.real", "real.jsonl", '{"content": "a b c"}\n',
                             "has columns ['content']"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_files_are_refused_in_one_line_before_anything_is_written(case, tmp_path, capsys):
    key, name, content, needle = CASES[case]
    path = _write(tmp_path / name, content)
    out = tmp_path / "run"
    assert main(["run", str(RECIPE), f"output_dir={out}", f"{key}={path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("collapse-guard: error:") and needle in err and str(path) in err, err
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists()  # refused before the run folder was claimed


def test_chat_data_for_a_tokenizer_without_a_chat_template_is_refused_before_anything_is_written(
        tmp_path, capsys):
    model = _chatless_model(tmp_path / "model")
    real = _write(tmp_path / "chat.jsonl", MESSAGES + "\n")
    out = tmp_path / "run"
    capsys.readouterr()  # the model's save progress bar
    assert main(["run", str(RECIPE), f"output_dir={out}", f"model.name_or_path={model}",
                 f"data.real={real}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is chat data ('messages') but the tokenizer of" in err and "has no chat template" in err, err
    assert "\n" not in err and not out.exists()


def test_a_real_process_prints_one_line_for_a_binary_held_out_file(tmp_path):
    path = _write(tmp_path / "heldout.txt", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "collapse_guard.cli", "run", str(RECIPE), f"output_dir={out}",
           f"data.heldout={path}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "is not a text file" in done.stderr and not out.exists()


def test_the_loader_says_what_is_wrong_too(tmp_path):
    """`load_source` (the API, and Hub-free sources the cheap check cannot read whole) gives the same kind of
    error instead of a UnicodeDecodeError or an empty data set."""
    with pytest.raises(DataFormatError, match="is not UTF-8 text"):
        load_source(str(_write(tmp_path / "a.txt", b"ok line\n" + "caf\xe9\n".encode("latin-1"))))
    with pytest.raises(DataFormatError, match="every one of its 2 rows has blank text"):
        load_source(str(_write(tmp_path / "b.jsonl", '{"text": " "}\n{"text": "\\t"}\n')))
    check_source(str(_write(tmp_path / "c.jsonl", '{"text": "fine"}\n')), "data.real")  # accepted


# ----- the API: tokenizer and model -----------------------------------------------------------------------
def test_a_model_name_where_a_tokenizer_belongs_is_a_clear_type_error():
    from collapse_guard.metrics import HeldoutPerplexity
    from collapse_guard.mixing import MixingCollator

    with pytest.raises(TypeError, match=r"tokenizer must be a tokenizer object, got the str 'gpt2'; load it "
                                        r"first: AutoTokenizer.from_pretrained\('gpt2'\)"):
        HeldoutPerplexity(TEXTS, "gpt2")
    with pytest.raises(TypeError, match="MixingCollator: tokenizer must be a tokenizer object, got the str"):
        MixingCollator(real_dataset=TEXTS, tokenizer="gpt2")


@pytest.fixture
def bigger_tokenizer(tokenizer):
    from collapse_guard.testing import tiny_tokenizer

    bigger = tiny_tokenizer()
    bigger.add_tokens([f"<extra_{i}>" for i in range(40)])
    return bigger


def test_perplexity_refuses_a_tokenizer_with_more_ids_than_the_model(bigger_tokenizer, tiny_model):
    from collapse_guard.metrics import HeldoutPerplexity

    with pytest.raises(ValueError, match="HeldoutPerplexity: the tokenizer .* has 552 tokens, but the model "
                                         r"\(LlamaForCausalLM\) embeds only 512 ids"):
        HeldoutPerplexity(TEXTS, bigger_tokenizer, context_length=16).compute(tiny_model)


def test_perplexity_warns_about_another_models_tokenizer_whose_ids_fit(tokenizer, tiny_model, recwarn):
    from collapse_guard.metrics import HeldoutPerplexity
    from collapse_guard.testing import tiny_tokenizer

    other = tiny_tokenizer(vocab_size=256)  # ids 0..260: every one fits the model's 512
    with pytest.warns(UserWarning, match="the tokenizer looks like another model's: it has 261 tokens for a "
                                         "model that embeds 512"):
        HeldoutPerplexity(TEXTS, other, context_length=16).compute(tiny_model)
    recwarn.clear()
    HeldoutPerplexity(TEXTS, tokenizer, context_length=16).compute(tiny_model)  # its own: not a word
    assert not [w for w in recwarn if "another model's" in str(w.message)]


def _trainer(model, tokenizer, out: Path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from collapse_guard.testing import tiny_tokenizer

    ids = tiny_tokenizer()(TEXTS)["input_ids"]
    from datasets import Dataset

    args = TrainingArguments(str(out), max_steps=2, per_device_train_batch_size=2, use_cpu=True, report_to=[],
                             save_strategy="no", disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids}),
                   data_collator=DataCollatorForLanguageModeling(tiny_tokenizer(), mlm=False),
                   processing_class=tokenizer)


def test_the_collator_refuses_a_tokenizer_with_more_ids_than_the_model(bigger_tokenizer, tiny_model,
                                                                       tmp_path):
    from collapse_guard.mixing import MixingCollator

    trainer = _trainer(tiny_model, bigger_tokenizer, tmp_path)
    with pytest.raises(ValueError, match="MixingCollator: the tokenizer .* has 552 tokens, but the model"):
        MixingCollator(real_dataset=TEXTS, min_real_fraction=0.5).attach(trainer)


def test_the_guard_refuses_a_tokenizer_with_more_ids_than_the_model_before_a_step(bigger_tokenizer,
                                                                                 tiny_model, tmp_path):
    from collapse_guard.callbacks import CollapseGuardCallback, GuardConfig
    from collapse_guard.probe import ProbeConfig

    trainer = _trainer(tiny_model, bigger_tokenizer, tmp_path)
    guard = CollapseGuardCallback(TEXTS, probe=ProbeConfig(context_length=16, max_new_tokens=4,
                                                           prompt_tokens=None),
                                  config=GuardConfig(eval_steps=1, cost_budget=None))
    guard.attach(trainer)
    with pytest.raises(ValueError, match="HeldoutPerplexity: the tokenizer .* embeds only 512 ids"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_the_collator_refuses_chat_data_for_a_tokenizer_without_a_chat_template(tiny_model, tmp_path):
    from collapse_guard.mixing import MixingCollator
    from collapse_guard.testing import tiny_tokenizer

    trainer = _trainer(tiny_model, tiny_tokenizer(chat_template=None), tmp_path)
    real = [json.loads(MESSAGES)] * 4
    with pytest.raises(DataFormatError, match="MixingCollator's real_dataset is chat data .* has no chat "
                                              "template"):
        MixingCollator(real_dataset=real, min_real_fraction=0.5).attach(trainer)


def test_the_detector_refuses_a_perplexity_given_as_text():
    import numpy as np

    from collapse_guard.detector import CollapseDetector

    with pytest.raises(TypeError, match=r"history\[1\]\['heldout_ppl'\] must be a number \(or None: not "
                                        r"measured\), got str '120.0'"):
        CollapseDetector().check([{"heldout_ppl": 100.0}, {"heldout_ppl": "120.0"}])
    # numpy scalars are numbers: judged (a 30% rise alarms), not skipped as before
    assert CollapseDetector().check([{"heldout_ppl": 100.0}, {"heldout_ppl": np.float32(130.0)}]).is_alarm
