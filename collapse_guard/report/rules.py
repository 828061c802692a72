"""The detector's rules in words, and a verdict's evidence as a phrase."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from collapse_guard.report.common import (
    ABSOLUTE_SIGNALS,
    HIGHER_IS_COLLAPSE,
    LEVELS,
    LOW_PERCENTILE,
    LOWER_IS_COLLAPSE,
    MEASURED_SIGNALS,
    _digits,
    _finite,
    _fmt,
    _is_number,
    _x,
    signal_label,
)


# ----- the rules ---------------------------------------------------------------------------------------
def detector_of(config: dict[str, Any]):
    """The run's `DetectorConfig` (its recipe's `detector` section over the defaults) and a note when the
    section could not be read."""
    from collapse_guard.detector import DetectorConfig

    spec = dict((config or {}).get("detector") or {})
    try:
        return DetectorConfig(**spec), None
    except (TypeError, ValueError) as err:
        return DetectorConfig(), (f"the recipe's detector section could not be read ({err}); the defaults "
                                  "are shown")


def _detector(run: dict[str, Any]):
    from collapse_guard.detector import DetectorConfig

    return DetectorConfig(**run["detector"])


@dataclasses.dataclass(frozen=True)
class SignalRule:
    """How a detector judges one signal, as the report draws and words it.

    Args:
        in_rules: some rule of the detector looks at the signal (False: measured and shown only).
        kind: "ratio" (shown relative to round 0) or "absolute" (its value is what a rule reads).
        direction: "above" or "below": which way it moves under collapse; None where no one knows.
        op: the comparison of its thresholds (">=", ">", "<").
        warn: the warn threshold, None where no threshold line applies.
        alarm: the alarm threshold, None where no threshold line applies.
        reference: a value human text reaches (the low-ppl share of human text), drawn as a dotted line.
        note: a condition the thresholds alone do not say ("only with a rise >= 0.02").
    """

    in_rules: bool = True
    kind: Literal["ratio", "absolute"] = "ratio"
    direction: Literal["above", "below"] | None = None
    op: str | None = None
    warn: float | None = None
    alarm: float | None = None
    reference: float | None = None
    note: str = ""

    def threshold(self, level: str) -> float | None:
        """The threshold of `level` ("warn" | "alarm"); None for any other level."""
        return self.warn if level == "warn" else self.alarm if level == "alarm" else None


def signal_rule(name: str, d) -> SignalRule:
    """How the detector `d` (a `DetectorConfig`) judges `name`."""
    if name == d.ppl_signal:
        return SignalRule(direction="above", op=">=", warn=d.ppl_ratio_warn, alarm=d.ppl_ratio_alarm)
    if name == f"{d.ppl_signal}_rises":
        return SignalRule(in_rules=d.ppl_rises_warn > 0, direction="above", op=">",
                          warn=1.0 + d.ppl_rise_tolerance,
                          note=f"{d.ppl_rises_warn} rises in a row, each step ratio > "
                               f"{1.0 + d.ppl_rise_tolerance:g}")
    if name in d.diversity_signals:
        return SignalRule(direction="below", op="<", warn=d.diversity_ratio_warn,
                          alarm=d.diversity_ratio_alarm)
    if name == d.self_bleu_signal:
        return SignalRule(direction="above", op=">", warn=d.self_bleu_ratio_warn,
                          alarm=d.self_bleu_ratio_alarm, note=f"only with a rise >= {d.self_bleu_min_rise:g}")
    if name == d.low_ppl_signal:
        return SignalRule(kind="absolute", direction="above", op=">", warn=d.low_ppl_share_warn,
                          alarm=d.low_ppl_share_alarm, reference=LOW_PERCENTILE / 100)
    kind = "absolute" if name in ABSOLUTE_SIGNALS or name.endswith("_share") else "ratio"
    direction = "above" if name in HIGHER_IS_COLLAPSE or name.startswith(f"{d.ppl_signal}@") else \
        "below" if name in LOWER_IS_COLLAPSE else None
    if name in d.nonfinite_alarm_signals:
        return SignalRule(kind=kind, direction=direction, note="alarm when not finite")
    return SignalRule(in_rules=False, kind=kind, direction=direction)


def judged_signals(d) -> list[str]:
    """The signals some rule of `d` looks at."""
    names = [d.ppl_signal, *d.diversity_signals, d.self_bleu_signal, d.low_ppl_signal,
             *d.nonfinite_alarm_signals]
    return list(dict.fromkeys(names))


def rule_lines(d, config: dict[str, Any]) -> list[str]:
    """Every rule in force, one line each, in the detector's words (Markdown inline code for keys)."""
    conf = f"{d.confidence:.0%}"
    lines = [
        f"held-out ppl ratio PPL_t / PPL_0 (`{d.ppl_signal}`): warn >= {d.ppl_ratio_warn:g}, alarm >= "
        f"{d.ppl_ratio_alarm:g}, decided on the lower bound of its {conf} interval (paired bootstrap "
        f"over the held-out documents, {d.ppl_bootstrap_resamples} resamples; the point ratio without "
        "per-document NLL)",
        (f"held-out ppl rising {d.ppl_rises_warn} evaluations in a row: warn when each step ratio PPL_t / "
         f"PPL_t-1 (its interval's lower bound) > {1.0 + d.ppl_rise_tolerance:g} (tolerance "
         f"`ppl_rise_tolerance` {d.ppl_rise_tolerance:g})") if d.ppl_rises_warn else
        "held-out ppl rises in a row: rule off (`ppl_rises_warn` 0)",
        "diversity ratios vs round 0 (" + ", ".join(f"`{s}`" for s in d.diversity_signals) + f"): warn < "
        f"{d.diversity_ratio_warn:g}, alarm < {d.diversity_ratio_alarm:g}, decided on the upper bound of the "
        f"{conf} interval (delete-one jackknife over prompts; the point ratio where no interval exists)",
        f"self-BLEU-4 ratio vs round 0 (`{d.self_bleu_signal}`): warn > {d.self_bleu_ratio_warn:g}, alarm > "
        f"{d.self_bleu_ratio_alarm:g}, decided on the lower bound of its {conf} interval, and only with an "
        f"absolute rise of at least {d.self_bleu_min_rise:g} (`self_bleu_min_rise`)",
        f"low-ppl share (`{d.low_ppl_signal}`: generations below the human {LOW_PERCENTILE:g}th-percentile "
        f"perplexity under round 0's model; human text: {LOW_PERCENTILE / 100:g}): warn > "
        f"{d.low_ppl_share_warn:g}, alarm > {d.low_ppl_share_alarm:g}",
        "not finite (" + ", ".join(f"`{s}`" for s in d.nonfinite_alarm_signals) + "): alarm",
        *([f"task accuracy (`{d.task_signal}`, the decision problems): warn when it falls more than "
           f"{d.task_drop_warn * 100:g} points below its best earlier round, the paired bootstrap interval "
           "of the fall (over the same problems) below 0"]
          if ((config or {}).get("generation") or {}).get("method") == "task" else []),
        f"confidence {conf} two-sided: a rule fires only when the whole interval is past its threshold "
        f"(one-sided {(1 + d.confidence) / 2:.1%}); with fewer than {d.min_items} documents or prompts the "
        "point estimates decide",
    ]
    guard = (config or {}).get("guard") or {}
    if not guard.get("enabled", True):
        actions = "the in-training guard is off"
    elif guard.get("stop_training_on_alarm", True):
        actions = "an alarm during training stops that round's training (`guard.stop_training_on_alarm`)"
    else:
        actions = "an alarm during training does not stop it (`guard.stop_training_on_alarm` false)"
    if config:
        ends = config.get("end_run_on_alarm", True)
        actions += "; a round judged alarm " + ("ends the run (`end_run_on_alarm`)" if ends else
                                                "does not end the run (`end_run_on_alarm` false)")
    lines.append(f"on alarm: {actions}")
    if guard.get("floor"):
        lines.append("adaptive real floor (`guard.floor`): warn raises the real share, alarm sets it to its "
                     "maximum, healthy measurements lower it again")
    return lines


