"""Run reports: JSON, PNG plots (matplotlib Agg) and a Markdown + HTML summary a person reads in a minute.

`write_report(run_dir)` reports one run of `collapse-guard run`; `write_comparison(out_dir, run_dirs)`
puts several side by side: arms (variants) and, for several seeds of an arm (`<out>/<arm>/seed_<s>`),
their mean and spread. What a report states:

- one sentence per run or arm: did it collapse, at which round, on what evidence (the ratio with its
  interval and the number of documents or prompts behind it) and on how much synthetic data;
- the rules in force, read from the run's `detector` section (thresholds, the minimum self-BLEU rise,
  the rises-in-a-row rule, the confidence level) and the measured signals that are not in the rules;
- per round: the verdict and its evidence, the optimizer steps trained (or where the guard stopped
  training), the synthetic budget (generated, kept by selection, trained on) and the realised real
  fraction, the signals relative to round 0, and a few sample generations.

Plots: `ppl_ratio.png` (held-out perplexity / round 0, warn and alarm bands, intervals or seed bands, a
stopped round marked), `diversity.png` (the diversity signals and every signal that raised a verdict;
signals outside the rules are drawn without warn/alarm lines) and `generated_ppl.png` (histograms of the
perplexity of each round's generated data under the round-0 model, as in Shumailov et al. 2024, Fig. 1,
with the human 25th-percentile cut of the low-perplexity rule). The HTML file embeds its images.

Example:

```python
from collapse_guard.report import write_report
paths = write_report("runs/replace")   # {"json": ..., "markdown": ..., "html": ..., "plots": [...]}
```
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import os
import re
from pathlib import Path
from typing import Any

from collapse_guard.io import atomic_write_json, atomic_write_text, read_json

LEVELS = ("ok", "warn", "alarm")
LEVEL_WORDS = {"ok": "OK", "warn": "WARNING", "alarm": "COLLAPSED"}
COLORS = {"ok": "#2e7d32", "warn": "#b26a00", "alarm": "#c62828"}
# Diversity panels always drawn (when measured); every signal that raised a verdict is added to them.
DIVERSITY_PANELS = ("distinct_2", "distinct_4", "unigram_entropy", "tail_coverage", "self_bleu4",
                    "low_ppl_share")
# Signals a comparison aggregates over seeds, besides held-out perplexity (and the extra held-out corpora).
COMPARED_SIGNALS = ("distinct_2", "unigram_entropy", "self_bleu4", "low_ppl_share")
# Signals of the probe the report knows; those the detector does not judge are listed as "not in the rules".
MEASURED_SIGNALS = ("distinct_1", "distinct_2", "distinct_3", "distinct_4", "unigram_entropy", "ttr",
                    "self_bleu4", "compression_ratio", "tail_coverage", "embedding_diversity",
                    "low_ppl_share", "high_ppl_share")
# Signals whose value (not their ratio to round 0) is what a report shows.
ABSOLUTE_SIGNALS = ("low_ppl_share", "high_ppl_share", "train_loss", "eval_loss")
# Which way a signal moves under collapse (for the plot titles).
HIGHER_IS_COLLAPSE = ("self_bleu4", "compression_ratio", "low_ppl_share", "heldout_ppl")
LOWER_IS_COLLAPSE = ("distinct_1", "distinct_2", "distinct_3", "distinct_4", "unigram_entropy", "ttr",
                     "tail_coverage", "embedding_diversity")
LABELS = {"heldout_ppl": "held-out ppl", "self_bleu4": "self-BLEU-4", "low_ppl_share": "low-ppl share",
          "high_ppl_share": "high-ppl share", "unigram_entropy": "unigram entropy",
          "tail_coverage": "tail coverage",
          "distinct_1": "distinct-1", "distinct_2": "distinct-2", "distinct_3": "distinct-3",
          "distinct_4": "distinct-4", "compression_ratio": "compression ratio", "train_loss": "train loss",
          "embedding_diversity": "embedding diversity", "ttr": "type-token ratio"}
# The human percentile below which a generation counts as low-perplexity (metrics.diversity).
LOW_PERCENTILE = 25.0
# A selection that keeps less than this share of the rows its round wanted is flagged in words.
SCARCE_SELECTION = 0.25
# Arms whose synthetic tokens trained per round differ by more than this factor are flagged.
BUDGET_TOLERANCE = 1.25
SAMPLES_PER_ROUND = 3
SAMPLE_CHARS = 240
_SEED_FOLDER = re.compile(r"^seed_(-?\d+)$")


# ----- small helpers -----------------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _fmt(value: Any, digits: int = 3) -> str:
    if not _is_number(value) or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _count(value: Any) -> str:
    return f"{round(value):,}" if _finite(value) else "-"


def _share(value: Any) -> str:
    return f"{value:.0%}" if _finite(value) else "-"


def _x(ratio: Any, digits: int = 2) -> str:
    return f"x{ratio:.{digits}f}" if _finite(ratio) else "-"


def _digits(low: Any, high: Any) -> int:
    return 3 if _finite(low) and _finite(high) and high - low < 0.02 else 2


def signal_label(name: str) -> str:
    if name.endswith("_rises"):
        return LABELS.get(name[: -len("_rises")], name[: -len("_rises")]) + " rises"
    if "@" in name:
        base, corpus = name.split("@", 1)
        return f"{LABELS.get(base, base)} ({corpus})"
    return LABELS.get(name, name)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if _finite(v)]
    return sum(values) / len(values) if values else None


def _spread(values: list[Any]) -> dict[str, Any]:
    """{mean, min, max, n, values}: `values` keeps every seed's number (None where a seed has none)."""
    finite = [float(v) for v in values if _finite(v)]
    if not finite:
        return {"mean": None, "min": None, "max": None, "n": 0, "values": list(values)}
    return {"mean": sum(finite) / len(finite), "min": min(finite), "max": max(finite), "n": len(finite),
            "values": list(values)}


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


def signal_rule(name: str, d) -> dict[str, Any]:
    """How the detector `d` judges `name`: {in_rules, kind ("ratio" | "absolute"), direction, op, warn, alarm,
    reference, note}. warn/alarm are None where no threshold line applies."""
    rule = {"in_rules": True, "kind": "ratio", "direction": None, "op": None, "warn": None, "alarm": None,
            "reference": None, "note": ""}
    if name == d.ppl_signal:
        return {**rule, "direction": "above", "op": ">=", "warn": d.ppl_ratio_warn,
                "alarm": d.ppl_ratio_alarm}
    if name == f"{d.ppl_signal}_rises":
        return {**rule, "in_rules": d.ppl_rises_warn > 0, "direction": "above", "op": ">",
                "warn": 1.0 + d.ppl_rise_tolerance,
                "note": f"{d.ppl_rises_warn} rises in a row, each step ratio > "
                        f"{1.0 + d.ppl_rise_tolerance:g}"}
    if name in d.diversity_signals:
        return {**rule, "direction": "below", "op": "<", "warn": d.diversity_ratio_warn,
                "alarm": d.diversity_ratio_alarm}
    if name == d.self_bleu_signal:
        return {**rule, "direction": "above", "op": ">", "warn": d.self_bleu_ratio_warn,
                "alarm": d.self_bleu_ratio_alarm, "note": f"only with a rise >= {d.self_bleu_min_rise:g}"}
    if name == d.low_ppl_signal:
        return {**rule, "kind": "absolute", "direction": "above", "op": ">", "warn": d.low_ppl_share_warn,
                "alarm": d.low_ppl_share_alarm, "reference": LOW_PERCENTILE / 100}
    kind = "absolute" if name in ABSOLUTE_SIGNALS or name.endswith("_share") else "ratio"
    direction = "above" if name in HIGHER_IS_COLLAPSE or name.startswith(f"{d.ppl_signal}@") else \
        "below" if name in LOWER_IS_COLLAPSE else None
    if name in d.nonfinite_alarm_signals:
        return {**rule, "kind": kind, "direction": direction, "note": "alarm when not finite"}
    return {**rule, "in_rules": False, "kind": kind, "direction": direction}


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
        return f"warn: {rule['note']}"
    if name in d.nonfinite_alarm_signals and rule["alarm"] is None:
        return "alarm: not finite"
    threshold = rule.get(level)
    if threshold is None:
        return level
    return f"{level} at {rule['op']} {threshold:g}"


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


