"""Every kill point resumes, and the run folder stays strict (issue 23 §3).

Real processes are SIGKILLed with an atomic write half done: `tests/scripts/hang_on_replace.py` holds the
process at the rename onto a chosen artifact (temp written, not yet renamed), so each kill lands exactly in
the window a real kill can hit. The next run must take the folder, remove the leftovers and finish with the
numbers of an uninterrupted run; no JSON file we write may hold NaN or Infinity.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collapse_guard.history import FILENAME as HISTORY
from collapse_guard.io import atomic_write_json, read_json
from collapse_guard.rundir import LOCK_NAME, RunFolderError, RunLock, claim

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_loop.yaml"
SCRIPTS = REPO / "tests" / "scripts"
HANG = SCRIPTS / "hang_on_replace.py"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPTS), str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _kill_at_rename(cmd: list[str], target: str, marker: Path, timeout: float = 300) -> str:
    """Runs `cmd` (under hang_on_replace) until it is about to rename onto `target`, SIGKILLs it there and
    returns the temp path it had written."""
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, env=_env(HANG_ON_REPLACE=target, HANG_MARKER=str(marker)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"ended before the rename onto {target}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"never reached the rename onto {target}")
        time.sleep(0.05)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return marker.read_text()


def _temps(folder: Path) -> list[str]:
    """Leftovers of our atomic writers: `<name>.tmp<pid>`, `<name>.old<pid>`, `.<name>.tmp<pid>.*`"""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if re.search(r"\.(tmp|old)\d+", p.name))


def _strict(path: Path) -> dict:
    """Parses like a strict JSON parser: NaN / Infinity literals are refused."""
    def refuse(literal: str):
        raise AssertionError(f"{path} holds a bare {literal}")

    return json.loads(path.read_text(), parse_constant=refuse)


# ----- fast: a real kill of a small process, the next claim through the API --------------------------------
CLAIM_AND_WRITE = """
import sys
from pathlib import Path
import hang_on_replace  # patches os.replace
from collapse_guard.io import atomic_write_json
from collapse_guard.rundir import RunLock, claim
folder = Path(sys.argv[1])
with RunLock(folder):
    claim(folder, {"name": "kill", "rounds": 2})
    atomic_write_json(folder / "round_1" / "eval.json", {"metrics": {"heldout_ppl": 20.0}})
