"""Typed recipe sections: `--help-config` lists exactly the keys a recipe may set, errors list the same keys,
every collator/guard/detector argument is a recipe key, and bad values are refused in one line before any
work starts (issue 22 section 5, issue 23 section 4)."""

import ast
import dataclasses
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from collapse_guard.config import (
    ConfigError,
    LoopConfig,
    check_config,
    config_from_dict,
    expand,
    help_text,
    load_config,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml")) + sorted((REPO / "collapse_guard" / "recipes")
                                                                          .glob("*.yaml"))
TINY = REPO / "recipes" / "tiny_loop.yaml"
KEY_LINE = re.compile(r"^  ([\w.]+) \(default (.*?)\): ")
OFFLINE = {"model": {"name_or_path": "tiny"}, "data": {"real": "tiny:human", "heldout": "tiny:heldout"}}


def _listed() -> list[tuple[str, str, object]]:
    """(context, key, default) for every key line of --help-config; context is the generation method a
    `generation.*` key belongs to ('' elsewhere)."""
    rows, context = [], ""
    for line in help_text().splitlines():
        header = re.match(r"^generation with method=(\w+)", line)
        if header:
            context = header.group(1)
            continue
        match = KEY_LINE.match(line)
        if match:
            key, default = match.groups()
            own = key in ("generation.method", "generation.n_samples", "generation.pool_factor")
            in_method = key.startswith("generation.") and key.count(".") == 1 and not own
            rows.append((context if in_method else "", key, ast.literal_eval(default)))
    return rows


def _nest(key: str, value: object) -> dict:
    out: dict = {}
    node = out
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def _walk(cls: type, prefix: str = "") -> set[str]:
    """Every init field of the recipe's dataclasses, sections walked into (what a recipe may set)."""
    from collapse_guard.config import GENERATION_METHODS, GenerationConfig

    keys = set()
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = typing.get_type_hints(cls)[f.name]
        args = typing.get_args(tp) or (tp,)
        section = next((a for a in args if dataclasses.is_dataclass(a)), None)
        if section is None or type(None) in args:  # a plain key, or an optional section (null is a value)
            keys.add(prefix + f.name)
        if section is not None:
            keys |= _walk(section, f"{prefix}{f.name}.")
        if section is GenerationConfig:
            for method in GENERATION_METHODS:
                keys |= _walk(GenerationConfig.settings_class(method), f"{prefix}{f.name}.")
    return keys


def test_help_config_lists_every_field_of_every_section_with_its_help():
    text = help_text()
    listed = {key for _, key, _ in _listed()}
    assert listed == _walk(LoopConfig)
    # the components' own fields, not `(default {})`
    for key in ("detector.ppl_ratio_alarm", "detector.min_items", "guard.eval_steps", "guard.enabled",
                "guard.floor.maximum", "evaluation.context_length", "evaluation.n_prompts",
                "generation.prefix_tokens", "generation.instruction_max_new_tokens", "mixing.floor_scope",
                "mixing.synthetic_filter", "training.lr_scheduler_type"):
        assert key in listed, key
    assert "(default {})" not in "".join(line for line in text.splitlines()
                                         if line.lstrip().startswith(("detector ", "guard ", "evaluation ")))
    for line in text.splitlines():
        match = KEY_LINE.match(line)
        assert match is None or line[match.end():].strip(), f"no help: {line}"


def test_every_listed_key_is_accepted_with_its_listed_default():
    rows = _listed()
    assert {"detector.ppl_ratio_alarm", "guard.floor.decay_after", "evaluation.n_prompts"} \
        <= {k for _, k, _ in rows}
    for context, key, default in rows:
        data = _nest(key, default)
        if context == "magpie":
            data = {**data, "data": {"real": "tiny:chat"}}
            data["generation"]["method"] = "magpie"
        if context == "task":
            data["generation"]["method"] = "task"
        try:
            config_from_dict(data)
        except ConfigError as err:  # pragma: no cover - the assertion message is the point
            pytest.fail(f"--help-config lists {key} (default {default!r}) but the recipe refuses it: {err}")