# ----- one run -----------------------------------------------------------------------------------------
def _missing(run_dir: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{run_dir} is not a folder: give the output_dir of a collapse-guard run "
                             "(e.g. collapse-guard report runs/tiny_loop).")


def _no_round(run_dir: Path, why: str) -> FileNotFoundError:
    return FileNotFoundError(f"{run_dir} holds no finished round ({why}): give the output_dir of a "
                             "collapse-guard run that finished at least round 0, or run collapse-guard run "
                             "RECIPE first.")


def _arm_and_seed(run_dir: Path, name: str) -> tuple[str, int | None]:
    match = _SEED_FOLDER.match(run_dir.name)
    if match:
        return run_dir.parent.name, int(match.group(1))
    return name, None


def _budget(config: dict[str, Any], generation: dict | None, selection: dict | None,
            train: dict | None) -> dict[str, Any]:
    """The round's synthetic budget: generated, kept by selection, trained on; the realised real fraction."""
    generation, selection, train = generation or {}, selection or {}, train or {}
    wanted = selection.get("wanted") or (config.get("generation") or {}).get("n_samples")
    kept = selection.get("selected")
    kept_of_wanted = kept / wanted if _is_number(kept) and _is_number(wanted) and wanted else None
    synthetic, real = train.get("synthetic_tokens_trained"), train.get("real_tokens_trained")
    token_share = synthetic / (synthetic + real) if _is_number(synthetic) and _is_number(real) and \
        synthetic + real else None
    return {
        "generated_rows": selection.get("generated", generation.get("rows")),
        "generated_tokens": generation.get("tokens"),
        "wanted_rows": wanted,
        "kept_rows": kept,
        "kept_tokens": selection.get("tokens"),
        "kept_share": selection.get("kept_share"),
        "kept_of_wanted": kept_of_wanted,
        "scarce_selection": kept_of_wanted is not None and kept_of_wanted < SCARCE_SELECTION,
        "synthetic_rows_trained": train.get("synthetic_rows_trained"),
        "synthetic_tokens_trained": synthetic,
        "real_tokens_trained": real,
        "synthetic_token_share": token_share,
        "synthetic_rows_untrained": train.get("synthetic_rows_untrained"),
        "real_fraction": train.get("real_fraction"),
        "floor": train.get("floor"),
    }


def _steps(train: dict | None) -> dict[str, Any] | None:
    if not train or not _is_number(train.get("max_steps")):
        return None
    stopped = train.get("stopped_by_guard_at")
    max_steps = int(train["max_steps"])
    if _is_number(stopped):
        text = f"stopped by the guard at step {int(stopped)} of {max_steps}"
    else:
        text = f"{_count(train.get('train_steps'))} of {max_steps}"
    if train.get("resumed_from"):
        text += f" (resumed from {train['resumed_from']})"
    return {"trained": train.get("train_steps"), "max": max_steps, "stopped_at": stopped, "text": text}


def _is_signal(key: str, entry: dict[str, Any]) -> bool:
    """A measured signal (not a stored ratio to the baseline, a mixing counter or a floor state)."""
    derived = key.endswith("_ratio") and key[: -len("_ratio")] in entry
    return not (derived or key.startswith("mixing/") or key in ("heldout_nll", "heldout_tokens", "floor"))