"""


def test_killed_before_the_first_run_state_rename_leaves_a_folder_the_next_run_takes(tmp_path):
    folder = tmp_path / "run"
    temp = _kill_at_rename([sys.executable, "-c", CLAIM_AND_WRITE, str(folder)], "run_state.json",
                           tmp_path / "marker", timeout=120)
    assert Path(temp).parent == folder
    assert sorted(p.name for p in folder.iterdir()) == sorted([LOCK_NAME, Path(temp).name])
    with RunLock(folder):  # used to refuse: "holds files but no run_state.json"
        state = claim(folder, {"name": "kill", "rounds": 2})
    assert not state.started
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, "run_state.json"]
    # only our own leftovers make a folder ours: next to anything else, it is still refused, untouched
    other = tmp_path / "other"
    other.mkdir()
    for name, text in ((LOCK_NAME, ""), ("run_state.json.tmp1", "x"), ("thesis.tex", "mine")):
        (other / name).write_text(text)
    with pytest.raises(RunFolderError, match="holds files but no run_state.json"), RunLock(other):
        claim(other, {"name": "x"})
    assert (other / "thesis.tex").read_text() == "mine" and (other / "run_state.json.tmp1").exists()


def test_temp_files_of_a_killed_writer_are_removed_by_the_next_claim(tmp_path):
    folder = tmp_path / "run"
    temp = _kill_at_rename([sys.executable, "-c", CLAIM_AND_WRITE, str(folder)], "eval.json",
                           tmp_path / "marker", timeout=120)
    assert Path(temp).exists() and Path(temp).name.startswith("eval.json.tmp")
    # a user's file in the same folder and our own live temp are kept
    (folder / "round_1" / "notes.txt").write_text("mine")
    ours = folder / "round_1" / f"train.json.tmp{os.getpid()}"
    ours.write_text("{}")
    with RunLock(folder):
        claim(folder, {"name": "kill", "rounds": 2})
    assert not Path(temp).exists()
    assert (folder / "round_1" / "notes.txt").read_text() == "mine" and ours.exists()


def test_only_writers_that_are_gone_count_as_stale_without_the_lock(tmp_path):
    from collapse_guard.io import stale_temp_files

    alive = tmp_path / f"eval.json.tmp{os.getppid()}"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    gone = tmp_path / f"train.tmp{dead}"
    for path in (alive, gone):
        path.mkdir() if path.name.startswith("train") else path.write_text("{}")
    assert list(stale_temp_files(tmp_path)) == [gone]
    assert sorted(stale_temp_files(tmp_path, locked=True)) == sorted([alive, gone])


def test_json_artifacts_are_strict(tmp_path):
    # measured values: null in the file, with what it was; read back as it was
    atomic_write_json(tmp_path / "eval.json", {"metrics": {"heldout_ppl": float("nan")},
                                               "human_reference_ppl": [3.0, float("inf")]})
    raw = _strict(tmp_path / "eval.json")
    assert raw["metrics"]["heldout_ppl"] is None and raw["human_reference_ppl"] == [3.0, None]
    assert raw["nonfinite"] == {"/metrics/heldout_ppl": "NaN", "/human_reference_ppl/1": "Infinity"}
    back = read_json(tmp_path / "eval.json")
    assert back["metrics"]["heldout_ppl"] != back["metrics"]["heldout_ppl"]
    assert back["human_reference_ppl"] == [3.0, float("inf")] and "nonfinite" not in back
    # settings: refused, and nothing is written
    with pytest.raises(ValueError, match=r"training.learning_rate=Infinity is not a finite number"):
        atomic_write_json(tmp_path / "s.json", {"training": {"learning_rate": float("inf")}},
                          non_finite="refuse")
    assert not list(tmp_path.glob("s.json*"))


def test_a_recipe_with_a_non_finite_value_is_refused_before_run_state_is_written(tmp_path):
    from collapse_guard.config import ConfigError

    with pytest.raises(ConfigError, match=r"selectors.0.threshold=NaN is not a finite number"), \
            RunLock(tmp_path):
        claim(tmp_path, {"name": "x", "selectors": [{"threshold": float("nan")}]})
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


# ----- slow: the real command line, killed at several renames, resumed to the uninterrupted numbers -------
def _cli(out: Path, hang: bool = False) -> list[str]:
    head = [sys.executable, str(HANG)] if hang else [sys.executable, "-m", "collapse_guard.cli"]
    return [*head, "run", str(RECIPE), f"output_dir={out}"]


def _numbers(out: Path) -> dict:
    history = read_json(out / HISTORY)["entries"]
    report = read_json(out / "report.json")
    keep = ("round", "step", "final", "heldout_ppl", "level", "reasons")
    judged = ("level", "reasons", "metrics", "ratios", "generated_ppl", "steps", "budget", "samples")
    rounds = [{k: r.get(k) for k in judged} for r in report["runs"][0]["rounds"]]
    for r in rounds:  # the text says "(resumed from checkpoint-2)": true, and the only allowed difference
        (r.get("steps") or {}).pop("text", None)
    return {"entries": [{k: e.get(k) for k in keep} for e in history], "report": rounds}


def _differences(a, b, where: str = "") -> list[str]:
    """Where two JSON-like values differ ('/report/1/metrics/distinct_2: 0.9 != 0.8')."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _differences(x, y, f"{where}/{i}")]
    return [] if a == b else [f"{where}: {str(a)[:80]} != {str(b)[:80]}"]


@pytest.mark.slow
def test_the_command_line_killed_at_each_rename_resumes_to_the_uninterrupted_numbers(tmp_path):
    killed, clean, marker = tmp_path / "killed", tmp_path / "clean", tmp_path / "marker"
    left = []
    # each kill leaves its temp; the next run (killed at the next point) must take the folder and clean up
    for target in ("run_state.json", "round_1/generated",
                   # mid-training: checkpoint-2 is complete, checkpoint-4 lacks the collator state
                   "round_1/trainer/checkpoint-4/collapse_guard/mixing_collator_rank0.json",
                   "round_1/eval.json", "round_2/train"):
        temp = _kill_at_rename(_cli(killed, hang=True), target, marker)
        assert Path(temp).exists(), target
        left.append(temp)
        assert all(not Path(t).exists() for t in left[:-1])  # the run after each kill removed the last one
    done = subprocess.run(_cli(killed), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    subprocess.run(_cli(clean), env=_env(), check=True, capture_output=True, timeout=600)
    assert _temps(killed) == [] and _temps(clean) == []
    assert read_json(killed / "run_state.json")["finished"]
    assert read_json(killed / "round_1" / "train.json")["resumed_from"] == "checkpoint-2"
    assert _differences(_numbers(killed), _numbers(clean)) == []
    for path in killed.rglob("*.json"):
        if "trainer" not in path.parts and "model" not in path.name:
            _strict(path)