def test_keys_the_loop_refuses_are_not_listed():
    listed = {k for _, k, _ in _listed()}
    for key in ("guard.round_index", "guard.history_path", "training.output_dir", "generation.settings",
                "training.extra"):
        assert key not in listed
        with pytest.raises(ConfigError) as err:
            config_from_dict(_nest(key, 1))
        assert key in str(err.value) and "\n" not in str(err.value)
    # the guard's error lists what the loop takes under guard: enabled and floor, not round_index
    with pytest.raises(ConfigError) as err:
        config_from_dict({"guard": {"eval_step": 1}})
    message = str(err.value)
    assert "'enabled'" in message and "'floor'" in message and "round_index" not in message


@pytest.mark.parametrize("section", ["model", "data", "mixing", "evaluation", "guard", "guard.floor",
                                     "detector", "generation"])
def test_the_valid_keys_an_error_lists_are_the_listed_keys(section):
    listed = [k.removeprefix(section + ".") for context, k, _ in _listed()
              if k.startswith(section + ".") and "." not in k.removeprefix(section + ".")
              and context in ("", "continuation")]
    with pytest.raises(ConfigError) as err:
        config_from_dict(_nest(f"{section}.no_such_key", 1))
    valid = ast.literal_eval(str(err.value).split("Valid keys under " + section + ": ", 1)[1].rstrip("."))
    assert sorted(valid) == sorted(listed)


def test_sections_hold_their_components_configs():
    from collapse_guard import DetectorConfig, FloorConfig, GuardConfig, ProbeConfig

    config = config_from_dict({"guard": {"eval_steps": 7, "floor": {"maximum": 0.8}},
                               "detector": {"diversity_signals": ["distinct_2"]},
                               "evaluation": {"context_length": 64, "n_prompts": 4}})
    assert isinstance(config.detector, DetectorConfig)
    assert config.detector.diversity_signals == ("distinct_2",)
    assert isinstance(config.guard.floor, FloorConfig) and config.guard.floor.maximum == 0.8
    guard = config.guard.for_round(3, "h.json")
    assert type(guard) is GuardConfig and (guard.round_index, guard.eval_steps) == (3, 7)
    probe = config.evaluation.probe()
    assert type(probe) is ProbeConfig and probe.context_length == 64 and config.evaluation.n_prompts == 4


def test_collator_arguments_are_recipe_keys():
    config = config_from_dict({**OFFLINE, "mixing": {
        "floor_scope": "micro_batch",
        "synthetic_filter": {"class": "collapse_guard.selection.PrivacyFilter"}}})
    assert config.mixing.floor_scope == "micro_batch"
    check_config(config)  # the filter's class is checked like a selector's
    with pytest.raises(ConfigError, match="mixing.synthetic_filter.class=.*is not a Selector subclass"):
        check_config(config_from_dict({**OFFLINE, "mixing": {
            "synthetic_filter": {"class": "collapse_guard.mixing.MixingCollator"}}}))


def test_collator_arguments_reach_the_collator(monkeypatch, tmp_path):
    """A round's collator is built with the recipe's floor_scope and synthetic_filter."""
    import collapse_guard.mixing as mixing
    from collapse_guard.loop import run_rounds

    seen = {}

    class Spy(mixing.MixingCollator):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(mixing, "MixingCollator", Spy)
    run_rounds(load_config(TINY, [f"output_dir={tmp_path}", "rounds=1", "generation.n_samples=4",
                                  "guard.enabled=false", "evaluation.n_prompts=2", "data.max_real=8",
                                  "mixing.floor_scope=micro_batch",
                                  "mixing.synthetic_filter={class: collapse_guard.selection.PrivacyFilter}"]))
    assert seen["floor_scope"] == "micro_batch"
    assert callable(seen["synthetic_filter"]) and "privacy" in seen["synthetic_filter"].__name__


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load_and_their_record_round_trips(path):
    for run in expand(load_config(path)).values():
        # every section is typed: no loose mapping rebuilt at each use
        assert not [name for name in ("generation", "training", "evaluation", "guard", "detector")
                    if isinstance(getattr(run, name), dict)]
        record = to_dict(run)
        # run_state.json keeps this record and compares the next run's with it: it must survive JSON as is
        assert json.loads(json.dumps(record, allow_nan=False)) == record
        assert config_from_dict(record) == run


