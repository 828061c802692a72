"""Wiring a `MixingCollator` into a Hugging Face `Trainer`: checks, the plan stated up front, and the
callback that keeps the collator in step with training (flush windows, checkpoints, evaluation)."""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import TrainerCallback

from collapse_guard.data import check_tokenizer_fits, column_names, require_chat_template, require_tokenizer
from collapse_guard.distributed import is_main
from collapse_guard.mixing.policy import FloorPlan, decide_examples, expected_share
from collapse_guard.mixing.rows import RowFormat, real_pool_index
from collapse_guard.mixing.setup import TrainerSetup
from collapse_guard.provenance import PROVENANCE_COLUMN, REAL, SYNTHETIC, arrow_fingerprints

if TYPE_CHECKING:  # the collator imports this module (attach), not the other way round
    from collapse_guard.mixing.collator import MixingCollator

logger = logging.getLogger(__name__)

# Trainers whose data is not SFT rows: the floor has nothing to mix there.
_NOT_SFT = {
    "DPOTrainer": "preference pairs (chosen/rejected)",
    "KTOTrainer": "preference labels",
    "ORPOTrainer": "preference pairs",
    "CPOTrainer": "preference pairs",
    "RewardTrainer": "preference pairs",
    "GRPOTrainer": "prompts whose completions the policy generates on-line",
    "RLOOTrainer": "prompts whose completions the policy generates on-line",
    "PPOTrainer": "prompts whose completions the policy generates on-line",
    "OnlineDPOTrainer": "prompts whose completions the policy generates on-line",
}


def _is_sft(trainer) -> bool:
    try:
        from trl import SFTTrainer
    except ImportError:  # pragma: no cover - trl is a dependency
        return False
    return isinstance(trainer, SFTTrainer)


