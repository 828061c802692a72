"""Reports: JSON, PNG plots and a Markdown/HTML summary from a run folder's artifacts."""

import json

import pytest
import yaml

from collapse_guard.io import atomic_write_json
from collapse_guard.report import report_path, summarize_run, write_comparison, write_report


def _fake_run(folder, name, ppl, distinct, levels, reasons, mode="replace", floor=0.0):
    """A run folder as `run_rounds` leaves it: config, state, history and per-round eval files."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "name": name, "mixing": {"mode": mode, "min_real_fraction": floor},
        "selectors": [{"class": "collapse_guard.selection.DedupSelector"}] if floor else [],
    }))
    history = []
    for r, (p, d, level, why) in enumerate(zip(ppl, distinct, levels, reasons, strict=True)):
        metrics = {"round": r, "heldout_ppl": p, "distinct_2": d, "distinct_4": d, "unigram_entropy": 8 * d,
                   "tail_coverage": d / 2, "self_bleu4": 0.1 / d, "low_ppl_share": 0.25 / d}
        history.append({**metrics, "level": level, "reasons": why})
        atomic_write_json(folder / f"round_{r}" / "eval.json", {
            "metrics": metrics, "generations": [f"sample {r}"],
            "generated_ppl": [p / d * (1 + i / 10) for i in range(12)],
            "heldout_per_document": [p * (1 + i / 20) for i in range(12)],
        })
        if r:
            atomic_write_json(folder / f"round_{r}" / "selection.json", {"generated": 32, "selected": 20})
            atomic_write_json(folder / f"round_{r}" / "train.json", {"train_loss": 2.5 - r / 10})
    atomic_write_json(folder / "history.json", history)
    atomic_write_json(folder / "run_state.json", {"done": {}, "finished": True, "stopped": None})
    return folder


@pytest.fixture
def two_runs(tmp_path):
    collapsed = _fake_run(tmp_path / "demo" / "replace", "replace", [20.0, 22.0, 26.0], [0.8, 0.7, 0.55],
                          ["ok", "warn", "alarm"],
                          [[], ["held-out ppl rose 10% over round 0 (20.00 -> 22.00): warn at 5%"],
                           ["held-out ppl rose 30% over round 0 (20.00 -> 26.00): alarm at 20%",
                            "distinct_2 fell 31% below round 0 (0.800 -> 0.550): alarm at 25%"]])
    healthy = _fake_run(tmp_path / "demo" / "guarded", "guarded", [20.0, 19.5, 19.2], [0.8, 0.79, 0.81],
                        ["ok", "ok", "ok"], [[], [], []], floor=0.5)
    return collapsed, healthy


def test_single_run_report_says_what_collapsed_and_why(two_runs):
    collapsed, _ = two_runs
    paths = write_report(collapsed)
    markdown = (collapsed / "report.md").read_text()
    assert "replace: COLLAPSED" in markdown and "alarm at round 2" in markdown
    assert "held-out ppl rose 30%" in markdown and "| 2 | alarm | 26.00 | 1.300 |" in markdown
    data = json.loads((collapsed / "report.json").read_text())
    assert data["runs"][0]["collapsed"] is True and data["runs"][0]["rounds"][2]["ratios"]["heldout_ppl"] == 1.3
    html = (collapsed / "report.html").read_text()
    assert "<table>" in html and "COLLAPSED" in html and "ppl_ratio.png" in html
    assert paths["plots"] and all(p.endswith(".png") for p in paths["plots"])


def test_plots_are_real_pngs(two_runs):
    import matplotlib.image as mpimg

    collapsed, _ = two_runs
    for path in write_report(collapsed)["plots"]:
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
        assert image.std() > 0.05  # not a blank canvas


def test_comparison_of_two_runs(two_runs, tmp_path):
    collapsed, healthy = two_runs
    paths = write_comparison(tmp_path / "demo", [collapsed, healthy], title="demo")
    text = (tmp_path / "demo" / "comparison.md").read_text()
    assert "replace: COLLAPSED" in text and "guarded: OK" in text
    assert "mode `replace`, real floor 0.5, selectors: DedupSelector" in text
    assert paths["verdicts"][1].startswith("guarded: OK")
    # `collapse-guard report DIR` on the parent folder writes each run's report and the comparison
    again = report_path(tmp_path / "demo")
    assert again["markdown"].endswith("comparison.md") and (healthy / "report.md").exists()


def test_warning_summary_and_missing_history(tmp_path):
    run = _fake_run(tmp_path / "w", "w", [20.0, 21.5], [0.8, 0.8], ["ok", "warn"],
                    [[], ["held-out ppl rose 8% over round 0 (20.00 -> 21.50): warn at 5%"]])
    summary = summarize_run(run)
    assert summary["level"] == "warn" and not summary["collapsed"]
    assert "w: WARNING" in write_report(run)["verdicts"][0]
    with pytest.raises(FileNotFoundError, match="history.json"):
        summarize_run(tmp_path / "empty")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no run"):
        report_path(tmp_path / "nothing")
