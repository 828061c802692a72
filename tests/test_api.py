"""The public API, used the way the README shows it: the package's own generators' outputs mix, select and
train with every other part, without adapters, for every data format they produce."""

import pytest
from datasets import Dataset

import collapse_guard
from collapse_guard import (
    CollapseGuardCallback,
    ContinuationConfig,
    ContinuationGenerator,
    DedupSelector,
    MagpieConfig,
    MagpieGenerator,
    MixingCollator,
    SelectionPipeline,
    mix_datasets,
)
from collapse_guard.data import texts_of
from collapse_guard.testing import human_like_sentences, tiny_causal_lm, tiny_chat_datasets


def generated(kind, model, tokenizer):
    if kind == "text":
        real = Dataset.from_dict({"text": human_like_sentences(24, seed=2)})
        config = ContinuationConfig(prefix_tokens=4, max_new_tokens=8, decoding="sample", show_progress=False)
        return real, ContinuationGenerator(model, tokenizer, config).generate(real["text"][:12], seed=1)
    real = tiny_chat_datasets(n_real=24)[0]
    if kind == "prompt_completion":
        real = real.map(lambda ex: {"prompt": ex["messages"][:-1], "completion": ex["messages"][-1:]},
                        remove_columns=["messages"])
    config = MagpieConfig(instruction_max_new_tokens=12, response_max_new_tokens=16, clean=False,
                          show_progress=False, output=kind)
    return real, MagpieGenerator(model, tokenizer, config).generate(8, seed=1)


@pytest.mark.parametrize("kind", ["text", "messages", "prompt_completion"])
def test_generate_select_mix_train(kind, tmp_path, tokenizer):
    from trl import SFTConfig, SFTTrainer

    model = tiny_causal_lm(tokenizer)
    real, synthetic = generated(kind, model, tokenizer)
    pipeline = SelectionPipeline([DedupSelector(real_texts=texts_of(real))])
    selected = pipeline(synthetic)
    train = mix_datasets(real, selected, mode="replace", min_real_fraction=0.5)
    assert {p["source"] for p in train["provenance"]} == {"real", "synthetic"}
    args = SFTConfig(str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                     bf16=False, save_strategy="no", disable_tqdm=True, max_length=48)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    guard = CollapseGuardCallback(human_like_sentences(8, seed=5), collator=MixingCollator(real_dataset=real))
    guard.attach(trainer)
    trainer.train()
    assert trainer.state.global_step == 3 and guard.last_verdict is not None
    assert guard.collator.real_fraction >= 0.5


def test_the_public_names_are_the_readmes_nouns_and_import_lazily():
    import subprocess
    import sys

    code = "import sys, collapse_guard; print('torch' in sys.modules, sorted(collapse_guard.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    loaded, names = out.split(" ", 1)
    assert loaded == "False"
    for name in ("MixingCollator", "mix_datasets", "CollapseGuardCallback", "CollapseDetector", "run_rounds"):
        assert name in names
    assert len(collapse_guard.__all__) <= 30
    with pytest.raises(AttributeError, match="no attribute 'luhn_valid'"):
        collapse_guard.luhn_valid  # noqa: B018 - helpers stay in their modules
