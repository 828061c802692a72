"""Drawing the plot data with matplotlib (Agg): `ppl_ratio.png`, `diversity.png`, `generated_ppl.png`."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from collapse_guard.report.common import (
    COLORS,
    LOW_PERCENTILE,
    _finite,
)


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


def _draw_verdict_marks(ax, marks: list[dict[str, Any]], top: float) -> None:
    """A ring in the level's colour around each round judged warn or alarm, named by the signals that
    raised it: an arm that alarmed on self-BLEU while its perplexity stayed flat is visible here too."""
    labelled = set()
    for k, mark in enumerate(marks):
        y = mark["y"] if _finite(mark["y"]) else top
        level = mark["level"]
        ax.scatter([mark["round"]], [y], s=170, facecolors="none", edgecolors=COLORS[level], linewidths=1.8,
                   zorder=5, label=None if level in labelled else f"round judged {level} (named below it)")
        labelled.add(level)
        ax.annotate(mark["text"], (mark["round"], y), textcoords="offset points", xytext=(-8, -14 - 10 * k),
                    fontsize=7, ha="right", color=COLORS[level])


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
    _draw_verdict_marks(ax, spec.get("verdicts") or [], top)
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


def _line_label(ax, y: float, text: str, color: str) -> None:
    """A rule line's label written on the line at the panel's right edge: a panel legend would sit on the
    arms' lines, which it did."""
    ax.annotate(text, xy=(1.0, y), xycoords=("axes fraction", "data"), xytext=(-2, 1),
                textcoords="offset points", ha="right", va="bottom", fontsize=6, color=color)


def plot_diversity(spec: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    from matplotlib.lines import Line2D

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # one colour per arm across every panel (and the figure's one legend), in the report's arm order
    arms = list(dict.fromkeys(s["arm"] for panel in spec for s in panel["series"]))
    color = {arm: colors[k % len(colors)] for k, arm in enumerate(arms)}
    cols = 3
    rows = max(1, math.ceil(len(spec) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, spec, strict=False):
        for s in panel["series"]:
            _draw_series(ax, s, color[s["arm"]])
        for line in panel["lines"]:
            line_color = "#e0a800" if line["level"] == "warn" else "#d9534f"
            ax.axhline(line["y"], color=line_color, linestyle="--", linewidth=1)
            _line_label(ax, line["y"], line["label"], line_color)
        if panel["reference"] is not None:
            ax.axhline(panel["reference"], color="gray", linestyle=":", linewidth=0.8)
            _line_label(ax, panel["reference"], "human", "gray")
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
    for ax in list(axes.flat)[len(spec):]:
        ax.axis("off")
    labels = {}
    for s in (s for panel in spec for s in panel["series"]):
        labels.setdefault(s["arm"], s["label"])
    if labels:  # below the panels, so that it covers none of them
        handles = [Line2D([], [], color=color[arm], marker="o", linewidth=2) for arm in labels]
        fig.legend(handles, list(labels.values()), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(len(labels), 4), fontsize=8, frameon=False)
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
            # the low-ppl share is measured on the fixed prompts' generations, not on this data: the label
            # says so, lest a reader take the share of this histogram left of the line for it
            ax.axvline(h["low_cut"], color="black", linestyle="--", linewidth=1,
                       label=f"human {LOW_PERCENTILE:g}th pct ({h['low_cut']:.3g}); the low-ppl share is\n"
                             "measured on the fixed prompts' generations, not this data")
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
