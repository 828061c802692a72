"""The launch configs users copy (issue 23 §6): every file in recipes/accelerate parses with accelerate's own
`launch` command, agrees with every recipe it can run, and the README's DDP advice runs on 2 processes.

DeepSpeed is not installed here, so the DeepSpeed configs are checked as far as CPU allows: the
environment `accelerate launch` would hand the workers, the `DeepSpeedPlugin` accelerate builds from it,
and transformers' own check of that plugin against the `SFTConfig` the loop builds for each recipe (the
check that raised "ds gradient_accumulation_steps=1 vs hf gradient_accumulation_steps=4"). FSDP needs
GPUs (see the comment in recipes/accelerate/fsdp.yaml): its config is checked to the plugin too.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
LAUNCHERS = {"NO": "simple_launcher", "MULTI_GPU": "multi_gpu_launcher", "FSDP": "multi_gpu_launcher",
             "DEEPSPEED": "deepspeed_launcher"}
LAUNCH_LINE = re.compile(r"accelerate launch --config_file (\S+\.yaml)\b.*?\brun (\S+\.yaml)")


def launched(config: Path, monkeypatch) -> tuple[str, Namespace]:
    """What `accelerate launch --config_file CONFIG script.py` starts: accelerate's own parsing and choice of
    launcher, stopped right before it spawns workers."""
    import accelerate.commands.launch as launch

    chosen: dict[str, object] = {}
    for name in set(LAUNCHERS.values()):
        monkeypatch.setattr(launch, name, lambda args, name=name: chosen.update(name=name, args=args))
    launch.launch_command(launch.launch_command_parser().parse_args(["--config_file", str(config), "x.py"]))
    return chosen["name"], chosen["args"]


def worker_env(config: Path, monkeypatch) -> dict[str, str]:
    """The ACCELERATE_* / FSDP_* variables the launched workers get."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    name, args = launched(config, monkeypatch)
    env = prepare_deepspeed_cmd_env(args)[1] if name == "deepspeed_launcher" else prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def recipe_trainer_args() -> list[tuple[str, object]]:
    """(recipe/variant, the SFTConfig the loop builds for it) for every shipped recipe and variant."""
    from collapse_guard.config import expand, load_config
    from collapse_guard.loop import _sft_config

    out = []
    for recipe in RECIPES:
        for name, config in expand(load_config(recipe)).items():
            if name.endswith("seed_0") or "seed_" not in name:  # seeds change no trainer field
                out.append((f"{recipe.name}:{name}",
                            _sft_config(SimpleNamespace(config=config), 1, Path("/nonexistent"))))
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_with_accelerate_launch(config, monkeypatch):
    raw = yaml.safe_load(config.read_text())
    name, args = launched(config, monkeypatch)
    assert name == LAUNCHERS[raw["distributed_type"]]
    assert args.num_processes == raw["num_processes"]
    assert worker_env(config, monkeypatch)  # the workers' environment builds too


def test_every_launch_line_names_a_shipped_config_and_a_loadable_recipe():
    from collapse_guard.config import load_config

    files = [ROOT / "README.md", *RECIPES, *CONFIGS]
    pairs = {m.groups() for f in files for m in LAUNCH_LINE.finditer(f.read_text())}
    assert {Path(c).name for c, _ in pairs} == {c.name for c in CONFIGS}  # each config is shown in use
    for config, recipe in pairs:
        assert (ROOT / config).is_file(), config
        load_config(ROOT / recipe)


class _TrainerDeepSpeedCheck:
    """transformers' `HfTrainerDeepSpeedConfig` (the Trainer's check of a DeepSpeed config against its
    arguments) without the `deepspeed` package: its methods on accelerate's plain config class."""

    def __new__(cls, config: dict):
        from accelerate.utils.deepspeed import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        if importlib.util.find_spec("deepspeed") is not None:
            return HfTrainerDeepSpeedConfig(config)
        shim = type("TrainerDeepSpeedCheck", (HfDeepSpeedConfig,), {
            name: HfTrainerDeepSpeedConfig.__dict__[name]
            for name in ("fill_match", "fill_only", "trainer_config_process", "is_auto")})
        check = shim(config)
        check.mismatches, check._dtype = [], None
        return check


class _OnGpu:
    """The loop's SFTConfig as it is on a bf16 GPU (`_sft_config` sets bf16 from the device)."""

    def __init__(self, args, world_size: int):
        self._args, self.world_size, self.bf16 = args, world_size, True

    def __getattr__(self, name):
        return getattr(self._args, name)


@pytest.mark.parametrize("config", [c for c in CONFIGS if "deepspeed" in c.name], ids=lambda p: p.name)
def test_deepspeed_configs_agree_with_every_recipe(config, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    trainer_args = recipe_trainer_args()  # before the launch environment: SFTConfig would read it
    env = worker_env(config, monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    processes = yaml.safe_load(config.read_text())["num_processes"]
    problems = []
    for recipe, args in trainer_args:
        plugin = DeepSpeedPlugin()  # what accelerate builds in every worker from that environment
        plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
        check = _TrainerDeepSpeedCheck(plugin.deepspeed_config)
        check.trainer_config_process(_OnGpu(args, processes))
        problems += [f"{recipe}: {m}" for m in check.mismatches]
    assert not problems, "\n".join(problems)


def test_fsdp_config_builds_accelerates_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    for key, value in worker_env(ROOT / "recipes" / "accelerate" / "fsdp.yaml", monkeypatch).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"


def readme_ddp_advice() -> dict:
    """The SFTConfig setting the README gives against rows repeated by `even_batches`."""
    text = " ".join((ROOT / "README.md").read_text().split())
    paragraph = text[text.index("`even_batches`"):][:700]
    snippet = re.search(r"set `([^`]+)`", paragraph).group(1)
    call = ast.parse(f"f({snippet})", mode="eval").body
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


@pytest.mark.distributed
def test_readme_ddp_advice_runs_on_two_processes_without_repeats(tmp_path):
    advice = readme_ddp_advice()
    script = ROOT / "tests" / "scripts" / "ddp_advice_dist.py"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           str(tmp_path), json.dumps(advice)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{advice} crashes a 2-process run:\n{result.stderr[-2000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2  # 18 rows, 8 a step: 2 full steps on each rank
    rows = [t for rank in ranks for t in rank["fed"] if not t.startswith("pool")]  # pool: collator top-ups
    assert len(rows) == len(set(rows)), "a training row was fed twice"