def attach_collator(collator: MixingCollator, trainer) -> None:
    """Checks the trainer can be mixed, wraps its collator, and adds `MixingCollatorCallback`."""
    for cls in type(trainer).__mro__:
        if cls.__name__ in _NOT_SFT:
            raise ValueError(
                f"MixingCollator mixes SFT rows; {cls.__name__} trains on {_NOT_SFT[cls.__name__]}. Use "
                "CollapseGuardCallback without a collator there (held-out perplexity and generation "
                "diversity)."
            )
    args = trainer.args
    if getattr(args, "dataloader_num_workers", 0):
        raise ValueError(
            "MixingCollator keeps its carry-over and real stream in the training process, but "
            f"dataloader_num_workers={args.dataloader_num_workers} runs the collator in worker processes "
            "(each with its own copy: examples lost or repeated, state not checkpointed). Set "
            "dataloader_num_workers=0; the collator costs a fraction of a millisecond per batch."
        )
    sft = _is_sft(trainer)
    if sft:
        check_trainer_max_length(getattr(args, "max_length", None))
    tokenizer = collator.tokenizer
    if tokenizer is None:
        processing = (getattr(trainer, "processing_class", None)
                      or getattr(trainer.data_collator, "tokenizer", None))
        tokenizer = getattr(processing, "tokenizer", processing)
    if tokenizer is None and collator.real_format != "tokens":
        raise ValueError("MixingCollator.attach: the trainer has no processing_class and its data collator "
                         "no tokenizer; pass MixingCollator(tokenizer=...) to tokenize real top-ups.")
    if tokenizer is not None:  # before training: top-ups in another model's ids train silently
        require_tokenizer(tokenizer, "MixingCollator")
        check_tokenizer_fits(tokenizer, trainer.model, "MixingCollator")
        require_chat_template(collator.real_format, tokenizer, "MixingCollator's real_dataset",
                              "the trainer's model")
    packing = bool(sft and getattr(args, "packing", False))
    if packing and collator.unit != "tokens":
        raise ValueError("SFTConfig(packing=True) packs several examples per row: the floor must count "
                         "tokens. Use MixingCollator(..., unit='tokens').")
    train = trainer.train_dataset
    if train is None:
        raise ValueError("MixingCollator.attach: the trainer has no train_dataset.")
    # every check has passed: learn the setup, bind it in one call, then wire the collator in
    row_format = _row_format(collator, tokenizer, trainer, sft, train)
    base = collator.base_collator if trainer.data_collator is collator or collator.base_collator is not None \
        else trainer.data_collator
    if PROVENANCE_COLUMN in column_names(train) and not packing:
        _keep_provenance_column(trainer)
        composition = _composition_from_provenance(train)
        setup = TrainerSetup(tokenizer, base, row_format, "row provenance", composition)
    else:
        # built now, before training starts
        index = collator.index if collator.index is not None \
            else real_pool_index(collator.real_dataset, tokenizer, row_format)
        composition = _composition_from_fingerprints(train, index, packing)
        setup = TrainerSetup(tokenizer, base, row_format, index.origin, composition, index)
        if composition is not None and composition[REAL] == 0:
            warnings.warn(
                f"MixingCollator: none of the {composition[SYNTHETIC]} training rows matches a "
                "real-pool example tokenized the way this trainer tokenizes "
                f"({_describe(row_format)}). If the training set holds real rows, they are "
                "tokenized differently and would be counted as synthetic. Fix: keep the 'provenance' column "
                "in the training set (mix_datasets adds it), or tokenize real data the same way.",
                stacklevel=3,
            )
    collator.bind(setup)
    trainer.data_collator = collator
    if not any(isinstance(cb, MixingCollatorCallback) and cb.collator is collator
               for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(MixingCollatorCallback(collator))


def check_trainer_max_length(max_length: Any, name: str = "SFTConfig.max_length") -> None:
    """Refuses a trainer `max_length` under which no row carries loss, before anything is trained: a causal
    LM learns each token from the ones before it, so a row needs at least 2 tokens, and TRL slices rows with
    `[:max_length]`, so a negative value silently cuts tokens off the end instead of failing."""
    if max_length is None:
        return  # TRL: no truncation
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ValueError(f"{name} must be an int number of tokens per row (>= 2) or None, got {max_length!r} "
                         f"({type(max_length).__name__}). Use e.g. max_length=1024 (TRL's default).")
    if max_length < 2:
        raise ValueError(f"{name}={max_length}: rows need at least 2 tokens to carry loss (a causal LM "
                         "predicts each token from the ones before it), so nothing would be trained. Use "
                         "max_length >= 2 (TRL's default is 1024) or None.")


def _describe(fmt: RowFormat) -> str:
    return (f"max_length={fmt.max_length}, EOS {'appended' if fmt.add_eos else 'not appended'}, "
            f"truncation {fmt.truncation_mode}")


def _row_format(collator: MixingCollator, tokenizer, trainer, sft: bool, train) -> RowFormat:
    from dataclasses import replace

    if sft:
        fmt = RowFormat.for_sft(trainer.args)
    else:
        sample = _sample_ids(train, 256)
        fmt = RowFormat.infer(sample, tokenizer, collator.max_length)
    return replace(fmt, max_length=collator.max_length) if collator.max_length else fmt


def _sample_ids(train, n: int) -> list[list[int]]:
    if "input_ids" not in column_names(train):
        return []
    if hasattr(train, "__len__"):
        return [list(x) for x in train.select(range(min(n, len(train))))["input_ids"]]
    return [list(row["input_ids"]) for _, row in zip(range(n), train, strict=False)]


def _keep_provenance_column(trainer) -> None:
    """Asks the Trainer to hand the `provenance` column to the collator (it drops columns the model's
    forward does not take); the collator strips it before the base collator sees the rows."""
    if getattr(trainer.args, "remove_unused_columns", True):
        trainer._set_signature_columns_if_needed()
        signature = list(getattr(trainer, "_signature_columns", None) or [])
        if PROVENANCE_COLUMN not in signature:
            trainer._signature_columns = [*signature, PROVENANCE_COLUMN]


def _composition_from_provenance(train) -> dict[str, int] | None:
    """Rows and tokens of each source in the training set (None for a streaming set)."""
    if not hasattr(train, "__len__"):
        return None
    table = train.with_format("arrow")[:]
    sources = table[PROVENANCE_COLUMN].combine_chunks().field("source").to_numpy(zero_copy_only=False)
    is_real = sources == REAL
    out = {REAL: int(is_real.sum()), SYNTHETIC: int((~is_real).sum())}
    if "input_ids" in table.column_names:
        lengths = np.diff(table["input_ids"].combine_chunks().offsets.to_numpy())
        out.update(real_tokens=int(lengths[is_real].sum()), synthetic_tokens=int(lengths[~is_real].sum()))
    return out


def _composition_from_fingerprints(train, index, packing: bool) -> dict[str, int] | None:
    """Rows (packed segments with packing) and tokens the real-pool index recognises as real."""
    if not hasattr(train, "__len__") or "input_ids" not in column_names(train):
        return None
    table = train.with_format("arrow")
    out = {REAL: 0, SYNTHETIC: 0, "real_tokens": 0, "synthetic_tokens": 0}
    for start in range(0, len(train), 50_000):
        chunk = table[start: start + 50_000]
        ids = chunk["input_ids"]
        if packing and "seq_lengths" in chunk.column_names:
            ids = _segments_array(ids, chunk["seq_lengths"])
        elif hasattr(ids, "combine_chunks"):
            ids = ids.combine_chunks()
        keys = arrow_fingerprints(ids, index.bos_id, index.eos_id)[0]
        real = index._member(keys, index.real_keys)
        lengths = np.diff(ids.offsets.to_numpy())
        out[REAL] += int(real.sum())
        out[SYNTHETIC] += int((~real).sum())
        out["real_tokens"] += int(lengths[real].sum())
        out["synthetic_tokens"] += int(lengths[~real].sum())
    return out


def _segments_array(ids, seq_lengths):
    """A list array of packed segments, re-cut from packed rows by their seq_lengths."""
    import pyarrow as pa

    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    lengths = seq_lengths.combine_chunks() if isinstance(seq_lengths, pa.ChunkedArray) else seq_lengths
    seg = lengths.values.to_numpy(zero_copy_only=False).astype(np.int64)
    base = ids.offsets.to_numpy()[0]
    offsets = np.concatenate([[base], base + np.cumsum(seg)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), ids.values)


def describe_plan(collator: MixingCollator, batch_size: int, accumulation: int) -> tuple[int, str]:
    """(logging level, sentence) stating what the floor will do with this training set, before it starts."""
    f, unit = collator.min_real_fraction, collator.unit
    rows = batch_size * accumulation
    scope = f"each optimizer step ({batch_size} rows x {accumulation} accumulation = {rows} rows per rank)" \
        if collator.floor_scope == "step" else f"each micro-batch ({batch_size} rows per rank)"
    window = rows if collator.floor_scope == "step" else batch_size
    if unit == "examples":
        real_min = math.ceil(f * window - 1e-9)
        room = (window - real_min) / window
        floor = (f"at least {real_min} real of {window} rows in {scope}, counting only rows that are trained "
                 "(a row whose labels are all -100 counts as none)")
    else:
        room = 1.0 - f
        floor = (f"at least {f:.0%} real tokens in {scope}, counting supervised tokens (labels other than "
                 "-100)")
    text = (f"MixingCollator: {floor}; recognising real rows by "
            f"{getattr(collator, 'recognition', 'fingerprints')}")
    comp = collator.composition
    if not comp:
        return logging.INFO, text + "; training-set composition unknown up front (streaming)."
    n = comp[REAL] + comp[SYNTHETIC]
    p = comp[SYNTHETIC] / n if n else 0.0
    text += f"; training set: {comp[SYNTHETIC]} synthetic of {n} rows ({p:.0%})."
    if comp[SYNTHETIC] == 0:
        return logging.INFO, text
    if f >= 1.0:
        return logging.WARNING, text + (f" min_real_fraction=1.0 leaves no room for synthetic data: its "
                                        f"{comp[SYNTHETIC]} synthetic rows will not be trained. Lower "
                                        "min_real_fraction to train them.")
    if unit == "tokens":
        tokens = comp.get("real_tokens", 0) + comp.get("synthetic_tokens", 0)
        p_tokens = comp.get("synthetic_tokens", 0) / tokens if tokens else p
        if p_tokens <= 0.95 * room:
            return logging.INFO, text + (f" Synthetic tokens: {p_tokens:.0%}; every synthetic row is trained "
                                         "once per epoch.")
        return logging.WARNING, text + (
            f" Synthetic tokens are {p_tokens:.0%} of the set and the floor leaves room for {room:.0%}: "
            f"micro-batches grow (up to max_growth={collator.max_growth}) to train every synthetic row once "
            "per epoch, and rows that still do not fit wait in the carry-over (counted at the end). To avoid "
            f"it: min_real_fraction <= {max(0.0, 1.0 - p_tokens) * 0.95:.2f}, or a training set built with "
            "mix_datasets(..., min_real_fraction=f).")
    sim = dry_run(collator, comp[REAL], comp[SYNTHETIC], batch_size, accumulation)
    measured = (f" Dry run of this plan on a shuffled set of the same composition: {sim['grown_share']:.0%} "
                f"of micro-batches take extra rows, {sim['extra_rows_share']:+.0%} rows in all, largest "
                f"micro-batch {sim['largest']} rows")
    if sim["untrained"] == 0:
        level = logging.INFO if sim["grown_share"] <= 0.25 else logging.WARNING
        return level, text + measured + "; every synthetic row is trained once per epoch."
    fixes = [f"min_real_fraction <= {max(0.0, 1.0 - p):.2f}"]
    better = next((k for k in range(window + 1, 4 * window + 64)
                   if (k - math.ceil(f * k - 1e-9)) / k >= p - 1e-9), None)
    if better:
        fixes.append(f"{'B x GA' if collator.floor_scope == 'step' else 'B'} >= {better}")
    fixes.append(f"max_growth > {collator.max_growth}")
    return logging.WARNING, text + measured + (
        f"; about {sim['untrained']} synthetic rows per epoch cannot be trained within the epoch (the floor "
        f"leaves room for {room:.0%} synthetic per step, growth is capped by "
        f"max_growth={collator.max_growth}); they wait in the carry-over. To train every synthetic row: "
        f"{'; or '.join(fixes)}.")


def dry_run(collator: MixingCollator, n_real: int, n_synthetic: int, batch_size: int, accumulation: int,
            seed: int = 0, max_rows: int = 100_000) -> dict[str, float]:
    """Runs the floor's policy (`policy.decide_examples`, the collator's own arithmetic) on counts alone over
    one shuffled epoch of the given composition (scaled down to `max_rows`), with the collator's floor,
    scope and growth cap, and reports growth and untrained synthetic rows. No rows are built."""
    n = n_real + n_synthetic
    scale = min(1.0, max_rows / max(n, 1))
    n_real_s, n_syn_s = round(n_real * scale), round(n_synthetic * scale)
    order = np.random.default_rng(seed).permutation(np.array([True] * n_real_s + [False] * n_syn_s, bool))
    per_epoch = math.ceil(len(order) / batch_size)
    plan = FloorPlan(accumulation, per_epoch, per_epoch, batch_size)
    f = collator.min_real_fraction
    credit = {"synthetic": 0.0, "real": 0.0}
    pending = carried = step_units = step_real = synthetic_seen = intake = typical = 0
    fed = grown = largest = 0
    for k in range(per_epoch):
        chunk = order[k * batch_size: (k + 1) * batch_size]
        b, real_in = len(chunk), int(chunk.sum())
        synthetic_seen += b - real_in
        intake += b
        pending += (b - real_in) if f < 1.0 else 0  # f = 1: synthetic rows are skipped, not queued
        carried += real_in
        if collator.floor_scope == "micro_batch" or plan.position_in_step(k) == 0:
            step_units = step_real = 0
        nominal = max(b, batch_size, typical)
        share = expected_share(1.0 - f, synthetic_seen, intake, nominal)  # no composition: prior 1 - f
        n_syn, n_real_rows = decide_examples(f, b, (step_units, step_real), (pending, carried),
                                             plan.remaining(k), nominal, collator.max_growth, share, credit)
        pending -= n_syn
        carried -= min(n_real_rows, carried)  # the rest are top-ups
        units = n_syn + n_real_rows
        step_units, step_real = step_units + units, step_real + n_real_rows
        fed += units
        grown += units > b
        largest = max(largest, units)
        typical = max(typical, b)
    return {"grown_share": grown / max(per_epoch, 1),
            "extra_rows_share": (fed - len(order)) / max(len(order), 1),
            "largest": largest,
            "untrained": round(pending / scale) if scale else 0}


class MixingCollatorCallback(TrainerCallback):
    """Keeps a `MixingCollator` in step with the Trainer (`MixingCollator.attach` adds it).

    - tells the collator where epochs, optimizer steps and training end (its flush windows) and states
      the plan up front;
    - saves the collator's state into every checkpoint, per rank, as of the last micro-batch the
      trainer consumed (the dataloader prefetches ahead), and restores it on resume;
    - pauses mixing while the Trainer evaluates (it reuses the data collator for eval batches);
    - at the end says how many synthetic rows were left untrained, if training stopped early.
    """

    def __init__(self, collator: MixingCollator):
        # duck-typed: importing MixingCollator here would close an import cycle (collator -> attach)
        if not all(callable(getattr(collator, name, None)) for name in ("plan", "save", "load", "state_at")):
            raise TypeError(f"MixingCollatorCallback needs a MixingCollator, got {type(collator).__name__}.")
        self.collator = collator
        self.consumed = 0

    @staticmethod
    def _checkpoint_dir(args, state) -> str:
        return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs: Any):
        c = self.collator
        accumulation = args.gradient_accumulation_steps
        per_epoch = len(train_dataloader) if train_dataloader is not None and _has_length(train_dataloader) \
            else None
        steps_per_epoch = math.ceil(per_epoch / accumulation) if per_epoch else None
        if per_epoch:
            full, rest = divmod(state.max_steps, steps_per_epoch)
            total = full * per_epoch + min(per_epoch, rest * accumulation)
        else:
            total = state.max_steps * accumulation
        c.plan(accumulation, per_epoch, total, args.per_device_train_batch_size)
        expected = 0
        if state.global_step > 0:
            g = state.global_step
            expected = (g // steps_per_epoch) * per_epoch + (g % steps_per_epoch) * accumulation \
                if per_epoch else g * accumulation
            directory = self._checkpoint_dir(args, state)
            if not c.load(directory):
                warnings.warn(f"resuming at step {g} but {directory} holds no MixingCollator state: its "
                              "carry-over and real-stream position restart empty.", stacklevel=2)
                c.calls = expected
            elif c.calls != expected:
                warnings.warn(f"MixingCollator state in {directory} is at micro-batch {c.calls}, training "
                              f"resumes at {expected}; continuing from {expected}.", stacklevel=2)
                c.calls = expected
            if not per_epoch and not args.ignore_data_skip:
                # an IterableDataset replays skipped batches
                c.skip_calls = (g % state.max_steps) * accumulation
        self.consumed = c.calls
        c.training = True
        c.paused = bool(getattr(args, "eval_on_start", False))
        if state.global_step == 0 and is_main():
            level, text = describe_plan(c, args.per_device_train_batch_size, accumulation)
            logger.log(level, text)

    def on_substep_end(self, args, state, control, **kwargs: Any):
        self.consumed += 1

    def on_step_end(self, args, state, control, **kwargs: Any):
        self.consumed += 1
        if control.should_evaluate:
            self.collator.paused = True

    def on_epoch_end(self, args, state, control, **kwargs: Any):
        if control.should_evaluate:
            self.collator.paused = True

    def on_evaluate(self, args, state, control, **kwargs: Any):
        self.collator.paused = False

    def on_save(self, args, state, control, **kwargs: Any):
        try:
            self.collator.save(self._checkpoint_dir(args, state), calls=self.consumed)
        except KeyError as err:
            warnings.warn(f"MixingCollator state not saved exactly: {err}", stacklevel=2)
            self.collator.save(self._checkpoint_dir(args, state))

    def on_train_end(self, args, state, control, **kwargs: Any):
        c = self.collator
        c.training = False
        c.paused = False
        pending = len(c.synthetic_buffer)
        if pending and is_main():
            why = ("training stopped before the end of the epoch" if state.global_step < state.max_steps else
                   "the floor and max_growth left no room for them within the epoch, as the plan said at "
                   "the start")
            logger.warning("MixingCollator: training ended at step %d of %d with %d synthetic rows still in "
                           "the carry-over (%s); they were not trained.",
                           state.global_step, state.max_steps, pending, why)


def _has_length(loader) -> bool:
    try:
        return len(loader) > 0
    except (TypeError, NotImplementedError):
        return False
