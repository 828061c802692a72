"""Collapse detection: a metric history in, an ok / warn / alarm verdict with its evidence out.

The default rules follow the literature on self-consuming training: held-out human perplexity rises
(Shumailov et al. 2024: OPT-125m 34 -> ~55 over nine fully synthetic generations), the tails of the
distribution vanish and outputs grow repetitive (lower distinct-n / entropy / tail coverage, higher
self-BLEU), and synthetic text concentrates in the lowest-perplexity quarter of the human
distribution (Zhu et al. 2024, ToEdit). Every threshold lives in `DetectorConfig`.

Decisions are taken on intervals, not on point estimates, wherever the history holds the items behind a
signal: per-document NLL sums for held-out perplexity (a paired bootstrap over documents) and the
generations of the fixed prompts for distinct-n, unigram entropy and self-BLEU-4 (a delete-one jackknife
over prompts); see `collapse_guard.stats`. A rule fires only when the whole interval lies past its
threshold: the luck of which documents or prompts make up the fixed sets trips it in about 2.5% of the
evaluations of a model that sits exactly at the threshold, and less often the further below it the model
is. Every verdict states the interval it rests on. Without those items (old histories, hand-made entries)
the same thresholds apply to the point estimates. The intervals cannot see training noise (another seed
gives another model): the thresholds themselves, `ppl_ratio_warn` and `ppl_rise_tolerance` above all, are
to be set from healthy runs.

The detector is a pure function of the history it is given: it never reduces anything itself and its
only randomness is a bootstrap generator seeded from the config, so ranks that hold the same
(all-reduced) history reach the same verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from collapse_guard.signals import LEVELS, names
from collapse_guard.signals import finite as _finite
from collapse_guard.signals import is_number as _is_number
from collapse_guard.stats import TEXT_SIGNALS, RatioInterval, diversity_ratio_intervals, ppl_ratio_interval

# Relative disagreement between a stored heldout_ppl and the one its per-document sums give, past which the
# sums are taken to belong to other documents (a wiring bug) and are not used: rounding stays far below it.
_PPL_CONSISTENCY = 1e-3
# Key of a history entry that says, in words, that the measured model diverged (NaN/inf logits): an alarm.
DIVERGED = "diverged"
# Keys of each `Verdict.evidence` entry, in order.
EVIDENCE_FIELDS = ("value", "baseline", "against", "ratio", "low", "high", "n", "confidence", "method",
                   "level", "rule")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DetectorConfig:
    """Thresholds of the collapse rules (defaults: the thresholds of the collapse literature, see the module
    docstring) and of the intervals behind them.

    Ratios compare the latest history entry with the baseline (`history[0]`). A signal missing from the
    latest entry or the baseline is skipped; a non-finite value of a `nonfinite_alarm_signals` signal is an
    alarm. Where the entries carry the items behind a signal (`heldout_doc_nll`/`heldout_doc_tokens`,
    `generations`), a threshold must be cleared by the whole `confidence` interval of the ratio, not only
    by the point estimate.

    Example:

    ```python
    >>> from collapse_guard.detector import DetectorConfig
    >>> DetectorConfig(ppl_ratio_alarm=1.5).ppl_ratio_warn
    1.05

    ```
    """

    ppl_signal: str = field(
        default="heldout_ppl",
        metadata={"help": "History key of the held-out human perplexity."},
    )
    ppl_ratio_warn: float = field(
        default=1.05,
        metadata={"help": "Warn when PPL_t / PPL_0 >= this: the lower bound of its interval when entries "
                          "carry per-document NLL, else the point ratio. Set it above the rise that healthy "
                          "runs (human text only, several seeds) reach."},
    )
    ppl_ratio_alarm: float = field(
        default=1.20,
        metadata={"help": "Alarm when PPL_t / PPL_0 >= this (its interval's lower bound, or the point)."},
    )
    ppl_rises_warn: int = field(
        default=2,
        metadata={"help": "Warn when held-out ppl rose this many evaluations in a row (0 disables the "
                          "rule)."},
    )
    ppl_rise_tolerance: float = field(
        default=0.01,
        metadata={"help": "A rise counts only if PPL_t / PPL_{t-1} > 1 + tolerance (the lower bound of its "
                          "interval when both entries carry per-document NLL). The interval absorbs which "
                          "documents were drawn; the tolerance absorbs training noise, which it cannot see: "
                          "set it from the round-to-round changes of healthy runs."},
    )
    ppl_doc_nll_signal: str = field(
        default="heldout_doc_nll",
        metadata={"help": "History key of the per-document summed NLL (nats) of the held-out set, same "
                          "documents in the same order every evaluation."},
    )
    ppl_doc_tokens_signal: str = field(
        default="heldout_doc_tokens",
        metadata={"help": "History key of the per-document predicted-token counts, as ppl_doc_nll_signal."},
    )
    ppl_doc_index_signal: str = field(
        default="heldout_doc_index",
        metadata={"help": "History key of the documents a sequential measurement scored (absent: all); its "
                          "per-document lists hold 0 elsewhere, and its ppl_signal is an estimate for the "
                          "whole set (<ppl_signal>_scored: the scored documents' own)."},
    )
    generations_signal: str = field(
        default="generations",
        metadata={"help": "History key of the generations for the fixed prompts (one string per prompt, same "
                          "prompts in the same order every evaluation)."},
    )
    confidence: float = field(
        default=0.95,
        metadata={"help": "Two-sided level of the intervals. A rule fires when the whole interval is past "
                          "its threshold: one-sided confidence (1 + confidence) / 2, 97.5% by default."},
    )
    ppl_bootstrap_resamples: int = field(
        default=2000,
        metadata={"help": "Bootstrap resamples of the held-out documents (2000: the Monte Carlo error of the "
                          "2.5% quantile is about 0.06 standard errors)."},
    )
    bootstrap_seed: int = field(
        default=0,
        metadata={"help": "Seed of the document bootstrap: one history gives one interval on every rank."},
    )
    min_items: int = field(
        default=10,
        metadata={"help": "Fewest documents / prompts for an interval; with fewer, the point rules apply "
                          "(percentile and jackknife intervals are unreliable on a handful of items)."},
    )
    diversity_signals: tuple[str, ...] = field(
        default=names(rule="diversity"),  # the registry's (collapse_guard.signals)
        metadata={"help": "Signals that shrink under collapse; their ratio to the baseline is checked."},
    )
    diversity_ratio_warn: float = field(
        default=0.90,
        metadata={"help": "Warn when a diversity ratio < this (the upper bound of its interval when entries "
                          "carry generations, else the point ratio)."},
    )
    diversity_ratio_alarm: float = field(
        default=0.75,
        metadata={"help": "Alarm when a diversity ratio < this."},
    )
    self_bleu_signal: str = field(default="self_bleu4", metadata={"help": "History key of self-BLEU-4."})
    self_bleu_ratio_warn: float = field(
        default=1.10,
        metadata={"help": "Warn when the self-BLEU-4 ratio > this (the lower bound of its interval when "
                          "entries carry generations, else the point ratio)."},
    )
    self_bleu_ratio_alarm: float = field(
        default=1.25,
        metadata={"help": "Alarm when self-BLEU-4 ratio > this."},
    )
    self_bleu_min_rise: float = field(
        default=0.05,
        metadata={"help": "The self-BLEU-4 rules also need an absolute rise of at least this (BLEU on a 0-1 "
                          "scale): varied generations have self-BLEU near 0.05, where a ratio of 1.5 is no "
                          "collapse."},
    )
    low_ppl_signal: str = field(
        default="low_ppl_share",
        metadata={"help": "History key of the share of generations below the human 25th ppl percentile."},
    )
    low_ppl_share_warn: float = field(
        default=0.40,
        metadata={"help": "Warn when the low-ppl share > this (human: 0.25)."},
    )
    low_ppl_share_alarm: float = field(
        default=0.60,
        metadata={"help": "Alarm when the low-ppl share > this."},
    )
    task_signal: str = field(
        default="task_accuracy",
        metadata={"help": "History key of the task accuracy (per-problem outcomes under task_correct)."},
    )
    task_drop_warn: float = field(
        default=0.05,
        metadata={"help": "Warn when task accuracy fell more than this (absolute, 0.05 = 5 points) below "
                          "the best earlier measurement, with the paired bootstrap interval of the fall "
                          "(over the same problems) below 0; without per-problem outcomes, the point fall "
                          "decides."},
    )
    nonfinite_alarm_signals: tuple[str, ...] = field(
        default=names(nonfinite_alarm=True),
        metadata={"help": "A NaN or infinite value of any of these signals is an alarm."},
    )
    min_baseline: float = field(
        default=1e-8,
        metadata={"help": "Ratios are skipped when the baseline value is below this (a ratio to ~0 means "
                          "nothing)."},
    )

    def __post_init__(self):
        self.diversity_signals = tuple(self.diversity_signals)
        self.nonfinite_alarm_signals = tuple(self.nonfinite_alarm_signals)
        for name in ("ppl_ratio_warn", "ppl_ratio_alarm", "self_bleu_ratio_warn", "self_bleu_ratio_alarm",
                     "diversity_ratio_warn", "diversity_ratio_alarm", "low_ppl_share_warn",
                     "low_ppl_share_alarm", "ppl_rise_tolerance", "min_baseline", "self_bleu_min_rise",
                     "task_drop_warn"):
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
                f"DetectorConfig.ppl_ratio_warn={self.ppl_ratio_warn} is below 1: it would warn on an "
                "unchanged model. Use a value >= 1, e.g. 1.05."
            )
        if not _is_int(self.ppl_rises_warn) or self.ppl_rises_warn < 0:
            raise ValueError("DetectorConfig.ppl_rises_warn must be an int >= 0, got "
                             f"{self.ppl_rises_warn!r}.")
        if not _finite(self.confidence) or not 0.5 <= self.confidence < 1:
            raise ValueError("DetectorConfig.confidence must be in [0.5, 1), e.g. 0.95, got "
                             f"{self.confidence!r}")
        if not _is_int(self.ppl_bootstrap_resamples) or self.ppl_bootstrap_resamples < 100:
            raise ValueError("DetectorConfig.ppl_bootstrap_resamples must be an int >= 100 (the interval's "
                             f"tails need them), got {self.ppl_bootstrap_resamples!r}.")
        if not _is_int(self.bootstrap_seed) or self.bootstrap_seed < 0:
            raise ValueError("DetectorConfig.bootstrap_seed must be an int >= 0, got "
                             f"{self.bootstrap_seed!r}")
        if not _is_int(self.min_items) or self.min_items < 3:
            raise ValueError(f"DetectorConfig.min_items must be an int >= 3, got {self.min_items!r}.")


@dataclass
class Verdict:
    """The detector's answer: `level` is "ok", "warn" or "alarm"; `reasons` say why, `signals` hold the
    values the rules looked at (latest values and their ratios to the baseline), and `evidence` holds, for
    every signal checked, what its rule decided on: {value, baseline, ratio, low, high, n, confidence,
    method, level, rule} (`low`/`high`/`n`/`confidence` are None where a point rule decided)."""

    level: str = "ok"
    reasons: list[str] = field(default_factory=list)
    signals: dict[str, float] = field(default_factory=dict)
    evidence: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The level each reason raised, in step with `reasons` (what `deciding_reasons` reads). Not written by
    # `to_dict`: a verdict read back from a file keeps its reasons in the order they were found.
    reason_levels: list[str] = field(default_factory=list, repr=False, compare=False)

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

    @property
    def diverged(self) -> bool:
        """Whether an alarm says the model diverged (a `diverged` text, or a NaN/inf signal): a model nothing
        can be built on, not one that collapses."""
        return any(e.get("level") == "alarm"
                   and (name == DIVERGED or str(e.get("rule", "")).startswith("alarm when not finite"))
                   for name, e in self.evidence.items())

    def raise_to(self, level: str, reason: str) -> None:
        if LEVELS.index(level) > self.severity:
            self.level = level
        self.reasons.append(reason)
        self.reason_levels.append(level)

    def deciding_reasons(self) -> list[str]:
        """The reasons that set `level` (an alarm's alarms, not the warnings found before them), in the order
        found; every reason where their levels are unknown (a verdict built from its reasons or a file)."""
        if len(self.reason_levels) != len(self.reasons):
            return list(self.reasons)
        return [r for r, level in zip(self.reasons, self.reason_levels, strict=True) if level == self.level]

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "reasons": list(self.reasons), "signals": dict(self.signals),
                "evidence": {name: dict(e) for name, e in self.evidence.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        evidence = {name: dict(e) for name, e in (data.get("evidence") or {}).items()}
        return cls(level=data["level"], reasons=list(data.get("reasons", [])),
                   signals=dict(data.get("signals", {})), evidence=evidence)

    def __str__(self) -> str:
        return self.level.upper() + (": " + "; ".join(self.reasons) if self.reasons else "")


def _label(entry: Mapping[str, Any], fallback: str) -> str:
    if "round" in entry and "step" in entry:
        return (f"round {entry['round']}" if entry["step"] == 0
                else f"round {entry['round']} step {entry['step']}")
    if "round" in entry:
        return f"round {entry['round']}"
    if "step" in entry:
        return f"step {entry['step']}"
    return fallback


def _pct(ratio: float) -> str:
    """|ratio - 1| as a percentage, with the precision small changes need ("23%", "5%", "1.5%", "0.02%")."""
    value = abs(ratio - 1.0) * 100
    if value >= 10 or (value >= 1 and abs(value - round(value)) < 0.05):
        return f"{value:.0f}%"
    return f"{value:.1f}%" if value >= 1 else f"{value:.2g}%"


def _x(ratio: float, digits: int = 2) -> str:
    return f"x{ratio:.{digits}f}"


def _numbers(base: float, value: float, digits: int, est: RatioInterval | None, items: str) -> str:
    """"20.00 -> 25.40", followed by the interval when one decided: "; x1.27, 95% interval ... documents"."""
    text = f"{base:.{digits}f} -> {value:.{digits}f}"
    return f"{text}; {_interval_text(est, items)}" if est is not None else text


def _interval_text(est: RatioInterval, items: str) -> str:
    # two decimals unless the interval is too narrow to show with them
    digits = 2 if est.high - est.low >= 0.02 else 3
    interval = f"{_x(est.low, digits)}-{_x(est.high, digits)}"
    return f"{_x(est.ratio, digits)}, {est.confidence:.0%} interval {interval} over {est.n} {items}"


def _evidence(value, baseline, against: str | None, ratio, est: RatioInterval | None, method: str,
              rule: str) -> dict[str, Any]:
    """One signal's evidence (EVIDENCE_FIELDS): JSON-ready floats, None where a field does not apply."""
    return {
        "value": None if value is None else float(value),
        "baseline": None if baseline is None else float(baseline),
        "against": against,
        "ratio": None if ratio is None else float(ratio),
        "low": est.low if est else None,
        "high": est.high if est else None,
        "n": est.n if est else None,
        "confidence": est.confidence if est else None,
        "method": method,
        "level": "ok",
        "rule": rule,
    }


def _numeric_signals(entry: Mapping[str, Any], names: set[str], where: str) -> Mapping[str, Any]:
    """`entry`, with numpy / torch scalars among the judged signals as floats; a signal that is no number
    (the string "120.0") is refused: skipped as "not measured", it would let the verdict read OK."""
    converted = {}
    for name in names & set(entry):
        value = entry[name]
        if value is None or _is_number(value):
            continue
        item = getattr(value, "item", None)
        number = item() if callable(item) and getattr(value, "ndim", 0) == 0 else None
        if not _is_number(number):
            raise TypeError(f"{where}[{name!r}] must be a number (or None: not measured), got "
                            f"{type(value).__name__} {value!r}; convert it, e.g. float(value).")
        converted[name] = float(number)
    return {**entry, **converted} if converted else entry


class CollapseDetector:
    """Turns a metric history into a `Verdict` (ok / warn / alarm, with reasons and evidence).

    `history` is a list of dicts of signals, oldest first; `history[0]` is the baseline (its `round`/`step`
    keys name it in the reasons). Known signals: `heldout_ppl`, `distinct_1..4`, `unigram_entropy`,
    `tail_coverage`, `self_bleu4`, `low_ppl_share`, `train_loss`/`eval_loss`; and the items behind them,
    which turn point rules into interval rules: `heldout_doc_nll` + `heldout_doc_tokens` (per-document
    NLL sums and predicted tokens of the held-out set) and `generations` (one text per fixed prompt).

    Rules, with R the latest/baseline ratio and [L, H] its `confidence` interval:

    - held-out ppl: alarm when L >= ppl_ratio_alarm, warn when L >= ppl_ratio_warn (point: R instead of L);
      warn when it rose `ppl_rises_warn` evaluations in a row, each step's L (or R) > 1 + ppl_rise_tolerance.
    - diversity signals: alarm when H < diversity_ratio_alarm, warn when H < diversity_ratio_warn.
    - self-BLEU-4: alarm when L > self_bleu_ratio_alarm, warn when L > self_bleu_ratio_warn, either only
      with an absolute rise >= self_bleu_min_rise.
    - low-ppl share (absolute): alarm above low_ppl_share_alarm, warn above low_ppl_share_warn.
    - a non-finite `nonfinite_alarm_signals` value in the baseline or the latest entry: alarm; so is a
      `diverged` text (the probe's reason, e.g. "model diverged: held-out perplexity is nan (...)").

    Example:

    ```python
    >>> from collapse_guard.detector import CollapseDetector
    >>> verdict = CollapseDetector().check([{"round": 0, "heldout_ppl": 20.0},
    ...                                     {"round": 1, "heldout_ppl": 24.6}])
    >>> verdict.level, verdict.reasons[0]
    ('alarm', 'held-out ppl rose 23% over round 0 (20.00 -> 24.60): alarm at 20%')
    >>> doc_nll, doc_tokens = [float(100 + i % 7) for i in range(64)], [40] * 64
    >>> history = [{"round": 0, "heldout_doc_nll": doc_nll, "heldout_doc_tokens": doc_tokens},
    ...            {"round": 3, "heldout_doc_nll": [v + 10.0 + i % 3 for i, v in enumerate(doc_nll)],
    ...             "heldout_doc_tokens": doc_tokens}]
    >>> print(CollapseDetector().check(history).reasons[0])  # doctest: +NORMALIZE_WHITESPACE
    held-out ppl rose 32% over round 0 (13.12 -> 17.26; x1.316, 95% interval x1.309-x1.322 over 64 documents):
    alarm at 20%

    ```
    """

    def __init__(self, config: DetectorConfig | None = None):
        if config is not None and not isinstance(config, DetectorConfig):
            raise TypeError(f"config must be a DetectorConfig, got {type(config).__name__}.")
        self.config = config or DetectorConfig()

    def check(self, history: Sequence[Mapping[str, Any]]) -> Verdict:
        """The verdict on `history` (oldest first; `history[0]` is the baseline)."""
        if not isinstance(history, Sequence) or isinstance(history, (str, bytes)):
            raise TypeError(f"history must be a list of dicts (oldest first), got {type(history).__name__}.")
        verdict = Verdict()
        if not history:
            return verdict
        c = self.config
        scalar_signals = {c.ppl_signal, *c.diversity_signals, c.self_bleu_signal, c.low_ppl_signal,
                          c.task_signal, *c.nonfinite_alarm_signals}
        checked = []
        for i, entry in enumerate(history):
            if not isinstance(entry, Mapping):
                raise TypeError(f"history[{i}] must be a dict of signals, got {type(entry).__name__}.")
            checked.append(_numeric_signals(entry, scalar_signals, f"history[{i}]"))
        history = checked
        baseline, latest = history[0], history[-1]
        baseline_label = _label(baseline, "the baseline")
        self._nonfinite(latest, baseline, verdict)
        self._perplexity(history, baseline_label, verdict)
        self._trend(history, verdict)
        if len(history) > 1:
            intervals, why_not = self._diversity_intervals(baseline, latest)
        else:  # the baseline compared with itself: nothing to estimate
            intervals, why_not = {}, "point estimate"
        self._diversity(latest, baseline, baseline_label, intervals, why_not, verdict)
        self._self_bleu(latest, baseline, baseline_label, intervals, why_not, verdict)
        self._low_ppl(latest, verdict)
        self._task(history, verdict)
        return verdict

    # ----- intervals ------------------------------------------------------------------------------
    def _ppl_interval(self, base: Mapping, new: Mapping, confidence: float | None = None,
                      resamples: int | None = None) -> tuple[RatioInterval | None, str]:
        """The bootstrap interval of new/base held-out ppl and its method, or None and why the point rule
        decides instead. Over the documents both entries scored (a sequential measurement scores part of
        the set: `heldout_doc_index`)."""
        c = self.config
        sums = []
        for which, entry in (("baseline", base), ("latest", new)):
            nll, tokens = entry.get(c.ppl_doc_nll_signal), entry.get(c.ppl_doc_tokens_signal)
            if nll is None or tokens is None:
                return None, f"point estimate: no per-document NLL in the {which} entry"
            if isinstance(nll, (str, bytes, Mapping)) or isinstance(tokens, (str, bytes, Mapping)):
                return None, f"point estimate: per-document NLL of the {which} entry is not a list"
            sums.append((nll, tokens))
        try:
            (b_nll, b_tok), (n_nll, n_tok) = sums
            shared = _shared_documents(base, new, len(b_nll), c)
            if shared is not None:
                b_nll, b_tok, n_nll, n_tok = ([values[d] for d in shared] for values in (b_nll, b_tok, n_nll,
                                                                                       n_tok))
            est = ppl_ratio_interval(b_nll, b_tok, n_nll, n_tok, resamples or c.ppl_bootstrap_resamples,
                                     confidence or c.confidence, c.bootstrap_seed)
            for which, entry, (nll, tokens) in (("baseline", base, sums[0]), ("latest", new, sums[1])):
                # a partial entry stores an estimate for the whole set, and its scored part's value beside it
                stored = entry.get(f"{c.ppl_signal}_scored" if _scored(entry, c) else c.ppl_signal)
                total = math.fsum(tokens)
                from_docs = math.exp(math.fsum(nll) / total) if total > 0 else None
                if (from_docs is not None and _finite(stored) and stored > 0
                        and abs(from_docs / stored - 1.0) > _PPL_CONSISTENCY):
                    return None, (f"point estimate: per-document sums give ppl {from_docs:.4g}, the {which} "
                                  f"{c.ppl_signal} is {stored:.4g}")
        except (TypeError, ValueError, IndexError, OverflowError) as error:
            return None, f"point estimate: per-document data unusable ({error})"
        if est.n < c.min_items:
            return None, f"point estimate: {est.n} documents, intervals need {c.min_items}"
        part = f"; sequential: the {est.n} of {len(sums[0][0])} documents both scored" if shared else ""
        return est, f"{est.method}, seed {c.bootstrap_seed}{part}"

    def held_out_decided(self, history: Sequence[Mapping[str, Any]], partial: Mapping[str, Any],
                         confidence: float = 0.999) -> bool:
        """Whether scoring the rest of the held-out set could not make the perplexity rules fire: on the
        documents `partial` scored (a sequential measurement's first look), the ratio to the baseline
        (`history[0]`) is below `ppl_ratio_warn` and the rise over the last measurement within
        `ppl_rise_tolerance`, each with its whole `confidence` interval. False when unsure (too few
        documents, no per-document sums): the caller then scores the whole set.

        A Haybittle-Peto boundary: the first look decides only at 99.9% (so rarely wrong that the final,
        whole-set test keeps its nominal level), and it decides only "ok"; every warning and alarm rests on
        the whole set, as without the first look.
        """
        c = self.config
        if not history or not 0.5 <= confidence < 1:
            return False
        resamples = max(c.ppl_bootstrap_resamples, math.ceil(20 / (1 - confidence)))  # 10+ resamples a tail
        checked = [_numeric_signals(e, {c.ppl_signal}, "history") for e in (*history, partial)]
        est, _ = self._ppl_interval(checked[0], checked[-1], confidence, resamples)
        if est is None or est.high >= c.ppl_ratio_warn:
            return False
        if self._trend_open(checked[:-1]):  # the earlier steps rose: the new one must clearly not
            rise, _ = self._ppl_interval(checked[-2], checked[-1], confidence, resamples)
            if rise is None or rise.high > 1.0 + c.ppl_rise_tolerance:
                return False
        return True

    def _trend_open(self, history: Sequence[Mapping[str, Any]]) -> bool:
        """Whether the next measurement can complete the trend rule: each of the last ppl_rises_warn - 1
        steps of `history` rose past the tolerance, as `_trend` decides them."""
        c = self.config
        if not c.ppl_rises_warn or len(history) < c.ppl_rises_warn:
            return False
        window = history[-c.ppl_rises_warn:]
        for prev, cur in zip(window, window[1:], strict=False):
            est, _ = self._ppl_interval(prev, cur)
            ratio = est.low if est is not None else self._ratio(cur, prev, c.ppl_signal)
            if ratio is None or not ratio > 1.0 + c.ppl_rise_tolerance:
                return False
        return True

    def _diversity_intervals(self, base: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[dict, str]:
        """Jackknife intervals of the text signals, or {} and why the point rules decide instead."""
        c = self.config
        texts = []
        for which, entry in (("baseline", base), ("latest", new)):
            generations = entry.get(c.generations_signal)
            if generations is None:
                return {}, f"point estimate: no generations in the {which} entry"
            if isinstance(generations, (str, bytes)) or not isinstance(generations, Sequence) or not all(
                isinstance(g, str) for g in generations
            ):
                return {}, f"point estimate: generations of the {which} entry are not a list of strings"
            texts.append(list(generations))
        if len(texts[0]) != len(texts[1]):
            return {}, f"point estimate: {len(texts[0])} baseline and {len(texts[1])} latest generations"
        if len(texts[0]) < c.min_items:
            return {}, f"point estimate: {len(texts[0])} generations, intervals need {c.min_items}"
        names = [s for s in (*c.diversity_signals, c.self_bleu_signal) if s in TEXT_SIGNALS]
        intervals = diversity_ratio_intervals(texts[0], texts[1], names, c.confidence) if names else {}
        return intervals, "point estimate: no interval for this signal (zero baseline, or sacrebleu missing)"

    # ----- rules ------------------------------------------------------------------------------
    def _nonfinite(self, latest: Mapping[str, Any], baseline: Mapping[str, Any], verdict: Verdict) -> None:
        entries = [("latest", latest)] + ([("baseline", baseline)] if baseline is not latest else [])
        explained = set()
        for which, entry in entries:
            # The probe's own words on a diverged model ("model diverged: held-out perplexity is nan
            # (non-finite weights in 12 of 20 parameter tensors)"): kept as the reason, and it survives a
            # history file that stores a non-finite number as null.
            reason = entry.get(DIVERGED)
            if isinstance(reason, str) and reason:
                value = entry.get(self.config.ppl_signal)
                evidence = _evidence(value if _is_number(value) else None, None, None, None, None,
                                     "point estimate", f"alarm when the model diverged (here: the {which} "
                                                       "evaluation)")
                verdict.evidence[DIVERGED] = {**evidence, "level": "alarm"}
                verdict.raise_to("alarm", reason if which == "latest" else f"{reason} ({which} evaluation)")
                explained.add((which, self.config.ppl_signal))
        for name in self.config.nonfinite_alarm_signals:
            for which, entry in entries:
                value = entry.get(name)
                if (which, name) in explained:  # said already, in the probe's words
                    if _is_number(value):
                        verdict.signals[name] = float(value)
                    continue
                if _is_number(value) and not math.isfinite(value):
                    verdict.signals[name] = float(value)
                    evidence = _evidence(value, None, None, None, None, "point estimate",
                                         f"alarm when not finite (here: the {which} evaluation)")
                    verdict.evidence[name] = {**evidence, "level": "alarm"}
                    verdict.raise_to("alarm", f"{name} is {value} ({which} evaluation): training diverged")

    def _ratio(self, latest: Mapping[str, Any], baseline: Mapping[str, Any], name: str) -> float | None:
        value, base = latest.get(name), baseline.get(name)
        if not (_finite(value) and _finite(base)) or abs(base) < self.config.min_baseline:
            return None
        return float(value) / float(base)

    def _perplexity(self, history: Sequence[Mapping[str, Any]], baseline_label: str,
                    verdict: Verdict) -> None:
        c = self.config
        latest, baseline = history[-1], history[0]
        if len(history) < 2:  # the baseline compared with itself says nothing
            est, method = None, "point estimate"
        else:
            est, method = self._ppl_interval(baseline, latest)
        if est is not None:
            base_ppl, ppl, ratio = est.baseline, est.value, est.ratio
        else:
            ratio = self._ratio(latest, baseline, c.ppl_signal)
            if ratio is None:
                return
            base_ppl, ppl = float(baseline[c.ppl_signal]), float(latest[c.ppl_signal])
        verdict.signals[c.ppl_signal] = ppl
        verdict.signals[f"{c.ppl_signal}_ratio"] = ratio
        decided = est.low if est is not None else ratio
        on = "the interval's lower bound" if est is not None else "the ratio"
        evidence = _evidence(ppl, base_ppl, baseline_label, ratio, est, method,
                             f"warn when {on} >= {c.ppl_ratio_warn:g}, alarm when >= {c.ppl_ratio_alarm:g}")
        verdict.evidence[c.ppl_signal] = evidence
        numbers = _numbers(base_ppl, ppl, 2, est, "documents")
        warn_note = ""
        if est is not None and ratio >= c.ppl_ratio_alarm > decided:
            warn_note = f" (alarm needs the whole interval above {_pct(c.ppl_ratio_alarm)})"
        evidence["level"] = _flag(
            verdict, f"held-out ppl rose {_pct(ratio)} over {baseline_label} ({numbers})",
            alarm=(decided >= c.ppl_ratio_alarm, f"alarm at {_pct(c.ppl_ratio_alarm)}"),
            warn=(decided >= c.ppl_ratio_warn, f"warn at {_pct(c.ppl_ratio_warn)}{warn_note}"))

    def _trend(self, history: Sequence[Mapping[str, Any]], verdict: Verdict) -> None:
        """Consecutive rises: a slow climb that has not reached the ratio thresholds yet."""
        c = self.config
        if not c.ppl_rises_warn or verdict.level == "alarm" or len(history) < c.ppl_rises_warn + 1:
            return
        window = history[-(c.ppl_rises_warn + 1):]
        steps, intervals = [], []
        for prev, cur in zip(window, window[1:], strict=False):
            est, _ = self._ppl_interval(prev, cur)
            if est is None:
                ratio = self._ratio(cur, prev, c.ppl_signal)
                if ratio is None:
                    return
                steps.append((ratio, ratio))
            else:
                steps.append((est.ratio, est.low))
                intervals.append(est)
        if not all(decided > 1.0 + c.ppl_rise_tolerance for _, decided in steps):
            return
        values = [_corpus_ppl(e, c) for e in window]
        trail = " -> ".join(f"{v:.2f}" for v in values)
        detail = ""
        if intervals:
            bounds = ", ".join(f"{_x(e.low, 3)}-{_x(e.high, 3)}" for e in intervals)
            detail = f"; {c.confidence:.0%} intervals of the rises {bounds} over {intervals[-1].n} documents"
        last = intervals[-1] if intervals and len(intervals) == len(steps) else None
        rule = (f"warn when each of the last {c.ppl_rises_warn} step ratios PPL_t / PPL_t-1 (their "
                f"interval's lower bound where per-document NLL is there) > {1.0 + c.ppl_rise_tolerance:g}")
        method = intervals[-1].method if intervals else "point estimate"
        verdict.evidence[f"{c.ppl_signal}_rises"] = {
            **_evidence(len(steps), None, "the previous evaluation", steps[-1][0], last, method, rule),
            "level": "warn"}
        verdict.raise_to("warn", f"held-out ppl rose {c.ppl_rises_warn} evaluations in a row "
                                 f"({trail}{detail}), each by more than {_pct(1.0 + c.ppl_rise_tolerance)}")

    def _diversity(self, latest, baseline, baseline_label: str, intervals: dict, why_not: str,
                   verdict: Verdict) -> None:
        c = self.config
        for name in c.diversity_signals:
            found = self._text_signal(name, latest, baseline, intervals, why_not, bound="upper")
            if found is None:
                continue
            base_value, value, ratio, decided, est, method, on = found
            verdict.signals[f"{name}_ratio"] = ratio
            rule = f"warn when {on} < {c.diversity_ratio_warn:g}, alarm when < {c.diversity_ratio_alarm:g}"
            evidence = _evidence(value, base_value, baseline_label, ratio, est, method, rule)
            verdict.evidence[name] = evidence
            numbers = _numbers(base_value, value, 3, est, "prompts")
            evidence["level"] = _flag(
                verdict, f"{name} fell {_pct(ratio)} below {baseline_label} ({numbers})",
                alarm=(decided < c.diversity_ratio_alarm, f"alarm at {_pct(c.diversity_ratio_alarm)}"),
                warn=(decided < c.diversity_ratio_warn, f"warn at {_pct(c.diversity_ratio_warn)}"))

    def _self_bleu(self, latest, baseline, baseline_label: str, intervals: dict, why_not: str,
                   verdict: Verdict) -> None:
        c = self.config
        name = c.self_bleu_signal
        found = self._text_signal(name, latest, baseline, intervals, why_not, bound="lower")
        if found is None:
            return
        base_value, value, ratio, decided, est, method, on = found
        verdict.signals[f"{name}_ratio"] = ratio
        rule = (f"warn when {on} > {c.self_bleu_ratio_warn:g}, alarm when > {c.self_bleu_ratio_alarm:g}, "
                f"either only with a rise >= {c.self_bleu_min_rise:g}")
        evidence = _evidence(value, base_value, baseline_label, ratio, est, method, rule)
        verdict.evidence[name] = evidence
        if value - base_value < c.self_bleu_min_rise:
            return
        numbers = _numbers(base_value, value, 3, est, "prompts")
        evidence["level"] = _flag(
            verdict, f"self-BLEU-4 rose {_pct(ratio)} over {baseline_label} ({numbers})",
            alarm=(decided > c.self_bleu_ratio_alarm, f"alarm at {_pct(c.self_bleu_ratio_alarm)}"),
            warn=(decided > c.self_bleu_ratio_warn, f"warn at {_pct(c.self_bleu_ratio_warn)}"))

    def _text_signal(self, name: str, latest, baseline, intervals: dict, why_not: str, bound: str):
        """(baseline, value, ratio, the number the rule compares, interval, method, its name) of a generation
        signal: the interval's bound on the harmful side when there is one, else the point ratio; None when
        the signal cannot be compared."""
        est = intervals.get(name)
        if est is not None:
            decided = est.high if bound == "upper" else est.low
            return (est.baseline, est.value, est.ratio, decided, est, est.method,
                    f"the interval's {bound} bound")
        ratio = self._ratio(latest, baseline, name)
        if ratio is None:
            return None
        method = why_not if name in TEXT_SIGNALS else "point estimate"
        return float(baseline[name]), float(latest[name]), ratio, ratio, None, method, "the ratio"

    def _low_ppl(self, latest, verdict: Verdict) -> None:
        c = self.config
        share = latest.get(c.low_ppl_signal)
        if not _finite(share):
            return
        verdict.signals[c.low_ppl_signal] = float(share)
        evidence = _evidence(share, None, None, None, None, "point estimate",
                             f"warn when > {c.low_ppl_share_warn:g}, alarm when > {c.low_ppl_share_alarm:g}")
        verdict.evidence[c.low_ppl_signal] = evidence
        evidence["level"] = _flag(
            verdict, f"{share:.0%} of generations sit below the human 25th ppl percentile (human: 25%)",
            alarm=(share > c.low_ppl_share_alarm, f"alarm above {c.low_ppl_share_alarm:.0%}"),
            warn=(share > c.low_ppl_share_warn, f"warn above {c.low_ppl_share_warn:.0%}"))


    def _task(self, history: Sequence[Mapping[str, Any]], verdict: Verdict) -> None:
        """Task accuracy against its best earlier value: a self-training loop that loses what it gained is
        degrading even while the human text still reads well."""
        from collapse_guard.task import accuracy_change

        c = self.config
        latest = history[-1]
        accuracy = latest.get(c.task_signal)
        if not _finite(accuracy):
            return
        verdict.signals[c.task_signal] = float(accuracy)
        earlier = [e for e in history[:-1] if _finite(e.get(c.task_signal))]
        if not earlier:
            return
        best = max(earlier, key=lambda e: e[c.task_signal])
        outcomes = c.task_signal.replace("accuracy", "correct")
        old, new = best.get(outcomes), latest.get(outcomes)
        est, method = None, "point estimate"
        fall = float(best[c.task_signal]) - float(accuracy)
        if isinstance(old, Sequence) and isinstance(new, Sequence) and len(old) == len(new) >= c.min_items:
            change = accuracy_change(old, new, c.confidence, c.ppl_bootstrap_resamples, c.bootstrap_seed)
            est, method = change, f"paired bootstrap over {change.n} problems"
            fell = -change.change > c.task_drop_warn and change.high < 0
            numbers = f"{change.change:+.1%} [{change.low:+.1%}, {change.high:+.1%}] over {change.n} problems"
        else:
            fell = fall > c.task_drop_warn
            numbers = f"{-fall:+.1%}"
        evidence = _evidence(accuracy, best[c.task_signal], _label(best, "the best earlier measurement"),
                             None, None, method, f"warn when it falls more than {c.task_drop_warn * 100:g} "
                                                 "points below its best earlier value")
        if est is not None:
            evidence.update(low=est.low, high=est.high, n=est.n, confidence=est.confidence)
        verdict.evidence[c.task_signal] = evidence
        evidence["level"] = _flag(
            verdict, f"task accuracy {float(accuracy):.0%} fell from {float(best[c.task_signal]):.0%} at "
                     f"{_label(best, 'its best')} ({numbers})",
            alarm=(False, ""), warn=(fell, f"warn when it falls more than {c.task_drop_warn * 100:g} points"))


def _scored(entry: Mapping[str, Any], c: DetectorConfig) -> list[int] | None:
    """The documents a partial (sequential) measurement scored; None: all of them."""
    index = entry.get(c.ppl_doc_index_signal)
    return None if index is None else list(index)


def _shared_documents(base: Mapping[str, Any], new: Mapping[str, Any], n: int,
                      c: DetectorConfig) -> list[int] | None:
    """The documents both entries scored, when either scored part of the set; None when both scored all."""
    scored = [_scored(e, c) for e in (base, new)]
    if scored == [None, None]:
        return None
    common = set(range(n))
    for index in scored:
        if index is not None:
            common &= {int(d) for d in index}
    return sorted(common)


def _corpus_ppl(entry: Mapping[str, Any], c: DetectorConfig) -> float:
    """The entry's held-out ppl: the stored value, else the one its per-document sums give."""
    stored = entry.get(c.ppl_signal)
    if _finite(stored):
        return float(stored)
    return math.exp(math.fsum(entry[c.ppl_doc_nll_signal]) / math.fsum(entry[c.ppl_doc_tokens_signal]))


def _flag(verdict: Verdict, finding: str, alarm: tuple[bool, str], warn: tuple[bool, str]) -> str:
    """Raises the verdict to the first (alarm, then warn) rule that `finding` trips, naming its threshold;
    returns the level the finding earned."""
    for level, (hit, threshold) in (("alarm", alarm), ("warn", warn)):
        if hit:
            verdict.raise_to(level, f"{finding}: {threshold}")
            return level
    return "ok"
