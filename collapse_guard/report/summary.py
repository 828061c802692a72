"""One run folder read into what its report shows (`summarize_run`), and its verdict sentence."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from collapse_guard.io import read_json
from collapse_guard.report.common import (
    _SEED_FOLDER,
    ABSOLUTE_SIGNALS,
    LEVEL_WORDS,
    LEVELS,
    LOW_PERCENTILE,
    MEASURED_SIGNALS,
    SAMPLES_PER_ROUND,
    SCARCE_SELECTION,
    _count,
    _finite,
    _is_number,
    _mean,
    _x,
)
from collapse_guard.report.rules import (
    _detector,
    _evidence_phrase,
    _reason_signal,
    detector_of,
    evidence_text,
    flagged_evidence,
    judged_signals,
    rule_lines,
    signal_rule,
)


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


def _judged_history(run_dir: Path):
    """The run's history and its judged round-closing entries; a clear error where there is none yet."""
    from collapse_guard.history import FILENAME, History

    if not run_dir.is_dir():
        raise _missing(run_dir)
    if not (run_dir / FILENAME).exists():
        raise _no_round(run_dir, f"no {FILENAME} in it")
    history = History.load(run_dir / FILENAME)
    finals = [e for e in history.finals() if "level" in e]
    if not finals:
        raise _no_round(run_dir, f"{FILENAME} has no judged round yet")
    return history, finals


def _ratios_and_intervals(metrics: dict[str, Any], base: dict[str, float],
                          evidence: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each signal's ratio to round 0 (the detector's own where its evidence has one) and its interval."""
    ratios = {k: v / base[k] for k, v in metrics.items()
              if k in base and k not in ABSOLUTE_SIGNALS and _finite(v) and _finite(base[k]) and base[k]}
    intervals = {}
    for signal, e in evidence.items():
        if isinstance(e, dict) and signal in metrics and _finite(e.get("ratio")):
            ratios[signal] = float(e["ratio"])
        if isinstance(e, dict) and _finite(e.get("low")) and _finite(e.get("high")):
            intervals[signal] = [float(e["low"]), float(e["high"])]
    return ratios, intervals


@dataclasses.dataclass(frozen=True)
class _RunRecord:
    """What each round of one run is read against: its folder, recipe, rules and judged history."""

    run_dir: Path
    config: dict[str, Any]
    detector: Any  # the run's DetectorConfig
    base: dict[str, float]  # round 0's signals
    judged: list[dict[str, Any]]  # every judged history entry, in-training ones included


def _guard_measurements(record: _RunRecord, r: int, max_steps: Any) -> list[dict[str, Any]]:
    """The guard's verdicts during round `r`'s training (held-out ppl / round 0 at each)."""
    d, base = record.detector, record.base
    during = []
    for e in record.judged:
        if e["round"] == r and not e.get("final") and e.get("step", 0) > 0:
            ratio = e.get(d.ppl_signal) / base[d.ppl_signal] if _finite(e.get(d.ppl_signal)) and \
                _finite(base.get(d.ppl_signal)) else None
            during.append({"step": e["step"], "max_steps": max_steps, "level": e["level"], "ratio": ratio,
                           "stopped": bool(e.get("stopped")),
                           "flagged": [s for s, _ in flagged_evidence(e.get("evidence") or {})]})
    return during


def _round_summary(entry: dict[str, Any], record: _RunRecord) -> dict[str, Any]:
    """One round: its verdict and evidence, signals and ratios, budget, steps and sample generations."""
    from collapse_guard.history import scalars

    r = int(entry["round"])
    rd = record.run_dir / f"round_{r}"
    evaluation = read_json(rd / "eval.json", default={}) or {}
    train = read_json(rd / "train.json", default=None)
    selection = read_json(rd / "selection.json", default=None)
    generation = read_json(rd / "generation.json", default=None)
    metrics = {k: v for k, v in scalars(entry).items() if _is_signal(k, entry)}
    if train and _is_number(train.get("train_loss")) and "train_loss" not in metrics:
        metrics["train_loss"] = float(train["train_loss"])
    evidence = entry.get("evidence")
    if evidence is None:  # histories written before entries carried their evidence
        evidence = (read_json(rd / "verdict.json", default={}) or {}).get("evidence") or {}
    ratios, intervals = _ratios_and_intervals(metrics, record.base, evidence)
    generations = entry.get("generations") or evaluation.get("generations") or []
    return {
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
        "budget": _budget(record.config, generation, selection, train) if r > 0 else None,
        "guard_measurements": _guard_measurements(record, r, (train or {}).get("max_steps")),
        "samples": [str(g) for g in generations[:SAMPLES_PER_ROUND]],
    }


def _triggered(judged: list[dict[str, Any]], d, known: set[str]) -> dict[str, dict[str, Any]]:
    """Every signal that raised a verdict (in-training measurements included) and where it first did."""
    triggered: dict[str, dict[str, Any]] = {}
    for e in judged:
        names = [s for s, _ in flagged_evidence(e.get("evidence") or {})]
        if e.get("level") in ("warn", "alarm") and not names:  # a history without evidence: its reasons
            names = [s for s in (_reason_signal(reason, d, known) for reason in e.get("reasons") or []) if s]
        for signal in names:
            triggered.setdefault(signal, {"round": e["round"], "step": e.get("step"), "level": e["level"]})
    return triggered


def _human_reference(run_dir: Path) -> tuple[list[float], float | None]:
    """Round 0's human reference perplexities and their low-ppl cut (the percentile of the rule)."""
    import numpy as np

    evaluation = read_json(run_dir / "round_0" / "eval.json", default={}) or {}
    human = evaluation.get("human_reference_ppl") or evaluation.get("heldout_per_document") or []
    human = [p for p in human if _finite(p)]
    return human, float(np.percentile(human, LOW_PERCENTILE)) if human else None


