"""The report as one list of blocks (headings, paragraphs, tables, samples, images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from collapse_guard.report.arms import (
    _spread_text,
    arm_sentence,
    budget_check,
)
from collapse_guard.report.common import (
    DIVERSITY_PANELS,
    _count,
    _finite,
    _fmt,
    _share,
    _x,
    signal_label,
)
from collapse_guard.report.rules import (
    _detector,
    _evidence_phrase,
    evidence_text,
    flagged_evidence,
    signal_rule,
)
from collapse_guard.report.summary import (
    _sentence_parts,
)


# ----- documents: one block list, rendered as Markdown and as HTML ------------------------------------
def _rounds_table(run: dict[str, Any]) -> list[list[str]]:
    d = _detector(run)
    rows = [["round", "verdict", "evidence (flagged signals)", "held-out ppl",
             "ratio to round 0 [interval, n]", "optimizer steps", "train loss"]]
    # a self-training run's task score, beside what it may cost (only runs that measured it get the column)
    task = any(_finite(x["metrics"].get(d.task_signal)) for x in run["rounds"])
    if task:
        rows[0].append("task accuracy [95% interval]")
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
        if task:
            m = x["metrics"]
            accuracy, low, high = (m.get(d.task_signal), m.get(f"{d.task_signal}_low"),
                                   m.get(f"{d.task_signal}_high"))
            rows[-1].append("-" if not _finite(accuracy) else f"{_share(accuracy)}" + (
                f" [{_share(low)}, {_share(high)}]" if _finite(low) and _finite(high) else ""))
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


def table_signals(runs: list[dict[str, Any]]) -> list[str]:
    """The columns of the per-run signal tables: the signals that raised a verdict in any of `runs`, the
    diversity panels and the extra held-out corpora. One list for every run of a document, so that arms
    read side by side (a signal one arm never measured shows "-")."""
    d = _detector(runs[0])
    present = {k for run in runs for x in run["rounds"] for k in x["metrics"]}
    triggered = [s for run in runs for s in run["triggered"] if s in present and s != d.ppl_signal]
    corpora = sorted(k for k in present if k.startswith(f"{d.ppl_signal}@"))
    return [s for s in dict.fromkeys([*triggered, *DIVERSITY_PANELS, *corpora]) if s in present]


def _signals_table(run: dict[str, Any], names: list[str]) -> list[list[str]]:
    d = _detector(run)
    header = ["round"]
    for s in names:
        rule = signal_rule(s, d)
        label = signal_label(s) + ("" if rule.kind == "absolute" else " ratio")
        header.append(label + ("" if rule.in_rules else " (not in the rules)"))
    rows = [header]
    for x in run["rounds"]:
        row = [str(x["round"])]
        for s in names:
            rule = signal_rule(s, d)
            if rule.kind == "absolute":
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


def _run_blocks(run: dict[str, Any], heading: str, signals: list[str]) -> list[tuple]:
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
    blocks += [("h3", "Signals relative to round 0"), ("table", _signals_table(run, signals))]
    samples = [(f"round {x['round']}", s) for x in run["rounds"] for s in x["samples"]]
    if samples:
        blocks += [("h3", "Sample generations (fixed prompts)"), ("samples", samples)]
    return blocks


def _arm_table(agg: dict[str, Any], d) -> list[list[str]]:
    signals = list(agg["rounds"][0]["signals"]) if agg["rounds"] else []  # what `aggregate_arm` was given
    header = ["round"]
    for s in signals:
        rule = signal_rule(s, d)
        header.append(f"{signal_label(s)}{'' if rule.kind == 'absolute' else ' ratio'} mean [min, max]"
                      + ("" if rule.in_rules else " (not in the rules)"))
    header += ["synthetic tokens trained (mean)", "real fraction (mean)", "kept of wanted (mean)",
               "seeds flagged warn/alarm"]
    rows = [header]
    for row in agg["rounds"]:
        cells = [str(row["round"])]
        for s in signals:
            cells.append(_spread_text(row["signals"][s], signal_rule(s, d).kind))
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
    signals = table_signals(runs)
    for arm, agg in zip(arms, aggregates, strict=True):
        if agg is None or len(arm["runs"]) == 1:
            for run in arm["runs"]:
                heading = run["name"] if len(arms) == 1 or arm["name"] == run["name"] else \
                    f"{arm['name']} ({run['name']})"
                blocks += _run_blocks(run, heading, signals)
            continue
        d = _detector(arm["runs"][0])
        seeds = ", ".join(str(s) for s in agg["seeds"])
        blocks += [("h2", f"{arm['name']} ({agg['n_seeds']} seeds: {seeds})"),
                   ("p", f"Setup (seed {arm['runs'][0]['seed']}): {arm['runs'][0]['setup']}.")]
        notes = list(dict.fromkeys(f"seed {run['seed']}: {note}" if "tiny model" not in note else note
                                   for run in arm["runs"] for note in run["notes"]))
        if notes:
            blocks.append(("ul", notes))
        blocks += [("h3", "Per round, over seeds (mean [min, max])"), ("table", _arm_table(agg, d)),
                   ("h3", "Per seed"), ("table", _seed_table(arm["runs"])),
                   ("p", "Each seed's folder holds its own report (report.md / report.html) with every "
                         "round's evidence and budget.")]
    blocks += [("h2", "Plots")] + [("img", p) for p in plots]
    return blocks
