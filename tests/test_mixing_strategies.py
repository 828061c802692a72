"""The collator's parts on their own (rows and integers in, rows and counts out), and a golden check that the
façade over them feeds exactly what the collator fed before it was split into parts.

The golden digests were recorded from the single-class collator (before `mixing.mixer`, `strategies`,
`carry`, `packing`, `topup`, `recognition` and `checkpoint` existed): a seeded run per unit, with packing on
and off, at both floor scopes, through growth, carry-over, flushes, rows without loss, a synthetic filter, a
checkpoint round trip in the middle, `drain()`, and a real pool whose rows mostly carry no loss when cut.
Each digest covers every batch fed (tensors or rows), the counters, metrics, warnings and `state_dict()`.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections import Counter

import pytest
import torch

from collapse_guard.mixing import MixingCollator, RowFormat, tokenize_row
from collapse_guard.mixing.carry import LOOK_AHEAD, CarryOver
from collapse_guard.mixing.checkpoint import MixingCheckpoint, SnapshotRing, serializable
from collapse_guard.mixing.counts import MixingCounts
from collapse_guard.mixing.mixer import Mixer, MixHooks
from collapse_guard.mixing.packing import PackedRows, min_fill, pack_micro_batch
from collapse_guard.mixing.policy import decide_examples
from collapse_guard.mixing.recognition import filter_synthetic, lookup_sources
from collapse_guard.mixing.segments import join_segments, pack_first_fit
from collapse_guard.mixing.strategies import (
    BatchContext,
    Demand,
    ExamplesUnit,
    TokensUnit,
    token_allowance,
    token_real_target,
)
from collapse_guard.mixing.topup import TOP_UP_TRIES, draw_top_up
from collapse_guard.provenance import REAL, SYNTHETIC, SourceIndex
from collapse_guard.testing import human_like_sentences, tiny_tokenizer

CAPACITY = 40


def identity(rows):
    return rows


def seg(ids: list[int], labels: list[int] | None = None) -> dict[str, list[int]]:
    return {"input_ids": list(ids), "labels": list(ids if labels is None else labels)}


def n_tokens(row: dict[str, list[int]]) -> int:
    return len(row["input_ids"])


# ----- the carry-over ---------------------------------------------------------------------------------------
def test_carry_over_takes_fifo_and_steps_over_what_does_not_fit():
    carry = CarryOver()
    carry.queue(real=[seg([1] * 3), seg([1] * 5)], synthetic=[seg([2] * 4), seg([3] * 9), seg([4] * 3)])
    chosen = carry.take_synthetic(7, n_tokens)
    # 4 fits, 9 does not (stepped over, not blocking), 3 fits: 7 in all; the 9 stays at the front
    assert [s["input_ids"][0] for s in chosen] == [2, 4]
    assert [s["input_ids"][0] for s in carry.synthetic] == [3]
    real, units = carry.take_real(4, n_tokens)
    assert units == 3 + 5 and len(real) == 2 and not carry.real  # whole items: the target may be passed
    carry.give_back_real([seg([7]), seg([8])])
    assert [s["input_ids"][0] for s in carry.real] == [8, 7]  # each to the front, in the order given
    carry.add(10, 4)
    assert carry.begin(new_step=False) == (10, 4) and carry.begin(new_step=True) == (0, 0)


def test_carry_over_look_ahead_is_bounded():
    carry = CarryOver()
    carry.queue([], [seg([9] * 50) for _ in range(LOOK_AHEAD + 10)] + [seg([1, 1])])
    assert carry.take_synthetic(10, n_tokens) == []  # the short one is beyond the look-ahead: it waits
    assert len(carry.synthetic) == LOOK_AHEAD + 11 and carry.synthetic[-1]["input_ids"] == [1, 1]


# ----- the strategies ---------------------------------------------------------------------------------------
def test_examples_unit_decides_whole_rows_like_the_policy():
    carry = CarryOver()
    carry.queue(real=[], synthetic=[seg([2, i]) for i in range(6)])
    demand = Demand(f=0.5, incoming=4, done=(0, 0), remaining=10, nominal=4, max_growth=2.0, share=0.5)
    expected = decide_examples(0.5, 4, (0, 0), (6, 0), 10, 4, 2.0, 0.5, {"synthetic": 0.0, "real": 0.0})
    chosen, n_real = ExamplesUnit().decide(demand, carry)
    assert (len(chosen), n_real) == expected == (2, 2)
    assert [s["input_ids"][1] for s in chosen] == [0, 1] and len(carry.synthetic) == 4


def test_examples_unit_fills_carried_then_top_ups_then_synthetic_then_passengers():
    drawn = iter([seg([1, 10]), seg([1, 11])])
    batch = BatchContext(rows=[], like=["input_ids", "labels"], passengers=[seg([5, 5], [-100, -100])],
                         top_up=lambda like, fit=None: next(drawn), capacity=lambda: None)
    filled = ExamplesUnit().fill([seg([2, 0])], [seg([1, 9])], 1, 3, batch)
    assert [r["input_ids"] for r in filled.rows] == [[1, 9], [1, 10], [1, 11], [2, 0], [5, 5]]
    assert (filled.top_up, filled.real_units) == (2, 3)


def test_tokens_unit_splits_packed_rows_and_counts_supervised_tokens():
    packed = join_segments([seg([1, 2, 3]), seg([4, 5], [-100, 5]), seg([6, 7, 8, 9])])
    looked_up = []

    def recognise(rows):
        looked_up.extend(r["input_ids"] for r in rows)
        return [REAL if r["input_ids"][0] == 1 else SYNTHETIC for r in rows]

    unit = TokensUnit()
    segments, sources = unit.split([packed, {**seg([3, 3]), "provenance": {"source": REAL}}], recognise)
    assert [s["input_ids"] for s in segments] == [[1, 2, 3], [4, 5], [6, 7, 8, 9], [3, 3]]
    assert sources == [REAL, SYNTHETIC, SYNTHETIC, REAL]
    assert looked_up == [[1, 2, 3], [4, 5], [6, 7, 8, 9]]  # the row with provenance is not looked up
    assert [unit.measure(s) for s in segments] == [3, 1, 4, 2]


def test_token_allowance_and_real_target_by_hand():
    credit = {"synthetic": 0.0, "real": 0.0}
    # f=0.5, 20 tokens in, nothing carried: room 10; the cap (2 x 20 x 0.5 = 20) does not bind
    demand = Demand(0.5, 20, (0, 0), remaining=None, nominal=20, max_growth=2.0, share=0.5)
    assert token_allowance(demand, pending=10, granule=5, credit=credit) == 10
    assert token_real_target(demand, synthetic=7, carried=0, credit=credit) == 13  # the rest of the 20
    # the step already holds 10 units, none real: of 30, 15 must be real, so 20 incoming leave room for 5
    behind = Demand(0.5, 20, (10, 0), remaining=None, nominal=20, max_growth=2.0, share=0.5)
    assert token_allowance(behind, pending=30, granule=5, credit=credit) == 5
    assert token_real_target(behind, synthetic=5, carried=0, credit=credit) == 15
    # the last micro-batch of the window takes every carried real token the growth cap leaves room for
    last = Demand(0.5, 20, (0, 0), remaining=1, nominal=20, max_growth=2.0, share=0.5)
    assert token_real_target(last, synthetic=10, carried=100, credit=credit) == 30  # 40 - 10


def test_packing_fills_rows_with_top_ups_and_gives_back_what_does_not_fit():
    fit_asked = []

    def top_up(fit):
        fit_asked.append(fit)
        return seg([1] * fit)

    rows = PackedRows.empty(own=1, capacity=16)
    packed = pack_micro_batch([seg([2] * 10)], [seg([1] * 8), seg([1] * 5)], real_target=4, rows=rows,
                              top_up=top_up)
    # the 8-token real segment does not fit next to the 10 synthetic; the 5 does, leaving 1 (< min_fill)
    assert [s["input_ids"] for s in packed.unplaced] == [[1] * 8]
    assert [r["seq_lengths"] for r in packed.rows] == [[10, 5]] and packed.top_up == 0
    assert packed.real_tokens == 5 and fit_asked == []
    # a floor the own rows cannot meet opens a row of real top-ups, and only while it is short
    packed = pack_micro_batch([seg([2] * 10)], [], real_target=20, rows=PackedRows.empty(1, 16),
                              top_up=top_up)
    assert fit_asked == [6, 16] and packed.real_tokens == 22 and packed.top_up == 2
    assert all(len(r["input_ids"]) <= 16 for r in packed.rows) and min_fill(16) == 2


def test_packing_matches_first_fit_decreasing_for_the_fixed_segments():
    fixed = [seg([2] * n) for n in (7, 12, 3, 9)]
    packed = pack_micro_batch(fixed, [], 0, PackedRows.empty(0, 16), top_up=lambda fit: None)
    bins, _ = pack_first_fit(fixed, 16)
    assert [r["seq_lengths"] for r in packed.rows] == [[len(s["input_ids"]) for s in b] for b in bins]


# ----- top-ups, recognition, checkpoints ---------------------------------------------------------------
class ListStream:
    def __init__(self, rows):
        self.rows, self.draws = rows, 0

    def next(self):
        row = self.rows[self.draws % len(self.rows)]
        self.draws += 1
        return row


def test_draw_top_up_cuts_redraws_and_gives_up():
    prompt_only = seg([1, 2, 3, 4, 5, 6], [-100, -100, -100, -100, 5, 6])
    stream = ListStream([prompt_only, seg([7, 8, 9])])
    row, misses = draw_top_up(stream, ["input_ids", "labels", "attention_mask"], limit=4)
    # cut to 4 the first carries no loss: redrawn; the second is shaped like the batch's rows
    assert (row, misses) == ({"input_ids": [7, 8, 9], "labels": [7, 8, 9], "attention_mask": [1, 1, 1]}, 1)
    row, misses = draw_top_up(ListStream([prompt_only]), ["input_ids", "labels"], limit=4)
    assert row is None and misses == TOP_UP_TRIES
    row, _ = draw_top_up(ListStream([seg([7, 8, 9, 10, 11])]), [], limit=None, fit=2)
    assert row == {"input_ids": [7, 8], "labels": [7, 8]}


def test_lookup_sources_and_filter_synthetic():
    counts = MixingCounts()
    built = []

    def index():
        built.append(1)
        return SourceIndex.from_sequences(real=[[1, 1, 1]], synthetic=[[2, 2, 2]])

    rows = [{"input_ids": [1, 1, 1]}, {"input_ids": [9, 9], "provenance": {"source": REAL}},
            {"input_ids": [3, 3, 3]}, {"input_ids": [2, 2, 2]}]
    assert lookup_sources(rows, index, counts) == [REAL, REAL, SYNTHETIC, SYNTHETIC]
    assert (counts.looked_up, counts.unrecognised) == (3, 1) and built == [1]
    assert lookup_sources(rows[1:2], index, counts) == [REAL] and built == [1]  # no lookup: no index
    dropped = Counter()
    kept = filter_synthetic([seg([4]), seg([5]), seg([6])], lambda texts: [None, "bad", "bad"], str, dropped)
    assert kept == [seg([4])] and dropped == {"bad": 2}
    with pytest.raises(ValueError, match="returned 1 verdicts for 2 texts"):
        filter_synthetic([seg([4]), seg([5])], lambda texts: [None], str, Counter())


# A checkpoint written by the single-class collator (`small_run("examples")`, saved after micro-batch 3).
OLD_STATE = {
    "calls": 3, "counts": {"extra_units": 3, "grown_batches": 3, "incoming_units": 9, "intake_units": 9,
                           "micro_batches": 3, "real_tokens": 18, "real_top_up": 6, "real_units": 6,
                           "synthetic_seen": 9, "synthetic_served": 6, "synthetic_tokens": 18,
                           "synthetic_units_seen": 9, "units": 12},
    "credit": {"real": 0.0, "synthetic": 0.9333333333333333}, "dropped": {}, "min_real_fraction": 0.5,
    "real_carry": [], "step": [4, 2], "stream": {"draws": 6},
    "synthetic_buffer": [{"input_ids": [2, 20 + i, 2], "labels": [2, 20 + i, 2],
                          "provenance": {"source": "synthetic"}} for i in range(3)]}
OLD_FILE_SHA256 = {"examples": "493916086f6064192e98938e72829109d786485ce25fa125666b596a8b0a4015",
                   "tokens": "e0bb633222b6c8f7d2cf2fa82e36a2d1c259002de37869d127d08bbc977286a0"}


def small_run(unit: str, steps: int = 4, collator: MixingCollator | None = None, start: int = 0):
    pool = [{"input_ids": [1, 1, 1 + i % 3, 4], "labels": [1, 1, 1 + i % 3, 4]} for i in range(10)]
    if collator is None:
        collator = MixingCollator(identity, real_dataset=pool, min_real_fraction=0.5, unit=unit,
                                  max_growth=1.5, seed=3).plan(2, 6, 6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = [collator([{"input_ids": [2, 10 * k + j, 2], "labels": [2, 10 * k + j, 2],
                           "provenance": {"source": "synthetic"}} for j in range(3)])
                for k in range(start, steps)]
    return collator, outs


@pytest.mark.parametrize("unit", ["examples", "tokens"])
def test_checkpoint_file_is_byte_identical_to_the_old_format(unit, tmp_path):
    collator, _ = small_run(unit)
    path = collator.save(tmp_path, calls=3)
    assert path.endswith("collapse_guard/mixing_collator_rank0.json")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == OLD_FILE_SHA256[unit]


def test_an_old_checkpoint_resumes_to_the_same_batches():
    straight, outs = small_run("examples", steps=6)
    resumed, _ = small_run("examples", steps=0)
    resumed.load_state_dict(json.loads(json.dumps(OLD_STATE)))
    _, after = small_run("examples", steps=6, collator=resumed, start=3)
    assert after == outs[3:] and resumed.state_dict() == straight.state_dict()
    # the state's own class reads and writes the same format
    assert serializable(MixingCheckpoint.from_state_dict(OLD_STATE).snapshot()) == OLD_STATE


def test_snapshot_ring_keeps_a_step_plus_the_prefetch():
    ring = SnapshotRing()
    ring.resize(accumulation=2)
    for calls in range(1, 15):
        ring.add(calls, {"calls": calls})
    assert ring.calls() == list(range(5, 15)) and ring.find(5) == {"calls": 5} and ring.find(4) is None


def test_one_mixing_path_serves_both_units():
    """The same `Mixer.mix` runs either strategy: rows worth 1 unit each, or supervised tokens."""
    def hooks(top_ups):
        return MixHooks(recognise=lambda rows: [SYNTHETIC] * len(rows), keep_synthetic=lambda rows: rows,
                        top_up=lambda like, fit=None: next(top_ups), capacity=lambda: None,
                        warn_once=lambda key, message: None, cut_note=lambda: "")

    rows = [seg([2, i, 2]) for i in range(4)]
    examples = Mixer(ExamplesUnit(), "step", 2.0, hooks(iter([seg([1, 1, 1])] * 8)))
    tokens = Mixer(TokensUnit(), "step", 2.0, hooks(iter([seg([1, 1, 1])] * 8)))
    out_e = examples.mix(rows, 0.5, None, 0, None)
    out_t = tokens.mix(rows, 0.5, None, 0, None)
    # 3 tokens a row: the token floor is the row floor here, so both feed 2 synthetic + 2 real rows
    assert out_e == out_t == [seg([1, 1, 1]), seg([1, 1, 1]), rows[0], rows[1]]
    assert examples.counts.real_units == 2 and tokens.counts.real_units == 6
    assert len(examples.carry.synthetic) == len(tokens.carry.synthetic) == 2


# ----- the golden run: what the collator feeds did not change ------------------------------------------
def _digest(obj) -> str:
    def plain(x):
        if isinstance(x, torch.Tensor):
            return {"dtype": str(x.dtype), "shape": list(x.shape), "data": x.tolist()}
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in sorted(x.items())}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, float) and x != x:
            return "nan"
        return x

    return hashlib.sha256(json.dumps(plain(obj), sort_keys=True).encode()).hexdigest()


def golden_run(unit: str, packed: bool, tensors: bool, scope: str = "step", resume_at: int | None = 5):
    """Synthetic-heavy batches (growth, carry-over, flushes) over two epochs; rows with and without
    provenance; rows that carry no loss; a synthetic filter; a state_dict round trip in the second epoch."""
    tok = tiny_tokenizer()
    fmt = RowFormat(max_length=CAPACITY)
    rng = random.Random(7)
    real_texts = human_like_sentences(48, seed=3)
    real_pool = [{"text": t} for t in real_texts]
    syn_texts = [f"synthetic {i} the model said the same thing number {rng.randint(0, 9)}" for i in range(60)]

    def row(text, source, with_provenance=True, no_loss=False):
        r = tokenize_row({"text": text}, tok, fmt)
        labels = [-100] * len(r["labels"]) if no_loss else list(r["labels"])
        r = {"input_ids": r["input_ids"], "labels": labels}
        return {**r, "provenance": {"source": source}} if with_provenance else r

    rows = []
    for i, t in enumerate(syn_texts):
        rows.append(row(t, "synthetic", with_provenance=i % 7 != 3, no_loss=i % 13 == 5))
        if i % 4 == 0:
            rows.append(row(real_texts[(i * 5) % 48], "real", with_provenance=i % 8 != 0,
                            no_loss=i % 24 == 12))
    if packed:
        features = []
        for k in range(0, len(rows), 3):
            bins, _ = pack_first_fit([{"input_ids": r["input_ids"], "labels": r["labels"]}
                                      for r in rows[k:k + 3]], CAPACITY)
            features += [join_segments(b) for b in bins]
    else:
        features = rows
    batch_size, accumulation = 4, 2
    per_epoch = -(-len(features) // batch_size)

    def no_sevens(texts):
        return ["seven" if "number 7" in t else None for t in texts]

    def build():
        return MixingCollator(None if tensors else identity, real_dataset=real_pool, tokenizer=tok,
                              min_real_fraction=0.4, unit=unit, floor_scope=scope, seed=11,
                              max_length=CAPACITY, synthetic_filter=no_sevens,
                              max_growth=1.5).plan(accumulation, per_epoch, 2 * per_epoch, batch_size)

    collator = build()
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):
            order = list(range(per_epoch))
            random.Random(epoch).shuffle(order)
            for k in order:
                if resume_at is not None and epoch == 1 and k == order[resume_at]:
                    state = json.loads(json.dumps(collator.state_dict()))
                    out.append(("state", state))
                    collator = build()
                    collator.load_state_dict(state)
                batch = collator(features[k * batch_size:(k + 1) * batch_size])
                out.append(batch if not tensors else dict(batch.items()))
        out.append(("end", collator.counts.as_dict(), collator.metrics(), collator.last_real_fraction,
                    collator.real_stream_draws, len(collator.synthetic_buffer), len(collator.real_carry),
                    collator.state_dict()))
    out.append(("warnings", sorted({str(w.message) for w in caught})))
    return out


def drain_run():
    tok = tiny_tokenizer()
    c = MixingCollator(real_dataset=[{"text": t} for t in human_like_sentences(16, seed=5)], tokenizer=tok,
                       min_real_fraction=0.75, unit="examples")
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(3):
            out.append(c([{"input_ids": tok(f"synthetic {k} {j} same thing")["input_ids"],
                           "provenance": {"source": "synthetic"}} for j in range(4)]))
        out += list(c.drain(2))
    out.append(("warnings", sorted({str(w.message) for w in caught})))
    out.append(c.state_dict())
    return out


def no_loss_pool_run(unit: str, packed: bool):
    """Most real rows, cut to max_length, carry no loss: top-ups are redrawn, and the floor goes short."""
    tok = tiny_tokenizer()
    long_prompt = " ".join(["the prompt goes on"] * 20)
    pool = [{"prompt": long_prompt if i % 5 else "short question", "completion": " an answer here"}
            for i in range(30)]
    c = MixingCollator(identity, real_dataset=pool, tokenizer=tok, min_real_fraction=0.5, unit=unit,
                       max_length=24, seed=2).plan(1, 6, 6, 3)
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(6):
            rows = [{"input_ids": [5, 6, 7, 8 + k, 9 + j], "labels": [5, 6, 7, 8 + k, 9 + j],
                     "provenance": {"source": "synthetic"}} for j in range(3)]
            if packed:
                rows = [join_segments([{kk: v for kk, v in r.items() if kk != "provenance"} for r in rows])]
            out.append(c(rows))
    out.append(("warnings", sorted({str(w.message) for w in caught})))
    out.append(c.state_dict())
    return out


GOLDEN = {
    "examples": "8784e422b9b1fa133d0824ba57d27ad86219e835f5a048cfb80feea44667727b",
    "examples_micro_batch": "c1ad85c4b7fe385cff4cce478525b4c33a40c061a80c4dcee3cfbca136dd2245",
    "tokens": "4c02de38c78b6a23cdd432b3b03b2a749d27332dbe25c5225b450b68ac3fa00f",
    "tokens_packed": "ef2a57152f405e74c832f980f8d76b86f45e23cd0ed4a3b88761e3fdd7ff67f7",
    "tokens_packed_micro_batch": "d57804a87ae4ccff691e35f2063d0dd947c6f4a5c94bfa7e7ee3c1428f2705a8",
    "drain": "18bf791ff51dc767e358a52d5914fbcd1c15f1c2e1cef7b320f844bb8d4cc01d",
    "no_loss_pool_examples": "cb3c9f752d381f4b273ee53fd921ed734b45478ca4924eb0c233a32b3b2c440c",
    "no_loss_pool_tokens": "79657d25cdf6d3bb8ba9b1b3403fd43c299885c91c21162c4abae57ee7650372",
    "no_loss_pool_tokens_packed": "72f6bd0269b58f254a5d8fa23384e263687fdc30635d93ca891c9a9c4267a971",
}
RUNS = {
    "examples": lambda: golden_run("examples", packed=False, tensors=True),
    "examples_micro_batch": lambda: golden_run("examples", packed=False, tensors=True, scope="micro_batch"),
    "tokens": lambda: golden_run("tokens", packed=False, tensors=True),
    "tokens_packed": lambda: golden_run("tokens", packed=True, tensors=False),
    "tokens_packed_micro_batch": lambda: golden_run("tokens", packed=True, tensors=False,
                                                    scope="micro_batch"),
    "drain": drain_run,
    "no_loss_pool_examples": lambda: no_loss_pool_run("examples", packed=False),
    "no_loss_pool_tokens": lambda: no_loss_pool_run("tokens", packed=False),
    "no_loss_pool_tokens_packed": lambda: no_loss_pool_run("tokens", packed=True),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_batches_are_unchanged(name, tmp_path, monkeypatch):
    # a fresh fingerprint cache: the index's origin ("real pool" vs "(cached)") is part of a warning's text
    monkeypatch.setattr("collapse_guard.mixing.rows.cache_dir", lambda: tmp_path)
    assert _digest(RUNS[name]()) == GOLDEN[name]
