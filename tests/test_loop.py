"""The multi-round loop on the offline tiny model: steps, artifacts, the run folder's protection, resume after
a real kill, 2 processes, and the command line's one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collapse_guard.config import load_config
from collapse_guard.history import FILENAME as HISTORY
from collapse_guard.io import read_json
from collapse_guard.loop import STEPS, run_rounds
from collapse_guard.rundir import RunFolderError

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
        assert {"distinct_2", "self_bleu4", "tail_coverage", "low_ppl_share", "generations",
                "evidence"} <= set(entry)
    state = read_json(out / "run_state.json")
    assert state["finished"] and state["done"]["1"] == list(STEPS) and state["config"]["name"] == "tiny_loop"
    for r in (1, 2):
        generated = load_from_disk(str(out / f"round_{r}" / "generated"))
        assert len(generated) == 16 and {p["round"] for p in generated["provenance"]} == {r}
        train = load_from_disk(str(out / f"round_{r}" / "train"))
        sources = [p["source"] for p in train["provenance"]]
        assert sources.count("real") == sources.count("synthetic") > 0  # replace mode, 50% floor
        assert (out / f"round_{r}" / "model" / "config.json").exists()  # keep_models: all
        assert not (out / f"round_{r}" / "trainer").exists()  # checkpoints dropped once the round is done
        info = read_json(out / f"round_{r}" / "train.json")
        assert info["real_fraction"] >= 0.5 and info["train_steps"] == info["max_steps"]
        # top-ups continue the real stream across rounds (not the same first rows every round)
        before = read_json(out / "round_1" / "train.json")["real_stream_draws"] if r == 2 else 0
        assert info["real_stream_draws"] == before + info["real_top_up"]
        assert info["synthetic_rows_trained"] == 3 * 16 and info["synthetic_rows_untrained"] == 0  # 3 epochs
        assert len(read_json(out / f"round_{r}" / "eval.json")["generated_ppl"]) == 16
    assert read_json(out / "round_1" / "selection.json")["steps"][0]["selector"] == "DedupSelector"
    # one history for the loop and the guard: the guard's round-1 closing measurement is the round's verdict
    entries = read_json(out / HISTORY)["entries"]
    assert [(e["round"], e["step"], e["final"]) for e in entries] == [
        (0, 0, True), (1, 0, False), (1, 24, True), (2, 0, False), (2, 24, True)]
    for name in ("report.md", "report.html", "report.json"):
        assert (out / name).stat().st_size > 0


def test_a_loop_round_measures_each_model_once(tmp_path, monkeypatch):
    """Round 0's model, then each round's trained one: the guard's closing measurement is the loop's round
    evaluation and the next round's start, so three models take three measurements, not five or seven."""
    from collapse_guard.probe import Probe

    measured = []
    measure = Probe.measure

    def counting(self, model, *args, **kwargs):
        measured.append(float(sum(p.detach().double().sum() for p in model.parameters())))
        return measure(self, model, *args, **kwargs)

    monkeypatch.setattr(Probe, "measure", counting)
    run_rounds(load_config(RECIPE, [f"output_dir={tmp_path / 'run'}"]))
    assert len(measured) == 3 and len(set(measured)) == 3


def test_finished_run_is_kept_other_recipes_refused_restart_discards(tiny_run, tmp_path):
    out, summary = tiny_run
    before = (out / HISTORY).stat().st_mtime_ns
    again = run_rounds(load_config(RECIPE, [f"output_dir={out}"]))
    assert [e["heldout_ppl"] for e in again["history"]] == [e["heldout_ppl"] for e in summary["history"]]
    assert (out / HISTORY).stat().st_mtime_ns == before
    # a run made before a setting existed continues when the setting is at its default
    state_file = out / "run_state.json"
    state = read_json(state_file)
    assert "report_heldout" in state["config"]["data"]
    del state["config"]["data"]["report_heldout"]
    state_file.write_text(json.dumps(state))
    run_rounds(load_config(RECIPE, [f"output_dir={out}"]))
    assert (out / HISTORY).stat().st_mtime_ns == before
    with pytest.raises(RunFolderError,
                       match=r"holds a run of another recipe \(training.learning_rate: .*--restart"):
        run_rounds(load_config(RECIPE, [f"output_dir={out}", "training.learning_rate=0.5"]))
    # a folder that is not a run folder is never written into
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match="not a collapse_guard run folder"):
        run_rounds(load_config(RECIPE, [f"output_dir={foreign}", "rounds=1"]))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_issue15_an_alarm_does_not_cut_later_rounds_unless_asked(tmp_path, monkeypatch):
    """Round 1 alarms (forced); with both stop switches off rounds 2 and 3 still train every step; with the
    in-round stop on, the guard stops training and the report says where."""
    from collapse_guard.detector import CollapseDetector, Verdict

    def check(self, history):
        if len(history) < 2:
            return Verdict()
        return Verdict("alarm", ["held-out ppl rose 50% over round 0 (forced by the test)"], {})

    monkeypatch.setattr(CollapseDetector, "check", check)
    out = tmp_path / "off"
    summary = run_rounds(load_config(RECIPE, [f"output_dir={out}", "rounds=3", "generation.n_samples=8",
                                              "guard.stop_training_on_alarm=false",
                                              "end_run_on_alarm=false"]))
    assert [e["level"] for e in summary["history"]] == ["ok", "alarm", "alarm", "alarm"]
    for r in (1, 2, 3):
        info = read_json(out / f"round_{r}" / "train.json")
        assert info["train_steps"] == info["max_steps"] > 1 and info["stopped_by_guard_at"] is None
    out = tmp_path / "on"
    summary = run_rounds(load_config(RECIPE, [f"output_dir={out}", "rounds=2", "generation.n_samples=8",
                                              "guard.stop_training_on_alarm=true", "guard.eval_steps=1",
                                              "guard.cost_budget=null", "end_run_on_alarm=false"]))
    info = read_json(out / "round_1" / "train.json")
    assert info["stopped_by_guard_at"] == info["train_steps"] == 1 < info["max_steps"]
    assert f"stopped by the guard at step 1 of {info['max_steps']}" in (out / "report.md").read_text()
    run_rounds(load_config(RECIPE, [f"output_dir={tmp_path / 'end'}", "rounds=3", "generation.n_samples=8",
                                    "end_run_on_alarm=true"]))
    assert read_json(tmp_path / "end" / "run_state.json")["stopped"]["round"] == 1
    assert not (tmp_path / "end" / "round_2").exists()


