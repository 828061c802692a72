"""Collapse detection: a metric history in, an ok / warn / alarm verdict with readable reasons out.

The default rules follow the literature on self-consuming training: held-out human perplexity rises
(Shumailov et al. 2024: OPT-125m 34 -> ~55 over nine fully synthetic generations), the tails of the
distribution vanish and outputs grow repetitive (lower distinct-n / entropy / tail coverage, higher
self-BLEU), and synthetic text concentrates in the lowest-perplexity quarter of the human
distribution (Zhu et al. 2024, ToEdit). Every threshold lives in `DetectorConfig`.

The detector is a pure function of the history it is given: it never reduces anything itself, so
ranks that hold the same (all-reduced) history reach the same verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

LEVELS = ("ok", "warn", "alarm")
# Keys of a history entry that describe it rather than measure the model.
METADATA_KEYS = ("round", "step", "level", "reasons")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


@dataclass
class DetectorConfig:
    """Thresholds of the collapse rules (defaults: the DESIGN table).

    Ratios compare the latest history entry with the baseline (`history[0]`, round 0). A signal missing
    from the latest entry or the baseline is skipped; a non-finite value of a `nonfinite_alarm_signals`
    signal is an alarm.

    Example:

    ```python
    >>> from collapse_guard.detector import DetectorConfig
    >>> DetectorConfig(ppl_ratio_alarm=1.5).ppl_ratio_warn
    1.05
    ```
    """

    ppl_signal: str = field(default="heldout_ppl", metadata={"help": "History key of the held-out human perplexity."})
    ppl_ratio_warn: float = field(default=1.05, metadata={"help": "Warn when PPL_t / PPL_0 >= this."})
    ppl_ratio_alarm: float = field(default=1.20, metadata={"help": "Alarm when PPL_t / PPL_0 >= this."})
    ppl_rises_warn: int = field(
        default=2,
        metadata={"help": "Warn when held-out ppl rose this many evaluations in a row (0 disables the rule)."},
    )
    ppl_rise_tolerance: float = field(
        default=0.0,
        metadata={"help": "A rise counts only if PPL_t > PPL_{t-1} * (1 + tolerance); absorbs evaluation noise."},
    )
    diversity_signals: tuple[str, ...] = field(
        default=("distinct_1", "distinct_2", "distinct_3", "distinct_4", "unigram_entropy", "tail_coverage"),
        metadata={"help": "Signals that shrink under collapse; their ratio to the baseline is checked."},
    )
    diversity_ratio_warn: float = field(default=0.90, metadata={"help": "Warn when a diversity ratio < this."})
    diversity_ratio_alarm: float = field(default=0.75, metadata={"help": "Alarm when a diversity ratio < this."})
    self_bleu_signal: str = field(default="self_bleu4", metadata={"help": "History key of self-BLEU-4."})
    self_bleu_ratio_warn: float = field(default=1.10, metadata={"help": "Warn when self-BLEU-4 ratio > this."})
    self_bleu_ratio_alarm: float = field(default=1.25, metadata={"help": "Alarm when self-BLEU-4 ratio > this."})
    self_bleu_min_rise: float = field(
        default=0.05,
        metadata={"help": "The self-BLEU-4 rules also need an absolute rise of at least this (BLEU on a 0-1 scale): "
                          "varied generations have self-BLEU near 0.05, where a ratio of 1.5 is sampling noise."},
    )
    low_ppl_signal: str = field(
        default="low_ppl_share",
        metadata={"help": "History key of the share of generations below the human 25th ppl percentile."},
    )
    low_ppl_share_warn: float = field(default=0.40, metadata={"help": "Warn when the low-ppl share > this (human: 0.25)."})
    low_ppl_share_alarm: float = field(default=0.60, metadata={"help": "Alarm when the low-ppl share > this."})
    nonfinite_alarm_signals: tuple[str, ...] = field(
        default=("heldout_ppl", "train_loss", "eval_loss"),
        metadata={"help": "A NaN or infinite value of any of these signals is an alarm."},
    )
    min_baseline: float = field(
        default=1e-8,
        metadata={"help": "Ratios are skipped when the baseline value is below this (a ratio to ~0 means nothing)."},
    )

    def __post_init__(self):
        self.diversity_signals = tuple(self.diversity_signals)
        self.nonfinite_alarm_signals = tuple(self.nonfinite_alarm_signals)
        for name in ("ppl_ratio_warn", "ppl_ratio_alarm", "self_bleu_ratio_warn", "self_bleu_ratio_alarm",
                     "diversity_ratio_warn", "diversity_ratio_alarm", "low_ppl_share_warn", "low_ppl_share_alarm",
                     "ppl_rise_tolerance", "min_baseline", "self_bleu_min_rise"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ValueError(f"DetectorConfig.{name} must be a finite number >= 0, got {value!r}.")
        pairs = [
            ("ppl_ratio_warn", "ppl_ratio_alarm"),
            ("self_bleu_ratio_warn", "self_bleu_ratio_alarm"),
            ("low_ppl_share_warn", "low_ppl_share_alarm"),
            ("diversity_ratio_alarm", "diversity_ratio_warn"),
        ]
        for low, high in pairs:
            if getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"DetectorConfig.{low}={getattr(self, low)} must be <= {high}={getattr(self, high)}: "
                    "the warn threshold has to trigger before (or with) the alarm threshold."
                )
        if self.ppl_ratio_warn < 1.0:
            raise ValueError(
                f"DetectorConfig.ppl_ratio_warn={self.ppl_ratio_warn} is below 1: it would warn on an unchanged "
                "model. Use a value >= 1, e.g. 1.05."
            )
        if isinstance(self.ppl_rises_warn, bool) or not isinstance(self.ppl_rises_warn, int) or self.ppl_rises_warn < 0:
            raise ValueError(f"DetectorConfig.ppl_rises_warn must be an int >= 0, got {self.ppl_rises_warn!r}.")


@dataclass
class Verdict:
    """The detector's answer: `level` is "ok", "warn" or "alarm"; `reasons` say why, `signals` hold the
    values the rules looked at (latest values and their ratios to the baseline)."""

    level: str = "ok"
    reasons: list[str] = field(default_factory=list)
    signals: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"Verdict.level must be one of {LEVELS}, got {self.level!r}.")

    @property
    def severity(self) -> int:
        """0 ok, 1 warn, 2 alarm (a number that logging backends can plot)."""
        return LEVELS.index(self.level)

    @property
    def is_alarm(self) -> bool:
        return self.level == "alarm"

    def raise_to(self, level: str, reason: str) -> None:
        if LEVELS.index(level) > self.severity:
            self.level = level
        self.reasons.append(reason)

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "reasons": list(self.reasons), "signals": dict(self.signals)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        return cls(level=data["level"], reasons=list(data.get("reasons", [])), signals=dict(data.get("signals", {})))

    def __str__(self) -> str:
        return self.level.upper() + (": " + "; ".join(self.reasons) if self.reasons else "")


def _label(entry: Mapping[str, Any], fallback: str) -> str:
    if "round" in entry and "step" in entry:
        return f"round {entry['round']}" if entry["step"] == 0 else f"round {entry['round']} step {entry['step']}"
    if "round" in entry:
        return f"round {entry['round']}"
    return fallback


def _pct(ratio: float) -> str:
    return f"{abs(ratio - 1.0) * 100:.0f}%"


class CollapseDetector:
    """Turns a metric history into a `Verdict` (ok / warn / alarm, with reasons).

    `history` is a list of dicts of signals, oldest first; `history[0]` is the baseline (round 0 before
    training). Known signals: `heldout_ppl`, `distinct_1..4`, `unigram_entropy`, `tail_coverage`,
    `self_bleu4`, `low_ppl_share`, `train_loss`/`eval_loss`; optional `round`/`step` keys label entries.

    Example:

    ```python
    >>> from collapse_guard.detector import CollapseDetector
    >>> verdict = CollapseDetector().check([{"round": 0, "heldout_ppl": 20.0}, {"round": 1, "heldout_ppl": 24.6}])
    >>> verdict.level, verdict.reasons[0]
    ('alarm', 'held-out ppl rose 23% over round 0 (20.00 -> 24.60): alarm at 20%')
    ```
    """

    def __init__(self, config: DetectorConfig | None = None):
        if config is not None and not isinstance(config, DetectorConfig):
            raise TypeError(f"config must be a DetectorConfig, got {type(config).__name__}.")
        self.config = config or DetectorConfig()

    def check(self, history: Sequence[Mapping[str, Any]]) -> Verdict:
        if not isinstance(history, Sequence) or isinstance(history, (str, bytes)):
            raise TypeError(f"history must be a list of dicts (oldest first), got {type(history).__name__}.")
        verdict = Verdict()
        if not history:
            return verdict
        for i, entry in enumerate(history):
            if not isinstance(entry, Mapping):
                raise TypeError(f"history[{i}] must be a dict of signals, got {type(entry).__name__}.")
        baseline, latest = history[0], history[-1]
        baseline_label = _label(baseline, "the baseline")
        self._nonfinite(latest, baseline, verdict)
        self._perplexity(history, baseline_label, verdict)
        self._diversity(latest, baseline, baseline_label, verdict)
        self._self_bleu(latest, baseline, baseline_label, verdict)
        self._low_ppl(latest, verdict)
        return verdict

    # ----- rules ------------------------------------------------------------------------------
    def _nonfinite(self, latest: Mapping[str, Any], baseline: Mapping[str, Any], verdict: Verdict) -> None:
        entries = [("latest", latest)] + ([("baseline", baseline)] if baseline is not latest else [])
        for name in self.config.nonfinite_alarm_signals:
            for which, entry in entries:
                value = entry.get(name)
                if _is_number(value) and not math.isfinite(value):
                    verdict.signals[name] = float(value)
                    verdict.raise_to("alarm", f"{name} is {value} ({which} evaluation): training diverged")

    def _ratio(self, latest: Mapping[str, Any], baseline: Mapping[str, Any], name: str) -> float | None:
        value, base = latest.get(name), baseline.get(name)
        if not (_finite(value) and _finite(base)) or abs(base) < self.config.min_baseline:
            return None
        return float(value) / float(base)

    def _perplexity(self, history: Sequence[Mapping[str, Any]], baseline_label: str, verdict: Verdict) -> None:
        c = self.config
        latest, baseline = history[-1], history[0]
        ratio = self._ratio(latest, baseline, c.ppl_signal)
        if ratio is None:
            return
        verdict.signals[c.ppl_signal] = float(latest[c.ppl_signal])
        verdict.signals[f"{c.ppl_signal}_ratio"] = ratio
        numbers = f"({baseline[c.ppl_signal]:.2f} -> {latest[c.ppl_signal]:.2f})"
        _flag(verdict, f"held-out ppl rose {_pct(ratio)} over {baseline_label} {numbers}",
              alarm=(ratio >= c.ppl_ratio_alarm, f"alarm at {_pct(c.ppl_ratio_alarm)}"),
              warn=(ratio >= c.ppl_ratio_warn, f"warn at {_pct(c.ppl_ratio_warn)}"))
        if c.ppl_rises_warn and verdict.level != "alarm":
            values = [e.get(c.ppl_signal) for e in history[-(c.ppl_rises_warn + 1):]]
            if len(values) == c.ppl_rises_warn + 1 and all(_finite(v) for v in values) and all(
                b > a * (1.0 + c.ppl_rise_tolerance) for a, b in zip(values, values[1:], strict=False)
            ):
                trail = " -> ".join(f"{v:.2f}" for v in values)
                verdict.raise_to("warn", f"held-out ppl rose {c.ppl_rises_warn} evaluations in a row ({trail})")

    def _diversity(self, latest, baseline, baseline_label: str, verdict: Verdict) -> None:
        c = self.config
        for name in c.diversity_signals:
            ratio = self._ratio(latest, baseline, name)
            if ratio is None:
                continue
            verdict.signals[f"{name}_ratio"] = ratio
            _flag(verdict, f"{name} fell {_pct(ratio)} below {baseline_label} "
                           f"({baseline[name]:.3f} -> {latest[name]:.3f})",
                  alarm=(ratio < c.diversity_ratio_alarm, f"alarm at {_pct(c.diversity_ratio_alarm)}"),
                  warn=(ratio < c.diversity_ratio_warn, f"warn at {_pct(c.diversity_ratio_warn)}"))

    def _self_bleu(self, latest, baseline, baseline_label: str, verdict: Verdict) -> None:
        c = self.config
        name = c.self_bleu_signal
        ratio = self._ratio(latest, baseline, name)
        if ratio is None:
            return
        verdict.signals[f"{name}_ratio"] = ratio
        numbers = f"({baseline[name]:.3f} -> {latest[name]:.3f})"
        if latest[name] - baseline[name] < c.self_bleu_min_rise:
            return
        _flag(verdict, f"self-BLEU-4 rose {_pct(ratio)} over {baseline_label} {numbers}",
              alarm=(ratio > c.self_bleu_ratio_alarm, f"alarm at {_pct(c.self_bleu_ratio_alarm)}"),
              warn=(ratio > c.self_bleu_ratio_warn, f"warn at {_pct(c.self_bleu_ratio_warn)}"))

    def _low_ppl(self, latest, verdict: Verdict) -> None:
        c = self.config
        share = latest.get(c.low_ppl_signal)
        if not _finite(share):
            return
        verdict.signals[c.low_ppl_signal] = float(share)
        _flag(verdict, f"{share:.0%} of generations sit below the human 25th ppl percentile (human: 25%)",
              alarm=(share > c.low_ppl_share_alarm, f"alarm above {c.low_ppl_share_alarm:.0%}"),
              warn=(share > c.low_ppl_share_warn, f"warn above {c.low_ppl_share_warn:.0%}"))


def _flag(verdict: Verdict, finding: str, alarm: tuple[bool, str], warn: tuple[bool, str]) -> None:
    """Raises the verdict to the first (alarm, then warn) rule that `finding` trips, naming its threshold."""
    for level, (hit, threshold) in (("alarm", alarm), ("warn", warn)):
        if hit:
            verdict.raise_to(level, f"{finding}: {threshold}")
            return
