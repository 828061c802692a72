"""`CollapseGuardCallback`: the guard's eyes inside a Hugging Face `Trainer` / TRL `SFTTrainer`.

It measures held-out human perplexity (and, given prompts, the diversity of fixed-prompt generations)
before the first step and every `eval_steps` steps, hands the history to `CollapseDetector`, logs the
signals under `collapse/`, and stops training on an alarm. Every rank takes the same decision at the
same step: perplexity sums are all-reduced, and rank 0's measurement is broadcast before anyone decides.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import sys
import weakref
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, ExportableState

from collapse_guard.detector import LEVELS, CollapseDetector, DetectorConfig, Verdict
from collapse_guard.io import atomic_write_json, read_json
from collapse_guard.metrics.perplexity import HeldoutPerplexity, document_perplexities, unwrap_causal_lm
from collapse_guard.mixing import MixingCollator, MixingCollatorCallback

logger = logging.getLogger(__name__)

HISTORY_FILENAME = "collapse_history.json"
HISTORY_VERSION = 1
LOG_PREFIX = "collapse/"
EVAL_PREFIX = "eval_"
# Entry keys that are bookkeeping, not model measurements.
_ENTRY_META = ("round", "step", "level", "reasons")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _broadcast(obj: Any) -> Any:
    """Rank 0's object on every rank (identity without torch.distributed)."""
    rank, world = _dist()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather(items: list[Any]) -> list[list[Any]]:
    rank, world = _dist()
    if world == 1:
        return [items]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, items)
    return out


def _validate_window(context_length: Any, stride: Any, max_batch_tokens: Any) -> None:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (tokens per held-out window), got {context_length!r}.")
    if stride is not None and (not isinstance(stride, int) or not 1 <= stride <= context_length):
        raise ValueError(f"stride must be None (blocks) or an int in [1, context_length={context_length}], got {stride!r}.")
    if not isinstance(max_batch_tokens, int) or max_batch_tokens < context_length:
        raise ValueError(
            f"max_batch_tokens={max_batch_tokens!r} must be an int >= context_length={context_length} (one window)."
        )