def _budget_means(rounds: list[dict[str, Any]]) -> dict[str, float | None]:
    """The synthetic budget per round, averaged over the rounds that trained."""
    trained = [x["budget"] for x in rounds
               if x["budget"] and _is_number(x["budget"]["synthetic_tokens_trained"])]
    return {
        "synthetic_tokens_per_round": _mean([b["synthetic_tokens_trained"] for b in trained]),
        "tokens_per_round": _mean([b["synthetic_tokens_trained"] + b["real_tokens_trained"] for b in trained
                                   if _is_number(b["real_tokens_trained"])]),
        "synthetic_token_share": _mean([b["synthetic_token_share"] for b in trained]),
        "real_fraction": _mean([b["real_fraction"] for b in trained]),
    }


def summarize_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything a report shows about one run, from its artifacts (history, state, per-round files)."""
    from collapse_guard.history import scalars

    run_dir = Path(run_dir)
    history, finals = _judged_history(run_dir)
    state = read_json(run_dir / "run_state.json", default={}) or {}
    config = state.get("config") or {}
    d, detector_note = detector_of(config)
    name = config.get("name") or run_dir.name
    arm, seed = _arm_and_seed(run_dir, name)
    if seed is None and _is_number(config.get("seed")) and config.get("seeds"):
        seed = int(config["seed"])
    base = scalars(finals[0])
    judged = [e for e in history.entries if "level" in e]
    record = _RunRecord(run_dir, config, d, base, judged)
    rounds = [_round_summary(entry, record) for entry in finals]

    known = {k for x in rounds for k in x["metrics"]}
    human, low_cut = _human_reference(run_dir)
    corpora = sorted(k for k in known if k.startswith(f"{d.ppl_signal}@"))
    excluded = [s for s in (*MEASURED_SIGNALS, *corpora) if s in known and not signal_rule(s, d).in_rules]
    worst = max(rounds, key=lambda x: (LEVELS.index(x["level"]), -x["round"]))
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
        "triggered": _triggered(judged, d, known),
        "rounds": rounds,
        "level": worst["level"],
        "collapsed": any(x["level"] == "alarm" for x in rounds),
        "first_flag": first_flag and {"round": first_flag["round"], "level": first_flag["level"],
                                      "reasons": first_flag["reasons"]},
        "stopped": state.get("stopped"),
        "guard_stops": [{"round": x["round"], "step": x["steps"]["stopped_at"],
                         "max_steps": x["steps"]["max"]}
                        for x in rounds if x["steps"] and _is_number(x["steps"]["stopped_at"])],
        "finished": bool(state.get("finished")),
        "human_reference_ppl": human,
        "low_ppl_cut": low_cut,
        **_budget_means(rounds),
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


def _verdict_head(run: dict[str, Any], d) -> tuple[str, list[str]]:
    """The verdict itself ("replace: COLLAPSED at round 2") and its evidence: the flagged signals of the
    first round at the run's level, or the held-out ppl of the last round of a healthy run."""
    rounds = run["rounds"]
    last = rounds[-1]
    if run["level"] == "ok" and len(rounds) == 1:
        return f"{run['name']}: OK so far (only round 0, the starting model, is measured)", []
    if run["level"] == "ok":
        head = f"{run['name']}: OK over {len(rounds) - 1} round{'s' if len(rounds) != 2 else ''}"
        ppl = last["evidence"].get(d.ppl_signal)
        if isinstance(ppl, dict) and _finite(ppl.get("ratio")):
            return head, [f"{evidence_text(d.ppl_signal, ppl)} at round {last['round']}"]
        if _finite(last["ratios"].get(d.ppl_signal)):
            return head, [f"held-out ppl {_x(last['ratios'][d.ppl_signal])} at round {last['round']}"]
        return head, []
    flag = next(x for x in rounds if x["level"] == run["level"])
    head = f"{run['name']}: {LEVEL_WORDS[run['level']]} at round {flag['round']}"
    if flag["round"] == 0:
        head = f"{run['name']}: {run['level'].upper()} at round 0 (the starting model itself trips a rule)"
    flagged = flagged_evidence(flag["evidence"])
    if any(name == "diverged" for name, _ in flagged):  # the probe's words: "model diverged: ... (why)"
        return head, [r for r in flag["reasons"] if r.startswith("model diverged")] or list(flag["reasons"])
    return head, [_evidence_phrase(s, e, d) for s, e in flagged] if flagged else list(flag["reasons"])


def _sentence_parts(run: dict[str, Any]) -> tuple[str, list[str]]:
    head, parts = _verdict_head(run, _detector(run))
    budget = _budget_phrase(run["synthetic_tokens_per_round"], run["synthetic_token_share"])
    if budget:
        parts.append(budget)
    for stop in run["guard_stops"]:
        parts.append(f"the guard stopped training in round {stop['round']} at step {stop['step']} of "
                     f"{stop['max_steps']}")
    if run.get("stopped"):
        # the loop also ends a run whose model diverged, whatever end_run_on_alarm says
        why = ("the model diverged" if str(run["stopped"].get("reason", "")).startswith("model diverged")
               else "end_run_on_alarm")
        parts.append(f"the run ended after round {run['stopped'].get('round')} ({why})")
    if run["tiny"]:
        parts.append("offline tiny model: a random network, these numbers carry no meaning")
    return head, parts


def verdict_sentence(run: dict[str, Any]) -> str:
    """One line a newcomer understands: did this loop collapse, when, on what evidence, on how much data."""
    head, parts = _sentence_parts(run)
    return f"{head} — {'; '.join(parts)}." if parts else f"{head}."
