"""The examples run on the offline tiny model, each adding one feature to the plain SFT script."""

import difflib
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _added_code_lines(name: str) -> list[str]:
    def code(path):
        text = path.read_text()
        return text[text.index('"""', 3) + 3:].splitlines()  # without the module docstring

    diff = difflib.unified_diff(code(EXAMPLES / "sft_plain.py"), code(EXAMPLES / f"{name}.py"), lineterm="",
                                n=0)
    return [line for line in diff if line.startswith("+") and not line.startswith("+++")]


@pytest.mark.parametrize(("name", "printed"), [("sft_plain", None), ("sft_guard", "real data:"),
                                               ("sft_selector", "selection kept"), ("sft_magpie", "magpie:")])
def test_sft_example_trains_and_says_what_its_feature_did(name, printed, tmp_path, capsys):
    trainer, _ = _load(name).main(["--output-dir", str(tmp_path), "--max-steps", "4"])
    assert trainer.state.global_step == 4
    assert all(log["loss"] > 0 for log in trainer.state.log_history if "loss" in log)
    if printed:
        assert printed in capsys.readouterr().out


def test_guard_example_is_about_three_lines_more():
    added = _added_code_lines("sft_guard")
    assert 3 <= len(added) <= 6, added
    assert any("MixingCollator(" in line and "CollapseGuardCallback(" in line and ".attach(trainer)" in line
               for line in added)


def test_guard_example_measures_heldout_perplexity(tmp_path):
    trainer, _ = _load("sft_guard").main(["--output-dir", str(tmp_path), "--max-steps", "4"])
    from collapse_guard import CollapseGuardCallback

    guard = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CollapseGuardCallback))
    assert guard.history.entries and guard.history.entries[0]["heldout_ppl"] > 1
    assert trainer.data_collator.real_fraction >= 0.5


def test_selector_example_drops_duplicates():
    added = _added_code_lines("sft_selector")
    assert len(added) <= 6 and any("SelectionPipeline" in line for line in added)


def test_loop_example(tmp_path):
    summary = _load("sft_loop").main(["--output-dir", str(tmp_path / "loop"), "--rounds", "1"])
    assert summary["finished"] and [h["round"] for h in summary["history"]] == [0, 1]
    assert (tmp_path / "loop" / "report.md").exists()


def test_adaptive_floor_example_moves_the_floor_up_and_back_down(tmp_path, capsys):
    trainer, _ = _load("sft_adaptive_floor").main(["--output-dir", str(tmp_path), "--max-steps", "6"])
    assert trainer.state.global_step == 6 and "floor decisions:" in capsys.readouterr().out
    from collapse_guard import CollapseGuardCallback

    guard = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CollapseGuardCallback))
    floors = [e["floor"] for e in guard.history.entries]
    assert floors[0] == 0.1 and max(floors) == 0.9  # raised to the maximum on the alarm
    assert 0.1 < floors[-1] < 0.9  # and lowered after healthy measurements
    # the collator the trainer feeds from holds the guard's last floor
    assert trainer.data_collator.min_real_fraction == floors[-1]


def test_grpo_example_stops_on_the_hacked_reward_and_not_on_noise(tmp_path):
    trainer, guard = _load("grpo_guard").main(["--output-dir", str(tmp_path / "a")])
    assert guard.policy_verdict.is_alarm and trainer.state.global_step < 30
    trainer, guard = _load("grpo_guard").main(["--output-dir", str(tmp_path / "b"), "--reward", "noise",
                                               "--max-steps", "12"])
    assert trainer.state.global_step == 12 and guard.policy_verdict.level == "ok"


def test_ratio_search_example(tmp_path):
    result = _load("ratio_search").main(["--output-dir", str(tmp_path / "search")])
    assert [row["fraction"] for row in result["rows"]][:3] == [0.1, 0.5, 0.9] or len(result["rows"]) >= 3
    assert (tmp_path / "search" / "ratio_search.md").exists() \
        and (tmp_path / "search" / "ratio_search.png").exists()