def summarize_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything a report shows about one run, from its artifacts (history, state, per-round files)."""
    import numpy as np

    from collapse_guard.history import FILENAME, History, scalars

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise _missing(run_dir)
    if not (run_dir / FILENAME).exists():
        raise _no_round(run_dir, f"no {FILENAME} in it")
    history = History.load(run_dir / FILENAME)
    finals = [e for e in history.finals() if "level" in e]
    if not finals:
        raise _no_round(run_dir, f"{FILENAME} has no judged round yet")
    state = read_json(run_dir / "run_state.json", default={}) or {}
    config = state.get("config") or {}
    d, detector_note = detector_of(config)
    name = config.get("name") or run_dir.name
    arm, seed = _arm_and_seed(run_dir, name)
    if seed is None and _is_number(config.get("seed")) and config.get("seeds"):
        seed = int(config["seed"])
    base = scalars(finals[0])
    judged = [e for e in history.entries if "level" in e]

    rounds = []
    for entry in finals:
        r = int(entry["round"])
        rd = run_dir / f"round_{r}"
        evaluation = read_json(rd / "eval.json", default={}) or {}
        train = read_json(rd / "train.json", default=None)
        selection = read_json(rd / "selection.json", default=None)
        generation = read_json(rd / "generation.json", default=None)
        metrics = {k: v for k, v in scalars(entry).items() if _is_signal(k, entry)}
        if train and _is_number(train.get("train_loss")) and "train_loss" not in metrics:
            metrics["train_loss"] = float(train["train_loss"])
        evidence = entry.get("evidence")
        if evidence is None:
            evidence = (read_json(rd / "verdict.json", default={}) or {}).get("evidence") or {}
        ratios = {k: v / base[k] for k, v in metrics.items()
                  if k in base and k not in ABSOLUTE_SIGNALS and _finite(v) and _finite(base[k]) and base[k]}
        intervals = {}
        for signal, e in evidence.items():
            if isinstance(e, dict) and signal in metrics and _finite(e.get("ratio")):
                ratios[signal] = float(e["ratio"])
            if isinstance(e, dict) and _finite(e.get("low")) and _finite(e.get("high")):
                intervals[signal] = [float(e["low"]), float(e["high"])]
        during = []
        max_steps = (train or {}).get("max_steps")
        for e in judged:
            if e["round"] == r and not e.get("final") and e.get("step", 0) > 0:
                during.append({"step": e["step"], "max_steps": max_steps, "level": e["level"],
                               "ratio": (e.get(d.ppl_signal) / base[d.ppl_signal]) if _finite(
                                   e.get(d.ppl_signal)) and _finite(base.get(d.ppl_signal)) else None,
                               "stopped": bool(e.get("stopped")),
                               "flagged": [s for s, _ in flagged_evidence(e.get("evidence") or {})]})
        generations = entry.get("generations") or evaluation.get("generations") or []
        rounds.append({
            "round": r,
            "level": entry.get("level", "ok"),
            "reasons": list(entry.get("reasons") or []),
            "evidence": evidence,
            "metrics": metrics,
            "ratios": ratios,
            "intervals": intervals,
            "generated_ppl": [p for p in evaluation.get("generated_ppl") or [] if _is_number(p)],
            "generation": generation,
            "selection": selection,
            "train": train,
            "steps": _steps(train),
            "budget": _budget(config, generation, selection, train) if r > 0 else None,
            "guard_measurements": during,
            "samples": [str(g) for g in generations[:SAMPLES_PER_ROUND]],
        })

    # every signal that raised a verdict, in-training measurements included
    known = {k for x in rounds for k in x["metrics"]}
    triggered: dict[str, dict[str, Any]] = {}
    for e in judged:
        names = [s for s, _ in flagged_evidence(e.get("evidence") or {})]
        if e.get("level") in ("warn", "alarm") and not names:
            names = [s for s in (_reason_signal(reason, d, known) for reason in e.get("reasons") or []) if s]
        for signal in names:
            triggered.setdefault(signal, {"round": e["round"], "step": e.get("step"), "level": e["level"]})

    human = (read_json(run_dir / "round_0" / "eval.json", default={}) or {})
    human = human.get("human_reference_ppl") or human.get("heldout_per_document") or []
    human = [p for p in human if _finite(p)]
    low_cut = float(np.percentile(human, LOW_PERCENTILE)) if human else None
    present = set(known)
    corpora = sorted(k for k in present if k.startswith(f"{d.ppl_signal}@"))
    excluded = [s for s in (*MEASURED_SIGNALS, *corpora)
                if s in present and not signal_rule(s, d)["in_rules"]]
    trained = [x["budget"] for x in rounds
               if x["budget"] and _is_number(x["budget"]["synthetic_tokens_trained"])]
    worst = max(rounds, key=lambda x: (LEVELS.index(x["level"]), -x["round"]))
    first_alarm = next((x for x in rounds if x["level"] == "alarm"), None)
    first_flag = next((x for x in rounds if x["level"] != "ok"), None)
    model = (config.get("model") or {}).get("name_or_path")
    mixing = config.get("mixing") or {}
    run = {
        "name": name,
        "arm": arm,
        "seed": seed,
        "run_dir": str(run_dir),
        "model": model,
        "tiny": model == "tiny",
        "mode": mixing.get("mode"),
        "min_real_fraction": mixing.get("min_real_fraction"),
        "selectors": [str(s.get("class", "?")).rsplit(".", 1)[-1] for s in config.get("selectors") or []],
        "setup": _setup_line(config, rounds),
        "detector": dataclasses.asdict(d),
        "rules": rule_lines(d, config),
        "detector_note": detector_note,
        "judged_signals": judged_signals(d),
        "excluded_signals": excluded,
        "triggered": triggered,
        "rounds": rounds,
        "level": worst["level"],
        "collapsed": first_alarm is not None,
        "first_flag": first_flag and {"round": first_flag["round"], "level": first_flag["level"],
                                      "reasons": first_flag["reasons"]},
        "stopped": state.get("stopped"),
        "guard_stops": [{"round": x["round"], "step": x["steps"]["stopped_at"],
                         "max_steps": x["steps"]["max"]}
                        for x in rounds if x["steps"] and _is_number(x["steps"]["stopped_at"])],
        "finished": bool(state.get("finished")),
        "human_reference_ppl": human,
        "low_ppl_cut": low_cut,
        "synthetic_tokens_per_round": _mean([b["synthetic_tokens_trained"] for b in trained]),
        "tokens_per_round": _mean([b["synthetic_tokens_trained"] + b["real_tokens_trained"] for b in trained
                                   if _is_number(b["real_tokens_trained"])]),
        "synthetic_token_share": _mean([b["synthetic_token_share"] for b in trained]),
        "real_fraction": _mean([b["real_fraction"] for b in trained]),
    }
    run["notes"] = _notes(run)
    run["summary"] = verdict_sentence(run)
    return run


def _setup_line(config: dict[str, Any], rounds: list[dict[str, Any]]) -> str:
    mixing, generation = config.get("mixing") or {}, config.get("generation") or {}
    selectors = ", ".join(str(s.get("class", "?")).rsplit(".", 1)[-1] for s in config.get("selectors") or [])
    parts = [f"model `{(config.get('model') or {}).get('name_or_path', '?')}`",
             f"mode `{mixing.get('mode')}`", f"real floor {mixing.get('min_real_fraction')}",
             f"selectors: {selectors or 'none'}"]
    if generation:
        pool = generation.get("pool_factor")
        method = generation.get("method", "continuation")
        parts.append(f"generation `{method}`, {generation.get('n_samples')} samples a round"
                     + (f" kept from a {pool:g}x pool" if _finite(pool) and pool > 1 else ""))
    if mixing.get("rows_per_round"):
        parts.append(f"{mixing['rows_per_round']} training rows a round")
    if _is_number(config.get("seed")):
        parts.append(f"seed {config['seed']}")
    line = "; ".join(parts)
    dropped: dict[str, int] = {}
    for x in rounds:
        for step in (x["selection"] or {}).get("steps", []) or []:
            for reason, n in (step.get("reasons") or {}).items():
                dropped[reason] = dropped.get(reason, 0) + int(n)
    if dropped:
        line += "; selection dropped " + ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items()))
    return line


def _notes(run: dict[str, Any]) -> list[str]:
    """Warnings in words: a selector that keeps almost nothing, no synthetic data, a random model."""
    notes = []
    for x in run["rounds"]:
        b = x["budget"]
        if b and b["scarce_selection"]:
            steps = [s for s in (x["selection"] or {}).get("steps", []) or [] if _is_number(s.get("kept"))]
            worst = min(steps, key=lambda s: s["kept"] / max(s.get("input") or 1, 1), default=None)
            who = ""
            if worst:
                selector = worst.get("selector") or worst.get("name")
                who = f" ({selector} kept {worst['kept']} of {worst.get('input')})"
            notes.append(f"Round {x['round']}: selection kept {b['kept_rows']} of the {b['wanted_rows']} "
                         f"rows the round wanted ({b['kept_of_wanted']:.0%}){who}: the selector keeps almost "
                         "nothing, so this round trains on far less synthetic data than planned and its "
                         "verdict says little.")
    share = run["synthetic_token_share"]
    if _finite(share) and share < 0.1:
        notes.append(f"Only {share:.0%} of the tokens trained on were synthetic: an OK verdict on (almost) "
                     "no synthetic data proves nothing about collapse.")
    if run["tiny"]:
        notes.append("This run uses the offline tiny model, a randomly initialised network: its numbers and "
                     "verdicts carry no meaning; the run only exercises the pipeline.")
    if run.get("detector_note"):
        notes.append(run["detector_note"][0].upper() + run["detector_note"][1:] + ".")
    return notes


# ----- sentences ---------------------------------------------------------------------------------------
def _budget_phrase(tokens: Any, share: Any, mean: bool = False) -> str:
    if not _finite(tokens):
        return ""
    text = f"trained on {_count(tokens)} synthetic tokens per round" + (" (mean over seeds" if mean else " (")
    return text + (f"{', ' if mean else ''}{share:.0%} synthetic)" if _finite(share) else ")" if mean else "")


def _sentence_parts(run: dict[str, Any]) -> tuple[str, list[str]]:
    d = _detector(run)
    rounds = run["rounds"]
    last = rounds[-1]
    parts = []
    if run["level"] == "ok" and len(rounds) == 1:
        head = f"{run['name']}: OK so far (only round 0, the starting model, is measured)"
    elif run["level"] == "ok":
        head = f"{run['name']}: OK over {len(rounds) - 1} round{'s' if len(rounds) != 2 else ''}"
        ppl = last["evidence"].get(d.ppl_signal)
        if isinstance(ppl, dict) and _finite(ppl.get("ratio")):
            parts.append(f"{evidence_text(d.ppl_signal, ppl)} at round {last['round']}")
        elif _finite(last["ratios"].get(d.ppl_signal)):
            parts.append(f"held-out ppl {_x(last['ratios'][d.ppl_signal])} at round {last['round']}")
    else:
        flag = next(x for x in rounds if x["level"] == run["level"])
        head = f"{run['name']}: {LEVEL_WORDS[run['level']]} at round {flag['round']}"
        if flag["round"] == 0:
            head = (f"{run['name']}: {run['level'].upper()} at round 0 (the starting model itself trips "
                    "a rule)")
        flagged = flagged_evidence(flag["evidence"])
        if flagged:
            parts += [_evidence_phrase(s, e, d) for s, e in flagged]
        else:
            parts += flag["reasons"]
    budget = _budget_phrase(run["synthetic_tokens_per_round"], run["synthetic_token_share"])
    if budget:
        parts.append(budget)
    for stop in run["guard_stops"]:
        parts.append(f"the guard stopped training in round {stop['round']} at step {stop['step']} of "
                     f"{stop['max_steps']}")
    if run.get("stopped"):
        parts.append(f"the run ended after round {run['stopped'].get('round')} (end_run_on_alarm)")
    if run["tiny"]:
        parts.append("offline tiny model: a random network, these numbers carry no meaning")
    return head, parts


def verdict_sentence(run: dict[str, Any]) -> str:
    """One line a newcomer understands: did this loop collapse, when, on what evidence, on how much data."""
    head, parts = _sentence_parts(run)
    return f"{head} — {'; '.join(parts)}." if parts else f"{head}."


# ----- several runs: arms and seeds --------------------------------------------------------------------
def group_arms(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs grouped by arm (the variant: the parent folder of `seed_<s>` folders), in first-seen order."""
    single = [r["arm"] for r in runs if r["seed"] is None or not _SEED_FOLDER.match(Path(r["run_dir"]).name)]
    clash = len(single) != len(set(single))
    arms: dict[str, dict[str, Any]] = {}
    for run in runs:
        key = run["arm"]
        if clash and not _SEED_FOLDER.match(Path(run["run_dir"]).name):
            key = Path(run["run_dir"]).name
        arms.setdefault(key, {"name": key, "runs": []})["runs"].append(run)
    return list(arms.values())