def test_lora_rounds_merge_their_adapter(tmp_path):
    run_rounds(load_config(RECIPE, [f"output_dir={tmp_path}", "rounds=1", "generation.n_samples=8",
                                    "model.lora={r: 4, lora_alpha: 8}", "guard.enabled=false"]))
    assert (tmp_path / "round_1" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "round_1" / "model" / "config.json").exists()


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "collapse_guard.cli", "run", str(RECIPE), f"output_dir={out}", *extra]


def test_concurrent_runs_into_one_folder(tmp_path, tiny_run):
    """Three processes start the same run in one folder: one runs, the others are refused by name."""
    out = tmp_path / "shared"
    procs = [subprocess.Popen(_cli(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for _ in range(3)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2, 2], results
    for code, err in results:
        if code == 2:
            assert "is in use by pid" in err and "Traceback" not in err and err.count("\n") == 1
    single = tiny_run[0]
    for r in (1, 2):
        assert _rows(out / f"round_{r}" / "train") == _rows(single / f"round_{r}" / "train")
    a, b = read_json(out / HISTORY)["entries"], read_json(single / HISTORY)["entries"]
    assert [e["heldout_ppl"] for e in a] == pytest.approx([e["heldout_ppl"] for e in b], rel=1e-6)
    assert not list(out.rglob(".model.*")) and not list(out.rglob("*.tmp*"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "RECIPES_DIR"], "is a folder"),
        (["run", "CYCLE"], "'extends' loops back on itself"),
        (["run", "BAD_YAML"], "is not valid YAML"),
        (["run", str(RECIPE), "selectors=[{class: collapse_guard.selection.DedupSelector, treshold: 1}]"],
         "selectors[0].treshold=1: collapse_guard.selection.DedupSelector takes no such argument"),
        (["run", str(RECIPE), "selectors=[{class: collections.Counter}]", "trust_recipe_code=true"],
         "is not a Selector subclass"),
        (["run", str(RECIPE), "generation.num_beam=3"], "unknown key 'generation.num_beam'"),
        (["run", str(RECIPE), "evaluation.context_length=1"], "evaluation: ProbeConfig.context_length"),
        (["report", "MISSING"], "is not a folder"),
        (["report", "EMPTY"], "holds no finished round"),
        (["generate", "continuation", "--model", "tiny", "--texts", "MISSING.txt", "--out", "OUT"],
         "no such file"),
        (["generate", "magpie", "--model", "/missing/model", "--n", "2", "--out", "OUT"],
         "no model folder there"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, needle):
    (tmp_path / "cycle.yaml").write_text("extends: cycle.yaml\n")
    (tmp_path / "bad.yaml").write_text("rounds: [1,\n")
    (tmp_path / "empty").mkdir()
    names = {"RECIPES_DIR": str(REPO / "recipes"), "CYCLE": str(tmp_path / "cycle.yaml"),
             "BAD_YAML": str(tmp_path / "bad.yaml"), "MISSING": str(tmp_path / "missing"),
             "EMPTY": str(tmp_path / "empty"), "MISSING.txt": str(tmp_path / "missing.txt"),
             "OUT": str(tmp_path / "out")}
    cmd = [sys.executable, "-m", "collapse_guard.cli", *[names.get(a, a) for a in args]]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr


def test_a_model_whose_vocabulary_is_smaller_than_its_tokenizer_is_refused(tmp_path):
    from collapse_guard.loop import load_tokenizer
    from collapse_guard.testing import save_tiny_model

    folder = save_tiny_model(tmp_path / "m")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens([f"<extra_{i}>" for i in range(600)])
    tok.save_pretrained(folder)
    with pytest.raises(ValueError, match="has 1112 tokens but the model's vocabulary holds 512"):
        load_tokenizer(folder)


def test_help_is_instant_and_imports_no_torch():
    code = ("import sys, time; t = time.time(); import collapse_guard.cli as c; c.build_parser(); "
            "print('torch' in sys.modules, 'transformers' in sys.modules, round(time.time() - t, 2))")
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                          timeout=120)
    torch_loaded, transformers_loaded, seconds = done.stdout.split()
    assert torch_loaded == "False" and transformers_loaded == "False", done.stderr
    for args in (["--help"], ["run", "--help"], ["generate", "magpie", "--help"], ["demo", "--help"]):
        done = subprocess.run([sys.executable, "-m", "collapse_guard.cli", *args], env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout


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
    slow = "callbacks=[{class: loop_hooks.SlowSteps, seconds: 0.3}]"
    # a test hook outside collapse_guard: the recipe must say it trusts that code
    slow = [slow, "trust_recipe_code=true"]
    # kill 1: during round 1's training, right after its first complete checkpoint (the collator's state
    # is written last)
    _run_until(_cli(killed, *slow), lambda: any((killed / "round_1" / "trainer").glob(
        "checkpoint-*/collapse_guard/mixing_collator_rank0.json")))
    state = read_json(killed / "run_state.json")
    assert "mix" in state["done"]["1"] and "train" not in state["done"]["1"]
    # kill 2: in round 2, as soon as its generated samples are saved
    _run_until(_cli(killed, *slow),
               lambda: (killed / "round_2" / "generated" / "dataset_info.json").exists())
    assert not read_json(killed / "run_state.json")["finished"]
    subprocess.run(_cli(killed, *slow), env=_env(), check=True, capture_output=True)
    subprocess.run(_cli(clean, *slow), env=_env(), check=True, capture_output=True)
    assert read_json(killed / "round_1" / "train.json")["resumed_from"].startswith("checkpoint-")
    assert _final_artifacts(killed) == _final_artifacts(clean)
    a = [e for e in read_json(killed / HISTORY)["entries"] if e["final"]]
    b = [e for e in read_json(clean / HISTORY)["entries"] if e["final"]]
    assert [e["round"] for e in a] == [e["round"] for e in b] == [0, 1, 2]
    for x, y in zip(a, b, strict=True):
        assert x["heldout_ppl"] == pytest.approx(y["heldout_ppl"], rel=1e-4)


@pytest.mark.distributed
def test_two_cpu_processes_under_accelerate_launch(tmp_path, tiny_run):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", "29561",
           "-m", "collapse_guard.cli", "run", str(RECIPE), f"output_dir={out}"]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    finals = [e for e in read_json(out / HISTORY)["entries"] if e["final"]]
    assert [e["round"] for e in finals] == [0, 1, 2]
    assert read_json(out / "run_state.json")["finished"]
    # generation is split across the ranks and gathered; batch seeds do not depend on the world size
    single = tiny_run[0]
    assert _rows(out / "round_1" / "generated") == _rows(single / "round_1" / "generated")
    # round 0 is the same model on the same held-out set: the all-reduced perplexity matches
    baseline = read_json(single / HISTORY)["entries"][0]["heldout_ppl"]
    assert finals[0]["heldout_ppl"] == pytest.approx(baseline, rel=1e-5)
    assert not list(out.rglob("*.tmp*"))  # only rank 0 wrote
    assert result.stderr.count("round 1/2: training") == 1  # logged once per run, not once per rank
    assert json.loads((out / "report.json").read_text())["runs"][0]["name"] == "tiny_loop"


def test_recipe_arms_measure_round_0_once(tmp_path, caplog):
    """Two arms on one base model, data, evaluation and seed: round 0 is measured once and written to both
    (the numbers are identical either way: its generations are seeded); an arm with another seed measures
    its own."""
    import logging

    from collapse_guard.loop import run_recipe
    from collapse_guard.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    config = load_config(RECIPE, [f"output_dir={tmp_path / 'runs'}", f"model.name_or_path={model}",
                                  "rounds=1", "variants={a: {mixing.min_real_fraction: 0.5}, "
                                  "b: {mixing.min_real_fraction: 1.0}, c: {seed: 1}}"])
    with caplog.at_level(logging.INFO, logger="collapse_guard"):
        run_recipe(config)
    evals = {arm: read_json(tmp_path / "runs" / arm / "round_0" / "eval.json") for arm in "abc"}
    assert evals["a"] == evals["b"] and evals["a"]["generations"]
    assert evals["c"]["metrics"]["heldout_ppl"] == pytest.approx(evals["a"]["metrics"]["heldout_ppl"])
    messages = [r.getMessage() for r in caplog.records]
    reused = [m for m in messages if "measured already by a" in m]
    assert len(reused) == 1 and reused[0].startswith("b |"), reused
    measured = [m.split(" |")[0] for m in messages if "round 0 (baseline): measuring" in m]
    assert measured == ["a", "c"], measured
    for arm in "abc":  # each arm's own history holds round 0 and its verdict
        entries = read_json(tmp_path / "runs" / arm / HISTORY)["entries"]
        assert [e["round"] for e in entries if e.get("final")] == [0, 1]
