"""Recipes: each section is its component's own config, validated before anything runs, with one-line
errors."""

import dataclasses

import pytest

from collapse_guard.config import (
    ConfigError,
    LoopConfig,
    build_component,
    builtin_recipe,
    check_config,
    config_from_dict,
    expand,
    help_text,
    load_config,
    parse_overrides,
)


def test_defaults_are_valid_and_documented():
    config = LoopConfig()
    assert config.mixing.min_real_fraction == 0.5
    for cls in (LoopConfig, type(config.model), type(config.data), type(config.mixing)):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    assert "mixing.min_real_fraction" in help_text()


def test_sections_are_the_components_configs():
    from collapse_guard.callbacks import GuardConfig
    from collapse_guard.detector import DetectorConfig
    from collapse_guard.generation import ContinuationConfig, MagpieConfig
    from collapse_guard.probe import ProbeConfig

    config = config_from_dict({"generation": {"method": "continuation", "num_beams": 3, "n_samples": 8},
                               "evaluation": {"context_length": 64, "n_prompts": 4},
                               "guard": {"eval_steps": 7, "cost_budget": 0.05},
                               "detector": {"ppl_ratio_alarm": 1.3}, "training": {"learning_rate": 1e-4}})
    generation = config.generation_config()
    assert isinstance(generation, ContinuationConfig) and generation.num_beams == 3 and config.n_samples == 8
    # one default per setting: the component's own
    assert generation.prefix_tokens == ContinuationConfig().prefix_tokens
    assert isinstance(config.probe_config(), ProbeConfig) and config.probe_config().context_length == 64
    guard = config.guard_config(2, "h.json")
    assert isinstance(guard, GuardConfig) and guard.round_index == 2 and guard.eval_steps == 7
    assert isinstance(config.detector_config(), DetectorConfig) \
        and config.detector_config().ppl_ratio_alarm == 1.3
    # the recipe's values over the loop's own SFTConfig defaults (declared by TrainingConfig)
    sft = config.sft_fields()
    assert sft["learning_rate"] == 1e-4 and sft["lr_scheduler_type"] == "constant"
    magpie = config_from_dict({"generation": {"method": "magpie", "instruction_max_new_tokens": 32},
                               "data": {"real": "tiny:chat"}}).generation_config()
    assert isinstance(magpie, MagpieConfig) and magpie.instruction_max_new_tokens == 32


def test_overrides_are_typed():
    config = config_from_dict({}, ["training.learning_rate=1e-4", "rounds=4", "data.max_words=12",
                                   "generation.temperature=0.7", "data.max_real=null", "seeds=[0,1,2]"])
    assert config.training["learning_rate"] == pytest.approx(1e-4)
    assert config.rounds == 4 and config.data.max_words == 12 and config.data.max_real is None
    assert config.generation_config().temperature == 0.7 and config.seeds == [0, 1, 2]


