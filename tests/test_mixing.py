"""The real-data floor: validation, mix_datasets modes, the collator's invariants and its Trainer integration."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collapse_guard import MixingCollator, MixingCollatorCallback, ProvenanceIndex, mix_datasets
from collapse_guard.provenance import REAL, tokenize_like_sft
from collapse_guard.testing import tiny_chat_datasets, tiny_text_datasets


def identity(rows):
    return rows


def real_pool(n: int = 50) -> Dataset:
    # distinct token sequences; real ids live in [1000, 2000) so tests can tell them apart
    return Dataset.from_dict({"input_ids": [[1000 + i, 1000 + i, 7] for i in range(n)]})


def is_real_row(row) -> bool:
    return 1000 <= row["input_ids"][0] < 2000


# ----------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_fraction_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"min_real_fraction must be in \[0, 1\]"):
        MixingCollator(identity, real_dataset=real_pool(), min_real_fraction=bad)


def test_fraction_of_wrong_type_is_refused():
    with pytest.raises(TypeError, match="min_real_fraction must be a number"):
        MixingCollator(identity, real_dataset=real_pool(), min_real_fraction="0.5")


def test_low_fraction_needs_explicit_override():
    with pytest.raises(ValueError, match="allow_low_real_fraction=True"):
        MixingCollator(identity, real_dataset=real_pool(), min_real_fraction=0.05)
    collator = MixingCollator(identity, real_dataset=real_pool(), min_real_fraction=0.05, allow_low_real_fraction=True)
    assert collator.min_real_fraction == 0.05


def test_empty_or_missing_real_data_is_refused():
    with pytest.raises(ValueError, match="real_dataset is empty"):
        MixingCollator(identity, real_dataset=Dataset.from_dict({"input_ids": []}))
    with pytest.raises(ValueError, match="real_dataset is missing"):
        MixingCollator(identity, real_dataset=None)


def test_tokenizer_without_pad_token_is_refused():
    from collapse_guard.testing import tiny_tokenizer

    no_pad = tiny_tokenizer()
    no_pad.pad_token = None
    real, _ = tiny_text_datasets(4, 4)
    with pytest.raises(ValueError, match="no pad token"):
        MixingCollator(real_dataset=real, tokenizer=no_pad)


def test_raw_real_data_needs_tokenizer():
    real, _ = tiny_text_datasets(4, 4)
    with pytest.raises(ValueError, match="needs tokenizer"):
        MixingCollator(identity, real_dataset=real)


def test_text_messages_mismatch_is_refused():
    real_text, _ = tiny_text_datasets(4, 4)
    _, synthetic_chat = tiny_chat_datasets(4, 4)
    with pytest.raises(ValueError, match="real data is in 'text' format but synthetic data is in 'messages'"):
        mix_datasets(real_text, synthetic_chat)


def test_bad_unit_and_mode():
    with pytest.raises(ValueError, match="unit must be one of"):
        MixingCollator(identity, real_dataset=real_pool(), unit="rows")
    real, synthetic = tiny_text_datasets(4, 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        mix_datasets(real, synthetic, mode="mix")


# ----------------------------------------------------------------------------------- mix_datasets
def _sources(dataset) -> list[str]:
    return [p["source"] for p in dataset["provenance"]]


def test_replace_without_real_data_is_fully_synthetic():
    real, synthetic = tiny_text_datasets(16, 20)
    mixed = mix_datasets(real, synthetic, mode="replace", min_real_fraction=0.0, allow_low_real_fraction=True)
    assert _sources(mixed) == ["synthetic"] * 20


@pytest.mark.parametrize("mode", ["replace", "fresh", "accumulate"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.75])
def test_modes_meet_the_round_floor(mode, fraction):
    real, synthetic = tiny_text_datasets(100, 30)
    mixed = mix_datasets(real, synthetic, mode=mode, min_real_fraction=fraction, round_index=2)
    sources = _sources(mixed)
    assert sources.count("real") / len(sources) >= fraction - 1e-9
    assert sources.count("synthetic") == 30
    assert all(p["round"] == 2 for p in mixed["provenance"] if p["source"] == "synthetic")


def test_accumulate_keeps_all_real_and_previous_rounds():
    real, synthetic = tiny_text_datasets(10, 6)
    previous = mix_datasets(real, synthetic, mode="replace", min_real_fraction=0.5).filter(
        lambda p: p["source"] == "synthetic", input_columns="provenance"
    )
    mixed = mix_datasets(real, synthetic, mode="accumulate", previous=previous, round_index=1, min_real_fraction=0.3)
    assert _sources(mixed).count("real") == 10
    assert _sources(mixed).count("synthetic") == 12
    assert set(real["text"]) <= set(mixed["text"])


def test_fresh_takes_new_real_rows_each_round_and_replace_does_not():
    real, synthetic = tiny_text_datasets(200, 10)
    real = real.map(lambda ex, i: {"text": f"{i}: {ex['text']}"}, with_indices=True)  # all distinct

    def real_rows(mode, round_index):
        mixed = mix_datasets(real, synthetic, mode=mode, min_real_fraction=0.5, round_index=round_index, seed=3)
        return {t for t, p in zip(mixed["text"], mixed["provenance"], strict=True) if p["source"] == "real"}

    assert real_rows("fresh", 0).isdisjoint(real_rows("fresh", 1))
    assert real_rows("replace", 0) == real_rows("replace", 1)
    assert real_rows("fresh", 1) == real_rows("fresh", 1)  # seeded


# ----------------------------------------------------------------------------------- collator invariants
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch_size=st.integers(1, 64),
    fraction=st.floats(0.1, 1.0),
    mix=st.lists(st.booleans(), min_size=1, max_size=300),
)
def test_every_batch_meets_the_floor_and_synthetic_is_served_exactly_once(batch_size, fraction, mix):
    collator = MixingCollator(identity, real_dataset=real_pool(), min_real_fraction=fraction, seed=1)
    synthetic_ids = [i for i, is_real in enumerate(mix) if not is_real]
    stream = [
        {"input_ids": [1000 + i % 50, 1000 + i % 50, 7]} if is_real else {"input_ids": [5000 + i, 3]}
        for i, is_real in enumerate(mix)
    ]
    batches = [collator(stream[i : i + batch_size]) for i in range(0, len(stream), batch_size)]
    # the rest of the epoch's synthetic examples wait, in order, in the carry-over buffer
    pending = [f["input_ids"][0] - 5000 for f in collator.state_dict()["buffer"]]
    # draining needs a batch with at least one synthetic slot: b - ceil(f * b) >= 1
    drain_size = next((b for b in range(batch_size, 257) if b - math.ceil(fraction * b - 1e-9) >= 1), None)
    if drain_size is not None:
        batches += [list(b) for b in collator.drain(batch_size=drain_size)]
    for rows in batches:
        need = math.ceil(fraction * len(rows) - 1e-9)
        assert sum(is_real_row(r) for r in rows) >= need
    served = [r["input_ids"][0] - 5000 for rows in batches for r in rows if r["input_ids"][0] >= 5000]
    if drain_size is not None:
        assert sorted(served) == synthetic_ids  # each exactly once
        assert served == synthetic_ids  # and in FIFO order
    else:  # f so close to 1 that no batch up to 256 has a synthetic slot: nothing lost, all pending
        assert served + pending == synthetic_ids
    full_batches = len(stream) // batch_size
    assert all(len(b) == batch_size for b in batches[:full_batches])


@settings(max_examples=40, deadline=None)
@given(
    batch_size=st.integers(1, 16),
    fraction=st.floats(0.1, 0.9),
    rows=st.lists(st.tuples(st.integers(1, 4), st.lists(st.booleans(), min_size=1, max_size=4)), min_size=1, max_size=60),
)
def test_token_floor_holds_for_packed_rows(batch_size, fraction, rows):
    pool = real_pool(50)
    collator = MixingCollator(identity, real_dataset=pool, min_real_fraction=fraction, unit="tokens", seed=2)
    features, next_synthetic = [], 0
    for _, segment_is_real in rows:
        ids, lengths = [], []
        for is_real in segment_is_real:
            if is_real:
                segment = pool[len(features) % 50]["input_ids"]
            else:
                segment = [5000 + next_synthetic, 9, 9, 9, 9]
                next_synthetic += 1
            ids += segment
            lengths.append(len(segment))
        features.append({"input_ids": ids, "seq_lengths": lengths})
    index = collator.provenance_index
    for i in range(0, len(features), batch_size):
        out = collator(features[i : i + batch_size])
        assert len(out) == len(features[i : i + batch_size])
        real_tokens = total = 0
        for row in out:
            start = 0
            for length in row["seq_lengths"]:
                segment = row["input_ids"][start : start + length]
                real_tokens += length if index.source_of(segment) == REAL else 0
                total += length
                start += length
        assert real_tokens >= fraction * total - 1e-6


def test_synthetic_filter_drops_with_reasons_and_keeps_batch_size():
    def no_sevens(texts):
        return ["contains 7" if "7" in t else None for t in texts]

    from collapse_guard.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    real, _ = tiny_text_datasets(20, 1)
    synthetic = [f"The model said number {i}." for i in range(10)]
    collator = MixingCollator(real_dataset=real, tokenizer=tok, min_real_fraction=0.5, synthetic_filter=no_sevens)
    batch = collator([{"input_ids": tok(t + tok.eos_token)["input_ids"]} for t in synthetic])
    assert batch["input_ids"].shape[0] == 10
    assert collator.metrics()["dropped/contains 7"] == 1.0
    assert collator.last_real_fraction == 0.5


def test_state_dict_round_trip_reproduces_the_stream():
    stream = [{"input_ids": [5000 + i, 3]} for i in range(40)]
    a = MixingCollator(identity, real_dataset=real_pool(), min_real_fraction=0.7, seed=4)
    for i in range(0, 20, 8):
        a(stream[i : i + 8])
    b = MixingCollator(identity, real_dataset=real_pool(), min_real_fraction=0.7, seed=4)
    b.load_state_dict(a.state_dict())
    assert [a(stream[i : i + 8]) for i in range(24, 40, 8)] == [b(stream[i : i + 8]) for i in range(24, 40, 8)]


# ----------------------------------------------------------------------------------- TRL integration
def _record_fed_batches(model, store):
    def hook(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        rows = []
        for i in range(ids.shape[0]):
            row = ids[i] if mask is None else ids[i][mask[i].bool()]
            rows.append(row.tolist())
        store.append(rows)

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _sft_args(tmp_path, **overrides):
    from trl import SFTConfig

    defaults = dict(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, report_to=[], use_cpu=True,
        bf16=False, save_strategy="no", logging_steps=50, disable_tqdm=True,
    )
    defaults.update(overrides)
    return SFTConfig(**defaults)


@pytest.mark.parametrize("kind", ["text", "messages", "prompt_completion"])
def test_sft_trainer_feeds_the_model_batches_that_meet_the_floor(tmp_path, tokenizer, tiny_model, kind):
    from trl import SFTTrainer

    if kind == "messages":
        real, synthetic = tiny_chat_datasets(24, 60)
    else:
        real, synthetic = tiny_text_datasets(24, 60)
        if kind == "prompt_completion":
            def split(ex):
                words = ex["text"].split()
                return {"prompt": " ".join(words[:3]) + " ", "completion": " ".join(words[3:])}

            real, synthetic = real.map(split, remove_columns="text"), synthetic.map(split, remove_columns="text")
    train = mix_datasets(real, synthetic, mode="replace", min_real_fraction=0.05, allow_low_real_fraction=True)
    collator = MixingCollator(real_dataset=real, tokenizer=tokenizer, min_real_fraction=0.5)
    trainer = SFTTrainer(model=tiny_model, args=_sft_args(tmp_path), train_dataset=train,
                         processing_class=tokenizer, data_collator=collator)
    trainer.add_callback(MixingCollatorCallback(collator))
    # SFTTrainer's own tokenization must match ours, or real examples would go unrecognized
    prepared = ProvenanceIndex.from_dataset(trainer.train_dataset)
    expected = ProvenanceIndex(None)
    expected.add_many((tokenize_like_sft(ex, tokenizer)["input_ids"] for ex in real), REAL)
    prepared_real = [ex["input_ids"] for ex in trainer.train_dataset if ex["provenance"]["source"] == REAL]
    assert prepared_real and all(expected.source_of(ids) == REAL for ids in prepared_real)
    assert len(prepared) > 0
    fed: list[list[list[int]]] = []
    _record_fed_batches(tiny_model, fed)
    trainer.train()
    assert len(fed) == 6
    for rows in fed:
        assert sum(expected.source_of(r) == REAL for r in rows) >= math.ceil(0.5 * len(rows))
    assert collator.real_fraction >= 0.5
    assert collator.counts["real_top_up"] > 0


def test_packed_sft_trainer_meets_the_token_floor(tmp_path, tokenizer, tiny_model):
    """BFD packing: SFTTrainer builds its padding-free collator itself; the floor wraps it after init."""
    from trl import SFTTrainer

    real, synthetic = tiny_text_datasets(30, 90)
    train = mix_datasets(real, synthetic, mode="replace", min_real_fraction=0.05, allow_low_real_fraction=True)
    args = _sft_args(tmp_path, packing=True, max_length=48, per_device_train_batch_size=4, max_steps=4)
    trainer = SFTTrainer(model=tiny_model, args=args, train_dataset=train, processing_class=tokenizer)
    seen = []
    base = trainer.data_collator

    def spy(rows):
        seen.append(rows)
        return base(rows)

    collator = MixingCollator(spy, real_dataset=real, tokenizer=tokenizer, min_real_fraction=0.6, unit="tokens",
                              max_length=48)
    trainer.data_collator = collator
    fed: list = []
    _record_fed_batches(tiny_model, fed)
    trainer.train()
    assert len(seen) >= 4
    index = collator.provenance_index
    for rows, batch in zip(seen, fed, strict=False):
        real_tokens = total = 0
        for row in rows:
            start = 0
            for length in row["seq_lengths"]:
                real_tokens += length if index.source_of(row["input_ids"][start : start + length]) == REAL else 0
                total += length
                start += length
        assert real_tokens >= 0.6 * total - 1e-6
        assert sum(len(r) for r in batch) == total  # padding-free: the model saw exactly these tokens


def test_resume_from_checkpoint_continues_the_real_stream(tmp_path, tokenizer):
    from trl import SFTTrainer

    from collapse_guard.testing import tiny_causal_lm

    real, synthetic = tiny_text_datasets(40, 80)
    train = mix_datasets(real, synthetic, mode="replace", min_real_fraction=0.1)

    def run(output_dir, resume=None, steps=8):
        model = tiny_causal_lm(tokenizer)
        collator = MixingCollator(real_dataset=real, tokenizer=tokenizer, min_real_fraction=0.6, seed=5)
        args = _sft_args(output_dir, max_steps=steps, per_device_train_batch_size=4, save_strategy="steps",
                         save_steps=3, gradient_accumulation_steps=2)
        trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                             data_collator=collator)
        trainer.add_callback(MixingCollatorCallback(collator))
        fed: list = []
        _record_fed_batches(model, fed)
        trainer.train(resume_from_checkpoint=resume)
        return fed, collator

    full, full_collator = run(tmp_path / "full")
    resumed, resumed_collator = run(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-6"))
    assert len(full) == 16 and len(resumed) == 4  # 2 micro-batches per step; resumed after step 6
    assert resumed == full[12:]
    assert resumed_collator.state_dict()["draws"] == full_collator.state_dict()["draws"]


def test_collator_passes_eval_batches_through_untouched(tmp_path, tokenizer, tiny_model):
    from trl import SFTTrainer

    real, synthetic = tiny_text_datasets(20, 40)
    train = mix_datasets(real, synthetic, mode="replace", min_real_fraction=0.1)
    collator = MixingCollator(real_dataset=real, tokenizer=tokenizer, min_real_fraction=0.5)
    args = _sft_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    trainer = SFTTrainer(model=tiny_model, args=args, train_dataset=train, eval_dataset=synthetic.select(range(8)),
                         processing_class=tokenizer, data_collator=collator)
    trainer.add_callback(MixingCollatorCallback(collator))
    trainer.train()
    # 4 training batches mixed; the 2 x 2 eval batches were not
    assert collator.calls == 4 or collator.calls == 5  # the dataloader may prefetch one training batch
    assert collator.counts["units"] == collator.calls * 8


def test_provenance_survives_as_column_in_prepared_dataset(tmp_path, tokenizer, tiny_model):
    from trl import SFTTrainer

    real, synthetic = tiny_text_datasets(6, 6)
    train = mix_datasets(real, synthetic, mode="accumulate")
    trainer = SFTTrainer(model=tiny_model, args=_sft_args(tmp_path), train_dataset=train, processing_class=tokenizer)
    assert "provenance" in trainer.train_dataset.column_names
    assert torch.is_tensor(trainer.get_train_dataloader().__iter__().__next__()["input_ids"])


def test_accumulate_upsamples_real_rows_to_meet_the_floor():
    real, synthetic = tiny_text_datasets(10, 30)
    mixed = mix_datasets(real, synthetic, mode="accumulate", min_real_fraction=0.5)
    assert _sources(mixed).count("real") == 30
    assert set(mixed.filter(lambda p: p["source"] == "real", input_columns="provenance")["text"]) == set(real["text"])


@pytest.mark.distributed
def test_two_process_run_meets_the_floor_on_every_rank(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "mixing_dist.py"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    for rank in ranks:
        assert len(rank["batches"]) == 5
        assert all(b["real"] >= math.ceil(0.5 * b["size"]) for b in rank["batches"])
    # the real stream is sharded by rank: the ranks top up with different human examples
    rows0 = {tuple(r) for b in ranks[0]["batches"] for r in b["real_rows"]}
    rows1 = {tuple(r) for b in ranks[1]["batches"] for r in b["real_rows"]}
    assert rows0 != rows1


def test_plain_transformers_trainer_with_its_own_lm_collator(tmp_path, tokenizer, tiny_model):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    real, synthetic = tiny_text_datasets(20, 60)

    def tokenize(ex):
        return {"input_ids": tokenizer(ex["text"] + tokenizer.eos_token)["input_ids"]}

    train = mix_datasets(real, synthetic, mode="replace", min_real_fraction=0.1).map(tokenize, remove_columns="text")
    base = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    collator = MixingCollator(base, real_dataset=real, tokenizer=tokenizer, min_real_fraction=0.75)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=tiny_model, args=args, train_dataset=train, data_collator=collator)
    fed: list = []
    _record_fed_batches(tiny_model, fed)
    trainer.train()
    expected = ProvenanceIndex(None)
    expected.add_many((tokenize_like_sft(ex, tokenizer)["input_ids"] for ex in real), REAL)
    assert len(fed) == 3
    assert all(sum(expected.source_of(r) == REAL for r in rows) >= 6 for rows in fed)
