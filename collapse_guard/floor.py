"""The adaptive real-data floor: the guard moves `MixingCollator.min_real_fraction` from its verdicts.

Policy (every step documented in `FloorConfig`):

- **warn** -> raise the floor: `floor = min(maximum, max(floor x step_up, floor + min_step))`;
- **alarm** -> jump to `maximum`; the guard then re-measures once (after `eval_steps`) before it stops,
  so a run the higher floor rescues keeps training;
- **ok** for `decay_after` measurements in a row -> lower it toward `minimum`:
  `floor = max(minimum, floor x step_down)`;
- otherwise hold.

With `early_warn` (signal -> threshold), an **ok** verdict whose early-warning signal has moved past its
threshold from the baseline, in the direction collapse moves it, raises the floor as a warn does. The verdict
stays ok (these signals are not judged: they also move when a healthy run improves less), so only the
floor hears them. Take the thresholds from healthy runs' noise (`benchmarks/early_warning.py`), not from
the runs you evaluate.

The floor never leaves [minimum, maximum]. Every decision is a pure function of the verdict sequence,
so every rank (which holds the same all-reduced verdicts) applies the same floor at the same step, and
the state (value, healthy streak) is stored in each history entry, so a resumed run continues it.

Example:

```python
>>> from collapse_guard.floor import FloorConfig, FloorController
>>> floor = FloorController(FloorConfig(minimum=0.1, maximum=0.9))
>>> floor.update("warn")[0], floor.update("alarm")[0], floor.update("ok")[0], floor.update("ok")[0]
(0.15, 0.9, 0.9, 0.72)

```
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from collapse_guard.distributed import is_main
from collapse_guard.signals import SIGNALS, finite, moved_toward_collapse

logger = logging.getLogger(__name__)


@dataclass
class FloorConfig:
    """The adaptive floor's policy (see the module docstring)."""

    minimum: float = field(default=0.1, metadata={
        "help": "The user's minimum real share; the floor never goes below."})
    maximum: float = field(default=0.9, metadata={
        "help": "The floor never goes above (1.0 trains no synthetic data)."})
    start: float | None = field(default=None, metadata={"help": "The first floor (default: minimum)."})
    step_up: float = field(default=1.5, metadata={"help": "Factor applied on a warn."})
    min_step: float = field(default=0.05, metadata={"help": "A raise is at least this much (absolute)."})
    step_down: float = field(default=0.8, metadata={
        "help": "Factor applied after decay_after healthy measurements."})
    decay_after: int = field(default=2, metadata={
        "help": "Healthy (ok) measurements in a row before lowering."})
    recheck_before_stop: bool = field(default=True, metadata={
        "help": "On an alarm, raise to maximum and re-measure once before stopping (if the guard stops at "
                "all)."})
    early_warn: dict[str, float] = field(default_factory=dict, metadata={
        "help": "Early-warning thresholds only the floor acts on: signal -> deviation from the baseline in "
                "the direction collapse moves it (e.g. {heldout_tail_nll: 0.2}: the tail NLL rose 0.2 nats). "
                "An ok verdict past one raises the floor as a warn does; the verdict stays ok. Set them from "
                "healthy runs (benchmarks/early_warning.py --threshold-seeds), not from the runs you judge. "
                "The held-out ones (heldout_*) are whole-set values, which a sequential measurement that "
                "stopped at half the documents leaves out (GuardConfig.sequential); self_bleu4 is measured "
                "every time."})

    def __post_init__(self) -> None:
        for name in ("minimum", "maximum", "min_step"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"FloorConfig.{name} must be in [0, 1], got {value!r}.")
        if self.minimum > self.maximum:
            raise ValueError(f"FloorConfig.minimum={self.minimum} must be <= maximum={self.maximum}.")
        if self.start is not None and not self.minimum <= self.start <= self.maximum:
            raise ValueError(f"FloorConfig.start={self.start} must lie in [minimum, maximum].")
        if not self.step_up > 1.0 or not 0.0 < self.step_down < 1.0:
            raise ValueError(f"FloorConfig.step_up must be > 1 and step_down in (0, 1), got {self.step_up}, "
                             f"{self.step_down}.")
        if (isinstance(self.decay_after, bool) or not isinstance(self.decay_after, int)
                or self.decay_after < 1):
            raise ValueError(f"FloorConfig.decay_after must be a positive int, got {self.decay_after!r}.")
        if not isinstance(self.early_warn, dict):
            raise ValueError(f"FloorConfig.early_warn must map signal names to thresholds, got "
                             f"{self.early_warn!r}; e.g. {{'heldout_tail_nll': 0.2}}.")
        for name, threshold in self.early_warn.items():
            if name not in SIGNALS or SIGNALS[name].direction is None:
                judged = sorted(n for n, s in SIGNALS.items() if s.direction is not None)
                raise ValueError(f"FloorConfig.early_warn: {name!r} is not a signal with a collapse "
                                 f"direction; use one of {', '.join(judged)}.")
            if not finite(threshold):
                raise ValueError(f"FloorConfig.early_warn[{name!r}] must be a finite number, got "
                                 f"{threshold!r}.")
        self.early_warn = {k: float(v) for k, v in self.early_warn.items()}

    def early_crossing(self, entry: dict[str, Any], baseline: dict[str, Any] | None) -> str | None:
        """The first `early_warn` signal in `entry` past its threshold from `baseline`, described; None if
        none (or no baseline: the first measurement is the baseline)."""
        if not baseline or baseline is entry:
            return None
        for name, threshold in self.early_warn.items():
            moved = moved_toward_collapse(entry, baseline, name)
            if moved is not None and moved > threshold:
                return (f"{SIGNALS[name].label} moved {moved:+.4g} from the baseline (early warning at "
                        f"{threshold:g})")
        return None


