"""`CollapseGuardCallback`: the guard's eyes inside a Hugging Face `Trainer` / TRL `SFTTrainer`.

It measures (`Probe`: held-out human perplexity, the diversity of a fixed prompt set's generations)
before the first step and then as often as its cost budget allows, hands the history to
`CollapseDetector`, logs `collapse/*` to every `report_to` backend, and stops training on an alarm.
Every rank measures the same numbers (all-reduced, gathered) and takes the same decision at the same
step.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from collapse_guard.detector import LEVELS, CollapseDetector, DetectorConfig, Verdict
from collapse_guard.distributed import broadcast, is_main
from collapse_guard.floor import FloorConfig, FloorController
from collapse_guard.history import FILENAME, History, is_number, scalars
from collapse_guard.policy import POLICY_RULES, policy_completions, policy_signals
from collapse_guard.probe import Probe, ProbeConfig

logger = logging.getLogger(__name__)

LOG_PREFIX = "collapse/"
# Logged at every measurement (the history file keeps everything): the headline signals, plus any signal a
# rule flagged, so a console or a dashboard is not flooded with a dozen keys a step.
LOGGED = ("heldout_ppl", "heldout_ppl_ratio", "distinct_2", "unigram_entropy", "self_bleu4", "low_ppl_share",
          "mixing/real_fraction", "floor")


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
            guard does not measure it again.
        floor: `FloorConfig` to let the guard move the collator's real share with its verdicts (the adaptive
            floor, `collapse_guard.floor`); needs `collator`.
        policy_rules: the rules for an on-policy RL trainer's own completions (`collapse_guard.policy`,
            default `POLICY_RULES`); used when the trainer generates (TRL's GRPOTrainer and kin).

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
                 policy_rules: DetectorConfig | None = None):
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
        if floor is not None and collator is None:
            raise ValueError("floor (the adaptive floor) moves a MixingCollator's real share: "
                             "pass collator=... too.")
        self.collator = collator
        self.floor = FloorController(floor) if floor is not None else None
        self._recheck_at: int | None = None
        self.detector = CollapseDetector(detector)
        self.policy_detector = CollapseDetector(policy_rules or POLICY_RULES)
        self.policy_history = History()
        self.policy_verdict: Verdict | None = None
        self.reference_model = reference_model
        self.start = start
        self.trainer = None
        self.probe: Probe | None = None
        self.history = History()
        self.last_verdict: Verdict | None = None
        self.stopped_at: int | None = None
        self.spent = {"seconds": 0.0, "tokens": 0.0, "measurements": 0}
        self._train = {"started": 0.0, "tokens": 0.0}
        self._last_measured = -1
        self._pending_logs: dict[str, float] = {}
        self._measuring = False

    # ----- wiring ------------------------------------------------------------------------------------------
    def attach(self, trainer) -> CollapseGuardCallback:
        """Adds the guard (and its collator) to `trainer`, right behind the Trainer's flow control and ahead
        of the `report_to` integrations, so its values reach TensorBoard / W&B / MLflow in the same log
        call."""
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
        return self

    def _history_file(self, args) -> str:
        return self.config.history_path or os.path.join(args.output_dir, FILENAME)

    # ----- measuring and deciding -------------------------------------------------------------------------
    def _due(self, step: int, final: bool, max_steps: int = 0) -> bool:
        """Whether to measure at `step`: spacing, then the cost budget (rank 0 decides for every rank).

        A due measurement is taken only if it and the final one (always taken) fit in the budget's share of
        the whole job, its length projected from the steps so far.
        """
        if step == self._last_measured:
            return False
        if final or step == self._recheck_at:
            return True
        if step - max(self._last_measured, 0) < self.config.eval_steps:
            return False
        budget = self.config.cost_budget
        if budget is None or not self.spent["measurements"]:
            return True
        unit = "seconds" if self.config.budget_unit == "time" else "tokens"
        trained = (time.perf_counter() - self._train["started"] - self.spent["seconds"]) \
            if unit == "seconds" else 3.0 * self._train["tokens"]
        next_cost = self.spent[unit] / self.spent["measurements"]
        projected = trained * max(1.0, max_steps / step) if step > 0 else trained
        planned = self.spent[unit] + 2 * next_cost  # this one and the final one
        return bool(broadcast(planned <= budget * (projected + planned)))

    def measure(self, model, step: int, final: bool = False) -> dict[str, Any]:
        """Measures `model` now (collective), judges the history and records the entry."""
        generations = final or self.spent["measurements"] % self.config.generation_every == 0
        self._measuring = True
        try:
            signals = self.probe.measure(model, generations=generations)
        finally:
            self._measuring = False
        cost = signals.pop("cost")
        self.spent["seconds"] += cost["seconds"]
        self.spent["tokens"] += cost["forward_tokens"]
        self.spent["measurements"] += 1
        for part in ("perplexity_seconds", "generation_seconds", "signals_seconds"):
            self.spent[part] = self.spent.get(part, 0.0) + cost.get(part, 0.0)
        entry = {"round": self.config.round_index, "step": step, "final": final, **signals}
        if self.collator is not None:
            entry.update({f"mixing/{k}": v for k, v in self.collator.metrics().items()})
        self._judge(entry)
        self._last_measured = step
        return entry

    def _judge(self, entry: dict[str, Any], update_floor: bool = True) -> None:
        self.history.add(entry)
        started = time.perf_counter()
        verdict = self.detector.check(self.history.context(self.config.round_index))
        self.spent["detector_seconds"] = (self.spent.get("detector_seconds", 0.0)
                                          + time.perf_counter() - started)
        self.last_verdict = verdict
        entry.update({k: v for k, v in verdict.signals.items() if k.endswith("_ratio")})
        entry.update(level=verdict.level, reasons=list(verdict.reasons),
                     evidence=verdict.to_dict().get("evidence", {}))
        if self.floor is not None and update_floor:
            value, reason = self.floor.update(verdict.level)
            # same verdicts on every rank: same floor at the same step
            self.collator.min_real_fraction = value
            entry.update(floor_reason=reason, **self.floor.state())
            if is_main():
                logger.info("collapse guard, round %d step %d: %s", entry["round"], entry["step"], reason)
        self._pending_logs.update(self._log_values(entry))
        if verdict.level != "ok" and is_main():
            logger.warning("collapse guard, round %d step %d: %s", entry["round"], entry["step"], verdict)

    def _log_values(self, entry: dict[str, Any]) -> dict[str, float]:
        flagged = {k for k, e in (entry.get("evidence") or {}).items()
                   if isinstance(e, dict) and e.get("level") != "ok"}
        values = {LOG_PREFIX + k: v for k, v in scalars(entry).items() if k in LOGGED or k in flagged
                  or k.removesuffix("_ratio") in flagged}
        values[LOG_PREFIX + "level"] = float(LEVELS.index(entry.get("level", "ok")))
        values[LOG_PREFIX + "cost_share"] = self.cost_share()
        return values

    def _warn_if_over_budget(self) -> None:
        """The first and the final measurement are never skipped: on a job too short for them, say so."""
        budget, share = self.config.cost_budget, self.cost_share()
        if budget is None or share <= budget or not is_main():
            return
        unit = "seconds" if self.config.budget_unit == "time" else "tokens"
        each = self.spent[unit] / max(self.spent["measurements"], 1)
        logger.warning(
            "collapse guard: it took %.1f%% of this training run, over its cost_budget of %.1f%%: %d "
            "measurement(s) of about %.3g %s each, and the first and the final one are always taken. The job "
            "needs about %.3g %s of training for those two to fit the budget; or make a measurement cheaper "
            "(ProbeConfig: fewer heldout texts, n_prompts, max_new_tokens, a shorter context_length).",
            100 * share, 100 * budget, self.spent["measurements"], each, unit, 2 * each / budget, unit)

    def cost_share(self) -> float:
        """What the guard spent as a share of the run so far (its budget unit)."""
        if self.config.budget_unit == "tokens":
            total = 3.0 * self._train["tokens"] + self.spent["tokens"]
            return self.spent["tokens"] / total if total else 0.0
        elapsed = time.perf_counter() - self._train["started"]
        return self.spent["seconds"] / elapsed if elapsed > 0 else 0.0

    def summary(self) -> str:
        """What the guard saw, in a few lines: measurements, the verdict with its reasons, the real share
        the model trained on and what the guard cost."""
        entries = [e for e in self.history.entries if e["round"] == self.config.round_index]
        lines = [f"collapse guard: {len(entries)} measurements of round {self.config.round_index}, "
                 f"{self.cost_share():.1%} of training time spent measuring"]
        for e in entries:
            ratio = e.get("heldout_ppl_ratio")
            lines.append(f"  step {e['step']:>5}: held-out ppl {e['heldout_ppl']:.2f}"
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

    def _save(self, state) -> None:
        if state.is_world_process_zero:
            self.history.save()

    def _stop_if_alarm(self, control, step: int) -> None:
        alarm = self.last_verdict is not None and self.last_verdict.is_alarm
        if (alarm and self.floor is not None and self.floor.config.recheck_before_stop
                and self._recheck_at is None):
            # the floor is at its maximum now: look again first
            self._recheck_at = step + self.config.eval_steps
            return
        self._recheck_at = None if not alarm else self._recheck_at
        if alarm and self.config.stop_training_on_alarm:
            control.should_training_stop = True
            self.stopped_at = step
            self.history.entries[-1]["stopped"] = True

    # ----- Trainer events ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.trainer is None or self.probe is None:
            raise ValueError("CollapseGuardCallback was added without attach(): use guard.attach(trainer) "
                             "after building the trainer (it adds the guard and its collator in the right "
                             "place).")
        path = self._history_file(args)
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "collapse_guard",
                                  FILENAME)
        source = path if os.path.exists(path) or state.global_step == 0 else checkpoint
        self.history = History.load(source) if os.path.exists(source) else History()
        self.history.path = path
        # a new run of this round, or a resume: what was measured after the checkpoint never happened
        self.history.drop_after(self.config.round_index, state.global_step if state.global_step else -1)
        self._train = {"started": time.perf_counter(), "tokens": 0.0}
        self.spent = {"seconds": 0.0, "tokens": 0.0, "measurements": 0}
        self.stopped_at, self._last_measured = None, -1
        self._count_training_tokens(model)
        if self.floor is not None:
            self.floor.restore(next((e for e in reversed(self.history.entries) if "floor" in e), None))
            self.collator.min_real_fraction = self.floor.value
        current = self.history.at(self.config.round_index, state.global_step)
        if current is None and self.start is not None and state.global_step == 0:
            current = self.history.add({**self.start, "round": self.config.round_index, "step": 0,
                                        "final": False})
        if current is None:
            self.measure(model, state.global_step)
        else:  # resumed (or measured by the loop): judged again for the logs, the floor state is restored
            self._judge(current, update_floor=state.global_step == 0 and "floor" not in current)
            self._last_measured = state.global_step
        self._save(state)

    def _count_training_tokens(self, model) -> None:
        """Counts the tokens the model trains on (the 'tokens' budget), skipping the guard's own forwards."""
        module = getattr(model, "module", model)

        def hook(_module, args, kwargs):
            if not self._measuring:
                mask = kwargs.get("attention_mask")
                ids = kwargs.get("input_ids", args[0] if args else None)
                self._train["tokens"] += float(mask.sum()) if mask is not None else float(ids.numel())

        if not getattr(module, "_collapse_guard_counting", False):
            module.register_forward_pre_hook(hook, with_kwargs=True)
            module._collapse_guard_counting = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        final = state.global_step >= state.max_steps
        if (self._due(state.global_step, final, state.max_steps)
                or control.should_evaluate and state.global_step != self._last_measured):
            self.measure(model, state.global_step, final=final)
            self._stop_if_alarm(control, state.global_step)
            self._save(state)
            control.should_log = True  # flush collapse/* at this step: report_to sees them now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        loss = logs.get("loss", logs.get("eval_loss"))
        # a diverged run: judged now, not at the next measurement
        if is_number(loss) and not math.isfinite(loss):
            entry = self.history.at(self.config.round_index, state.global_step) or {
                "round": self.config.round_index, "step": state.global_step, "final": False}
            entry["train_loss" if "loss" in logs else "eval_loss"] = float(loss)
            self._judge(entry)
            self._stop_if_alarm(control, state.global_step)
            self._save(state)
        # Trainer.evaluate logs before on_evaluate: join them here
        if any(k.startswith("eval_") for k in logs):
            entry = self.history.at(self.config.round_index, state.global_step)
            if entry is None:
                entry = self.measure(kwargs["model"], state.global_step)
                self._save(state)
            logs.update(self._eval_values(entry))
        else:
            self._judge_policy(args, state, control, logs)
            logs.update(self._pending_logs)
            self._pending_logs.clear()
        # Trainer.log appended a copy of `logs` to log_history before calling us: complete that copy too
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update({k: v for k, v in logs.items() if k not in state.log_history[-1]})

    def _judge_policy(self, args, state, control, logs: dict[str, Any]) -> None:
        """On-policy RL: the diversity of the trainer's own latest completions, judged against the first
        logging step's (no extra generation; see `collapse_guard.policy`)."""
        completions = policy_completions(self.trainer) if self.trainer is not None else None
        if not completions or len(completions) < 2 or self.policy_history.at(0, state.global_step):
            return
        entry = self.policy_history.add({"round": 0, "step": state.global_step, "final": False,
                                         **policy_signals(completions, logs)})
        verdict = self.policy_detector.check(self.policy_history.entries)
        self.policy_verdict = verdict
        entry.update(level=verdict.level, reasons=list(verdict.reasons))
        entry.update({k: v for k, v in verdict.signals.items() if k.endswith("_ratio")})
        self.policy_history.path = self._history_file(args).replace(".json", "_policy.json")
        if state.is_world_process_zero:
            self.policy_history.save()
        logs.update({f"{LOG_PREFIX}policy/{k}": v for k, v in scalars(entry).items()})
        logs[f"{LOG_PREFIX}policy/level"] = float(LEVELS.index(verdict.level))
        if verdict.level != "ok" and is_main():
            logger.warning("collapse guard (policy completions), step %d: %s", state.global_step, verdict)
        if verdict.is_alarm and self.config.stop_training_on_alarm:
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        entry = self.history.at(self.config.round_index, state.global_step)
        if entry is None:
            entry = self.measure(model, state.global_step)
            self._save(state)
        if metrics is not None:
            metrics.update(self._eval_values(entry))

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
            History(os.path.join(folder, FILENAME), self.history.entries).save()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._last_measured != state.global_step:  # stopped early: the final model still gets a verdict
            self.measure(model, state.global_step, final=True)
        else:
            self.history.at(self.config.round_index, state.global_step)["final"] = True
        self._save(state)
        self._warn_if_over_budget()
        if self._pending_logs and self.trainer is not None:
            self.trainer.log(dict(self._pending_logs))  # reaches every report_to backend before they close
            self._pending_logs.clear()