# ----- bad values: refused in one line, before work starts ----------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["seed=-1"], "seed=-1: use an int >= 0"),
        (["seeds=[0,0]"], "seeds=[0, 0]: seed 0 is listed more than once"),
        (["seeds=[1,-2]"], "seeds[1]=-2"),
        (["training.per_device_train_batch_size=0"], "per_device_train_batch_size=0: use an int >= 1"),
        (["training.per_device_train_batch_size=2.5"], "batch_size=2.5: expected a whole number"),
        (["training.gradient_accumulation_steps=0"], "training.gradient_accumulation_steps=0"),
        (["training.learning_rate=.nan"], "training.learning_rate=nan: expected a finite number"),
        (["training.learning_rate=.inf"], "training.learning_rate=inf: expected a finite number"),
        (["training.learning_rate=fast"], "training.learning_rate='fast': expected a number"),
        (["training.learning_rate=-1e-4"], "training.learning_rate=-0.0001: use a finite number >= 0"),
        (["training.num_train_epochs=0"], "training.num_train_epochs=0: use a number > 0"),
        (["training.max_length=1"], "training.max_length=1: use an int >= 2"),
        (["training.packing=maybe"], "training.packing='maybe': expected true or false"),
        (["mixing.max_growth=.nan"], "mixing.max_growth=nan: expected a finite number"),
        (["mixing.max_growth=0.5"], "mixing.max_growth=0.5: use a number >= 1"),
        (["detector.ppl_ratio_alarm=.inf"], "detector.ppl_ratio_alarm=inf: expected a finite number"),
        (["generation.n_samples=2.5"], "generation.n_samples=2.5: expected a whole number"),
        (["mixing.floor_scope=epoch"], "mixing.floor_scope='epoch': choose one of ['step', 'micro_batch']"),
    ],
)
def test_bad_values_are_refused_when_the_recipe_loads(overrides, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_values_the_loop_passed_on_before_still_pass_unchanged():
    config = config_from_dict({}, ["training.max_steps=-1", "training.learning_rate=2e-4",
                                   "training.save_steps=0.5", "training.max_length=null",
                                   "training.num_train_epochs=1"])
    kwargs = config.training.sft_kwargs()
    assert kwargs["max_steps"] == -1 and kwargs["save_steps"] == 0.5 and kwargs["max_length"] is None
    assert type(kwargs["num_train_epochs"]) is int  # passed on as given, as before


def test_an_output_dir_that_is_a_file_or_unwritable_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    for out, needle in [(tmp_path / "file", "is a file"), (tmp_path / "file" / "run", "lies under the file")]:
        with pytest.raises(ConfigError, match=needle):
            check_config(config_from_dict({**OFFLINE, "output_dir": str(out)}))
    import tempfile

    locked = Path("/sys")  # read-only even for root
    try:
        with tempfile.TemporaryFile(dir=locked):
            pytest.skip("/sys is writable here")
    except OSError:
        pass
    with pytest.raises(ConfigError, match="cannot write in"):
        check_config(config_from_dict({**OFFLINE, "output_dir": str(locked / "run")}))
    assert not (locked / "run").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["training.learning_rate=.inf"], "training.learning_rate=inf: expected a finite number"),
        (["seeds=[0,0]"], "seed 0 is listed more than once"),
        (["output_dir=FILE"], "is a file"),
    ],
)
def test_the_cli_refuses_bad_values_in_one_line_before_work_starts(tmp_path, args, needle):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out"
    args = [a.replace("FILE", str(tmp_path / "file")) for a in args]
    cmd = [sys.executable, "-m", "collapse_guard.cli", "run", str(TINY), f"output_dir={out}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("collapse-guard: error: ") and needle in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert not out.exists()  # nothing was written
