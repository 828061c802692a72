"""The floor counts what is trained (issue 23, section 2), checked from the user's side: the labels that reach
the model (a forward pre-hook), the warnings and the refusals at attach.

A row whose labels are all -100 (a prompt-completion row cut inside its prompt by `max_length`) trains
nothing, so it must not satisfy the real-data floor: real top-ups that would carry no loss are redrawn, and
when none does the run says so, naming the cause and the fix.
"""

from __future__ import annotations

import logging
import math
import random
import warnings

import pytest
from datasets import Dataset

from collapse_guard.mixing import MixingCollator, mix_datasets
from collapse_guard.testing import tiny_causal_lm

WORDS = ["river", "valley", "mill", "stone", "water", "bridge", "field", "morning", "light", "road"]


def prompt_completion_sets(n_real: int, n_synthetic: int, short_every: int | None):
    """Real prompts of 40-80 words (longer than max_length=32 tokens), every `short_every`-th one short;
    synthetic prompts short. Every row starts with its source's name, so the hook can tell them apart."""
    rng = random.Random(0)

    def real_prompt(i: int) -> str:
        if short_every and i % short_every == 0:
            return f"real {i} asks"
        return f"real {i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 80)))

    real = Dataset.from_dict({"prompt": [real_prompt(i) for i in range(n_real)],
                              "completion": [f" human answer {i} about the mill" for i in range(n_real)]})
    synthetic = Dataset.from_dict({"prompt": [f"synthetic {i} says" for i in range(n_synthetic)],
                                   "completion": [" the model said the same thing"] * n_synthetic})
    return real, synthetic


def record_trained(model, tokenizer, store: list):
    """Per micro-batch at the model input: (is_real, supervised tokens) of every sequence (packed rows split
    at position resets); supervised = labels past the first that are not -100, what the loss is taken on."""
    def hook(module, args, kwargs):
        ids, labels = kwargs["input_ids"], kwargs["labels"]
        pos, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
        seqs = []
        for i in range(ids.shape[0]):
            if pos is not None and mask is None:
                starts = (pos[i] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
                spans = [(a, b) for a, b in zip(starts, starts[1:], strict=False) if b > a]
            else:
                spans = [(0, int(mask[i].sum()) if mask is not None else ids.shape[1])]
            for a, b in spans:
                text = tokenizer.decode(ids[i, a:b].tolist(), skip_special_tokens=True).lstrip()
                seqs.append((not text.startswith("synthetic"), int((labels[i, a + 1:b] != -100).sum())))
        store.append(seqs)

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def train(tmp_path, tokenizer, real, synthetic, fraction=0.5, **config):
    from trl import SFTConfig, SFTTrainer

    packing = config.get("packing", False)
    model = tiny_causal_lm(tokenizer)
    fed: list = []
    record_trained(model, tokenizer, fed)
    args = SFTConfig(str(tmp_path), num_train_epochs=1, per_device_train_batch_size=4, report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no", logging_steps=1000, disable_tqdm=True,
                     **{"max_length": 32, **config})
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=mix_datasets(real, synthetic, min_real_fraction=fraction, seed=1))
    collator = MixingCollator(real_dataset=real, min_real_fraction=fraction,
                              unit="tokens" if packing else "examples").attach(trainer)
    trainer.train()
    return fed, collator


def test_rows_floor_counts_only_rows_that_carry_loss(tmp_path, tokenizer, caplog):
    """max_length=32 cuts 3 of 4 real prompts: top-ups that would carry no loss are redrawn, so every step
    trains at least ceil(f x n) real rows among the n rows that carry loss (before: top-ups cut inside their
    prompt counted as real, and real rows were a minority of the trained rows)."""
    real, synthetic = prompt_completion_sets(48, 24, short_every=4)
    with caplog.at_level(logging.INFO, logger="collapse_guard"):
        fed, collator = train(tmp_path, tokenizer, real, synthetic)
    for step in fed:
        trained = [is_real for is_real, supervised in step if supervised > 0]
        assert sum(trained) >= math.ceil(0.5 * len(trained) - 1e-9), step
    assert collator.counts["top_up_no_loss"] > 0  # cut top-ups were drawn and not used
    plan = next(m for m in caplog.messages if m.startswith("MixingCollator: at least"))
    assert "counting only rows that are trained (a row whose labels are all -100 counts as none)" in plan


