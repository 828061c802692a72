"""Several runs: grouped into arms (variants), aggregated over seeds, and their budgets compared."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from collapse_guard.report.common import (
    _SEED_FOLDER,
    BUDGET_TOLERANCE,
    COMPARED_SIGNALS,
    _count,
    _digits,
    _finite,
    _is_number,
    _mean,
    _spread,
    _x,
)
from collapse_guard.report.rules import (
    _detector,
    _evidence_phrase,
    flagged_evidence,
    signal_rule,
)
from collapse_guard.report.summary import (
    _budget_phrase,
    verdict_sentence,
)


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
            kind = signal_rule(signal, d).kind
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
