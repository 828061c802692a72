"""Synthetic data generation: Magpie instruction/response pairs and continuations of real text."""

from collapse_guard.generation.backends import (
    Completion,
    Decoding,
    TransformersBackend,
    VLLMBackend,
    resolve_backend,
)
from collapse_guard.generation.continuation import ContinuationConfig, ContinuationGenerator
from collapse_guard.generation.magpie import MagpieConfig, MagpieGenerator
from collapse_guard.generation.templates import PRESETS, ChatTemplateInfo, TemplatePreset, derive_template

__all__ = [
    "PRESETS",
    "ChatTemplateInfo",
    "Completion",
    "ContinuationConfig",
    "ContinuationGenerator",
    "Decoding",
    "MagpieConfig",
    "MagpieGenerator",
    "TemplatePreset",
    "TransformersBackend",
    "VLLMBackend",
    "derive_template",
    "resolve_backend",
]
