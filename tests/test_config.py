"""The recipe config system: YAML -> validated dataclasses, overrides, plug-in components, clear errors."""

import dataclasses

import pytest

from collapse_guard.config import (
    ConfigError,
    LoopConfig,
    apply_overrides,
    build_component,
    builtin_recipe,
    check_config,
    config_from_dict,
    help_text,
    load_config,
    variant_configs,
)


def test_defaults_are_valid_and_documented():
    config = LoopConfig()
    assert config.mixing.min_real_fraction == 0.5
    for cls in (LoopConfig, type(config.training), type(config.mixing), type(config.generation)):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    assert "mixing.min_real_fraction" in help_text()


def test_overrides_are_typed_by_the_field():
    config = config_from_dict({}, ["training.learning_rate=1e-4", "rounds=4", "model.lora=true",
                                   "data.max_words=12", "generation.temperature=0.7", "data.max_real=null"])
    assert config.training.learning_rate == pytest.approx(1e-4) and isinstance(config.training.learning_rate, float)
    assert config.rounds == 4 and config.model.lora is True and config.data.max_words == 12
    assert config.data.max_real is None
    # YAML's own parser would leave '1e-4' a string; the dataclass type decides
    assert config_from_dict({"training": {"learning_rate": "3e-5"}}).training.learning_rate == pytest.approx(3e-5)


@pytest.mark.parametrize(
    ("data", "overrides", "needle"),
    [
        ({"mixing": {"mode": "replaec"}}, [], "mixing.mode='replaec'"),
        ({"mixing": {"modee": "replace"}}, [], "Valid keys under mixing: ['mode'"),
        ({"tranining": {}}, [], "unknown key 'tranining'"),
        ({}, ["mixing.min_real_fraction=0.05"], "mixing.allow_low_real_fraction=true"),
        ({}, ["mixing.min_real_fraction=1.5"], "mixing.min_real_fraction=1.5"),
        ({}, ["training.learning_rate=fast"], "training.learning_rate='fast': expected a number"),
        ({}, ["rounds=0"], "rounds=0"),
        ({}, ["model.lora=maybe"], "model.lora='maybe': expected true or false"),
        ({"selectors": ["DedupSelector"]}, [], "selectors[0]"),
        ({}, ["generation.top_p=0"], "generation.top_p=0"),
        ({}, ["noequals"], "expected key.sub=value"),
    ],
)
def test_bad_values_name_key_value_and_fix(data, overrides, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, overrides)
    assert needle in str(err.value)


def test_low_real_fraction_needs_the_explicit_override():
    config = config_from_dict({}, ["mixing.min_real_fraction=0", "mixing.allow_low_real_fraction=true"])
    assert config.mixing.min_real_fraction == 0.0


def test_check_config_catches_paths_models_and_components(tmp_path):
    base = {"model": {"name_or_path": "tiny"}, "data": {"real": "tiny:human", "heldout": "tiny:heldout"}}
    check_config(config_from_dict(base))
    cases = [
        (["data.real=" + str(tmp_path / "missing.jsonl")], "data.real="),
        (["data.heldout=human:nope"], "human:lee"),
        (["model.name_or_path=" + str(tmp_path)], "no config.json"),
        (["model.name_or_path=./not/here"], "no such folder"),
        (["detector.thresholds={ppl_ratio_alrm: 1.3}"], "ppl_ratio_alarm"),
        (["training.sft_args={not_a_field: 1}"], "training.sft_args.not_a_field"),
    ]
    for overrides, needle in cases:
        with pytest.raises(ConfigError) as err:
            check_config(config_from_dict(base, overrides))
        assert needle in str(err.value), (overrides, str(err.value))
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg'"):
        check_config(config_from_dict({**base, "selectors": [{"class": "no_such_pkg.Selector"}]}))
    with pytest.raises(ConfigError, match="has no 'DedupSelectr'"):
        check_config(config_from_dict({**base, "selectors": [{"class": "collapse_guard.selection.DedupSelectr"}]}))


def test_components_by_dotted_path_get_what_they_ask_for():
    counter = build_component({"class": "collections.Counter", "a": 2}, key="x")
    assert counter["a"] == 2
    selector = build_component({"class": "collapse_guard.selection.DedupSelector", "threshold": 0.7},
                               real_texts=["A human sentence here."], unused_object=object())
    assert selector.threshold == 0.7
    with pytest.raises(ConfigError, match=r"selectors\[0\].*treshold"):
        build_component({"class": "collapse_guard.selection.DedupSelector", "treshold": 0.7}, key="selectors[0]")


def test_extends_and_variants(tmp_path):
    parent = tmp_path / "parent.yaml"
    parent.write_text("rounds: 5\noutput_dir: out\nmixing: {mode: accumulate, min_real_fraction: 0.3}\n")
    child = tmp_path / "child.yaml"
    child.write_text(
        "extends: parent.yaml\nname: child\nmixing: {mode: replace}\n"
        "variants:\n  a: {mixing.min_real_fraction: 0.0, mixing.allow_low_real_fraction: true}\n  b: {rounds: 2}\n"
    )
    config = load_config(child)
    assert config.rounds == 5 and config.mixing.mode == "replace" and config.mixing.min_real_fraction == 0.3
    variants = variant_configs(config)
    assert list(variants) == ["a", "b"]
    assert variants["a"].mixing.min_real_fraction == 0.0 and variants["a"].output_dir.endswith("out/a")
    assert variants["b"].rounds == 2 and variants["b"].name == "b"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_apply_overrides_builds_sections():
    assert apply_overrides({}, ["a.b.c=3"]) == {"a": {"b": {"c": 3}}}
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_builtin_demo_recipe_loads():
    config = load_config(builtin_recipe("demo.yaml"))
    variants = variant_configs(config)
    assert variants["replace"].mixing.min_real_fraction == 0.0
    assert variants["guarded"].mixing.min_real_fraction == 0.5 and variants["guarded"].selectors