def _aggregate_signals(arms_runs: list[dict[str, Any]]) -> list[str]:
    d = _detector(arms_runs[0])
    present = {k for run in arms_runs for x in run["rounds"] for k in x["metrics"]}
    triggered = [s for run in arms_runs for s in run["triggered"]
                 if not s.endswith("_rises") and s != d.ppl_signal and s in present]
    extra = sorted(k for k in present if k.startswith(f"{d.ppl_signal}@"))
    names = [d.ppl_signal, *extra, *[s for s in COMPARED_SIGNALS if s in present], *triggered]
    return list(dict.fromkeys(names))


def _value(x: dict[str, Any], signal: str, kind: str) -> Any:
    return x["metrics"].get(signal) if kind == "absolute" else x["ratios"].get(signal)


def aggregate_arm(arm: dict[str, Any], signals: list[str]) -> dict[str, Any]:
    """Mean and min-max over an arm's seeds, per round; every seed's number kept in `values`."""
    runs = arm["runs"]
    d = _detector(runs[0])
    rounds = sorted({x["round"] for run in runs for x in run["rounds"]})
    table = []
    for r in rounds:
        at = [next((x for x in run["rounds"] if x["round"] == r), None) for run in runs]
        present = [x for x in at if x is not None]
        row: dict[str, Any] = {"round": r, "n": len(present), "signals": {}}
        for signal in signals:
            kind = signal_rule(signal, d)["kind"]
            row["signals"][signal] = _spread([_value(x, signal, kind) if x else None for x in at])
        budgets = [x["budget"] or {} if x else {} for x in at]
        for key in ("synthetic_tokens_trained", "synthetic_rows_trained", "real_tokens_trained",
                    "real_fraction", "generated_rows", "kept_rows", "kept_of_wanted",
                    "synthetic_token_share"):
            row[key] = _spread([b.get(key) for b in budgets])
        levels = [x["level"] if x else None for x in at]
        row["levels"] = levels
        row["flagged_share"] = sum(level in ("warn", "alarm") for level in levels) / max(len(present), 1)
        row["alarm_share"] = sum(level == "alarm" for level in levels) / max(len(present), 1)
        row["guard_stopped"] = sum(bool(x and x["steps"] and _is_number(x["steps"]["stopped_at"]))
                                   for x in at)
        table.append(row)
    seeds = [run["seed"] if run["seed"] is not None else i for i, run in enumerate(runs)]
    collapsed = [s for s, run in zip(seeds, runs, strict=True) if run["collapsed"]]
    warned = [s for s, run in zip(seeds, runs, strict=True) if run["level"] == "warn"]
    return {"name": arm["name"], "n_seeds": len(runs), "seeds": seeds,
            "run_dirs": [r["run_dir"] for r in runs],
            "levels": [r["level"] for r in runs], "collapsed_seeds": collapsed, "warned_seeds": warned,
            "rounds": table,
            "synthetic_tokens_per_round": _mean([r["synthetic_tokens_per_round"] for r in runs]),
            "tokens_per_round": _mean([r["tokens_per_round"] for r in runs]),
            "synthetic_token_share": _mean([r["synthetic_token_share"] for r in runs]),
            "real_fraction": _mean([r["real_fraction"] for r in runs]),
            "tiny": any(r["tiny"] for r in runs)}


def _spread_text(s: dict[str, Any], kind: str = "ratio") -> str:
    if s["mean"] is None:
        return "-"
    if kind == "absolute":
        return f"{s['mean']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"
    digits = _digits(s["min"], s["max"])
    return f"{_x(s['mean'], digits)} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def arm_sentence(agg: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """The summary of an arm run over several seeds."""
    if len(runs) == 1:
        return verdict_sentence(runs[0])
    d = _detector(runs[0])
    n = agg["n_seeds"]
    if agg["collapsed_seeds"]:
        first = min((next(x["round"] for x in run["rounds"] if x["level"] == "alarm"), run["seed"])
                    for run in runs if run["collapsed"])
        head = (f"{agg['name']}: COLLAPSED in {len(agg['collapsed_seeds'])} of {n} seeds (first alarm at "
                f"round {first[0]}, seed {first[1]}{': the starting model itself' if first[0] == 0 else ''})")
    elif agg["warned_seeds"]:
        head = f"{agg['name']}: WARNING in {len(agg['warned_seeds'])} of {n} seeds"
    else:
        head = f"{agg['name']}: OK in all {n} seeds"
    last = agg["rounds"][-1]
    ppl = last["signals"].get(d.ppl_signal)
    parts = []
    if ppl and ppl["mean"] is not None:
        parts.append(f"held-out ppl at round {last['round']} {_spread_text(ppl)} (mean [min, max] over "
                     f"{ppl['n']} seeds)")
    if agg["collapsed_seeds"] or agg["warned_seeds"]:
        flag_run = next(run for run in runs if run["level"] != "ok")
        flag = next(x for x in flag_run["rounds"] if x["level"] == flag_run["level"])
        flagged = flagged_evidence(flag["evidence"])
        if flagged:
            phrases = ", ".join(_evidence_phrase(s, e, d) for s, e in flagged)
            parts.append(f"seed {flag_run['seed']}: {phrases}")
    budget = _budget_phrase(agg["synthetic_tokens_per_round"], agg["synthetic_token_share"], mean=True)
    if budget:
        parts.append(budget)
    stops = sum(len(run["guard_stops"]) for run in runs)
    if stops:
        parts.append(f"the guard stopped training {stops} time{'s' if stops > 1 else ''}")
    if agg["tiny"]:
        parts.append("offline tiny model: a random network, these numbers carry no meaning")
    return f"{head} — {'; '.join(parts)}." if parts else f"{head}."


def budget_check(aggs: list[dict[str, Any]]) -> str | None:
    """Issue #11: arms compared in one report should train on the same budget (synthetic and in all)."""
    arms = [(a["name"], a["synthetic_tokens_per_round"], a["tokens_per_round"]) for a in aggs
            if _finite(a["synthetic_tokens_per_round"])]
    if len(arms) < 2:
        return None
    listing = ", ".join(f"{name} {_count(t)}" + (f" of {_count(total)}" if _finite(total) else "")
                        for name, t, total in arms)
    listing += " synthetic of all tokens trained per round"
    low, high = min(t for _, t, _ in arms), max(t for _, t, _ in arms)
    totals = [total for _, _, total in arms if _finite(total) and total > 0]
    total_note = ""
    if len(totals) == len(arms) and max(totals) / min(totals) > BUDGET_TOLERANCE:
        total_note = (" The arms also train on different numbers of tokens in all "
                      f"(x{max(totals) / min(totals):.1f}): fix rows_per_round to compare them at the same "
                      "training budget.")
    if low <= 0:
        none = ", ".join(name for name, t, _ in arms if t <= 0)
        return (f"Synthetic budgets differ: {none} trained on no synthetic data ({listing}); an arm that "
                "avoids collapse by training on no synthetic data proves nothing." + total_note)
    if high / low > BUDGET_TOLERANCE:
        return (f"Synthetic budgets differ (x{high / low:.1f}): {listing}. A difference in collapse can "
                "come from the budget rather than the method: compare arms at the same budget "
                "(rows_per_round, pool_factor)." + total_note)
    return f"Same synthetic budget (within {BUDGET_TOLERANCE - 1:.0%}): {listing}." + total_note