def _config_key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CollapseGuardCallback(TrainerCallback, ExportableState):
    """Watches a fine-tuning run for model collapse and stops it on an alarm.

    Drop-in for `transformers.Trainer` and TRL's `SFTTrainer`: `trainer.add_callback(guard)`. It

    - measures the baseline (held-out human perplexity, plus generation diversity when `prompts` are
      given) before the first step, unless the history file or a resumed checkpoint already holds one;
    - re-measures every `eval_steps` optimizer steps, whenever the Trainer evaluates and at the end, and puts
      `eval_heldout_ppl`, `eval_heldout_ppl_ratio`, ... into the evaluation metrics, so
      `EarlyStoppingCallback` with `metric_for_best_model="heldout_ppl"` (and `greater_is_better=False`)
      works too;
    - logs `collapse/*` values (and the `MixingCollator`'s realized real fraction, carry-over and drop
      counts) through the Trainer's logging, so `report_to` backends receive them;
    - asks `CollapseDetector` for a verdict and, on an alarm with `stop_on_alarm=True`, sets
      `control.should_training_stop` on every rank at the same step;
    - keeps a JSON history (`collapse_history.json` in `output_dir`, or `history_path`) with every
      round's measurements, so the trainer of round r compares with round 0's baseline;
    - restores its history on `resume_from_checkpoint`.

    With `collator=` it also does all that `MixingCollatorCallback` does (collator state in checkpoints,
    no mixing during evaluation): do not add both.

    Args:
        heldout_texts: human documents the model never trains on; fixed across rounds.
        tokenizer: the model's tokenizer; defaults to the Trainer's `processing_class`.
        eval_steps: measure every this many optimizer steps.
        collator: the `MixingCollator` feeding the Trainer, if any.
        stop_on_alarm: stop training when the detector raises an alarm.
        prompts: a fixed prompt set; the model's generations on it give the diversity signals. Ratios of
            distinct-n and self-BLEU over a handful of short generations are noisy: use 16 or more prompts.
        history_path: the history file; share it across rounds (default: `output_dir/collapse_history.json`).
        round_index: this trainer's round of a multi-round loop (0 = the first).
        detector_config: thresholds of the collapse rules.
        context_length, stride, max_batch_tokens: held-out perplexity settings (fixed across rounds).
        max_new_tokens, do_sample, generation_seed, generation_batch_size, apply_chat_template: the fixed
            decoding of `prompts` (greedy by default; sampling is seeded and leaves the training RNG alone).
        reference_model: a frozen model (ideally round 0's) scoring the generations for the low-/high-
            perplexity concentration signal; `"initial"` copies the model as it is when training begins.
        embedding_model: a sentence-embedding model directory for embedding diversity (optional).
        restore_key: internal; lets `Trainer(restore_callback_states_from_checkpoint=True)` rebuild the guard.

    Example:

    ```python
    >>> from collapse_guard.callbacks import CollapseGuardCallback
    >>> from collapse_guard.testing import tiny_tokenizer, tiny_causal_lm, human_like_sentences
    >>> tok = tiny_tokenizer()
    >>> guard = CollapseGuardCallback(human_like_sentences(16, seed=5), tok, eval_steps=2, context_length=64)
    >>> round(guard.measure(tiny_causal_lm(tok))["heldout_ppl"]) > 1
    True
    ```

    In a training script:

    ```python
    trainer = SFTTrainer(model, args=SFTConfig(...), train_dataset=mixed, data_collator=collator)
    trainer.add_callback(CollapseGuardCallback(human_texts("lee"), eval_steps=50, collator=collator))
    trainer.train()  # stops on an alarm; guard.last_verdict.reasons says why
    ```
    """

    # Live guards by configuration, so Trainer's `type(cb)(**state["args"])` can find the real objects.
    _live: weakref.WeakValueDictionary[str, CollapseGuardCallback] = weakref.WeakValueDictionary()

    def __init__(
        self,
        heldout_texts: list[str] | None = None,
        tokenizer=None,
        eval_steps: int = 50,
        collator: MixingCollator | None = None,
        stop_on_alarm: bool = True,
        prompts: list[str] | None = None,
        history_path: str | None = None,
        round_index: int = 0,
        detector_config: DetectorConfig | None = None,
        context_length: int = 512,
        stride: int | None = None,
        max_batch_tokens: int = 16384,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        generation_seed: int = 0,
        generation_batch_size: int = 16,
        apply_chat_template: bool = False,
        reference_model=None,
        embedding_model: str | None = None,
        restore_key: str | None = None,
    ):
        if heldout_texts is None and restore_key is not None:
            self._adopt(restore_key)
            return
        self._validate(heldout_texts, tokenizer, eval_steps, prompts, round_index, history_path, stop_on_alarm,
                       max_new_tokens, generation_batch_size, detector_config, reference_model, do_sample)
        _validate_window(context_length, stride, max_batch_tokens)
        self.heldout_texts = list(heldout_texts)
        self.tokenizer = tokenizer
        self.eval_steps = int(eval_steps)
        self.stop_on_alarm = stop_on_alarm
        self.prompts = list(prompts) if prompts is not None else None
        self.history_path = os.fspath(history_path) if history_path is not None else None
        self.round_index = int(round_index)
        self.detector = CollapseDetector(detector_config)
        self.context_length = context_length
        self.stride = stride
        self.max_batch_tokens = max_batch_tokens
        self.generation_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        self.generation_seed = generation_seed
        self.generation_batch_size = generation_batch_size
        self.apply_chat_template = apply_chat_template
        self.reference_model = reference_model
        self.embedding_model = embedding_model
        self.collator = collator
        self._mixing = MixingCollatorCallback(collator) if collator is not None else None
        self._evaluator: HeldoutPerplexity | None = None
        self._human_reference_ppl: list[float] | None = None
        self.history: list[dict[str, Any]] = []
        self._last_verdict: Verdict | None = None
        self.stopped_at: int | None = None
        self._pending_logs: dict[str, float] = {}
        self.restore_key = _config_key(self.heldout_texts, self.prompts, self.round_index, self.eval_steps,
                                       self.context_length, self.stride, self.history_path)
        CollapseGuardCallback._live[self.restore_key] = self

    @staticmethod
    def _validate(heldout_texts, tokenizer, eval_steps, prompts, round_index, history_path, stop_on_alarm,
                  max_new_tokens, generation_batch_size, detector_config, reference_model, do_sample) -> None:
        if heldout_texts is None or isinstance(heldout_texts, str) or not isinstance(heldout_texts, (list, tuple)):
            raise TypeError(
                f"heldout_texts must be a list of human documents, got {type(heldout_texts).__name__}; e.g. "
                "collapse_guard.resources.human_texts('lee')."
            )
        if not heldout_texts or not any(isinstance(t, str) and t.strip() for t in heldout_texts):
            raise ValueError("heldout_texts is empty: pass human documents the model does not train on.")
        bad = next((i for i, t in enumerate(heldout_texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"heldout_texts[{bad}] is {type(heldout_texts[bad]).__name__}, expected str.")
        if tokenizer is not None and not callable(tokenizer):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}.")
        if isinstance(eval_steps, bool) or not isinstance(eval_steps, int) or eval_steps <= 0:
            raise ValueError(f"eval_steps must be a positive int (optimizer steps between checks), got {eval_steps!r}.")
        if prompts is not None:
            if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
                raise ValueError(f"prompts must be a non-empty list of strings or None, got {prompts!r:.80}.")
            if not all(isinstance(p, str) for p in prompts):
                raise TypeError("prompts must all be strings.")
        if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
            raise ValueError(f"round_index must be an int >= 0, got {round_index!r}.")
        if history_path is not None and not isinstance(history_path, (str, os.PathLike)):
            raise TypeError(f"history_path must be a path, got {type(history_path).__name__}.")
        if not isinstance(stop_on_alarm, bool):
            raise TypeError(f"stop_on_alarm must be True or False, got {stop_on_alarm!r}.")
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
        if not isinstance(generation_batch_size, int) or generation_batch_size <= 0:
            raise ValueError(f"generation_batch_size must be a positive int, got {generation_batch_size!r}.")
        if detector_config is not None and not isinstance(detector_config, DetectorConfig):
            raise TypeError(f"detector_config must be a DetectorConfig, got {type(detector_config).__name__}.")
        if isinstance(reference_model, str) and reference_model != "initial":
            raise ValueError(f"reference_model must be a model, 'initial' or None, got {reference_model!r}.")
        if reference_model is not None and prompts is None:
            raise ValueError("reference_model scores generations: it needs prompts=[...] too.")
        if reference_model is not None and not do_sample:
            raise ValueError(
                "reference_model (low-/high-perplexity concentration) needs do_sample=True: greedy generations sit "
                "below the human 25th perplexity percentile by construction, which would alarm on a healthy model."
            )

    def _adopt(self, restore_key: str) -> None:
        # Trainer(restore_callback_states_from_checkpoint=True) rebuilds callbacks from their JSON state;
        # held-out texts, tokenizer and collator are not JSON, so take them from the live guard they came from.
        live = CollapseGuardCallback._live.get(restore_key)
        if live is None:
            raise ValueError(
                "cannot rebuild CollapseGuardCallback from the checkpoint: no guard with the same configuration "
                "(held-out texts, prompts, round, eval_steps) is attached to this trainer. Attach the same guard, or "
                "leave restore_callback_states_from_checkpoint=False: the guard restores its history itself."
            )
        self.__dict__.update(live.__dict__)
        self.history = [dict(e) for e in live.history]

    # ----- ExportableState --------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "args": {"restore_key": self.restore_key},
            "attributes": {
                "history": self.history,
                "last_verdict": self._last_verdict.to_dict() if self._last_verdict else None,
                "stopped_at": self.stopped_at,
            },
        }

    @property
    def last_verdict(self) -> Verdict | None:
        """The detector's latest verdict (None before the first measurement)."""
        return self._last_verdict

    @last_verdict.setter
    def last_verdict(self, value: Verdict | dict | None) -> None:
        self._last_verdict = Verdict.from_dict(value) if isinstance(value, dict) else value

    @property
    def baseline(self) -> dict[str, Any] | None:
        """Round 0's first measurement: every ratio compares with it."""
        return self.history[0] if self.history else None

    # ----- setup ----------------------------------------------------------------------------------
    def _history_file(self, args) -> str:
        return self.history_path or os.path.join(args.output_dir, HISTORY_FILENAME)

    def _ensure_ready(self, args, kwargs: dict[str, Any]) -> None:
        if self.tokenizer is None:
            processing = kwargs.get("processing_class")
            self.tokenizer = getattr(processing, "tokenizer", processing)
        if self.tokenizer is None:
            raise ValueError("CollapseGuardCallback needs a tokenizer: pass tokenizer=... (the Trainer has none).")
        metric = (args.metric_for_best_model or "").removeprefix(EVAL_PREFIX)
        if metric.startswith("heldout_ppl") and args.greater_is_better:
            raise ValueError(
                f"metric_for_best_model={args.metric_for_best_model!r} is a perplexity (lower is better) but "
                "greater_is_better=True (Trainer's default for metrics not ending in 'loss'). Pass "
                "greater_is_better=False in the training arguments."
            )

    def _move_ahead_of_loggers(self) -> None:
        # Trainer puts report_to integrations (TensorBoard, W&B, MLflow) before user callbacks, and they write
        # `logs` as soon as they see them. To get collapse/* values into the same log call, the guard moves
        # itself right behind DefaultFlowCallback (whose control flags it reads). The handler is the caller.
        frame = sys._getframe(1)
        for _ in range(4):
            if frame is None:
                break
            handler = frame.f_locals.get("self")
            if isinstance(handler, CallbackHandler):
                if self in handler.callbacks:
                    handler.callbacks.remove(self)
                    flow = [i for i, cb in enumerate(handler.callbacks) if isinstance(cb, DefaultFlowCallback)]
                    handler.callbacks.insert(flow[0] + 1 if flow else 0, self)
                return
            frame = frame.f_back

    def _load_history(self, args, state) -> None:
        """History at train begin: earlier rounds from the file, this round's from the checkpoint on resume."""
        stored = None
        if state.is_world_process_zero:
            stored = read_json(self._history_file(args), default=None)
        stored = _broadcast(stored)
        entries = [dict(e) for e in (stored or {}).get("entries", [])]
        earlier = [e for e in entries if e.get("round", 0) < self.round_index]
        this_round: list[dict[str, Any]] = []
        if state.global_step > 0:
            restored = self._checkpoint_attributes(state)
            if restored and restored.get("history"):
                this_round = [dict(e) for e in restored.get("history", []) if e.get("round", 0) == self.round_index]
                earlier = earlier or [dict(e) for e in restored.get("history", [])
                                      if e.get("round", 0) < self.round_index]
                self.last_verdict = restored.get("last_verdict")
            else:
                this_round = [e for e in entries if e.get("round", 0) == self.round_index]
            # Anything measured after the checkpoint belongs to a timeline that no longer exists.
            this_round = [e for e in this_round if e.get("step", 0) <= state.global_step]
        elif any(e.get("round", 0) >= self.round_index for e in entries):
            logger.warning(
                "CollapseGuard: %s holds measurements of round >= %d from an earlier run; they are replaced.",
                self._history_file(args), self.round_index,
            )
        self.history = earlier + this_round
        self.stopped_at = None

    def _checkpoint_attributes(self, state) -> dict[str, Any] | None:
        data = (state.stateful_callbacks or {}).get(type(self).__name__)
        candidates = data if isinstance(data, list) else [data] if data else []
        for candidate in candidates:
            if candidate.get("args", {}).get("restore_key") == self.restore_key:
                return candidate.get("attributes", {})
        return candidates[0].get("attributes", {}) if len(candidates) == 1 else None

    def _write_history(self, args, state) -> None:
        if not state.is_world_process_zero:
            return
        atomic_write_json(self._history_file(args), {
            "version": HISTORY_VERSION,
            "baseline": self.baseline,
            "entries": self.history,
            "last_verdict": self._last_verdict.to_dict() if self._last_verdict else None,
        })

    # ----- measuring -------------------------------------------------------------------------------
    def _entry_at(self, step: int) -> dict[str, Any] | None:
        for entry in reversed(self.history):
            if entry.get("round") == self.round_index and entry.get("step") == step:
                return entry
        return None

    def measure(self, model) -> dict[str, float]:
        """Held-out perplexity (+ diversity and concentration of `prompts` generations) of `model`.

        Collective under torch.distributed: call it on every rank; every rank returns rank 0's values.
        """
        if self._evaluator is None:
            if self.tokenizer is None:
                raise ValueError("measure() needs a tokenizer: pass tokenizer=... (or let the Trainer start first).")
            self._evaluator = HeldoutPerplexity(self.heldout_texts, self.tokenizer, self.context_length,
                                                self.stride, self.max_batch_tokens)
        result = self._evaluator.compute(model)
        signals: dict[str, float] = {"heldout_ppl": result.perplexity, "heldout_nll_sum": result.nll_sum,
                                     "heldout_tokens": float(result.n_tokens)}
        # A diverged model cannot generate meaningfully (sampling NaN probabilities would even crash).
        if self.prompts is not None and math.isfinite(result.perplexity):
            generations = self.generate(model)
            if _dist()[0] == 0:
                signals.update(self._generation_signals(generations))
        return _broadcast(signals)

    def generate(self, model) -> list[str]:
        """The fixed-prompt generations (seeded, left-padded); every rank gets all of them, in prompt order."""
        rank, world = _dist()
        prompts = self.prompts[rank::world] or self.prompts[:1]
        texts = self._generate_local(model, prompts)[: len(self.prompts[rank::world])]
        shards = _gather(texts)
        ordered: list[str] = [""] * len(self.prompts)
        for r, shard in enumerate(shards):
            ordered[r::world] = shard
        return ordered

    def _generate_local(self, model, prompts: list[str]) -> list[str]:
        tok = self.tokenizer
        if self.apply_chat_template:
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        generator = unwrap_causal_lm(model) if not hasattr(model, "get_base_model") else model
        device = next(generator.parameters()).device
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        padding_side, was_training = tok.padding_side, generator.training
        out: list[str] = []
        tok.padding_side = "left"  # decoder-only generation needs the prompt flush against the new tokens
        generator.eval()
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(self.generation_seed)
                for start in range(0, len(prompts), self.generation_batch_size):
                    batch = tok(prompts[start: start + self.generation_batch_size], return_tensors="pt",
                                padding=True, add_special_tokens=not self.apply_chat_template).to(device)
                    ids = generator.generate(**batch, **self.generation_kwargs, pad_token_id=pad_id)
                    out += tok.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        finally:
            tok.padding_side = padding_side
            generator.train(was_training)
        return out

    def _generation_signals(self, generations: list[str]) -> dict[str, float]:
        from collapse_guard.metrics.diversity import diversity_metrics, perplexity_concentration

        signals = diversity_metrics(generations, human_texts=self.heldout_texts, embedding_model=self.embedding_model)
        reference = self.reference_model
        if reference is not None and not isinstance(reference, str):
            if self._human_reference_ppl is None:
                self._human_reference_ppl = document_perplexities(reference, self.tokenizer, self.heldout_texts,
                                                                  self.context_length, self.max_batch_tokens)
            scored = [g if g.strip() else " " for g in generations]
            generation_ppl = document_perplexities(reference, self.tokenizer, scored, self.context_length,
                                                   self.max_batch_tokens)
            if any(not math.isnan(p) for p in generation_ppl):
                signals.update(perplexity_concentration(generation_ppl, self._human_reference_ppl))
        return signals

    # ----- deciding and logging --------------------------------------------------------------------
    def _evaluate(self, args, state, control, kwargs: dict[str, Any]) -> dict[str, Any]:
        entry = self._entry_at(state.global_step)
        if entry is not None:
            return entry
        if self.tokenizer is None:  # Trainer.evaluate() before train()
            self._ensure_ready(args, kwargs)
        entry = {"round": self.round_index, "step": state.global_step, **self.measure(kwargs["model"])}
        if self.collator is not None:
            entry.update({f"mixing/{k}": v for k, v in self.collator.metrics().items()})
        self.history.append(entry)
        self._decide(args, state, control, entry)
        return entry

    def _decide(self, args, state, control, entry: dict[str, Any]) -> None:
        verdict = self.detector.check(self.history)
        self._last_verdict = verdict
        entry.update({k: v for k, v in verdict.signals.items() if k.endswith("_ratio")})
        entry["level"], entry["reasons"] = verdict.level, list(verdict.reasons)
        self._pending_logs.update(self._log_values(entry))
        self._write_history(args, state)
        if verdict.level != "ok" and state.is_world_process_zero:
            logger.warning("CollapseGuard step %d (round %d): %s", state.global_step, self.round_index, verdict)
        if verdict.is_alarm and self.stop_on_alarm:
            control.should_training_stop = True
            self.stopped_at = state.global_step

    @staticmethod
    def _signal_values(entry: dict[str, Any]) -> dict[str, float]:
        values = {k: float(v) for k, v in entry.items() if k not in _ENTRY_META and _is_number(v)}
        values["level"] = float(LEVELS.index(entry.get("level", "ok")))
        return values

    def _log_values(self, entry: dict[str, Any]) -> dict[str, float]:
        return {LOG_PREFIX + k: v for k, v in self._signal_values(entry).items()}

    def _eval_values(self, entry: dict[str, Any]) -> dict[str, float]:
        values = self._signal_values(entry)
        values["collapse_level"] = values.pop("level")
        return {EVAL_PREFIX + k: v for k, v in values.items() if not k.startswith("mixing/")}

    # ----- Trainer events ----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._move_ahead_of_loggers()
        if self._mixing is not None:
            self._mixing.on_train_begin(args, state, control, **kwargs)
        self._ensure_ready(args, kwargs)
        self._load_history(args, state)
        if isinstance(self.reference_model, str):  # "initial": freeze the model as this round starts
            self.reference_model = copy.deepcopy(unwrap_causal_lm(kwargs["model"])).eval().requires_grad_(False)
        if self.baseline is not None and self._entry_at(state.global_step) is None and state.global_step == 0:
            logger.info("CollapseGuard: baseline from %s (round %s).", self._history_file(args),
                        self.baseline.get("round"))
        self._evaluate(args, state, control, kwargs)
        if self.baseline is not None:
            self._pending_logs.update({f"{LOG_PREFIX}baseline_heldout_ppl": float(self.baseline["heldout_ppl"])})
        self._write_history(args, state)

    def on_substep_end(self, args, state, control, **kwargs):
        if self._mixing is not None:
            self._mixing.on_substep_end(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self._mixing is not None:
            self._mixing.on_step_end(args, state, control, **kwargs)
        if state.global_step % self.eval_steps == 0 or control.should_evaluate:
            self._evaluate(args, state, control, kwargs)
            control.should_log = True  # flush collapse/* at this step (report_to sees them now)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        loss_key = "loss" if "loss" in logs else "eval_loss" if "eval_loss" in logs else None
        if loss_key is not None and _is_number(logs[loss_key]):
            name = "train_loss" if loss_key == "loss" else "eval_loss"
            value = float(logs[loss_key])
            entry = self._entry_at(state.global_step)
            if not math.isfinite(value):
                if entry is None:
                    entry = {"round": self.round_index, "step": state.global_step}
                    self.history.append(entry)
                entry[name] = value
                self._decide(args, state, control, entry)
            elif entry is not None:  # the loss logged at a measured step belongs to that measurement
                entry[name] = value
        if any(k.startswith(EVAL_PREFIX) for k in logs):  # the Trainer is evaluating: join its metrics
            entry = self._evaluate(args, state, control, kwargs)
            logs.update(self._eval_values(entry))
        else:
            logs.update(self._pending_logs)
            self._pending_logs.clear()
            if self.collator is not None:
                logs.update({f"{LOG_PREFIX}mixing/{k}": v for k, v in self.collator.metrics().items()})
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update({k: v for k, v in logs.items() if k not in state.log_history[-1]})
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._mixing is not None:
            self._mixing.on_evaluate(args, state, control, **kwargs)
        if metrics is not None:
            entry = self._evaluate(args, state, control, kwargs)
            metrics.update(self._eval_values(entry))
        return control

    def on_save(self, args, state, control, **kwargs):
        if self._mixing is not None:
            self._mixing.on_save(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        # The final model gets a verdict even when max_steps is not a multiple of eval_steps.
        if self._entry_at(state.global_step) is None and self.tokenizer is not None:
            self._evaluate(args, state, control, kwargs)
        self._write_history(args, state)
