"""Every YAML recipe and accelerate config shipped with the project loads and validates."""

import re
from pathlib import Path

import pytest
import yaml

from collapse_guard.config import builtin_recipes, check_config, expand, load_config

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")
PACKAGED = sorted((REPO / "collapse_guard" / "recipes").glob("*.yaml"))
# Recipes whose data and model ship offline (checked with their paths); the others name Hub models
# and user data that exist only on a user's machine.
OFFLINE = {"demo.yaml", "demo_fast.yaml", "demo_cpu.yaml", "tiny_loop.yaml"}


def test_there_is_something_to_check():
    assert {p.name for p in RECIPES} >= {"demo_cpu.yaml", "guarded_sft.yaml", "loop_replace.yaml",
                                         "loop_accumulate.yaml", "loop_fresh.yaml", "tiny_loop.yaml"}
    assert {p.name for p in ACCELERATE} >= {"single_gpu.yaml", "multi_gpu_ddp.yaml", "fsdp.yaml",
                                            "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "cpu_2proc.yaml"}
    assert {"demo", "demo_fast"} <= set(builtin_recipes())


def _launch_command(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name} must start with its launch command as a comment"
    command = first[2:].strip()
    assert command.startswith(("collapse-guard ", "accelerate launch ")), command
    return command


@pytest.mark.parametrize("path", RECIPES + PACKAGED, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_validates(path):
    command = _launch_command(path)
    config = load_config(path)
    for variant in expand(config).values():
        check_config(variant, check_paths=path.name in OFFLINE)
    # the files a launch command names exist (run from the repository root)
    for name in re.findall(r"(recipes/\S+\.yaml)", command):
        assert (REPO / name).exists(), f"{path.name}: {name} does not exist"
    assert len([line for line in path.read_text().splitlines() if line.startswith("#")]) >= 3, \
        f"{path.name}: comment its trade-offs"


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    _launch_command(path)
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type in set(DistributedType)
    raw = yaml.safe_load(path.read_text())
    if "deepspeed" in path.name:
        assert config.distributed_type == DistributedType.DEEPSPEED
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])
    if path.name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if path.name == "cpu_2proc.yaml":
        # MULTI_CPU would start one process and wait for mpirun; MULTI_GPU + use_cpu starts 2 gloo workers
        assert config.distributed_type == DistributedType.MULTI_GPU and raw["use_cpu"] is True
        assert config.num_processes == 2