# ----- plot data ---------------------------------------------------------------------------------------
def _series(arm: dict[str, Any], signal: str, kind: str, label: str,
            style: str = "-") -> dict[str, Any] | None:
    """One line of a plot: a single run's values with their intervals, or several seeds' mean and min-max
    band."""
    runs = arm["runs"]
    if len(runs) == 1:
        rows = runs[0]["rounds"]
        xs = [x["round"] for x in rows]
        ys = [_value(x, signal, kind) for x in rows]
        iv = [x["intervals"].get(signal) if kind == "ratio" else None for x in rows]
        low = [i[0] if i else None for i in iv]
        high = [i[1] if i else None for i in iv]
        band = False
    else:
        xs, ys, low, high = [], [], [], []
        for r in sorted({x["round"] for run in runs for x in run["rounds"]}):
            s = _spread([_value(x, signal, kind) for run in runs for x in run["rounds"] if x["round"] == r])
            xs.append(r)
            ys.append(s["mean"])
            low.append(s["min"])
            high.append(s["max"])
        band = True
    if not any(_finite(y) for y in ys):
        return None
    return {"arm": arm["name"], "label": label, "x": xs, "y": ys, "low": low, "high": high, "band": band,
            "style": style, "n_seeds": len(runs)}


def _agreed_rule(runs: list[dict[str, Any]], signal: str) -> dict[str, Any]:
    rules = [signal_rule(signal, _detector(run)) for run in runs]
    if all(r == rules[0] for r in rules):
        return rules[0]
    return {**rules[0], "warn": None, "alarm": None, "note": "thresholds differ per arm (see Rules)"}


def _rule_lines_for_plot(rule: dict[str, Any]) -> list[dict[str, Any]]:
    if not rule["in_rules"]:
        return []
    return [{"level": level, "y": rule[level], "label": f"{level} ({rule['op']} {rule[level]:g})"}
            for level in ("warn", "alarm") if _finite(rule[level])]


def _stops(arms: list[dict[str, Any]], signal: str) -> list[dict[str, Any]]:
    stops = []
    for arm in arms:
        for run in arm["runs"]:
            prefix = f"{arm['name']}" + (f" seed {run['seed']}" if len(arm["runs"]) > 1 else "")
            for stop in run["guard_stops"]:
                x = next(x for x in run["rounds"] if x["round"] == stop["round"])
                stops.append({"arm": arm["name"], "seed": run["seed"], "round": stop["round"],
                              "y": x["ratios"].get(signal), "step": stop["step"],
                              "max_steps": stop["max_steps"],
                              "text": f"{prefix}: guard stopped round {stop['round']} at step {stop['step']}/"
                                      f"{stop['max_steps']}"})
            if run.get("stopped"):
                r = run["stopped"].get("round")
                x = next((x for x in run["rounds"] if x["round"] == r), None)
                stops.append({"arm": arm["name"], "seed": run["seed"], "round": r, "step": None,
                              "max_steps": None, "y": x["ratios"].get(signal) if x else None,
                              "text": f"{prefix}: run ended after round {r}"})
    return stops


def build_plot_specs(arms: list[dict[str, Any]]) -> dict[str, Any]:
    """What the plots draw, as data (JSON-ready): the ppl figure, the signal panels, the histograms.

    Every line carries its label; a panel of a signal outside the rules has `in_rules` False and no `lines`.
    """
    runs = [run for arm in arms for run in arm["runs"]]
    d = _detector(runs[0])
    several = len(arms) > 1
    present = {k for run in runs for x in run["rounds"] for k in x["metrics"]}

    def name(arm, what=""):
        return f"{arm['name']}{what}" if several or what else arm["name"]

    ppl_rule = _agreed_rule(runs, d.ppl_signal)
    series = [s for arm in arms for s in [_series(arm, d.ppl_signal, "ratio", name(arm))] if s]
    extra = []
    for corpus in sorted(k for k in present if k.startswith(f"{d.ppl_signal}@")):
        for arm in arms:
            label = f"{name(arm, ' ')}{signal_label(corpus)} (not in the rules)".strip()
            s = _series(arm, corpus, "ratio", label, style="--")
            if s:
                extra.append(s)
    guard_points = []
    for arm in arms:
        if len(arm["runs"]) == 1:
            for x in arm["runs"][0]["rounds"]:
                for m in x["guard_measurements"]:
                    if _finite(m["ratio"]) and _is_number(m["max_steps"]) and m["max_steps"]:
                        guard_points.append({"arm": arm["name"],
                                             "x": x["round"] - 1 + m["step"] / m["max_steps"],
                                             "y": m["ratio"], "level": m["level"], "step": m["step"]})
    ppl = {"signal": d.ppl_signal, "title": "Held-out human perplexity / round 0",
           "ylabel": "held-out ppl / round 0", "in_rules": True, "lines": _rule_lines_for_plot(ppl_rule),
           "note": ppl_rule["note"], "series": series + extra, "guard_points": guard_points,
           "stops": _stops(arms, d.ppl_signal),
           "band_note": "shaded: min-max over seeds" if any(s["band"] for s in series) else
           "bars: the detector's interval" if any(_finite(v) for s in series for v in s["low"]) else ""}

    triggered = [s for run in runs for s in run["triggered"]]
    # the signals that raised a verdict first, then the usual panels
    candidates = [*[s for s in triggered if not s.endswith("_rises") and s != d.ppl_signal
                    and not s.startswith(f"{d.ppl_signal}@") and s in present],
                  *[p for p in DIVERSITY_PANELS if p in present]]
    panels = []
    for signal in dict.fromkeys(candidates):
        rule = _agreed_rule(runs, signal)
        kind = rule["kind"]
        title = signal_label(signal) + (" / round 0" if kind == "ratio" else "")
        if rule["direction"]:
            title += f" ({'higher' if rule['direction'] == 'above' else 'lower'} = collapse)"
        if not rule["in_rules"]:
            title += " (not in the rules)"
        elif rule["note"]:
            title += f"\n{rule['note']}"
        panel_series = [s for arm in arms for s in [_series(arm, signal, kind, name(arm))] if s]
        panels.append({"signal": signal, "title": title, "kind": kind, "in_rules": rule["in_rules"],
                       "triggered": signal in triggered, "lines": _rule_lines_for_plot(rule),
                       "reference": rule["reference"], "series": panel_series,
                       "stops": sorted({s["round"] for s in _stops(arms, signal)})})

    hists = []
    for arm in arms:
        rounds: dict[int, list[float]] = {}
        for run in arm["runs"]:
            for x in run["rounds"]:
                scores = [p for p in x["generated_ppl"] if _finite(p) and p > 0]
                rounds.setdefault(x["round"], []).extend(scores)
        human = [p for run in arm["runs"][:1] for p in run["human_reference_ppl"] if p > 0]
        pooled = f" (pooled over {len(arm['runs'])} seeds)" if len(arm["runs"]) > 1 else ""
        title = f"{arm['name']}: perplexity of generated data under the round-0 model{pooled}"
        hists.append({"arm": arm["name"], "title": title,
                      "human": human, "low_cut": arm["runs"][0]["low_ppl_cut"],
                      "rounds": [{"round": r, "values": v} for r, v in sorted(rounds.items()) if v]})
    return {"ppl": ppl, "panels": panels, "histograms": hists}


