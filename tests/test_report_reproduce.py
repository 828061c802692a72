"""`collapse-guard report` on a run folder writes what the run wrote (issue 25 §4); the verdict line names
the reasons that set the level (§6); the plots and tables of a comparison read side by side (§8)."""

import json
from pathlib import Path

import pytest
from test_report import _ev, _metrics, _ppl_ev, make_run

from collapse_guard.cli import main
from collapse_guard.config import load_config
from collapse_guard.detector import CollapseDetector
from collapse_guard.io import atomic_write_json, read_json
from collapse_guard.loop import run_recipe, verdict_line
from collapse_guard.report import write_comparison

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_loop.yaml"
OUTPUTS = ("comparison.json", "comparison.md", "comparison.html", "ppl_ratio.png", "diversity.png",
           "generated_ppl.png")


def _outputs(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in OUTPUTS}


@pytest.fixture(scope="module")
def recipe_arms(tmp_path_factory):
    """Two arms of one tiny recipe, run in the order zeta, alpha (not the folders' sorted order)."""
    out = tmp_path_factory.mktemp("arms") / "runs"
    config = load_config(RECIPE, [f"output_dir={out}", "rounds=1", "name=my comparison",
                                  "variants={zeta: {mixing.min_real_fraction: 0.5}, "
                                  "alpha: {mixing.min_real_fraction: 1.0}}"])
    run_recipe(config)
    return out, _outputs(out)  # the folder, and what the run wrote


def test_report_on_a_recipe_folder_rewrites_the_runs_comparison_byte_for_byte(recipe_arms, capsys):
    recipe_arms, written = recipe_arms
    assert json.loads(written["comparison.json"])["title"] == "my comparison"
    assert main(["report", str(recipe_arms)]) == 0
    assert "report: " + str(recipe_arms / "comparison.md") in capsys.readouterr().out
    again = _outputs(recipe_arms)
    for name in OUTPUTS:  # title, order of the arms, plot colours, numbers: all as the run wrote them
        assert again[name] == written[name], name
    data = json.loads(again["comparison.json"])
    assert [arm["name"] for arm in data["arms"]] == ["zeta", "alpha"]


def test_a_folder_written_before_variants_json_kept_the_order_is_reproduced_too(recipe_arms):
    """Runs of older versions left variants.json without title and order: the comparison in the folder
    still says both."""
    recipe_arms, written = recipe_arms
    record = read_json(recipe_arms / "variants.json")
    atomic_write_json(recipe_arms / "variants.json", {"arms": record["arms"], "seeds": record["seeds"]})
    assert main(["report", str(recipe_arms)]) == 0
    assert _outputs(recipe_arms) == written


def test_the_verdict_line_shows_the_alarm_not_the_warning_found_before_it():
    """Held-out ppl warns (15% over round 0, and rising 2 evaluations in a row) before self-BLEU alarms:
    the line names the self-BLEU alarm that set the level."""
    history = [{"round": r, "step": 8 * bool(r), "final": True, "heldout_ppl": ppl, "self_bleu4": bleu}
               for r, (ppl, bleu) in enumerate([(20.0, 0.05), (21.0, 0.05), (22.0, 0.05), (23.0, 0.6)])]
    verdict = CollapseDetector().check(history)
    assert verdict.level == "alarm" and not verdict.reasons[0].startswith("self-BLEU")  # the warn came first
    line = verdict_line(verdict, {"heldout_ppl": 23.0, "heldout_ppl_ratio": 1.15}, 3)
    assert line.startswith("verdict ALARM: held-out ppl 23.00 (x1.150 of round 0); self-BLEU-4 rose 1100%")
    assert line.endswith("alarm at 25% (and 2 warnings: see verdict.json)"), line


def _two_arms(root: Path) -> list[Path]:
    """`replace` alarms on distinct_1 (a signal outside the default panels) at round 2; `guarded` keeps its
    perplexity flat and alarms on self-BLEU at round 2."""
    flat = {"heldout_ppl": _ppl_ev(1.0, 0.98, 1.02)}
    replace = make_run(root / "replace", [
        {"metrics": _metrics(20.0)}, {"metrics": _metrics(21.0), "evidence": flat},
        {"metrics": _metrics(22.0, div=0.5), "level": "alarm", "reasons": ["distinct_1 fell 38%: alarm"],
         "evidence": {**flat, "distinct_1": _ev(0.62, "alarm", 0.6, 0.65, 16)}}])
    guarded = make_run(root / "guarded", [
        {"metrics": _metrics(20.0)}, {"metrics": _metrics(20.1), "evidence": flat},
        {"metrics": _metrics(20.2, bleu=0.3), "level": "alarm", "reasons": ["self-BLEU-4 rose: alarm"],
         "evidence": {**flat, "self_bleu4": _ev(6.0, "alarm", 5.0, 7.0, 16)}}])
    return [replace, guarded]


def _signal_headers(markdown: str) -> list[str]:
    return [block.split("\n", 1)[0] for block in markdown.split("### Signals relative to round 0\n\n")[1:]]


def test_a_comparison_marks_other_signals_alarms_on_the_ppl_plot_and_tables_share_columns(tmp_path,
                                                                                         monkeypatch):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    legends, cuts = [], []
    original_legend, original_axvline = Axes.legend, Axes.axvline
    monkeypatch.setattr(Axes, "legend",
                        lambda ax, *a, **k: legends.append(ax) or original_legend(ax, *a, **k))
    monkeypatch.setattr(Axes, "axvline", lambda ax, *a, **k: cuts.append(k.get("label"))
                        or original_axvline(ax, *a, **k))
    figure_legends = []
    original_fig_legend = Figure.legend
    monkeypatch.setattr(Figure, "legend",
                        lambda fig, *a, **k: figure_legends.append(fig) or original_fig_legend(fig, *a, **k))
    paths = write_comparison(tmp_path / "cmp", _two_arms(tmp_path), title="two arms")

    # ppl_ratio.png: the guarded arm's self-BLEU alarm is ringed and named, though its perplexity is flat
    marks = json.loads(Path(paths["json"]).read_text())["plots"]["ppl"]["verdicts"]
    assert [(m["arm"], m["round"], m["level"], m["text"]) for m in marks] == [
        ("replace", 2, "alarm", "replace: alarm at round 2 on distinct-1"),
        ("guarded", 2, "alarm", "guarded: alarm at round 2 on self-BLEU-4")]
    # diversity.png: no legend inside a panel (it covered a line); one figure legend below the panels
    assert len(figure_legends) == 1
    # (the ppl plot and the histograms keep theirs: 1 + 2 arms)
    assert len(legends) == 3, legends
    # generated_ppl.png: the human cut says the low-ppl share is not measured on this data
    labels = [c for c in cuts if c]
    assert labels and all("fixed prompts' generations, not this data" in c for c in labels), labels
    # the two arms' signal tables have the same columns, distinct-1 included
    headers = _signal_headers(Path(paths["markdown"]).read_text())
    assert len(headers) == 2 and headers[0] == headers[1] and "distinct-1 ratio" in headers[0], headers


def test_the_reports_measured_signals_are_the_registrys_diversity_panel():
    """A signal added to the registry's diversity panel is listed by reports (as "not in the rules" where no
    rule judges it) without a second edit here."""
    from collapse_guard.report import MEASURED_SIGNALS
    from collapse_guard.signals import names

    assert sorted(MEASURED_SIGNALS) == sorted(names(panel="diversity"))