@pytest.mark.parametrize(
    ("data", "overrides", "needle"),
    [
        ({"mixing": {"mode": "replaec"}}, [], "mixing.mode='replaec': choose one of"),
        ({"mixing": {"modee": "replace"}}, [], "Valid keys under mixing: ['mode'"),
        ({"tranining": {}}, [], "unknown key 'tranining'"),
        ({}, ["mixing.min_real_fraction=0.05"], "mixing.allow_low_real_fraction=true"),
        ({}, ["mixing.min_real_fraction=1.5"], "mixing.min_real_fraction must be in [0, 1], got 1.5"),
        ({}, ["rounds=0"], "rounds=0"),
        ({}, ["rounds=two"], "rounds='two': expected a number"),
        ({}, ["training.learnig_rate=1e-4"], "training.learnig_rate=0.0001: not a trl.SFTConfig field"),
        ({}, ["generation.num_beam=3"], "unknown key 'generation.num_beam'"),
        ({}, ["generation.top_p=0"], "generation: top_p must be in (0, 1], got 0.0"),
        ({}, ["evaluation.context_length=1"], "evaluation: ProbeConfig.context_length"),
        ({}, ["guard.eval_steps=0"], "guard: GuardConfig.eval_steps"),
        ({}, ["guard.round_index=3"], "guard.round_index=3: the loop sets it"),
        ({}, ["detector.ppl_ratio_alrm=1.3"], "unknown key 'detector.ppl_ratio_alrm'"),
        ({}, ["model.lora={rank: 4}"], "model.lora.rank=4: not a peft.LoraConfig field"),
        ({}, ["noequals"], "expected key.sub=value"),
    ],
)
def test_bad_values_name_key_value_and_fix(data, overrides, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_check_config_catches_sources_models_and_plugins(tmp_path):
    base = {"model": {"name_or_path": "tiny"}, "data": {"real": "tiny:human", "heldout": "tiny:heldout"}}
    check_config(config_from_dict(base))
    cases = [
        (["data.real=" + str(tmp_path / "missing.jsonl")], "no such file or folder"),
        (["data.heldout=human:nope"], "human:lee_background"),
        (["model.name_or_path=" + str(tmp_path)], "no config.json"),
        (["model.name_or_path=./not/here"], "no such folder"),
    ]
    for overrides, needle in cases:
        with pytest.raises(ConfigError) as err:
            check_config(config_from_dict(base, overrides))
        assert needle in str(err.value), (overrides, str(err.value))
    plugin_cases = [
        ({"class": "no_such_pkg.Selector"}, "cannot import module 'no_such_pkg'"),
        ({"class": "collapse_guard.selection.DedupSelectr"}, "has no 'DedupSelectr'"),
        ({"class": "collapse_guard.selection.DedupSelector", "treshold": 0.7}, r"selectors\[0\].treshold"),
        ({"class": "collections.Counter"}, "is not a Selector subclass"),
    ]
    for spec, needle in plugin_cases:
        with pytest.raises(ConfigError, match=needle):  # trusted: modules outside collapse_guard are imported
            check_config(config_from_dict({**base, "selectors": [spec], "trust_recipe_code": True}))


def test_components_by_dotted_path_get_what_they_ask_for():
    selector = build_component({"class": "collapse_guard.selection.DedupSelector", "threshold": 0.7},
                               real_texts=["A human sentence here."], unused_object=object())
    assert selector.threshold == 0.7


def test_extends_variants_and_seeds(tmp_path):
    parent = tmp_path / "parent.yaml"
    parent.write_text("rounds: 5\noutput_dir: out\nmixing: {mode: accumulate, min_real_fraction: 0.3}\n")
    child = tmp_path / "child.yaml"
    child.write_text(
        "extends: parent.yaml\nname: child\nmixing: {mode: replace}\nseeds: [0, 1]\n"
        "variants:\n  a: {mixing.min_real_fraction: 0.0, mixing.allow_low_real_fraction: true}\n"
        "  b: {rounds: 2}\n"
    )
    config = load_config(child)
    assert config.rounds == 5 and config.mixing.mode == "replace" and config.mixing.min_real_fraction == 0.3
    runs = expand(config)
    # Seeds outermost: a run cut short after the first seed still has every arm.
    assert list(runs) == ["a/seed_0", "b/seed_0", "a/seed_1", "b/seed_1"]
    assert runs["a/seed_1"].mixing.min_real_fraction == 0.0 \
        and runs["a/seed_1"].output_dir.endswith("out/a/seed_1")
    assert runs["a/seed_1"].seed == 1 and runs["b/seed_0"].rounds == 2 and runs["b/seed_0"].name == "b"


@pytest.mark.parametrize(
    ("text", "needle"),
    [("rounds: [1,\n", "is not valid YAML"), ("- a\n- b\n", "must be a YAML mapping"),
     ("extends: loop.yaml\n", "'extends' loops back on itself")],
)
def test_bad_recipe_files_are_one_line_errors(tmp_path, text, needle):
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_parse_overrides_builds_sections():
    assert parse_overrides(["a.b.c=3", "d=[1, 2]"]) == {"a": {"b": {"c": 3}}, "d": [1, 2]}


def test_builtin_demo_recipe_loads():
    runs = expand(load_config(builtin_recipe("demo")))
    assert runs["replace"].mixing.min_real_fraction == 0.0 and not runs["replace"].selectors
    guarded = runs["guarded"]
    # the recommended guard: the adaptive floor from 50%, measured every 4 steps, no typicality selection
    assert guarded.guard.floor.start == 0.5 and guarded.guard.eval_steps == 4 and not guarded.selectors
    assert guarded.mixing.tokens_per_round == runs["replace"].mixing.tokens_per_round == 3000  # equal compute
    assert guarded.end_run_on_alarm is False and guarded.guard_config(1).stop_training_on_alarm is False