def _threshold_text(name: str, level: str, d) -> str:
    rule = signal_rule(name, d)
    if name == f"{d.ppl_signal}_rises":
        return f"warn: {rule.note}"
    if name in d.nonfinite_alarm_signals and rule.alarm is None:
        return "alarm: not finite"
    threshold = rule.threshold(level)
    if threshold is None:
        return level
    return f"{level} at {rule.op} {threshold:g}"


# ----- evidence ----------------------------------------------------------------------------------------
def _items(method: Any) -> str:
    method = str(method or "")
    return "documents" if "document" in method else "prompts" if "prompt" in method else "items"


def evidence_text(name: str, evidence: dict[str, Any], short: bool = False) -> str:
    """"held-out ppl x1.27 (95% interval x1.21-x1.33 over 32 documents)";
    short: "held-out ppl x1.27 [x1.21-x1.33, n=32]"."""
    value, ratio = evidence.get("value"), evidence.get("ratio")
    low, high = evidence.get("low"), evidence.get("high")
    n, conf = evidence.get("n"), evidence.get("confidence")
    digits = _digits(low, high)
    if name == "diverged":  # the detector's divergence alarm: its value is the held-out ppl, if any
        return "model diverged" + (f" (held-out ppl {value})" if _is_number(value) else "")
    if name.endswith("_rises"):
        count = int(value) if _finite(value) else "several"
        text = (f"{signal_label(name[: -len('_rises')])} rose {count} evaluations in a row, last step "
                f"{_x(ratio, digits)}")
    elif not _finite(ratio):
        if _is_number(value) and not math.isfinite(value):
            return f"{signal_label(name)} is {value}"
        return f"{signal_label(name)} {_fmt(value, 2)}"
    else:
        text = f"{signal_label(name)} {_x(ratio, digits)}"
    if _finite(low) and _finite(high):
        if short:
            return f"{text} [{_x(low, digits)}-{_x(high, digits)}, n={n}]"
        level = f"{conf:.0%} " if _finite(conf) else ""
        items = _items(evidence.get("method"))
        return f"{text} ({level}interval {_x(low, digits)}-{_x(high, digits)} over {n} {items})"
    return text if short else f"{text} (point estimate)"


def flagged_evidence(entry_evidence: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(signal, evidence) of every signal that raised the verdict, alarms first."""
    flagged = [(name, e) for name, e in (entry_evidence or {}).items()
               if isinstance(e, dict) and e.get("level") in ("warn", "alarm")]
    return sorted(flagged, key=lambda item: (-LEVELS.index(item[1]["level"]),
                                             not item[0].startswith("heldout")))


def _evidence_phrase(name: str, evidence: dict[str, Any], d, short: bool = False) -> str:
    return f"{evidence_text(name, evidence, short)}: {_threshold_text(name, evidence['level'], d)}"


def _reason_signal(reason: str, d, known: set[str]) -> str | None:
    """The signal a detector reason is about (for histories without evidence)."""
    if reason.startswith("held-out ppl rose") and "in a row" in reason:
        return f"{d.ppl_signal}_rises"
    if reason.startswith("held-out ppl"):
        return d.ppl_signal
    if reason.startswith("self-BLEU"):
        return d.self_bleu_signal
    if "of generations sit below" in reason:
        return d.low_ppl_signal
    first = reason.split(" ", 1)[0]
    return first if first in known or first in MEASURED_SIGNALS else None
