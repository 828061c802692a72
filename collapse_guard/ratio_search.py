"""Ratio search: the smallest real-data share that keeps held-out perplexity within a tolerance.

Runs the recipe's loop (its rounds, its settings) once per real share on a grid and per seed, then
bisects between the largest failing and the smallest passing share. A share passes a seed when the
held-out perplexity ratio stays <= `tolerance` at every round; the answer is the smallest share that
passes every seed (the conservative reading), reported with the share at which the mean over seeds
passes and each share's spread. Every run is an ordinary, resumable run folder
(`output_dir/f_<share>/seed_<s>`), so an interrupted search continues where it stopped.

Example (the search logic on a known response: held-out ppl ratio 1 + 0.3 (0.4 - f) above f = 0.4):

```python
>>> from collapse_guard.ratio_search import search
>>> result = search(lambda f, seed: [1.0 + max(0.0, 0.3 * (0.4 - f))] * 3, [0.1, 0.25, 0.5, 0.75],
...                 tolerance=1.02, seeds=[0], refine=3)
>>> round(result["answer"], 3)
0.344

```
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from collapse_guard.io import atomic_write_json, atomic_write_text

DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 0.75)
logger = logging.getLogger("collapse_guard.ratio_search")


def search(evaluate: Callable[[float, int], Sequence[float]], fractions: Sequence[float],
           tolerance: float = 1.05, seeds: Sequence[int] = (0,), refine: int = 2,
           progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Grid, then `refine` bisection steps. `evaluate(fraction, seed)` -> held-out ppl ratio per round.

    `progress` (default: the `collapse_guard.ratio_search` logger) gets one line before every trial: trial k
    of (at most) n, the share, the seed, the time left at the mean trial time so far, and the bracket.
    """
    if not fractions or any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"fractions must be shares in [0, 1], got {list(fractions)}.")
    if not tolerance >= 1.0:
        raise ValueError(f"tolerance is the largest held-out ppl ratio that passes (>= 1), got {tolerance}.")
    trials: dict[float, dict[int, list[float]]] = {}
    grid = sorted(set(round(x, 4) for x in fractions))
    say = progress or logger.info
    done: list[float] = []  # seconds per finished trial
    refine_left = refine

    def run(f: float, phase: str) -> None:
        trials[f] = {}
        for s in seeds:
            k = len(done) + 1
            # every grid share, the bisections run so far and those still possible, each once per seed
            shares = len(trials) + (len(grid) - len(trials) if phase == "grid" else 0) + refine_left
            total = shares * len(seeds)
            left = (f"~{_duration(sum(done) / len(done) * (total - k + 1))} left" if done
                    else "time left known after the first trial")
            say(f"ratio-search: trial {k} of {'up to ' if refine_left else ''}{total} ({phase}): real share "
                f"{f:g}, seed {s}; {_bracket(trials, tolerance, len(seeds))}; {left}")
            start = time.perf_counter()
            trials[f][s] = [float(x) for x in evaluate(f, s)]
            done.append(time.perf_counter() - start)

    for f in grid:
        run(f, "grid")
    for _ in range(refine):
        fail = [f for f in trials if not _passes_all(trials[f], tolerance)]
        ok = [f for f in trials if _passes_all(trials[f], tolerance)]
        low = max((f for f in fail if not ok or f < min(ok)), default=None)
        high = min(ok, default=None)
        if low is None or high is None or high - low < 0.02:
            break
        refine_left -= 1
        run(round((low + high) / 2, 4), "bisection")
    rows = []
    for f in sorted(trials):
        worst = [max(r) for r in trials[f].values()]
        rows.append({"fraction": f, "worst_ratio_per_seed": worst, "mean_worst": sum(worst) / len(worst),
                     "min_worst": min(worst), "max_worst": max(worst),
                     "passes_all": _passes_all(trials[f], tolerance),
                     "per_round_mean": [sum(v) / len(v) for v in zip(*trials[f].values(), strict=True)]})
    answer = next((r["fraction"] for r in rows if r["passes_all"]), None)
    mean_answer = next((r["fraction"] for r in rows if r["mean_worst"] <= tolerance), None)
    return {"tolerance": tolerance, "seeds": list(seeds), "rows": rows, "answer": answer,
            "mean_answer": mean_answer, "trials": {str(f): v for f, v in trials.items()}}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _bracket(trials: dict[float, dict[int, list[float]]], tolerance: float, n_seeds: int) -> str:
    """Where the answer lies so far, from the shares whose every seed has finished."""
    finished = {f: v for f, v in trials.items() if len(v) == n_seeds}
    ok = [f for f, v in finished.items() if _passes_all(v, tolerance)]
    fail = [f for f, v in finished.items() if not _passes_all(v, tolerance)]
    high = min(ok, default=None)
    low = max((f for f in fail if high is None or f < high), default=None)
    if low is None and high is None:
        return "bracket: none yet"
    if high is None:
        return f"bracket: above {low:g} (every share so far fails)"
    if low is None:
        return f"bracket: at most {high:g} (every share so far passes)"
    return f"bracket: ({low:g}, {high:g}]"


