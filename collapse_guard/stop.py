"""The one stop decision of the guards (`CollapseGuardCallback`, `PolicyGuardCallback`).

Ranks hold the same all-reduced measurements and so the same verdicts; the alarm flag is still reduced
over ranks before the decision, so that a rank whose verdict differed (a bug, a non-deterministic kernel)
cannot leave the others waiting in a collective: every rank stops at the same step or none does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from collapse_guard.distributed import all_reduce_max

if TYPE_CHECKING:
    from collapse_guard.detector import Verdict


def stop_on_alarm(control, verdict: Verdict | None, enabled: bool,
                  hold: Callable[[bool], bool] | None = None) -> bool:
    """Stops training (`control.should_training_stop`) when any rank's `verdict` is an alarm and `enabled`.

    Collective: every rank calls it at the same step. `hold(alarm)` may defer the stop (the adaptive floor
    re-measures once at its maximum first). Returns whether training stops.
    """
    alarm = all_reduce_max(float(verdict is not None and verdict.is_alarm)) > 0
    if hold is not None and hold(alarm):
        return False
    if alarm and enabled:
        control.should_training_stop = True
        return True
    return False
