"""Synthetic data generation: Magpie instruction/response pairs and continuations of real text."""

from collapse_guard.generation.backends import (
    Completion,
    Decoding,
    ModelDivergedError,
    TransformersBackend,
    VLLMBackend,
    resolve_backend,
)
from collapse_guard.generation.continuation import ContinuationConfig, ContinuationGenerator
from collapse_guard.generation.magpie import TASKS, MagpieConfig, MagpieGenerator, MagpieTask
from collapse_guard.generation.templates import (
    FAMILIES,
    PRESETS,
    ChatTemplateInfo,
    TemplatePreset,
    derive_template,
)

__all__ = [
    "FAMILIES",
    "PRESETS",
    "TASKS",
    "ChatTemplateInfo",
    "Completion",
    "ContinuationConfig",
    "ContinuationGenerator",
    "Decoding",
    "MagpieConfig",
    "MagpieGenerator",
    "MagpieTask",
    "ModelDivergedError",
    "TemplatePreset",
    "TransformersBackend",
    "VLLMBackend",
    "derive_template",
    "resolve_backend",
]