def _passes_all(per_seed: dict[int, list[float]], tolerance: float) -> bool:
    return all(all(x <= tolerance for x in ratios if math.isfinite(x))
               and all(math.isfinite(x) for x in ratios)
               for ratios in per_seed.values())


def ratio_search(config, fractions: Sequence[float] | None = None, tolerance: float = 1.05, refine: int = 2,
                 restart: bool = False) -> dict[str, Any]:
    """Runs the search on a recipe (`LoopConfig`); writes ratio_search.json / .md / .png to its output_dir."""
    import copy

    from collapse_guard.config import config_from_dict, to_dict
    from collapse_guard.loop import run_rounds

    if config.variants:
        raise ValueError("ratio-search varies mixing.min_real_fraction itself: "
                         "give a recipe without variants.")
    out = Path(config.output_dir)
    seeds = list(config.seeds) or [config.seed]
    base = to_dict(config)
    base.pop("variants")

    def evaluate(fraction: float, seed: int) -> list[float]:
        data = copy.deepcopy(base)
        data.update(seed=seed, seeds=[], output_dir=str(out / f"f_{fraction:g}" / f"seed_{seed}"),
                    end_run_on_alarm=False)
        data["mixing"] = {**base["mixing"], "min_real_fraction": fraction, "allow_low_real_fraction": True}
        summary = run_rounds(config_from_dict(data), restart=restart)
        finals = summary["history"]
        base_ppl = finals[0]["heldout_ppl"]
        return [e["heldout_ppl"] / base_ppl for e in finals[1:]]

    result = search(evaluate, fractions or DEFAULT_FRACTIONS, tolerance, seeds, refine)
    result["recipe"] = config.name
    result["answer_text"] = _answer_text(result)
    atomic_write_json(out / "ratio_search.json", result)
    result["plot"] = str(_plot(result, out / "ratio_search.png"))
    atomic_write_text(out / "ratio_search.md", _markdown(result))
    result["markdown"] = str(out / "ratio_search.md")
    return result


def _answer_text(result: dict[str, Any]) -> str:
    t = result["tolerance"]
    if result["answer"] is None:
        return (f"no real share tried keeps held-out perplexity within x{t:g} at every round; "
                "try larger shares.")
    text = (f"smallest real share keeping held-out ppl within x{t:g} at every round, for every seed "
            f"({len(result['seeds'])}): {result['answer']:g}")
    if result["mean_answer"] is not None and result["mean_answer"] != result["answer"]:
        text += f" (on the mean over seeds: {result['mean_answer']:g})"
    return text + "."


def _markdown(result: dict[str, Any]) -> str:
    lines = [f"# Ratio search: {result['recipe']}", "", result["answer_text"], "",
             "| real share | worst ppl ratio, mean [min, max] over seeds | passes every seed "
             "| mean ratio per round |",
             "|---|---|---|---|"]
    for r in result["rows"]:
        per_round = ", ".join(f"{x:.3f}" for x in r["per_round_mean"])
        lines.append(f"| {r['fraction']:g} | {r['mean_worst']:.3f} [{r['min_worst']:.3f}, "
                     f"{r['max_worst']:.3f}] | {'yes' if r['passes_all'] else 'no'} | {per_round} |")
    lines += ["", f"![ratio search]({Path(result['plot']).name})", ""]
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = result["rows"]
    n_rounds = len(rows[0]["per_round_mean"]) if rows else 0
    xs = [r["fraction"] for r in rows]
    for k in range(n_rounds):
        ax.plot(xs, [r["per_round_mean"][k] for r in rows], marker="o", label=f"round {k + 1} (mean)")
    ax.fill_between(xs, [r["min_worst"] for r in rows], [r["max_worst"] for r in rows], alpha=0.2,
                    label="worst round, min-max over seeds")
    ax.axhline(result["tolerance"], color="red", linestyle="--", label=f"tolerance x{result['tolerance']:g}")
    if result["answer"] is not None:
        ax.axvline(result["answer"], color="green", linestyle=":", label=f"answer {result['answer']:g}")
    ax.set_xlabel("real share (mixing.min_real_fraction)")
    ax.set_ylabel("held-out ppl / round 0")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
