"""The signals the guard measures, in one registry: what each is called, which way it moves under
collapse, the key it is logged under and the plot panel it belongs to.

The detector's default rules, the guard's logging and (in time) the report read their signal lists from
here, so a new signal is added in one place. Also home of the verdict `LEVELS` and the number tests every
module shares (`is_number`, `finite`).

Example:

```python
>>> from collapse_guard.signals import SIGNALS, names
>>> SIGNALS["self_bleu4"].label, SIGNALS["self_bleu4"].direction, SIGNALS["self_bleu4"].logged_key
('self-BLEU-4', 'up', 'collapse/self_bleu4')
>>> names(panel="diversity")[:3]
('distinct_1', 'distinct_2', 'distinct_3')

```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

# Verdict levels, least to most severe: their index is the number logged as `collapse/level`.
LEVELS = ("ok", "warn", "alarm")
LOG_PREFIX = "collapse/"

Direction = Literal["up", "down"]
Panel = Literal["perplexity", "early", "diversity", "loss", "mixing", "policy", "task"]
Rule = Literal["perplexity", "diversity", "self_bleu", "share", "task"]


def is_number(value: Any) -> bool:
    """An int or float, not a bool (True is an int to Python, never a measurement here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


@dataclass(frozen=True)
class Signal:
    """One measured quantity of a history entry.

    Args:
        name: its key in a history entry.
        label: how people read it (report, plots, log lines).
        direction: which way it moves under collapse ("up": perplexity, self-BLEU; "down": diversity); None
            for quantities that describe the run rather than judge the model.
        panel: the plot panel it is drawn in ("early": the observe-only early-warning signals of the
            held-out forward).
        rule: the default `CollapseDetector` rule that judges it ("perplexity", "diversity", "self_bleu",
            "share"), None if no default rule does.
        nonfinite_alarm: a NaN or infinite value is an alarm by default (a diverged model).
        headline: logged at every measurement as `collapse/<name>`; the others are logged only when a rule
            flagged them, so a dashboard is not flooded with a dozen keys a step.
        log_ratio: its ratio to the baseline (`<name>_ratio`) is a headline too.
    """

    name: str
    label: str
    direction: Direction | None
    panel: Panel
    rule: Rule | None = None
    nonfinite_alarm: bool = False
    headline: bool = False
    log_ratio: bool = False

    @property
    def logged_key(self) -> str:
        return LOG_PREFIX + self.name


_ALL = (
    Signal("heldout_ppl", "held-out ppl", "up", "perplexity", "perplexity", nonfinite_alarm=True,
           headline=True, log_ratio=True),
    # Observe-only early-warning signals from the held-out perplexity forward (`HeldoutPerplexity(...,
    # signals=True)`): logged and kept in the history, judged by no default rule until thresholds are set
    # from the noise of healthy runs (issue 21; benchmarks/early_warning.py measures their lead over held-out
    # perplexity).
    Signal("heldout_entropy", "held-out predictive entropy", "down", "early", headline=True),
    Signal("heldout_top1_mass", "held-out top-1 mass", "up", "early", headline=True),
    Signal("heldout_tail_nll", "held-out tail NLL", "up", "early", headline=True),
    Signal("heldout_worst_decile_nll", "held-out worst-decile NLL", "up", "early", headline=True),
    Signal("heldout_low_prob_share", "held-out p<1e-4 share", "up", "early", headline=True),
    # From the generations, when the guard knows the round's training rows: how much more of the generated
    # text copies them (word 4-grams) than the baseline model's generations do; 0 at the baseline.
    Signal("train_copy_gain", "copying of training 4-grams", "up", "early", headline=True),
    # What self-training is for: accuracy on a verifiable task's held-out problems (a fall is a warning).
    Signal("task_accuracy", "task accuracy", "down", "task", "task", headline=True),
    Signal("train_loss", "train loss", "up", "loss", nonfinite_alarm=True),
    Signal("eval_loss", "eval loss", "up", "loss", nonfinite_alarm=True),
    Signal("distinct_1", "distinct-1", "down", "diversity", "diversity"),
    Signal("distinct_2", "distinct-2", "down", "diversity", "diversity", headline=True),
    Signal("distinct_3", "distinct-3", "down", "diversity", "diversity"),
    Signal("distinct_4", "distinct-4", "down", "diversity", "diversity"),
    Signal("unigram_entropy", "unigram entropy", "down", "diversity", "diversity", headline=True),
    Signal("tail_coverage", "tail coverage", "down", "diversity", "diversity"),
    Signal("ttr", "type-token ratio", "down", "diversity"),
    Signal("embedding_diversity", "embedding diversity", "down", "diversity"),
    Signal("self_bleu4", "self-BLEU-4", "up", "diversity", "self_bleu", headline=True),
    Signal("compression_ratio", "compression ratio", "up", "diversity"),
    Signal("low_ppl_share", "low-ppl share", "up", "diversity", "share", headline=True),
    Signal("high_ppl_share", "high-ppl share", None, "diversity"),
    Signal("token_entropy", "token entropy", "down", "policy"),
    Signal("reward", "reward", None, "policy"),
    Signal("mixing/real_fraction", "real share trained", None, "mixing", headline=True),
    Signal("floor", "real-data floor", None, "mixing", headline=True),
)
SIGNALS: dict[str, Signal] = {s.name: s for s in _ALL}


def names(panel: Panel | None = None, direction: Direction | None = None, rule: Rule | None = None,
          nonfinite_alarm: bool | None = None) -> tuple[str, ...]:
    """The registered signal names that match every given attribute, in registry order."""
    return tuple(s.name for s in _ALL
                 if (panel is None or s.panel == panel) and (direction is None or s.direction == direction)
                 and (rule is None or s.rule == rule)
                 and (nonfinite_alarm is None or s.nonfinite_alarm == nonfinite_alarm))


def moved_toward_collapse(entry: dict[str, Any], baseline: dict[str, Any], name: str) -> float | None:
    """How far signal `name` moved from `baseline` to `entry` in the direction collapse moves it (value -
    baseline for "up" signals, baseline - value for "down" ones); None when either value is missing or not
    finite, or the signal has no direction."""
    value, base = entry.get(name), baseline.get(name)
    direction = SIGNALS[name].direction if name in SIGNALS else None
    if direction is None or not (finite(value) and finite(base)):
        return None
    return value - base if direction == "up" else base - value


def logged_names() -> tuple[str, ...]:
    """What the guard logs at every measurement: the headline signals, and the ratios marked as headlines."""
    out: list[str] = []
    for s in _ALL:
        if s.headline:
            out += [s.name, f"{s.name}_ratio"] if s.log_ratio else [s.name]
    return tuple(out)


def label(name: str) -> str:
    """A signal's label ("distinct-2"); unregistered names (extra held-out corpora) read as they are."""
    base = name.removesuffix("_ratio") if name.endswith("_ratio") and name not in SIGNALS else name
    found = SIGNALS.get(base)
    text = found.label if found is not None else base
    return f"{text} ratio" if base != name else text
