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
stopped round marked, every round judged warn or alarm ringed and named by the signals that raised it),
`diversity.png` (the diversity signals and every signal that raised a verdict; signals outside the rules
are drawn without warn/alarm lines) and `generated_ppl.png` (histograms of the perplexity of each round's
generated data under the round-0 model, as in Shumailov et al. 2024, Fig. 1, with the human
25th-percentile perplexity; the low-ppl share itself is measured on the fixed prompts' generations). The
HTML file embeds its images. `collapse-guard report` on a folder of arms writes the comparison the run
wrote: its title and its order of the arms (and so their colours) come from the folder's `variants.json`.

The package's parts, in the order a report is built: `common` (signal words, formatting), `rules` (the
detector's rules and a verdict's evidence in words), `summary` (one run folder read), `arms` (several runs
grouped and aggregated), `plot_data` and `plots` (what the plots draw, and drawing it), `document` (the
report as blocks) and `render` (Markdown and HTML).

Example:

```python
from collapse_guard.report import write_report
paths = write_report("runs/replace")   # {"json": ..., "markdown": ..., "html": ..., "plots": [...]}
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from collapse_guard.io import atomic_write_json, atomic_write_text, read_json
from collapse_guard.report.arms import (
    _aggregate_signals,
    aggregate_arm,
    arm_sentence,
    budget_check,
    group_arms,
)
from collapse_guard.report.common import (
    ABSOLUTE_SIGNALS,
    BUDGET_TOLERANCE,
    COLORS,
    COMPARED_SIGNALS,
    DIVERSITY_PANELS,
    HIGHER_IS_COLLAPSE,
    LABELS,
    LEVEL_WORDS,
    LEVELS,
    LOW_PERCENTILE,
    LOWER_IS_COLLAPSE,
    MEASURED_SIGNALS,
    SAMPLE_CHARS,
    SAMPLES_PER_ROUND,
    SCARCE_SELECTION,
    signal_label,
)
from collapse_guard.report.document import (
    build_document,
)
from collapse_guard.report.plot_data import (
    build_plot_specs,
)
from collapse_guard.report.plots import (
    log_ticks,
    plot_diversity,
    plot_generated_ppl,
    plot_ppl_ratio,
)
from collapse_guard.report.render import (
    render_html,
    render_markdown,
)
from collapse_guard.report.rules import (
    SignalRule,
    detector_of,
    evidence_text,
    flagged_evidence,
    judged_signals,
    rule_lines,
    signal_rule,
)
from collapse_guard.report.summary import (
    _missing,
    _no_round,
    summarize_run,
    verdict_sentence,
)

# What `run_recipe` writes next to the arms it compares: {"title", "arms": {arm: [run folders]}, "runs":
# [run folders, in the order compared], "seeds"}.
VARIANTS_FILE = "variants.json"

__all__ = [
    "ABSOLUTE_SIGNALS",
    "BUDGET_TOLERANCE",
    "COLORS",
    "COMPARED_SIGNALS",
    "DIVERSITY_PANELS",
    "HIGHER_IS_COLLAPSE",
    "LABELS",
    "LEVELS",
    "LEVEL_WORDS",
    "LOWER_IS_COLLAPSE",
    "LOW_PERCENTILE",
    "MEASURED_SIGNALS",
    "SAMPLES_PER_ROUND",
    "SAMPLE_CHARS",
    "SCARCE_SELECTION",
    "SignalRule",
    "VARIANTS_FILE",
    "aggregate_arm",
    "arm_sentence",
    "budget_check",
    "build_document",
    "build_plot_specs",
    "detector_of",
    "evidence_text",
    "find_runs",
    "flagged_evidence",
    "group_arms",
    "judged_signals",
    "log_ticks",
    "plot_diversity",
    "plot_generated_ppl",
    "plot_ppl_ratio",
    "render_html",
    "render_markdown",
    "report_path",
    "rule_lines",
    "signal_label",
    "signal_rule",
    "summarize_run",
    "verdict_sentence",
    "write_comparison",
    "write_report",
]


# ----- writing -----------------------------------------------------------------------------------------
def _write(out_dir: Path, runs: list[dict[str, Any]], title: str, stem: str,
           comparison: bool) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    arms = group_arms(runs) if comparison else [{"name": runs[0]["name"], "runs": runs}]
    # every arm aggregates the same signals, so that their tables have the same columns
    aggregates = [aggregate_arm(arm, _aggregate_signals(runs)) for arm in arms] if comparison else None
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
    """Run folders (holding a history) directly under `folder` or one level deeper (`<arm>/seed_<s>`), in
    the order the recipe ran them when the folder's `variants.json` says it (else sorted by name)."""
    from collapse_guard.history import FILENAME

    found = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (child / FILENAME).exists():
            found.append(child)
        else:
            found += sorted(g for g in child.iterdir() if g.is_dir() and (g / FILENAME).exists())
    listed = _recorded_runs(folder)

    def position(run: Path) -> int:
        # the recorded paths may be relative to another working directory, or the folder moved since:
        # a run is matched by its path inside `folder` (`<arm>` or `<arm>/seed_<s>`)
        parts = run.relative_to(folder).parts
        return next((k for k, p in enumerate(listed) if p.parts[-len(parts):] == parts), len(listed))

    return sorted(found, key=position)  # stable: runs the record does not list keep their sorted order


def _recorded_runs(folder: Path) -> list[Path]:
    """The run folders in the order `run_recipe` ran and compared them: `variants.json`'s `runs`; for
    folders written before it kept them, the order of the comparison already in the folder."""
    record = read_json(folder / VARIANTS_FILE, default=None)
    runs = record.get("runs") if isinstance(record, dict) else None
    if not isinstance(runs, list):
        previous = read_json(folder / "comparison.json", default=None)
        runs = [r.get("run_dir") for r in previous.get("runs") or [] if isinstance(r, dict)] \
            if isinstance(previous, dict) else []
    return [Path(d) for d in runs if isinstance(d, str)]


def _comparison_title(folder: Path) -> str:
    """The title the run gave its comparison (the recipe's name, kept in `variants.json`; folders written
    before it was kept there: the title of the comparison already in the folder), so that reporting a
    folder again reproduces what the run wrote."""
    for path in (folder / VARIANTS_FILE, folder / "comparison.json"):
        record = read_json(path, default=None)
        if isinstance(record, dict) and isinstance(record.get("title"), str) and record["title"]:
            return record["title"]
    return f"collapse-guard comparison: {folder.name}"


def report_path(run_dir: str | os.PathLike) -> dict[str, Any]:
    """`collapse-guard report DIR`: a run folder, or a folder of runs (variants, seeds) -> report or
    comparison. A folder `run_recipe` wrote is compared again as the run compared it: same title, same
    order of the arms (and so the same plot colours)."""
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
    return write_comparison(run_dir, children, title=_comparison_title(run_dir))
