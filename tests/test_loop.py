"""The multi-round loop on the offline tiny model: steps, artifacts, resume after a real kill, 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collapse_guard.config import ConfigError, load_config
from collapse_guard.io import read_json
from collapse_guard.loop import STEPS, run_rounds

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_loop.yaml"
SCRIPTS = REPO / "tests" / "scripts"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPTS), str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("loop") / "run"
    summary = run_rounds(load_config(RECIPE, [f"output_dir={out}"]))
    return out, summary


def test_two_rounds_produce_every_artifact(tiny_run):
    from datasets import load_from_disk

    out, summary = tiny_run
    assert summary["finished"] and summary["stopped"] is None
    assert [h["round"] for h in summary["history"]] == [0, 1, 2]
    for entry in summary["history"]:
        assert entry["heldout_ppl"] > 1 and entry["level"] in ("ok", "warn", "alarm")
        assert {"distinct_2", "self_bleu4", "tail_coverage", "low_ppl_share"} <= set(entry)
    state = read_json(out / "run_state.json")
    assert state["finished"] and state["done"]["1"] == list(STEPS) and state["done"]["2"] == list(STEPS)
    for r in (1, 2):
        generated = load_from_disk(str(out / f"round_{r}" / "generated"))
        assert len(generated) == 16 and {p["round"] for p in generated["provenance"]} == {r}
        train = load_from_disk(str(out / f"round_{r}" / "train"))
        sources = [p["source"] for p in train["provenance"]]
        # replace mode with a 50% floor: as many real rows as selected synthetic ones
        assert sources.count("real") == sources.count("synthetic") > 0
        assert (out / f"round_{r}" / "model" / "config.json").exists()  # keep_models: all
        assert not (out / f"round_{r}" / "trainer").exists()  # checkpoints dropped once the round is done
        assert read_json(out / f"round_{r}" / "train.json")["realized_real_fraction"] >= 0.5
        assert len(read_json(out / f"round_{r}" / "eval.json")["generated_ppl"]) == 16
    assert read_json(out / "round_1" / "selection.json")["steps"][0]["selector"] == "DedupSelector"
    for name in ("report.md", "report.html", "report.json", "ppl_ratio.png", "diversity.png", "generated_ppl.png"):
        assert (out / name).stat().st_size > 0
    assert "tiny_loop" in (out / "report.md").read_text()


def test_finished_run_is_not_redone_and_other_configs_are_refused(tiny_run):
    out, summary = tiny_run
    before = (out / "history.json").stat().st_mtime_ns
    again = run_rounds(load_config(RECIPE, [f"output_dir={out}"]))
    assert again["history"] == summary["history"]
    assert (out / "history.json").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="different config"):
        run_rounds(load_config(RECIPE, [f"output_dir={out}", "training.learning_rate=0.5"]))


def test_alarm_ends_the_run_with_the_reason_and_lora(tmp_path, monkeypatch):
    from collapse_guard.detector import CollapseDetector, Verdict

    def check(self, history):  # round 1 alarms, whatever the tiny model measures
        if len(history) < 2:
            return Verdict()
        return Verdict("alarm", ["held-out ppl rose 50% over round 0 (test)"], {})

    monkeypatch.setattr(CollapseDetector, "check", check)
    summary = run_rounds(load_config(RECIPE, [f"output_dir={tmp_path}", "detector.stop_on_alarm=true",
                                              "model.lora=true", "model.lora_r=4", "guard.enabled=false"]))
    assert summary["stopped"] == {"round": 1, "reason": "held-out ppl rose 50% over round 0 (test)"}
    assert not (tmp_path / "round_2").exists()
    assert "COLLAPSED" in (tmp_path / "report.md").read_text()
    # LoRA: the adapter is kept and merged into a plain model the next round would generate with
    assert (tmp_path / "round_1" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "round_1" / "model" / "config.json").exists()


@pytest.mark.slow
def test_accumulate_trains_on_every_round_so_far(tmp_path):
    from datasets import load_from_disk

    run_rounds(load_config(RECIPE, [f"output_dir={tmp_path}", "mixing.mode=accumulate", "guard.enabled=false"]))
    rounds = [p["round"] for p in load_from_disk(str(tmp_path / "round_2" / "train"))["provenance"]]
    # all 64 real rows, round 1's synthetic rows and round 2's
    assert rounds.count(-1) == 64 and rounds.count(1) > 0 and rounds.count(2) > 0


def test_cli_errors_and_help(capsys, tmp_path):
    from collapse_guard.cli import main

    assert main(["run", str(RECIPE), "mixing.mode=sometimes"]) == 2
    assert "mixing.mode='sometimes'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert main(["run", "--help-config"]) == 0
    assert "mixing.min_real_fraction" in capsys.readouterr().out


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "collapse_guard.cli", "run", str(RECIPE), f"output_dir={out}",
            "training.callbacks=[{class: loop_hooks.SlowSteps, seconds: 0.3}]", *extra]


def _run_until(cmd: list[str], marker, timeout: float = 240) -> None:
    """Starts the loop and SIGKILLs it as soon as `marker()` is true."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not marker():
        if proc.poll() is not None:
            raise AssertionError(f"the loop ended before the kill point: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("kill point never reached")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _rows(path: Path) -> list[dict]:
    """A saved dataset's rows; provenance meta names the run folder's model path, so it is left out."""
    from datasets import load_from_disk

    rows = load_from_disk(str(path)).to_list()
    for row in rows:
        row["provenance"] = {k: v for k, v in row["provenance"].items() if k != "meta"}
    return rows


def _final_artifacts(out: Path) -> dict:
    data = {}
    for r in (1, 2):
        for name in ("generated", "selected", "train"):
            data[f"{r}/{name}"] = _rows(out / f"round_{r}" / name)
        data[f"{r}/generations"] = read_json(out / f"round_{r}" / "eval.json")["generations"]
    return data


@pytest.mark.slow
def test_killed_mid_round_resumes_to_the_same_artifacts(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    # kill 1: during round 1's training, right after its first checkpoint
    _run_until(_cli(killed), lambda: any((killed / "round_1" / "trainer").glob("checkpoint-*/trainer_state.json")))
    state = read_json(killed / "run_state.json")
    assert "mix" in state["done"]["1"] and "train" not in state["done"]["1"]
    # kill 2: in round 2, as soon as its generated samples are saved
    _run_until(_cli(killed), lambda: (killed / "round_2" / "generated" / "dataset_info.json").exists())
    assert not read_json(killed / "run_state.json")["finished"]
    subprocess.run(_cli(killed), env=_env(), check=True, capture_output=True)
    subprocess.run(_cli(clean), env=_env(), check=True, capture_output=True)

    resumed_train = read_json(killed / "round_1" / "train.json")
    assert resumed_train["resumed_from"] and resumed_train["resumed_from"].startswith("checkpoint-")
    assert _final_artifacts(killed) == _final_artifacts(clean)
    a, b = read_json(killed / "history.json"), read_json(clean / "history.json")
    assert [h["round"] for h in a] == [h["round"] for h in b] == [0, 1, 2]
    for x, y in zip(a, b, strict=True):
        for key, value in y.items():
            if isinstance(value, float):
                assert x[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
            else:
                assert x[key] == value, key


@pytest.mark.distributed
def test_two_cpu_processes_under_accelerate_launch(tmp_path, tiny_run):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", "29561",
           "-m", "collapse_guard.cli", "run", str(RECIPE), f"output_dir={out}"]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    history = read_json(out / "history.json")
    assert [h["round"] for h in history] == [0, 1, 2]
    assert read_json(out / "run_state.json")["finished"]
    # generation is split across the ranks and gathered; batch seeds do not depend on the world size
    single = tiny_run[0]
    assert _rows(out / "round_1" / "generated") == _rows(single / "round_1" / "generated")
    # round 0 is the same model on the same held-out set: the all-reduced perplexity matches
    baseline = read_json(single / "history.json")[0]["heldout_ppl"]
    assert history[0]["heldout_ppl"] == pytest.approx(baseline, rel=1e-5)
    # only rank 0 wrote: no stray temp files from a second writer
    assert not list(out.rglob("*.tmp*"))
    assert json.loads((out / "report.json").read_text())["runs"][0]["name"] == "tiny_loop"
