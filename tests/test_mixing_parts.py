"""The mixing package's parts, each on its own: the floor's pure arithmetic (integers in, counts out), the
one validating floor setter, the trainer setup bound in one call, and the dry run on counts alone."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from collapse_guard.mixing import MixingCollator, attach, policy
from collapse_guard.mixing.policy import decide_examples, real_for_synthetic, real_needed, spread


def identity(rows):
    return rows


def synthetic_rows(n: int, start: int = 0) -> list[dict]:
    return [{"input_ids": [2, start + i], "provenance": {"source": "synthetic"}} for i in range(n)]


def test_floor_arithmetic_is_integers_in_counts_out():
    assert real_needed(0.5, 0, 0, 4) == 2
    assert real_needed(0.1, 0, 0, 30) == 3  # 0.1 * 30 is 3.0000000000000004 in floats: still 3
    assert real_needed(0.5, 4, 3, 4) == 1  # the step already holds 3 real of 4
    assert real_for_synthetic(0.5, 0, 0, 3) == 3 and real_for_synthetic(0.25, 0, 0, 3) == 1
    credit = {"synthetic": 0.0}
    assert [spread(credit, "synthetic", 2, 4), spread(credit, "synthetic", 2, 4)] == [0, 1]  # 0.5 a batch
    assert spread(credit, "synthetic", 5, 1) == 5  # the window's last micro-batch takes everything
    # B=4, f=0.5, 4 synthetic waiting, nothing carried: 2 synthetic + 2 real
    assert decide_examples(0.5, 4, (0, 0), (4, 0), remaining=10, nominal=4, max_growth=2.0, share=0.5,
                           credit={"synthetic": 0.0, "real": 0.0}) == (2, 2)
    # f = 1: no synthetic row, ever
    assert decide_examples(1.0, 4, (0, 0), (4, 0), 1, 4, 2.0, 0.5, {"synthetic": 0.0, "real": 0.0})[0] == 0


def test_set_floor_validates_and_applies_from_the_next_micro_batch():
    collator = MixingCollator(identity, real_dataset=[{"input_ids": [1, 1]}], min_real_fraction=0.5).plan()
    assert sum(r["input_ids"][0] == 1 for r in collator(synthetic_rows(4))) == 2
    collator.set_floor(0.75)
    assert sum(r["input_ids"][0] == 1 for r in collator(synthetic_rows(4, 10))) == 3
    with pytest.raises(TypeError, match="min_real_fraction must be a number"):
        collator.set_floor("0.9")
    with pytest.raises(ValueError, match="below 0.1.*allow_low_real_fraction=True"):
        collator.set_floor(0.05)
    state = collator.state_dict()
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got 2.0"):
        collator.load_state_dict({**state, "min_real_fraction": 2.0})  # a resume goes through set_floor too
    assert collator.min_real_fraction == 0.75


def test_attach_binds_one_frozen_trainer_setup(tmp_path, tokenizer, tiny_model):
    from trl import SFTConfig, SFTTrainer

    from collapse_guard.mixing import mix_datasets

    real = ["a human sentence about the river"] * 8
    trainer = SFTTrainer(model=tiny_model, processing_class=tokenizer,
                         args=SFTConfig(str(tmp_path), report_to=[], use_cpu=True, max_length=48),
                         train_dataset=mix_datasets(real, ["a model sentence"] * 8))
    own = trainer.data_collator
    collator = MixingCollator(real_dataset=real).attach(trainer)
    setup = collator.setup
    assert (setup.row_format.max_length, setup.recognition) == (48, "row provenance")
    assert setup.base_collator is own
    assert setup.composition["real"] == 8 and collator.attached and trainer.data_collator is collator
    with pytest.raises(dataclasses.FrozenInstanceError):
        setup.recognition = "fingerprints"


def test_dry_run_needs_no_collator_internals(monkeypatch):
    """The plan's dry run replays the policy on counts: it builds no collator and injects no stream."""
    collator = MixingCollator(identity, real_dataset=["a"], min_real_fraction=0.5)
    monkeypatch.setattr(MixingCollator, "__init__", lambda *a, **k: pytest.fail("dry_run built a collator"))
    predicted = attach.dry_run(collator, 30, 70, 4, 2)
    assert predicted["untrained"] > 0 and predicted["largest"] == 8  # 70% synthetic at f = 0.5 cannot fit
    assert attach.dry_run(collator, 70, 30, 4, 2)["untrained"] == 0


def test_attach_does_not_import_the_collator_at_run_time():
    """collator -> attach only (the old deferred import closed a cycle attach <-> collator)."""
    tree = ast.parse(Path(attach.__file__).read_text())
    runtime_imports = [node.module for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert "collapse_guard.mixing.collator" not in runtime_imports
    assert policy.validate_real_fraction(0.5) == 0.5
