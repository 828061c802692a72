"""Run reports: JSON, PNG plots (matplotlib Agg) and a Markdown + HTML summary a person reads in a minute.

`write_report(run_dir)` reports one run of `collapse-guard run`; `write_comparison(out_dir, run_dirs)`
puts several side by side (the demo compares a replace loop with a guarded one). Plots:

- `ppl_ratio.png`: held-out human perplexity / round 0, per round, with the warn and alarm bands;
- `diversity.png`: diversity signals per round relative to round 0 (and the low-perplexity share);
- `generated_ppl.png`: histograms of the perplexity of each round's generations scored by the round-0
  model, as in Shumailov et al. (2024, Fig. 1): collapse narrows and shifts them toward low perplexity.

Example:

```python
from collapse_guard.report import write_report
paths = write_report("runs/replace")   # {"json": ..., "markdown": ..., "html": ..., "plots": [...]}
```
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any

from collapse_guard.io import atomic_write_json, atomic_write_text, read_json

LEVELS = ("ok", "warn", "alarm")
DIVERSITY_PANELS = ("distinct_2", "distinct_4", "unigram_entropy", "tail_coverage", "self_bleu4", "low_ppl_share")
# Signals whose absolute value (not their ratio to round 0) is what the detector compares.
ABSOLUTE_SIGNALS = ("low_ppl_share",)


def _thresholds(config: dict[str, Any]) -> dict[str, float]:
    from collapse_guard.detector import DetectorConfig

    d = DetectorConfig(**((config or {}).get("detector") or {}))
    return {"ppl_warn": d.ppl_ratio_warn, "ppl_alarm": d.ppl_ratio_alarm, "div_warn": d.diversity_ratio_warn,
            "div_alarm": d.diversity_ratio_alarm, "bleu_warn": d.self_bleu_ratio_warn,
            "bleu_alarm": d.self_bleu_ratio_alarm, "low_warn": d.low_ppl_share_warn,
            "low_alarm": d.low_ppl_share_alarm}


def _ratio(value: Any, base: Any) -> float | None:
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)) or not base:
        return None
    return float(value) / float(base)


def summarize_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything a report shows about one run, from its artifacts (history, state, per-round files)."""
    from collapse_guard.history import FILENAME, History, scalars

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a folder: give the output_dir of a `collapse-guard run`.")
    history = [e for e in History.load(run_dir / FILENAME).finals() if "level" in e]
    if not history:
        raise FileNotFoundError(f"{str(run_dir)!r} holds no finished round ({FILENAME} has no judged round): give the "
                                "output_dir of a `collapse-guard run` that finished at least round 0.")
    history = [{"round": e["round"], "level": e["level"], "reasons": e["reasons"], **scalars(e)} for e in history]
    state = read_json(run_dir / "run_state.json", default={}) or {}
    config = state.get("config") or {}
    base = history[0]
    rounds = []
    for entry in history:
        r = int(entry.get("round", len(rounds)))
        round_dir = run_dir / f"round_{r}"
        evaluation = read_json(round_dir / "eval.json", default={}) or {}
        rounds.append({
            "round": r,
            "level": entry.get("level", "ok"),
            "reasons": entry.get("reasons", []),
            "metrics": {k: v for k, v in entry.items() if k not in ("round", "level", "reasons")},
            "ratios": {k: _ratio(v, base.get(k)) for k, v in entry.items()
                       if k not in ("round", "level", "reasons") and _ratio(v, base.get(k)) is not None},
            "generated_ppl": evaluation.get("generated_ppl", []),
            "selection": read_json(round_dir / "selection.json", default=None),
            "train": read_json(round_dir / "train.json", default=None),
            "sample": (evaluation.get("generations") or [""])[0],
        })
    worst = max(rounds, key=lambda x: (LEVELS.index(x["level"]), -x["round"]))
    first_alarm = next((x for x in rounds if x["level"] == "alarm"), None)
    first_flag = next((x for x in rounds if x["level"] != "ok"), None)
    return {
        "name": config.get("name", run_dir.name),
        "run_dir": str(run_dir),
        "mode": (config.get("mixing") or {}).get("mode"),
        "min_real_fraction": (config.get("mixing") or {}).get("min_real_fraction"),
        "selectors": [s.get("class", "?").rsplit(".", 1)[-1] for s in config.get("selectors") or []],
        "rounds": rounds,
        "level": worst["level"],
        "collapsed": first_alarm is not None,
        "first_flag": first_flag and {"round": first_flag["round"], "level": first_flag["level"],
                                      "reasons": first_flag["reasons"]},
        "stopped": state.get("stopped"),
        "finished": bool(state.get("finished")),
        "thresholds": _thresholds(config),
        "heldout_per_document": (read_json(run_dir / "round_0" / "eval.json", default={}) or {}).get(
            "heldout_per_document", []),
    }