def test_token_floor_counts_supervised_tokens_with_packing(tmp_path, tokenizer, caplog):
    real, synthetic = prompt_completion_sets(48, 24, short_every=4)
    with caplog.at_level(logging.INFO, logger="collapse_guard"):
        fed, _ = train(tmp_path, tokenizer, real, synthetic, packing=True)
    real_supervised = sum(n for step in fed for is_real, n in step if is_real)
    supervised = sum(n for step in fed for _, n in step)
    assert real_supervised >= 0.5 * supervised  # before: well under half
    plan = next(m for m in caplog.messages if m.startswith("MixingCollator: at least"))
    assert "counting supervised tokens (labels other than -100)" in plan


def test_a_pool_whose_rows_all_carry_no_loss_is_said_once_with_the_fix(tmp_path, tokenizer):
    """Every real prompt is longer than max_length: no top-up can carry loss. The run says so (once, cause
    and fix) and does not claim a real share it did not train."""
    real, synthetic = prompt_completion_sets(24, 16, short_every=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fed, collator = train(tmp_path, tokenizer, real, synthetic)
    said = [str(w.message) for w in caught if "carry no loss" in str(w.message)]
    assert len(said) == 1 and "max_length=32" in said[0] and "raise max_length" in said[0] \
        and "shorten the prompts" in said[0]
    assert sum(n for step in fed for is_real, n in step if is_real) == 0  # nothing real was trained...
    assert collator.real_fraction == 0.0  # ...and the collator does not claim otherwise (before: 0.5)


@pytest.mark.parametrize(("max_length", "message"), [
    (1, "SFTConfig.max_length=1: rows need at least 2 tokens to carry loss"),
    (-5, "SFTConfig.max_length=-5: rows need at least 2 tokens"),
])
def test_trainer_max_length_that_trains_nothing_is_refused_at_attach(tmp_path, tokenizer, tiny_model,
                                                                     max_length, message):
    from trl import SFTConfig, SFTTrainer

    real, synthetic = prompt_completion_sets(8, 8, short_every=1)
    args = SFTConfig(str(tmp_path), report_to=[], use_cpu=True, max_length=max_length, save_strategy="no")
    trainer = SFTTrainer(model=tiny_model, args=args, processing_class=tokenizer,
                         train_dataset=mix_datasets(real, synthetic))
    collator = MixingCollator(real_dataset=real)
    with pytest.raises(ValueError, match=message) as err:
        collator.attach(trainer)
    assert "\n" not in str(err.value) and "Use max_length >= 2" in str(err.value)
    assert trainer.data_collator is not collator  # refused before anything was wired


def test_api_path_says_no_real_row_was_recognised_within_two_batches(tokenizer):
    """The collator used directly (not attached), rows without provenance tokenized unlike the real pool:
    the recognition self-check speaks after the first 8 rows, not only the generic 'not attached'."""
    texts = [f"real {i} the river crossed the valley" for i in range(8)]
    collator = MixingCollator(real_dataset=Dataset.from_dict({"text": texts}), tokenizer=tokenizer)
    rows = [{"input_ids": tokenizer(t.upper())["input_ids"]} for t in texts]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collator(rows[:4])
        first = [str(w.message) for w in caught if "recognised no real row" in str(w.message)]
        collator(rows[4:])
    said = [str(w.message) for w in caught if "recognised no real row" in str(w.message)]
    assert first == [] and len(said) == 1 and "first 8 rows" in said[0] and "provenance" in said[0]


def test_mix_datasets_relabels_synthetic_rows_that_say_real():
    real = Dataset.from_dict({"text": [f"human {i}" for i in range(20)]})
    earlier = mix_datasets(real, [f"model {i}" for i in range(20)], mode="replace")  # half say 'real'
    with pytest.warns(UserWarning, match="20 of the 40 rows passed as synthetic carry a provenance that is "
                                         "not 'synthetic'.*relabelled synthetic"):
        mixed = mix_datasets(real, earlier, mode="replace", round_index=3)
    relabelled = [p for t, p in zip(mixed["text"], mixed["provenance"], strict=True) if t.startswith("human")
                  and p["round"] == 3]
    assert len(relabelled) == 20 and {p["source"] for p in relabelled} == {"synthetic"}
    assert [p["source"] for p in mixed["provenance"]].count("real") == 40  # real rows: the `real` pool's


def test_mix_datasets_refuses_a_streaming_synthetic_set_up_front():
    real = Dataset.from_dict({"text": ["a human text"] * 4})
    streaming = Dataset.from_dict({"text": ["a model text"] * 4}).to_iterable_dataset()
    with pytest.raises(ValueError, match="synthetic is a streaming IterableDataset.*Dataset.from_list"):
        mix_datasets(real, streaming)
    with pytest.raises(ValueError, match="previous is a streaming IterableDataset"):
        mix_datasets(real, ["x"], previous=streaming)