# ----- drawing -----------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _legend(ax, **kwargs) -> None:
    """A legend only where something carries a label (no matplotlib "No artists with labels" warning)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, **kwargs)


def _nan(values: list[Any]) -> list[float]:
    return [float(v) if _finite(v) else math.nan for v in values]


def _draw_series(ax, s: dict[str, Any], color) -> None:
    xs, ys = s["x"], _nan(s["y"])
    ax.plot(xs, ys, marker="o", linewidth=2 if s["style"] == "-" else 1.4, linestyle=s["style"], color=color,
            label=s["label"])
    low, high = _nan(s["low"]), _nan(s["high"])
    if s["band"]:
        ax.fill_between(xs, low, high, color=color, alpha=0.18, linewidth=0)
    elif any(math.isfinite(v) for v in low):
        err = [[max(y - lo, 0) if math.isfinite(lo) and math.isfinite(y) else 0 for y, lo in zip(ys, low,
                                                                                                 strict=True)],
               [max(hi - y, 0) if math.isfinite(hi) and math.isfinite(y) else 0 for y, hi in zip(ys, high,
                                                                                                strict=True)]]
        ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor=color, capsize=3, linewidth=1)


def _limits(values: list[float], lines: list[float], pad: float = 0.05) -> tuple[float, float]:
    values = [v for v in values + lines if math.isfinite(v)]
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    span = max(high - low, 0.02 * max(abs(high), 1e-9))
    return low - pad * span, high + pad * span


def plot_ppl_ratio(spec: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    arms = list(dict.fromkeys(s["arm"] for s in spec["series"]))
    values = [v for s in spec["series"] for v in _nan(s["y"]) + _nan(s["low"]) + _nan(s["high"])]
    values += [p["y"] for p in spec["guard_points"]] + [1.0]
    lines = {line["level"]: line for line in spec["lines"]}
    bottom, top = _limits(values, [line["y"] for line in spec["lines"]])
    top = max(top, lines["alarm"]["y"] + 0.05) if "alarm" in lines else top
    if "warn" in lines:
        ax.axhspan(lines["warn"]["y"], lines["alarm"]["y"] if "alarm" in lines else top, color="#f6d365",
                   alpha=0.35, label=lines["warn"]["label"])
    if "alarm" in lines:
        ax.axhspan(lines["alarm"]["y"], top, color="#f08080", alpha=0.35, label=lines["alarm"]["label"])
    for s in spec["series"]:
        _draw_series(ax, s, colors[arms.index(s["arm"]) % len(colors)])
    if spec["guard_points"]:
        ax.scatter([p["x"] for p in spec["guard_points"]], [p["y"] for p in spec["guard_points"]], s=18,
                   c=[COLORS[p["level"]] for p in spec["guard_points"]], marker="s", zorder=3,
                   label="guard, during training")
    for k, stop in enumerate(spec["stops"]):
        y = stop["y"] if _finite(stop["y"]) else top
        ax.scatter([stop["round"]], [y], s=140, marker="X", color="#c62828", edgecolor="black", zorder=4,
                   label="stopped" if k == 0 else None)
        ax.annotate(stop["text"], (stop["round"], y), textcoords="offset points", xytext=(-10, 10 + 12 * k),
                    fontsize=7, ha="right", color="#c62828")
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_ylim(bottom, top)
    ax.set_xlabel("round")
    ax.set_ylabel(spec["ylabel"])
    ax.set_title(spec["title"] + (f" ({spec['band_note']})" if spec["band_note"] else ""), fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(ax, fontsize=7, loc="best")
    _save(fig, path)
    plt.close(fig)
    return path


def plot_diversity(spec: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cols = 3
    rows = max(1, math.ceil(len(spec) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, spec, strict=False):
        arms = list(dict.fromkeys(s["arm"] for s in panel["series"]))
        for s in panel["series"]:
            _draw_series(ax, s, colors[arms.index(s["arm"]) % len(colors)])
        for line in panel["lines"]:
            ax.axhline(line["y"], color="#e0a800" if line["level"] == "warn" else "#d9534f", linestyle="--",
                       linewidth=1, label=line["label"])
        if panel["reference"] is not None:
            ax.axhline(panel["reference"], color="gray", linestyle=":", linewidth=0.8, label="human")
        for r in panel["stops"]:
            ax.axvline(r, color="#c62828", linestyle=":", linewidth=1)
        # the axis follows the values and the rule lines; a wide interval may run off it (clipped)
        core = [v for s in panel["series"] for v in _nan(s["y"])] + [line["y"] for line in panel["lines"]]
        core += [panel["reference"]] if panel["reference"] is not None else []
        spread = [v for s in panel["series"] for v in _nan(s["low"]) + _nan(s["high"])]
        low, high = _limits(core, [])
        span = high - low
        low, high = _limits(core, [v for v in spread if low - span <= v <= high + span])
        ax.set_ylim(low, high)
        ax.set_title(panel["title"], fontsize=9, color="#c62828" if panel["triggered"] else "black")
        ax.set_xlabel("round", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=8)
        _legend(ax, fontsize=7)
    for ax in list(axes.flat)[len(spec):]:
        ax.axis("off")
    bands = any(s["band"] for panel in spec for s in panel["series"])
    fig.suptitle("Signals of the fixed prompt set's generations (dashed: warn / alarm of the rules; red "
                 "title: raised a verdict; dotted red: a stopped round; "
                 + ("shaded: min-max over seeds)" if bands else "bars: the detector's interval)"), fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def log_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """A few round, readable ticks across [low, high] for a log axis (never one per minor decade step)."""
    import numpy as np

    if not (low > 0 and high > low):
        return [float(f"{low:.2g}")] if low > 0 else []
    ticks = sorted({float(f"{v:.2g}") for v in np.geomspace(low, high, count)})
    return [t for t in ticks if low * 0.98 <= t <= high * 1.02] or [float(f"{low:.2g}")]


def plot_generated_ppl(spec: list[dict[str, Any]], path: Path) -> Path:
    import numpy as np
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    plt = _pyplot()
    fig, axes = plt.subplots(len(spec), 1, figsize=(7.0, 3.1 * len(spec)), squeeze=False)
    values = [p for h in spec for r in h["rounds"] for p in r["values"]]
    values += [p for h in spec for p in h["human"]]
    cuts = [h["low_cut"] for h in spec if _finite(h["low_cut"])]
    low = min(values + cuts) if values or cuts else 1.0
    high = max(values + cuts) if values or cuts else 10.0
    if high <= low:
        low, high = low * 0.9, high * 1.1
    bins = np.geomspace(low, high, 30)
    cmap = plt.get_cmap("viridis")
    for ax, h in zip(axes[:, 0], spec, strict=True):
        if h["human"]:
            ax.hist(h["human"], bins=bins, density=True, histtype="stepfilled", color="lightgray", alpha=0.6,
                    label="human held-out")
        n = max(len(h["rounds"]) - 1, 1)
        for i, r in enumerate(h["rounds"]):
            ax.hist(r["values"], bins=bins, density=True, histtype="step", linewidth=1.8, color=cmap(i / n),
                    label=f"round {r['round']}")
        if _finite(h["low_cut"]):
            ax.axvline(h["low_cut"], color="black", linestyle="--", linewidth=1,
                       label=f"human {LOW_PERCENTILE:g}th pct ({h['low_cut']:.3g}): low-ppl cut")
        ax.set_xscale("log")
        ax.set_xlim(low, high)
        ax.xaxis.set_major_locator(FixedLocator(log_ticks(low, high)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(h["title"], fontsize=9)
        ax.set_xlabel("perplexity (log scale)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.tick_params(labelsize=8)
        if not h["rounds"] and not h["human"]:
            ax.text(0.5, 0.5, "no generated data scored", transform=ax.transAxes, ha="center", fontsize=8)
        _legend(ax, fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


# ----- documents: one block list, rendered as Markdown and as HTML ------------------------------------
def _rounds_table(run: dict[str, Any]) -> list[list[str]]:
    d = _detector(run)
    rows = [["round", "verdict", "evidence (flagged signals)", "held-out ppl",
             "ratio to round 0 [interval, n]", "optimizer steps", "train loss"]]
    for x in run["rounds"]:
        flagged = flagged_evidence(x["evidence"])
        evidence = "; ".join(_evidence_phrase(s, e, d, short=True) for s, e in flagged)
        if not evidence and x["level"] != "ok":
            evidence = "; ".join(x["reasons"])
        ppl = x["evidence"].get(d.ppl_signal)
        if isinstance(ppl, dict) and _finite(ppl.get("ratio")) and x["round"]:
            ratio = evidence_text(d.ppl_signal, ppl, short=True).split(" ", 2)[-1]
        else:
            ratio = _x(x["ratios"].get(d.ppl_signal), 3)
        steps = x["steps"]["text"] if x["steps"] else ("baseline" if x["round"] == 0 else "-")
        rows.append([str(x["round"]), x["level"], evidence or "-", _fmt(x["metrics"].get(d.ppl_signal), 2),
                     ratio, steps, _fmt(x["metrics"].get("train_loss"))])
    return rows


def _budget_table(run: dict[str, Any]) -> list[list[str]]:
    rows = [["round", "generated rows (tokens)", "kept by selection rows (tokens)", "kept of wanted",
             "kept of pool", "synthetic trained: rows served (tokens)", "real tokens trained",
             "real fraction (floor)", "synthetic share of tokens"]]
    for x in run["rounds"]:
        b = x["budget"]
        if not b:
            continue
        kept = f"{_count(b['kept_rows'])} ({_count(b['kept_tokens'])})"
        wanted = "-"
        if b["kept_of_wanted"] is not None:
            wanted = f"{_share(b['kept_of_wanted'])} of {_count(b['wanted_rows'])}"
        if b["scarce_selection"]:
            wanted += " (selector keeps almost nothing)"
        rows.append([str(x["round"]), f"{_count(b['generated_rows'])} ({_count(b['generated_tokens'])})",
                     kept, wanted, _share(b["kept_share"]),
                     f"{_count(b['synthetic_rows_trained'])} ({_count(b['synthetic_tokens_trained'])})",
                     _count(b["real_tokens_trained"]),
                     f"{_fmt(b['real_fraction'], 2)} ({_fmt(b['floor'], 2)})",
                     _share(b["synthetic_token_share"])])
    return rows


def _signals_table(run: dict[str, Any]) -> list[list[str]]:
    d = _detector(run)
    present = {k for x in run["rounds"] for k in x["metrics"]}
    triggered = [s for s in run["triggered"] if s in present and s != d.ppl_signal]
    names = [s for s in dict.fromkeys([*triggered, *DIVERSITY_PANELS,
                                       *sorted(k for k in present if k.startswith(f"{d.ppl_signal}@"))])
             if s in present]
    header = ["round"]
    for s in names:
        rule = signal_rule(s, d)
        label = signal_label(s) + ("" if rule["kind"] == "absolute" else " ratio")
        header.append(label + ("" if rule["in_rules"] else " (not in the rules)"))
    rows = [header]
    for x in run["rounds"]:
        row = [str(x["round"])]
        for s in names:
            rule = signal_rule(s, d)
            if rule["kind"] == "absolute":
                cell = _fmt(x["metrics"].get(s), 2)
            else:
                cell = _fmt(x["ratios"].get(s), 3)
                iv = x["intervals"].get(s)
                if iv and x["round"]:
                    cell += f" [{iv[0]:.2f}, {iv[1]:.2f}]"
            ev = x["evidence"].get(s)
            level = ev.get("level") if isinstance(ev, dict) else None
            if level in ("warn", "alarm"):
                cell += f" {level}"
            row.append(cell)
        rows.append(row)
    return rows


def _run_blocks(run: dict[str, Any], heading: str) -> list[tuple]:
    blocks: list[tuple] = [("h2", heading), ("p", f"Setup: {run['setup']}.")]
    if run["notes"]:
        blocks.append(("ul", run["notes"]))
    blocks += [("h3", "Rounds"), ("table", _rounds_table(run))]
    flagged = [f"round {x['round']} ({x['level']}): " + "; ".join(x["reasons"])
               for x in run["rounds"] if x["reasons"]]
    if flagged:
        blocks += [("p", "The detector's reasons:"), ("ul", flagged)]
    during = [f"round {x['round']}: " + ", ".join(
        f"step {m['step']} {_x(m['ratio'], 3)} {m['level']}" + (" (stopped here)" if m["stopped"] else "")
        for m in x["guard_measurements"]) for x in run["rounds"] if x["guard_measurements"]]
    if during:
        blocks += [("p", "Guard measurements during training (held-out ppl / round 0, verdict):"),
                   ("ul", during)]
    budget = _budget_table(run)
    if len(budget) > 1:
        blocks += [("h3", "Synthetic budget"), ("table", budget),
                   ("p", "Rows served count every epoch; the real fraction is the realised share of real "
                         "rows (or tokens) in the optimizer steps, against the floor in force.")]
    blocks += [("h3", "Signals relative to round 0"), ("table", _signals_table(run))]
    samples = [(f"round {x['round']}", s) for x in run["rounds"] for s in x["samples"]]
    if samples:
        blocks += [("h3", "Sample generations (fixed prompts)"), ("samples", samples)]
    return blocks


def _arm_table(agg: dict[str, Any], signals: list[str], d) -> list[list[str]]:
    header = ["round"]
    for s in signals:
        rule = signal_rule(s, d)
        header.append(f"{signal_label(s)}{'' if rule['kind'] == 'absolute' else ' ratio'} mean [min, max]"
                      + ("" if rule["in_rules"] else " (not in the rules)"))
    header += ["synthetic tokens trained (mean)", "real fraction (mean)", "kept of wanted (mean)",
               "seeds flagged warn/alarm"]
    rows = [header]
    for row in agg["rounds"]:
        cells = [str(row["round"])]
        for s in signals:
            cells.append(_spread_text(row["signals"][s], signal_rule(s, d)["kind"]))
        flagged = sum(level in ("warn", "alarm") for level in row["levels"])
        alarms = sum(level == "alarm" for level in row["levels"])
        cells += [_count(row["synthetic_tokens_trained"]["mean"]), _fmt(row["real_fraction"]["mean"], 2),
                  _share(row["kept_of_wanted"]["mean"]),
                  f"{row['flagged_share']:.0%} ({flagged} of {row['n']}, {alarms} alarm)"]
        rows.append(cells)
    return rows


def _seed_table(runs: list[dict[str, Any]]) -> list[list[str]]:
    d = _detector(runs[0])
    rows = [["seed", "verdict", "first flag", "last held-out ppl ratio", "synthetic tokens / round",
             "real fraction", "guard stops", "folder"]]
    for run in runs:
        last = run["rounds"][-1]
        flag = run["first_flag"]
        stops = ", ".join(f"round {s['round']} step {s['step']}/{s['max_steps']}" for s in run["guard_stops"])
        first = f"round {flag['round']} ({flag['level']})" if flag else "-"
        rows.append([str(run["seed"]), run["level"], first,
                     _x(last["ratios"].get(d.ppl_signal), 3), _count(run["synthetic_tokens_per_round"]),
                     _fmt(run["real_fraction"], 2), stops or "-", Path(run["run_dir"]).name])
    return rows


def _rules_blocks(runs: list[dict[str, Any]], arms: list[dict[str, Any]]) -> list[tuple]:
    excluded = list(dict.fromkeys(s for run in runs for s in run["excluded_signals"]))
    ex_line = ("Not in the rules (measured and shown, drawn without warn/alarm lines): "
               + ", ".join(f"`{s}`" for s in excluded)) if excluded else None
    same = all(run["rules"] == runs[0]["rules"] for run in runs)
    if same:
        items = runs[0]["rules"] + ([ex_line] if ex_line else [])
        return [("p", "**Rules:** the detector's rules in force (from the run's `detector` section):"),
                ("ul", items)]
    blocks: list[tuple] = [("p", "**Rules:** the arms use different detector settings:")]
    for arm in arms:
        blocks += [("p", f"Rules of {arm['name']}:"), ("ul", arm["runs"][0]["rules"])]
    if ex_line:
        blocks.append(("p", ex_line))
    return blocks


def build_document(runs: list[dict[str, Any]], title: str, plots: list[str],
                   arms: list[dict[str, Any]] | None = None,
                   aggregates: list[dict[str, Any]] | None = None) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"h3"|"p", text), ("ul", [text]), ("verdicts", [(level, head, rest)]),
    ("table", rows), ("samples", [(label, raw text)]), ("img", path). Text may hold `code` and **bold**."""
    arms = arms or [{"name": run["name"], "runs": [run]} for run in runs]
    aggregates = aggregates or [None] * len(arms)
    blocks: list[tuple] = [("h1", title)]
    verdicts = []
    for arm, agg in zip(arms, aggregates, strict=True):
        if agg is None or len(arm["runs"]) == 1:
            for run in arm["runs"]:
                head, parts = _sentence_parts(run)
                verdicts.append((run["level"], head, "; ".join(parts)))
        else:
            sentence = arm_sentence(agg, arm["runs"])
            head, _, rest = sentence.partition(" — ")
            level = "alarm" if agg["collapsed_seeds"] else "warn" if agg["warned_seeds"] else "ok"
            verdicts.append((level, head, rest.rstrip(".")))
    blocks.append(("verdicts", verdicts))
    if any(a is not None for a in aggregates):
        check = budget_check([a for a in aggregates if a is not None])
        if check:
            blocks.append(("p", check))
    blocks += _rules_blocks(runs, arms)
    for arm, agg in zip(arms, aggregates, strict=True):
        if agg is None or len(arm["runs"]) == 1:
            for run in arm["runs"]:
                heading = run["name"] if len(arms) == 1 or arm["name"] == run["name"] else \
                    f"{arm['name']} ({run['name']})"
                blocks += _run_blocks(run, heading)
            continue
        d = _detector(arm["runs"][0])
        signals = _aggregate_signals(arm["runs"])
        seeds = ", ".join(str(s) for s in agg["seeds"])
        blocks += [("h2", f"{arm['name']} ({agg['n_seeds']} seeds: {seeds})"),
                   ("p", f"Setup (seed {arm['runs'][0]['seed']}): {arm['runs'][0]['setup']}.")]
        notes = list(dict.fromkeys(f"seed {run['seed']}: {note}" if "tiny model" not in note else note
                                   for run in arm["runs"] for note in run["notes"]))
        if notes:
            blocks.append(("ul", notes))
        blocks += [("h3", "Per round, over seeds (mean [min, max])"), ("table", _arm_table(agg, signals, d)),
                   ("h3", "Per seed"), ("table", _seed_table(arm["runs"])),
                   ("p", "Each seed's folder holds its own report (report.md / report.html) with every "
                         "round's evidence and budget.")]
    blocks += [("h2", "Plots")] + [("img", p) for p in plots]
    return blocks


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", " ".join(str(text).split()))


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _sample(text: str) -> str:
    text = " ".join(str(text).split())
    return text[:SAMPLE_CHARS] + ("..." if len(text) > SAMPLE_CHARS else "") if text else "(empty)"