# ----- plots -----------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_ppl_ratio(runs: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    t = runs[0]["thresholds"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    top = max([t["ppl_alarm"] + 0.1] + [x["ratios"].get("heldout_ppl", 1.0) * 1.05 for run in runs
                                         for x in run["rounds"]])
    bottom = min([0.95] + [x["ratios"].get("heldout_ppl", 1.0) * 0.98 for run in runs for x in run["rounds"]])
    ax.axhspan(t["ppl_warn"], t["ppl_alarm"], color="#f6d365", alpha=0.35, label=f"warn (>= {t['ppl_warn']:.2f})")
    ax.axhspan(t["ppl_alarm"], top, color="#f08080", alpha=0.35, label=f"alarm (>= {t['ppl_alarm']:.2f})")
    for run in runs:
        xs = [x["round"] for x in run["rounds"]]
        ys = [x["ratios"].get("heldout_ppl", math.nan) for x in run["rounds"]]
        ax.plot(xs, ys, marker="o", linewidth=2, label=f"{run['name']} ({run['level']})")
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_ylim(bottom, top)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out human perplexity / round 0")
    ax.set_title("Held-out perplexity ratio")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="upper left")
    _save(fig, path)
    plt.close(fig)
    return path


def plot_diversity(runs: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    t = runs[0]["thresholds"]
    panels = [p for p in DIVERSITY_PANELS if any(p in x["metrics"] for run in runs for x in run["rounds"])]
    cols = 3
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels, strict=False):
        absolute = name in ABSOLUTE_SIGNALS
        for run in runs:
            xs = [x["round"] for x in run["rounds"]]
            ys = [x["metrics"].get(name, math.nan) if absolute else x["ratios"].get(name, math.nan)
                  for x in run["rounds"]]
            ax.plot(xs, ys, marker="o", label=run["name"])
        if absolute:
            warn, alarm, above = t["low_warn"], t["low_alarm"], True
            ax.axhline(0.25, color="gray", linestyle=":", linewidth=0.8)
        elif name == "self_bleu4":
            warn, alarm, above = t["bleu_warn"], t["bleu_alarm"], True
        else:
            warn, alarm, above = t["div_warn"], t["div_alarm"], False
        ax.axhline(warn, color="#e0a800", linestyle="--", linewidth=1)
        ax.axhline(alarm, color="#d9534f", linestyle="--", linewidth=1)
        ax.set_title(f"{name}{'' if absolute else ' / round 0'} ({'higher' if above else 'lower'} = collapse)",
                     fontsize=9)
        ax.set_xlabel("round", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Diversity of generations on a fixed prompt set (dashed: warn / alarm)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_generated_ppl(runs: list[dict[str, Any]], path: Path) -> Path:
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 1, figsize=(6.4, 3.0 * len(runs)), squeeze=False)
    values = [p for run in runs for x in run["rounds"] for p in x["generated_ppl"] if p and math.isfinite(p)]
    values += [p for run in runs for p in run["heldout_per_document"] if p and math.isfinite(p)]
    if values:
        bins = np.logspace(np.log10(max(min(values), 1e-3)), np.log10(max(values)), 30)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        cmap = plt.get_cmap("viridis")
        n = max(len(run["rounds"]) - 1, 1)
        if values and run["heldout_per_document"]:
            ax.hist([p for p in run["heldout_per_document"] if math.isfinite(p)], bins=bins, density=True,
                    histtype="stepfilled", color="lightgray", alpha=0.6, label="human held-out")
        for x in run["rounds"]:
            scores = [p for p in x["generated_ppl"] if p and math.isfinite(p)]
            if scores:
                ax.hist(scores, bins=bins, density=True, histtype="step", linewidth=1.8,
                        color=cmap(x["round"] / n), label=f"round {x['round']}")
        ax.set_xscale("log")
        ax.set_title(f"{run['name']}: perplexity of generations under the round-0 model", fontsize=9)
        ax.set_xlabel("perplexity (log scale)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


# ----- text ------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def verdict_sentence(run: dict[str, Any]) -> str:
    """One line: did this loop collapse, and why."""
    last = run["rounds"][-1]
    ratio = last["ratios"].get("heldout_ppl")
    if run["collapsed"]:
        flag = next(x for x in run["rounds"] if x["level"] == "alarm")
        stop = f"; the run stopped after round {run['stopped']['round']}" if run.get("stopped") else ""
        return (f"**{run['name']}: COLLAPSED** (alarm at round {flag['round']}{stop}): "
                + "; ".join(flag["reasons"]) + ".")
    if run["level"] == "warn":
        flag = run["first_flag"]
        return (f"**{run['name']}: WARNING** (from round {flag['round']}): " + "; ".join(flag["reasons"])
                + f". Held-out ppl ratio at round {last['round']}: {_fmt(ratio)}.")
    return (f"**{run['name']}: OK**: no collapse signal over {len(run['rounds']) - 1} rounds; held-out ppl ratio "
            f"at round {last['round']}: {_fmt(ratio)}.")


def _round_table(run: dict[str, Any]) -> list[list[str]]:
    rows = [["round", "verdict", "held-out ppl", "ratio", "distinct-2 ratio", "entropy ratio",
             "tail cov. ratio", "self-BLEU-4 ratio", "low-ppl share", "train loss", "kept/generated"]]
    for x in run["rounds"]:
        m, q = x["metrics"], x["ratios"]
        sel = x["selection"] or {}
        kept = f"{sel.get('selected', '-')}/{sel.get('generated', '-')}" if sel else "-"
        rows.append([str(x["round"]), x["level"], _fmt(m.get("heldout_ppl"), 2), _fmt(q.get("heldout_ppl")),
                     _fmt(q.get("distinct_2")), _fmt(q.get("unigram_entropy")), _fmt(q.get("tail_coverage")),
                     _fmt(q.get("self_bleu4")), _fmt(m.get("low_ppl_share"), 2), _fmt(m.get("train_loss")), kept])
    return rows


def _md_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _setup_line(run: dict[str, Any]) -> str:
    selectors = ", ".join(run["selectors"]) or "none"
    line = f"mode `{run['mode']}`, real floor {run['min_real_fraction']}, selectors: {selectors}"
    dropped: dict[str, int] = {}
    for x in run["rounds"]:
        for step in (x["selection"] or {}).get("steps", []):
            for reason, n in (step.get("reasons") or {}).items():
                dropped[reason] = dropped.get(reason, 0) + int(n)
    if dropped:
        line += "; selection dropped " + ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items()))
    return line


