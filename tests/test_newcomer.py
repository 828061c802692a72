"""A newcomer's second hour (issue 25, items 1-3): every command says what it did and where.

From the user's side: the console line a command prints last, its exit code, the files it names.
The adaptive-floor example moving the floor is asserted in tests/test_examples.py.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from collapse_guard.cli import main as cli


def _last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_generate_continuation_last_line_names_folder_and_counts(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"The river crossed the valley near mill {i} at dawn." for i in range(5)))
    out = tmp_path / "cont"
    code = cli(["generate", "continuation", "--model", "tiny", "--texts", str(texts), "--n", "4",
                "--prefix-tokens", "4", "--max-new-tokens", "4", "--out", str(out), "--no-show-progress"])
    line = _last_line(capsys)
    assert code == 0 and (out / "generation_stats.json").is_file()
    assert str(out) in line and re.search(r"kept 4 of 4 tried", line), line


def test_generate_magpie_last_line_names_folder_and_counts(tmp_path, capsys):
    out = tmp_path / "magpie"
    code = cli(["generate", "magpie", "--model", "tiny", "--n", "2", "--out", str(out),
                "--min-instruction-words", "0", "--no-clean", "--no-show-progress", "--max-new-tokens", "6"])
    line = _last_line(capsys)
    kept, tried = map(int, re.search(r"kept (\d+) of (\d+) tried", line).groups())
    assert str(out) in line and tried >= kept and code == (0 if kept else 1)


def test_readme_gives_generate_magpie_the_time_its_defaults_take(capsys):
    """The README's timing names the budgets the command really uses (its --help defaults)."""
    with pytest.raises(SystemExit):
        cli(["generate", "magpie", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    budgets = [re.search(rf"Token budget of an? {what}\. \(default: (\d+)\)", text).group(1)
               for what in ("instruction", "response")]
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f"`generate magpie` keeps its defaults ({budgets[0]} + {budgets[1]} tokens)" in readme


def test_ratio_search_progress_line_names_trial_share_seed_time_and_bracket(caplog):
    from collapse_guard.ratio_search import search

    with caplog.at_level(logging.INFO, logger="collapse_guard.ratio_search"):
        result = search(lambda f, seed: [1.0 + max(0.0, 0.3 * (0.4 - f))] * 2, [0.1, 0.5], tolerance=1.02,
                        seeds=[0, 1], refine=1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6  # 2 shares x 2 seeds, then 1 bisection x 2 seeds
    assert lines[0].startswith("ratio-search: trial 1 of up to 6 (grid): real share 0.1, seed 0;")
    assert "time left known after the first trial" in lines[0]
    assert re.search(r"trial 5 of 6 \(bisection\): real share 0\.3, seed 0; bracket: \(0\.1, 0\.5\]; "
                     r"~\d+ s left", lines[4]), lines[4]
    assert result["answer"] == 0.5
