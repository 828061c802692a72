"""`PolicyGuardCallback`: the guard inside on-policy RL (TRL's GRPOTrainer and its kin).

At every logging step it reads the completions the trainer generated for its latest batch (no extra
generation), measures their diversity (`collapse_guard.policy`), judges them against the first logging
step with `POLICY_RULES`, logs `collapse/policy/*` to every `report_to` backend, keeps its own history
(`collapse_history_policy.json`) and stops training on an alarm. `CollapseGuardCallback.attach` adds it by
itself when the trainer generates, so a GRPO script needs no change.

Example:

```python
>>> from collapse_guard.policy_guard import PolicyGuardCallback
>>> guard = PolicyGuardCallback()
>>> guard.detector.config.diversity_ratio_alarm
0.6

```

In a training script: `PolicyGuardCallback().attach(grpo_trainer)`; then `trainer.train()` stops on an
alarm and `guard.verdict.reasons` says why.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers import Trainer, TrainerCallback

from collapse_guard.detector import CollapseDetector, DetectorConfig, Verdict
from collapse_guard.distributed import is_main
from collapse_guard.history import History, scalars, write_verdict
from collapse_guard.policy import POLICY_RULES, policy_completions, policy_signals
from collapse_guard.signals import LEVELS, LOG_PREFIX
from collapse_guard.stop import stop_on_alarm

logger = logging.getLogger(__name__)

POLICY_FILENAME = "collapse_history_policy.json"


class PolicyGuardCallback(TrainerCallback):
    """Judges an on-policy trainer's own completions at every logging step; stops training on an alarm.

    Args:
        rules: the policy rules (default `POLICY_RULES`, calibrated for RL's noisier batches).
        stop_training_on_alarm: an alarm stops training (on every rank at the same step).
        history_path: its history file (default: output_dir/collapse_history_policy.json).
    """

    def __init__(self, rules: DetectorConfig | None = None, stop_training_on_alarm: bool = True,
                 history_path: str | None = None):
        if not isinstance(stop_training_on_alarm, bool):
            raise TypeError("PolicyGuardCallback: stop_training_on_alarm must be True or False, got "
                            f"{stop_training_on_alarm!r}.")
        self.detector = CollapseDetector(rules or POLICY_RULES)
        self.stop_training_on_alarm = stop_training_on_alarm
        self.history_path = history_path
        self.history = History()
        self.verdict: Verdict | None = None
        self.stopped_at: int | None = None
        self.trainer = None

    @staticmethod
    def applies_to(trainer) -> bool:
        """Whether `trainer` generates its own completions and keeps them where the guard reads them."""
        logs = getattr(trainer, "_logs", None)
        return isinstance(logs, dict) and "completion" in logs

    def attach(self, trainer, after: TrainerCallback | None = None) -> PolicyGuardCallback:
        """Adds the guard to `trainer` (right behind `after`, if given and present)."""
        if not self.applies_to(trainer):
            raise ValueError(f"PolicyGuardCallback judges the completions an on-policy trainer generates; "
                             f"{type(trainer).__name__} keeps none (TRL's GRPOTrainer does). Use "
                             "CollapseGuardCallback for supervised fine-tuning.")
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(callbacks.index(after) + 1 if after in callbacks else len(callbacks), self)
        self.trainer = trainer
        return self

    def on_train_begin(self, args, state, control, **kwargs: Any):
        path = self.history_path or os.path.join(args.output_dir, POLICY_FILENAME)
        # a resume continues the first logging step's baseline; a new run starts its own
        self.history = History.load(path) if state.global_step > 0 and os.path.exists(path) else History(path)
        self.history.path = path
        self.history.drop_after(0, state.global_step if state.global_step else -1)
        self.verdict, self.stopped_at = None, None

    def on_log(self, args, state, control, logs=None, **kwargs: Any):
        if logs is None or any(k.startswith("eval_") for k in logs) or self.trainer is None:
            return
        completions = policy_completions(self.trainer)
        if not completions or len(completions) < 2 or self.history.at(0, state.global_step):
            return  # nothing generated yet, or judged at this step already (our own log call below)
        entry = self.history.add({"round": 0, "step": state.global_step, "final": False,
                                  **policy_signals(completions, logs)})
        self.verdict = self.detector.check(self.history.entries)
        write_verdict(entry, self.verdict)
        if stop_on_alarm(control, self.verdict, self.stop_training_on_alarm):
            self.stopped_at = state.global_step
            entry["stopped"] = True
        if state.is_world_process_zero:
            self.history.save()
        if self.verdict.level != "ok" and is_main():
            logger.warning("collapse guard (policy completions), step %d: %s", state.global_step,
                           self.verdict)
        values = {f"{LOG_PREFIX}policy/{k}": v for k, v in scalars(entry).items()}
        values[f"{LOG_PREFIX}policy/level"] = float(LEVELS.index(self.verdict.level))
        # The base Trainer.log: a subclass's log (GRPOTrainer's) would flush its own metric buffers here.
        Trainer.log(self.trainer, values)