def render_markdown(runs: list[dict[str, Any]], title: str, plots: list[str]) -> str:
    out = [f"# {title}", ""]
    out += [f"- {verdict_sentence(run)}" for run in runs]
    out += ["", "Rules: held-out ppl ratio warn >= {ppl_warn:.2f}, alarm >= {ppl_alarm:.2f}; diversity ratios warn "
            "< {div_warn:.2f}, alarm < {div_alarm:.2f}; self-BLEU-4 ratio warn > {bleu_warn:.2f}, alarm > "
            "{bleu_alarm:.2f}; low-ppl share warn > {low_warn:.2f}, alarm > {low_alarm:.2f} (human: 0.25)."
            .format(**runs[0]["thresholds"]), ""]
    for run in runs:
        out += [f"## {run['name']}", "", _setup_line(run), "", _md_table(_round_table(run)), ""]
        sample = run["rounds"][-1]["sample"]
        if sample:
            out += [f"Last round's first generation: _{sample.strip()[:300]}_", ""]
    out += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(out)


def _md_inline_to_html(text: str) -> str:
    escaped = html.escape(text)
    parts = escaped.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def render_html(runs: list[dict[str, Any]], title: str, plots: list[str]) -> str:
    colors = {"ok": "#2e7d32", "warn": "#b26a00", "alarm": "#c62828"}
    body = [f"<h1>{html.escape(title)}</h1>", "<ul>"]
    for run in runs:
        body.append(f"<li style='color:{colors[run['level']]}'>{_md_inline_to_html(verdict_sentence(run))}</li>")
    body.append("</ul>")
    for run in runs:
        rows = _round_table(run)
        body.append(f"<h2>{html.escape(run['name'])}</h2><p>{html.escape(_setup_line(run))}</p><table>")
        body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>")
        for row in rows[1:]:
            style = f" style='color:{colors.get(row[1], '#000')}'"
            body.append(f"<tr{style}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        body.append("</table>")
    body += [f"<p><img src='{html.escape(Path(p).name)}' style='max-width:100%'></p>" for p in plots]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _write(out_dir: Path, runs: list[dict[str, Any]], title: str, stem: str) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [str(plot_ppl_ratio(runs, out_dir / "ppl_ratio.png")),
             str(plot_diversity(runs, out_dir / "diversity.png")),
             str(plot_generated_ppl(runs, out_dir / "generated_ppl.png"))]
    summary = {"title": title, "runs": runs, "verdicts": [verdict_sentence(run).replace("**", "") for run in runs]}
    atomic_write_json(out_dir / f"{stem}.json", summary)
    atomic_write_text(out_dir / f"{stem}.md", render_markdown(runs, title, plots))
    atomic_write_text(out_dir / f"{stem}.html", render_html(runs, title, plots))
    return {"json": str(out_dir / f"{stem}.json"), "markdown": str(out_dir / f"{stem}.md"),
            "html": str(out_dir / f"{stem}.html"), "plots": plots, "verdicts": summary["verdicts"]}


def write_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Writes report.json / report.md / report.html and the plots into `run_dir`; returns their paths."""
    run = summarize_run(run_dir)
    return _write(Path(run_dir), [run], f"collapse-guard report: {run['name']}", "report")


def write_comparison(out_dir: str | os.PathLike, run_dirs: list[str | os.PathLike],
                     title: str = "collapse-guard comparison") -> dict[str, Any]:
    """Several runs in one report (comparison.json / .md / .html + plots in `out_dir`)."""
    runs = [summarize_run(d) for d in run_dirs]
    return _write(Path(out_dir), runs, title, "comparison")


def report_path(run_dir: str | os.PathLike) -> dict[str, Any]:
    """`collapse-guard report DIR`: a run folder, or a folder of runs (the demo's) -> report/comparison."""
    run_dir = Path(run_dir)
    if (run_dir / "history.json").exists():
        return write_report(run_dir)
    children = sorted(p for p in run_dir.iterdir() if (p / "history.json").exists()) if run_dir.is_dir() else []
    if not children:
        raise FileNotFoundError(f"{run_dir} holds no run (no history.json in it or in its subfolders).")
    for child in children:
        write_report(child)
    return write_comparison(run_dir, children, title=f"collapse-guard comparison: {run_dir.name}")