class FloorController:
    """The floor's state machine: `update(level) -> (floor, reason)`."""

    def __init__(self, config: FloorConfig | None = None):
        self.config = config or FloorConfig()
        self.value = self.config.start if self.config.start is not None else self.config.minimum
        self.healthy = 0

    def update(self, level: str) -> tuple[float, str]:
        c, before = self.config, self.value
        if level == "alarm":
            self.value, self.healthy = c.maximum, 0
            reason = f"alarm: floor {before:.2f} -> {self.value:.2f} (maximum)"
        elif level == "warn":
            self.value, self.healthy = min(c.maximum, max(before * c.step_up, before + c.min_step)), 0
            reason = f"warn: floor {before:.2f} -> {self.value:.2f}"
        else:
            self.healthy += 1
            if self.healthy >= c.decay_after and before > c.minimum:
                self.value, self.healthy = max(c.minimum, before * c.step_down), 0
                reason = f"{c.decay_after} healthy measurements: floor {before:.2f} -> {self.value:.2f}"
            else:
                reason = f"ok: floor held at {before:.2f}"
        self.value = round(self.value, 6)
        return self.value, reason

    def state(self) -> dict[str, Any]:
        return {"floor": self.value, "floor_healthy": self.healthy}

    def restore(self, entry: dict[str, Any] | None) -> None:
        """Continues from the state stored in a history entry (a resumed run, or the next round)."""
        if entry and "floor" in entry:
            self.value = float(entry["floor"])
            self.healthy = int(entry.get("floor_healthy", 0))


class AdaptiveFloor:
    """The controller's decisions applied to a `MixingCollator`, which owns the floor.

    The floor has one owner, the collator: its checkpoint restores the floor on a resume. The controller
    keeps only the healthy streak and reads the current floor from the collator before each decision. The
    history (where every decision is recorded) sets the floor only when a trainer starts from step 0 with
    no checkpoint, e.g. the next round of a loop, which continues the previous round's floor.
    """

    def __init__(self, config: FloorConfig, collator):
        from collapse_guard.mixing.policy import validate_real_fraction

        # the floor will reach `minimum`: refused now if the collator's setter would refuse it mid-training
        validate_real_fraction(config.minimum, getattr(collator, "allow_low_real_fraction", True),
                               key="FloorConfig.minimum")
        self.controller = FloorController(config)
        self.collator = collator
        self.recheck_at: int | None = None
        self._unheard: set[str] = set()  # early_warn signals already reported missing from the baseline

    @property
    def config(self) -> FloorConfig:
        return self.controller.config

    def begin(self, last_decision: dict[str, Any] | None, resumed: bool) -> None:
        """A trainer starts: continue the decisions recorded in the history (`last_decision`, the latest
        entry that holds a floor). On a resume the collator's checkpoint restores the floor itself."""
        self.recheck_at = None
        self.controller.restore(last_decision)
        if not resumed:
            self._apply(self.controller.value)

    def decide(self, entry: dict[str, Any], level: str, baseline: dict[str, Any] | None = None) -> str:
        """Moves the floor for a verdict of `level` and records the decision in `entry`. Every rank holds
        the same verdicts and entries, so every rank sets the same floor at the same step. An ok verdict
        whose early-warning signal crossed (`FloorConfig.early_warn`, against `baseline`) counts as a warn."""
        self.controller.value = float(self.collator.min_real_fraction)
        if baseline is not None and baseline is not entry:
            self._report_unheard(baseline)
        early = self.config.early_crossing(entry, baseline) if level == "ok" else None
        value, reason = self.controller.update("warn" if early else level)
        if early:
            reason = f"{reason} ({early}; the verdict stays ok)"
        self._apply(value)
        entry.update(floor_reason=reason, **self.controller.state())
        return reason

    def hold_stop(self, alarm: bool, step: int, eval_steps: int) -> bool:
        """Whether to hold an alarm's stop: the first alarm raised the floor to its maximum, so the guard
        looks again `eval_steps` later (`recheck_at`) before it stops, if the config asks for it."""
        if alarm and self.config.recheck_before_stop and self.recheck_at is None:
            self.recheck_at = step + eval_steps
            return True
        if not alarm:
            self.recheck_at = None
        return False

    def _report_unheard(self, baseline: dict[str, Any]) -> None:
        # A threshold on a signal the baseline lacks can never fire: say so once instead of staying silent.
        missing = [n for n in self.config.early_warn
                   if not finite(baseline.get(n)) and n not in self._unheard]
        if missing and is_main():
            logger.warning("adaptive floor: early_warn on %s will never act: the baseline measurement has no "
                           "finite value for it (generation signals need the guard's prompt set).",
                           ", ".join(missing))
        self._unheard.update(missing)

    def _apply(self, value: float) -> None:
        if hasattr(self.collator, "set_floor"):  # the collator's validating setter
            self.collator.set_floor(value)
        else:  # a MixingCollator from before set_floor existed
            self.collator.min_real_fraction = value