def render_markdown(blocks: list[tuple]) -> str:
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            out += [block[1], ""]
        elif kind == "ul":
            out += [f"- {item}" for item in block[1]] + [""]
        elif kind == "verdicts":
            out += [f"- **{head}**" + (f" — {rest}." if rest else ".") for _, head, rest in block[1]] + [""]
        elif kind == "table":
            rows = block[1]
            out += ["| " + " | ".join(_md_cell(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows[1:]] + [""]
        elif kind == "samples":
            out += [f"- {label}: {_md_escape(_sample(text))}" for label, text in block[1]] + [""]
        elif kind == "img":
            out += [f"![{Path(block[1]).stem}]({Path(block[1]).name})", ""]
    return "\n".join(out)


def _html_inline(text: str) -> str:
    """Escaped text with `code` spans and **bold** rendered; no literal backtick survives."""
    escaped = html.escape(str(text))
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", escaped)
    return escaped.replace("`", "&#96;")


def _html_text(text: str) -> str:
    return html.escape(str(text)).replace("`", "&#96;")


def _data_uri(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(blocks: list[tuple], title: str) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_html_inline(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_html_inline(block[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_html_inline(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "verdicts":
            items = [f"<li style='color:{COLORS.get(level, '#000')}'><b>{_html_text(head)}</b>"
                     + (f" — {_html_text(rest)}." if rest else ".") + "</li>"
                     for level, head, rest in block[1]]
            body.append("<ul class='verdicts'>" + "".join(items) + "</ul>")
        elif kind == "table":
            rows = block[1]
            body.append("<table><tr>" + "".join(f"<th>{_html_text(c)}</th>" for c in rows[0]) + "</tr>")
            for row in rows[1:]:
                level = row[1] if len(row) > 1 and row[1] in COLORS else None
                style = f" style='color:{COLORS[level]}'" if level and level != "ok" else ""
                body.append(f"<tr{style}>" + "".join(f"<td>{_html_text(c)}</td>" for c in row) + "</tr>")
            body.append("</table>")
        elif kind == "samples":
            body.append("<ul class='samples'>" + "".join(
                f"<li><b>{_html_text(label)}</b>: <q>{_html_text(_sample(text))}</q></li>"
                for label, text in block[1]) + "</ul>")
        elif kind == "img":
            body.append(f"<p><img alt='{_html_text(Path(block[1]).stem)}' src='{_data_uri(block[1])}' "
                        "style='max-width:100%'></p>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right;vertical-align:top}th{background:#f4f4f4}td:nth-child(3){text-align:left}"
             "code{background:#f4f4f4;padding:0 3px}ul.samples{font-family:monospace;font-size:90%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_html_text(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


# ----- writing -----------------------------------------------------------------------------------------
def _write(out_dir: Path, runs: list[dict[str, Any]], title: str, stem: str,
           comparison: bool) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    arms = group_arms(runs) if comparison else [{"name": runs[0]["name"], "runs": runs}]
    aggregates = [aggregate_arm(arm, _aggregate_signals(arm["runs"])) for arm in arms] if comparison else None
    specs = build_plot_specs(arms)
    plots = [str(plot_ppl_ratio(specs["ppl"], out_dir / "ppl_ratio.png")),
             str(plot_diversity(specs["panels"], out_dir / "diversity.png")),
             str(plot_generated_ppl(specs["histograms"], out_dir / "generated_ppl.png"))]
    blocks = build_document(runs, title, plots, arms, aggregates)
    verdicts = [f"{head} — {rest}." if rest else f"{head}." for _, head, rest in
                next(b for b in blocks if b[0] == "verdicts")[1]]
    summary = {"title": title, "verdicts": verdicts, "runs": runs, "arms": aggregates,
               "budget_check": budget_check(aggregates) if aggregates else None,
               "plots": {"ppl": specs["ppl"], "panels": specs["panels"]}}
    atomic_write_json(out_dir / f"{stem}.json", summary)
    atomic_write_text(out_dir / f"{stem}.md", render_markdown(blocks))
    atomic_write_text(out_dir / f"{stem}.html", render_html(blocks, title))
    return {"json": str(out_dir / f"{stem}.json"), "markdown": str(out_dir / f"{stem}.md"),
            "html": str(out_dir / f"{stem}.html"), "plots": plots, "verdicts": verdicts, "plot_specs": specs}


def write_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Writes report.json / report.md / report.html and the plots into `run_dir`; returns their paths."""
    run = summarize_run(run_dir)
    return _write(Path(run_dir), [run], f"collapse-guard report: {run['name']}", "report", comparison=False)


def write_comparison(out_dir: str | os.PathLike, run_dirs: list[str | os.PathLike],
                     title: str = "collapse-guard comparison") -> dict[str, Any]:
    """Several runs in one report (comparison.json / .md / .html + plots in `out_dir`). Runs in
    `<arm>/seed_<s>` folders are grouped by arm and reported as mean and min-max over their seeds."""
    if not run_dirs:
        raise FileNotFoundError(f"{out_dir}: no run folder to compare; give the output_dirs of "
                                "collapse-guard runs.")
    runs = [summarize_run(d) for d in run_dirs]
    return _write(Path(out_dir), runs, title, "comparison", comparison=True)


def find_runs(folder: Path) -> list[Path]:
    """Run folders (holding a history) directly under `folder` or one level deeper (`<arm>/seed_<s>`)."""
    from collapse_guard.history import FILENAME

    found = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (child / FILENAME).exists():
            found.append(child)
        else:
            found += sorted(g for g in child.iterdir() if g.is_dir() and (g / FILENAME).exists())
    return found


def report_path(run_dir: str | os.PathLike) -> dict[str, Any]:
    """`collapse-guard report DIR`: a run folder, or a folder of runs (variants, seeds) -> report or
    comparison."""
    from collapse_guard.history import FILENAME

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise _missing(run_dir)
    if (run_dir / FILENAME).exists():
        return write_report(run_dir)
    children = []
    for child in find_runs(run_dir):
        try:
            write_report(child)
        except FileNotFoundError:  # a run that has not finished round 0: nothing to compare yet
            continue
        children.append(child)
    if not children:
        raise _no_round(run_dir, f"no {FILENAME} with a judged round in it or in its subfolders")
    if len(children) == 1:
        return write_report(children[0])
    return write_comparison(run_dir, children, title=f"collapse-guard comparison: {run_dir.name}")
