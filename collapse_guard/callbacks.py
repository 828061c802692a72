"""`CollapseGuardCallback`: the guard's eyes inside a Hugging Face `Trainer` / TRL `SFTTrainer`.

It measures (`Probe`: held-out human perplexity, the diversity of a fixed prompt set's generations)
before the first step and then as often as its cost budget allows, hands the history to
`CollapseDetector`, logs `collapse/*` to every `report_to` backend, and stops training on an alarm.
Every rank measures the same numbers (all-reduced, gathered) and takes the same decision at the same
step.

Its parts live in their own modules: the schedule and cost account (`collapse_guard.budget`), the
adaptive floor's application (`collapse_guard.floor.AdaptiveFloor`), the one stop decision
(`collapse_guard.stop`) and, for trainers that generate their own completions (GRPO),
`collapse_guard.policy_guard.PolicyGuardCallback`, which `attach` adds by itself.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from collapse_guard.budget import MeasurementBudget
from collapse_guard.detector import CollapseDetector, DetectorConfig, Verdict
from collapse_guard.distributed import is_main
from collapse_guard.floor import AdaptiveFloor, FloorConfig
from collapse_guard.history import FILENAME, History, measurement, scalars, verdict_of, write_verdict
from collapse_guard.policy_guard import PolicyGuardCallback
from collapse_guard.probe import Probe, ProbeConfig, estimate_whole_set
from collapse_guard.signals import LEVELS, LOG_PREFIX, finite, is_number, logged_names
from collapse_guard.stop import stop_on_alarm

logger = logging.getLogger(__name__)

# Logged at every measurement (the history file keeps everything): the registry's headline signals, plus
# any signal a rule flagged, so a console or a dashboard is not flooded with a dozen keys a step.
LOGGED = logged_names()


@dataclass
class GuardConfig:
    """How often the guard looks and what it does on an alarm."""

    eval_steps: int = field(default=50, metadata={
        "help": "Fewest optimizer steps between two measurements (the cost budget may space them further)."})
    cost_budget: float | None = field(default=0.03, metadata={
        "help": "Share of training the guard may spend measuring (0.03 = 3%); it skips a due measurement "
                "that would exceed it. None: measure every eval_steps regardless of cost."})
    budget_unit: Literal["time", "tokens"] = field(default="time", metadata={
        "help": "'time': wall-clock seconds; 'tokens': forward tokens (a training token counts 3: forward "
                "and backward), machine-independent."})
    generation_every: int = field(default=1, metadata={
        "help": "Generate the prompt set at every N-th measurement only (held-out perplexity is cheaper); "
                "the first and the final measurement always generate."})
    sequential: bool = field(default=True, metadata={
        "help": "A measurement between the first and the final one scores half the held-out documents (a "
                "fixed random half) first and the rest only when that half cannot show the perplexity "
                "rules will stay quiet at sequential_confidence; such an entry's heldout_ppl is then the "
                "whole set's estimate from the paired half, and the held-out early signals (heldout_entropy, "
                "...: whole-set values) are left out of it. Warnings and alarms always rest on the whole "
                "set. When half the scorable documents (rounded up) are fewer than "
                "DetectorConfig.min_items, the half could never decide: the guard says so once and scores "
                "them all. False: every measurement scores every document."})
    sequential_confidence: float = field(default=0.999, metadata={
        "help": "Two-sided level of the first look's intervals (a Haybittle-Peto boundary: 0.999 keeps the "
                "whole-set test's error rates; lower saves more and risks more)."})
    stop_training_on_alarm: bool = field(default=True, metadata={
        "help": "An alarm stops this training run (control.should_training_stop, on every rank at the same "
                "step). The loop's `end_run_on_alarm` is the separate switch that ends a multi-round run."})
    round_index: int = field(default=0, metadata={
        "help": "This trainer's round in a multi-round loop (0 = first)."})
    history_path: str | None = field(default=None, metadata={
        "help": "The history file, shared across rounds (default: output_dir/collapse_history.json)."})

    def __post_init__(self) -> None:
        for name in ("eval_steps", "generation_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GuardConfig.{name} must be a positive int, got {value!r}.")
        if self.cost_budget is not None and not (is_number(self.cost_budget) and 0 < self.cost_budget < 1):
            raise ValueError(f"GuardConfig.cost_budget must be in (0, 1) or None, got {self.cost_budget!r}.")
        if self.budget_unit not in ("time", "tokens"):
            raise ValueError(f"GuardConfig.budget_unit must be 'time' or 'tokens', got {self.budget_unit!r}.")
        if (isinstance(self.round_index, bool) or not isinstance(self.round_index, int)
                or self.round_index < 0):
            raise ValueError(f"GuardConfig.round_index must be an int >= 0, got {self.round_index!r}.")
        if not isinstance(self.sequential, bool):
            raise TypeError(f"GuardConfig.sequential must be True or False, got {self.sequential!r}.")
        if not (is_number(self.sequential_confidence) and 0.5 <= self.sequential_confidence < 1):
            raise ValueError("GuardConfig.sequential_confidence must be in [0.5, 1), e.g. 0.999, got "
                             f"{self.sequential_confidence!r}.")
        if not isinstance(self.stop_training_on_alarm, bool):
            raise TypeError("GuardConfig.stop_training_on_alarm must be True or False, "
                            f"got {self.stop_training_on_alarm!r}.")


class CollapseGuardCallback(TrainerCallback):
    """Watches a fine-tuning run for model collapse; stops it on an alarm.

    Args:
        heldout_texts: human documents the model never trains on; fixed across rounds.
        prompts: a fixed prompt set; its generations give the diversity signals (use 16 or more).
        collator: the `MixingCollator` feeding the trainer; `attach` attaches it too and its counters are
            logged.
        config: `GuardConfig` (frequency, cost budget, stop switch, round, history file).
        probe: `ProbeConfig` (perplexity context, generation settings), fixed for the run.
        detector: `DetectorConfig` (the collapse rules).
        reference_model: a frozen model (round 0's) scoring generations for the low-perplexity signal.
        start: a measurement of the model as training starts (the loop passes the previous round's), so the
            guard does not measure it again; a verdict recorded in it is ignored.
        floor: `FloorConfig` to let the guard move the collator's real share with its verdicts (the adaptive
            floor, `collapse_guard.floor`); needs `collator`.
        policy_rules: the rules for an on-policy RL trainer's own completions (`collapse_guard.policy`,
            default `POLICY_RULES`); used when the trainer generates (TRL's GRPOTrainer and kin), by the
            `PolicyGuardCallback` that `attach` adds.
        training_texts: the texts this run trains on (its synthetic rows above all). With them every
            measurement that generates logs `train_copy_gain`: the share of the generations' word 4-grams
            found in these texts, less the baseline's generations' share (memorisation of the training
            rows; observe-only, `benchmarks/early_warning.py` measures its lead).

    Example:

    ```python
    >>> from collapse_guard.callbacks import CollapseGuardCallback
    >>> from collapse_guard.probe import ProbeConfig
    >>> guard = CollapseGuardCallback(["A held-out human document about rivers."],
    ...                               probe=ProbeConfig(context_length=64))
    >>> guard.config.cost_budget
    0.03

    ```

    In a training script:
    `CollapseGuardCallback(human_texts("lee"), prompts=..., collator=collator).attach(trainer)`;
    then `trainer.train()` stops on an alarm and `guard.last_verdict.reasons` says why.
    """

    def __init__(self, heldout_texts: list[str], prompts: list[str] | None = None, collator=None,
                 config: GuardConfig | None = None, probe: ProbeConfig | None = None,
                 detector: DetectorConfig | None = None, reference_model=None,
                 start: dict[str, Any] | None = None, floor: FloorConfig | None = None,
                 policy_rules: DetectorConfig | None = None, training_texts: list[str] | None = None):
        from collapse_guard.mixing import MixingCollator

        if collator is not None and not isinstance(collator, MixingCollator):
            raise TypeError(f"collator must be a MixingCollator, got {type(collator).__name__}.")
        self.config = config or GuardConfig()
        self.probe_config = probe or ProbeConfig()
        for name, value, cls in (("config", self.config, GuardConfig),
                                 ("probe", self.probe_config, ProbeConfig)):
            if not isinstance(value, cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}.")
        self.heldout_texts, self.prompts = heldout_texts, prompts
        Probe(heldout_texts, None, self.probe_config, prompts)  # validates the texts now, before any training
        self._training_ngrams = None
        self._first_look_ok: bool | None = None
        if training_texts is not None:
            from collapse_guard.metrics.diversity import ngram_set

            if isinstance(training_texts, str) or not all(isinstance(t, str) for t in training_texts):
                raise TypeError("training_texts must be a list of strings (the texts the run trains on), got "
                                f"{type(training_texts).__name__}.")
            self._training_ngrams = ngram_set(list(training_texts))
        if floor is not None and collator is None:
            raise ValueError("floor (the adaptive floor) moves a MixingCollator's real share: "
                             "pass collator=... too.")
        self.collator = collator
        self.floor = AdaptiveFloor(floor, collator) if floor is not None else None
        self.detector = CollapseDetector(detector)
        self.policy = PolicyGuardCallback(policy_rules, self.config.stop_training_on_alarm,
                                          self._policy_history_path())
        self.reference_model = reference_model
        self.start = measurement(start) if start is not None else None
        self.budget = MeasurementBudget.from_config(self.config)
        self.trainer = None
        self.probe: Probe | None = None
        self.history = History()
        self.last_verdict: Verdict | None = None
        self._stopped_at: int | None = None
        self._baseline_unlogged: dict[str, Any] | None = None

    # ----- wiring ------------------------------------------------------------------------------------------
    def attach(self, trainer) -> CollapseGuardCallback:
        """Adds the guard (and its collator) to `trainer`, right behind the Trainer's flow control and ahead
        of the `report_to` integrations; on a trainer that generates its own completions (GRPO) the policy
        guard too."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
        callbacks.insert(flow[0] + 1 if flow else 0, self)
        self.trainer = trainer
        processing = trainer.processing_class or getattr(trainer.data_collator, "tokenizer", None)
        tokenizer = getattr(processing, "tokenizer", processing)
        if tokenizer is None:
            raise ValueError("CollapseGuardCallback.attach: the trainer has no processing_class (tokenizer); "
                             "build it with processing_class=tokenizer.")
        metric = (trainer.args.metric_for_best_model or "").removeprefix("eval_")
        if metric.startswith("heldout_ppl") and trainer.args.greater_is_better:
            raise ValueError(f"metric_for_best_model={trainer.args.metric_for_best_model!r} is a perplexity "
                             "(lower is better) but greater_is_better=True; pass greater_is_better=False.")
        self.probe = Probe(self.heldout_texts, tokenizer, self.probe_config, self.prompts,
                           self.reference_model)
        if self.collator is not None:
            self.collator.attach(trainer)
        if PolicyGuardCallback.applies_to(trainer):
            self.policy.attach(trainer, after=self)
        return self

    def _history_file(self, args) -> str:
        return self.config.history_path or os.path.join(args.output_dir, FILENAME)

    def _policy_history_path(self) -> str | None:
        path = self.config.history_path
        return path.replace(".json", "_policy.json") if path else None

    # ----- what the policy guard and the budget hold, under the names this class always had ----------------
    @property
    def policy_history(self) -> History:
        return self.policy.history

    @property
    def policy_verdict(self) -> Verdict | None:
        return self.policy.verdict

    @property
    def stopped_at(self) -> int | None:
        """The step at which the guard (or its policy guard) stopped training; None if it did not."""
        return self._stopped_at if self._stopped_at is not None else self.policy.stopped_at

    @property
    def spent(self) -> dict[str, float]:
        return self.budget.spent

    def cost_share(self) -> float:
        """What the guard spent as a share of the run so far (its budget unit)."""
        return self.budget.share()

    # ----- measure -> judge -> log / stop -------------------------------------------------------------------
    def measure(self, model, step: int, final: bool = False, sequential: bool = False) -> dict[str, Any]:
        """Measures `model` now (collective), judges the history and records the entry. `sequential`: the
        held-out set may be scored in two looks (`GuardConfig.sequential`)."""
        context = self.history.context(self.config.round_index)
        first_look = None
        if sequential and self.config.sequential and not final and context and self._first_look_possible():
            def first_look(partial: dict[str, Any]) -> bool:
                return self.detector.held_out_decided(context, partial, self.config.sequential_confidence)

        with self.budget.measurement():
            signals = self.probe.measure(model, generations=self.budget.generates(final),
                                         first_look=first_look)
        if "heldout_doc_index" in signals:
            estimate_whole_set(signals, context[0])
        self._copy_gain(signals, context[0] if context else None)
        self.budget.record(step, signals.pop("cost"), final=final)
        entry = {"round": self.config.round_index, "step": step, "final": final, **signals}
        # what on_log found non-finite at this step (loss, gradient norm) stays part of its entry
        judged = self.history.at(self.config.round_index, step) or {}
        entry.update({k: judged[k] for k in ("train_loss", "eval_loss", "grad_norm", "diverged")
                      if k in judged and k not in entry})
        if self.collator is not None:
            # before the first batch the realised share is undefined (NaN): left out, not logged as NaN
            entry.update({f"mixing/{k}": v for k, v in self.collator.metrics().items() if finite(v)})
        self._judge(entry)
        return entry

    def _first_look_possible(self) -> bool:
        """Whether half the held-out set holds enough documents for the first look's interval; if not, says
        once that every measurement scores the whole set (and the budget prices them so)."""
        if self._first_look_ok is None:
            half, need = len(self.probe.first_look_documents()), self.detector.config.min_items
            self._first_look_ok = half >= need
            if not self._first_look_ok:
                self.budget.sequential = False
                if is_main():
                    logger.info("collapse guard: sequential measurements are off: their first look at half "
                                "the held-out set would hold %d documents and its interval needs %d "
                                "(DetectorConfig.min_items); every measurement scores all of them.",
                                half, need)
        return self._first_look_ok

    def _copy_gain(self, signals: dict[str, Any], baseline: dict[str, Any] | None) -> None:
        """`train_copy_gain` of a measurement that generated: copying of the training rows beyond what the
        baseline's generations copy (by chance or by domain) from the same rows."""
        generations = signals.get("generations")
        if self._training_ngrams is None or not generations:
            return
        from collapse_guard.metrics.diversity import copy_gain

        if baseline is None:  # this is the baseline: compared with itself
            signals["train_copy_gain"] = 0.0
            return
        base_generations = baseline.get("generations")
        if not base_generations:
            return
        signals["train_copy_gain"] = copy_gain(generations, base_generations, self._training_ngrams)
        # the baseline compared with itself is 0 by definition; recorded so that a threshold on the signal
        # (FloorConfig.early_warn) has its baseline value
        baseline.setdefault("train_copy_gain", 0.0)

    def _judge(self, entry: dict[str, Any], update_floor: bool = True) -> Verdict:
        self.history.add(entry)
        started = time.perf_counter()
        verdict = self.detector.check(self.history.context(self.config.round_index))
        self.budget.add_seconds("detector_seconds", time.perf_counter() - started)
        self.last_verdict = verdict
        write_verdict(entry, verdict)
        if self.floor is not None and update_floor:
            reason = self.floor.decide(entry, verdict.level, self.history.baseline)
            if is_main():
                logger.info("collapse guard, round %d step %d: %s", entry["round"], entry["step"], reason)
        if verdict.level != "ok" and is_main():
            logger.warning("collapse guard, round %d step %d: %s", entry["round"], entry["step"], verdict)
        return verdict

    def _stop_if_alarm(self, control, step: int) -> None:
        hold = None
        if self.floor is not None:  # the floor is at its maximum after an alarm: it looks again first
            def hold(alarm: bool) -> bool:
                return self.floor.hold_stop(alarm, step, self.config.eval_steps)

        if stop_on_alarm(control, self.last_verdict, self.config.stop_training_on_alarm, hold):
            self._stopped_at = step
            self.history.at(self.config.round_index, step)["stopped"] = True

    def _log(self, entry: dict[str, Any]) -> None:
        """Sends the entry's headline values (and every flagged signal) to every `report_to` backend, at
        this step."""
        flagged = {k for k, e in (entry.get("evidence") or {}).items()
                   if isinstance(e, dict) and e.get("level") != "ok"}
        values = {LOG_PREFIX + k: v for k, v in scalars(entry).items() if k in LOGGED or k in flagged
                  or k.removesuffix("_ratio") in flagged}
        values[LOG_PREFIX + "level"] = float(LEVELS.index(entry.get("level", "ok")))
        values[LOG_PREFIX + "cost_share"] = self.cost_share()
        # The base Trainer.log: SFTTrainer's and GRPOTrainer's own log would flush their metric buffers here.
        Trainer.log(self.trainer, values)

    def _save(self, state) -> None:
        if state.is_world_process_zero:
            self.history.save()

    def summary(self) -> str:
        """What the guard saw, in a few lines: measurements, the verdict with its reasons, the real share
        the model trained on and what the guard cost."""
        entries = [e for e in self.history.entries if e["round"] == self.config.round_index]
        lines = [f"collapse guard: {len(entries)} measurements of round {self.config.round_index}, "
                 f"{self.cost_share():.1%} of training time spent measuring"]
        for e in entries:
            ratio, ppl = e.get("heldout_ppl_ratio"), e.get("heldout_ppl")
            # entries a NaN loss / gradient norm wrote between measurements hold no perplexity
            ppl_text = f"held-out ppl {ppl:.2f}" if is_number(ppl) else "a training log (no measurement)"
            lines.append(f"  step {e['step']:>5}: {ppl_text}"
                         + (f" (x{ratio:.3f} of the baseline)" if ratio is not None else "")
                         + f"  {e.get('level', '?')}")
        if self.last_verdict is not None:
            lines.append(f"  verdict: {self.last_verdict}")
        if self.stopped_at is not None:
            lines.append(f"  stopped training at step {self.stopped_at}")
        if self.collator is not None:
            m = self.collator.metrics()
            lines.append(f"  real data: {m['real_fraction']:.1%} of the rows trained on (floor "
                         f"{self.collator.min_real_fraction:.0%}); "
                         f"{int(m['synthetic_served'])} synthetic rows fed, "
                         f"{int(m['synthetic_pending'])} left untrained, "
                         f"{int(m['real_top_up'])} real top-ups")
        return "\n".join(lines)

    # ----- Trainer events ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.trainer is None or self.probe is None:
            raise ValueError("CollapseGuardCallback was added without attach(): use guard.attach(trainer) "
                             "after building the trainer (it adds the guard and its collator in the right "
                             "place).")
        step, round_index, resumed = state.global_step, self.config.round_index, state.global_step > 0
        self.history = self._load_history(args, step)
        self.last_verdict, self._stopped_at = None, None
        self.budget.start(model=model)
        self.budget.announce(state.max_steps)
        if self.floor is not None:
            self.floor.begin(next((e for e in reversed(self.history.entries) if "floor" in e), None), resumed)
        latest = self.history.last(round_index)
        if resumed and latest is not None:
            # Continues from the latest measurement before the checkpoint, as the uninterrupted run did: no
            # measurement (nor log) at the resume step, which the uninterrupted run did not measure either.
            self.budget.last_measured = latest["step"]
            self.last_verdict = verdict_of(latest)
            return
        current = self.history.at(round_index, step)
        if current is None and self.start is not None and not resumed:
            current = self.history.add({**self.start, "round": round_index, "step": 0, "final": False})
        if current is None:
            current = self.measure(model, step)
        else:  # measured by the loop: judged here (the floor's first decision, unless it holds one)
            self._judge(current, update_floor="floor" not in current)
            self.budget.last_measured = step
        self._save(state)
        self._baseline_unlogged = current  # logged at the first step's begin, still at step 0


    def _load_history(self, args, step: int) -> History:
        """The shared history, or on a resume whose shared file is gone the checkpoint's copy; without what
        came after `step` (a new run of this round, or a resume: it never happened)."""
        path = self._history_file(args)
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{step}", "collapse_guard", FILENAME)
        source = path if os.path.exists(path) or step == 0 else checkpoint
        history = History.load(source) if os.path.exists(source) else History()
        history.path = path
        history.drop_after(self.config.round_index, step if step else -1)
        return history

    def on_step_begin(self, args, state, control, **kwargs):
        # The baseline reaches every report_to backend at step 0, once their own on_train_begin (which runs
        # after ours and tells TensorBoard its folder) has set them up.
        if self._baseline_unlogged is not None:
            self._log(self._baseline_unlogged)
            self._baseline_unlogged = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        recheck = self.floor is not None and step == self.floor.recheck_at
        if (self.budget.due(step, step >= state.max_steps, state.max_steps, forced=recheck)
                or control.should_evaluate and step != self.budget.last_measured):
            entry = self.measure(model, step, final=step >= state.max_steps, sequential=True)
            self._stop_if_alarm(control, step)
            self._save(state)
            self._log(entry)
            # a loss row at every measurement too, so loss and verdict share a step on every dashboard (the
            # loop's mean logged loss counts these rows)
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        loss = logs.get("loss", logs.get("eval_loss"))
        # The gradient norm is not hidden by logging_nan_inf_filter (on by default, it logs the running mean
        # in place of a NaN loss). Under fp16 the loss scaler skips steps whose gradients overflowed, so a
        # non-finite norm is routine there and says nothing.
        norm = None if args.fp16 else logs.get("grad_norm")
        bad_loss = is_number(loss) and not math.isfinite(loss)
        bad_norm = is_number(norm) and not math.isfinite(norm)
        if not (bad_loss or bad_norm):
            return
        if not bad_loss and any(e.get("diverged") for e in self.history.entries
                                if e["round"] == self.config.round_index and e["step"] < state.global_step):
            return  # said once this round; training goes on only because stop_training_on_alarm is off
        # a diverged run: judged now, not at the next measurement
        entry = self.history.at(self.config.round_index, state.global_step) or {
            "round": self.config.round_index, "step": state.global_step, "final": False}
        if bad_loss:
            entry["train_loss" if "loss" in logs else "eval_loss"] = float(loss)
        if bad_norm:
            entry["grad_norm"] = float(norm)
            entry.setdefault("diverged", f"model diverged: grad_norm is {norm} at step {state.global_step} "
                                         "(the update wrote non-finite gradients into the weights)")
        self._judge(entry)
        self._stop_if_alarm(control, state.global_step)
        self._save(state)
        self._log(entry)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        entry = self.history.at(self.config.round_index, state.global_step)
        if entry is None:
            entry = self.measure(model, state.global_step)
            self._save(state)
        if metrics is not None:  # what EarlyStoppingCallback and metric_for_best_model read
            values = self._eval_values(entry)
            metrics.update(values)
            Trainer.log(self.trainer, dict(values))

    @staticmethod
    def _eval_values(entry: dict[str, Any]) -> dict[str, float]:
        """The entry as evaluation metrics: `eval_heldout_ppl`, ... (what EarlyStoppingCallback can watch)."""
        values = {k: v for k, v in scalars(entry).items() if not k.startswith("mixing/")
                  and k not in ("train_loss", "eval_loss")}
        values["collapse_level"] = float(LEVELS.index(entry.get("level", "ok")))
        return {f"eval_{k}": v for k, v in values.items()}

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # a copy travels with the checkpoint
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "collapse_guard")
            self.history.save(os.path.join(folder, FILENAME))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.on_step_begin(args, state, control)  # a run with no step still logs its baseline
        if self.budget.last_measured != state.global_step:  # stopped early: the final model gets a verdict
            entry = self.measure(model, state.global_step, final=True)
            self._save(state)
            self._log(entry)  # reaches every report_to backend before they close
        else:
            self.history.at(self.config.round_index, state.global_step)["final"] = True
            self._save(state)
        self.budget.warn_if_over()
