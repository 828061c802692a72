"""collapse_guard: keep Hugging Face fine-tuning from collapsing when it learns from synthetic data.

The public API is re-exported here and imported lazily (PEP 562), so `import collapse_guard` and the
`collapse-guard --help` command do not import torch or transformers.

```python
from collapse_guard import CollapseGuardCallback, MixingCollator, mix_datasets
```
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# name -> module that defines it
_EXPORTS = {
    # mixing: the real-data floor
    "mix_datasets": "collapse_guard.mixing",
    "MixingCollator": "collapse_guard.mixing",
    # the guard
    "CollapseGuardCallback": "collapse_guard.callbacks",
    "GuardConfig": "collapse_guard.callbacks",
    "PolicyGuardCallback": "collapse_guard.policy_guard",
    "ProbeConfig": "collapse_guard.probe",
    "FloorConfig": "collapse_guard.floor",
    "CollapseDetector": "collapse_guard.detector",
    "DetectorConfig": "collapse_guard.detector",
    "Verdict": "collapse_guard.detector",
    # measurements
    "HeldoutPerplexity": "collapse_guard.metrics",
    "diversity_metrics": "collapse_guard.metrics",
    # selection
    "Selector": "collapse_guard.selection",
    "SelectionPipeline": "collapse_guard.selection",
    "RewardModelSelector": "collapse_guard.selection",
    "VerifierSelector": "collapse_guard.selection",
    "PerplexitySelector": "collapse_guard.selection",
    "DedupSelector": "collapse_guard.selection",
    "ContaminationFilter": "collapse_guard.selection",
    "PrivacyFilter": "collapse_guard.selection",
    # generation
    "MagpieGenerator": "collapse_guard.generation",
    "MagpieConfig": "collapse_guard.generation",
    "ContinuationGenerator": "collapse_guard.generation",
    "ContinuationConfig": "collapse_guard.generation",
    # data
    "load_source": "collapse_guard.data",
    "with_provenance": "collapse_guard.provenance",
    # equal compute: tokens counted at the model input
    "TokenBudgetCallback": "collapse_guard.token_budget",
    # the loop
    "run_rounds": "collapse_guard.loop",
    "load_config": "collapse_guard.config",
    "write_report": "collapse_guard.report",
}

__all__ = [
    "CollapseDetector",
    "CollapseGuardCallback",
    "ContaminationFilter",
    "ContinuationConfig",
    "ContinuationGenerator",
    "DedupSelector",
    "DetectorConfig",
    "FloorConfig",
    "GuardConfig",
    "HeldoutPerplexity",
    "MagpieConfig",
    "MagpieGenerator",
    "MixingCollator",
    "PerplexitySelector",
    "PolicyGuardCallback",
    "PrivacyFilter",
    "ProbeConfig",
    "RewardModelSelector",
    "SelectionPipeline",
    "Selector",
    "TokenBudgetCallback",
    "Verdict",
    "VerifierSelector",
    "diversity_metrics",
    "load_config",
    "load_source",
    "mix_datasets",
    "run_rounds",
    "with_provenance",
    "write_report",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'collapse_guard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from collapse_guard.callbacks import CollapseGuardCallback, GuardConfig
    from collapse_guard.config import load_config
    from collapse_guard.data import load_source
    from collapse_guard.detector import CollapseDetector, DetectorConfig, Verdict
    from collapse_guard.floor import FloorConfig
    from collapse_guard.generation import (
        ContinuationConfig,
        ContinuationGenerator,
        MagpieConfig,
        MagpieGenerator,
    )
    from collapse_guard.loop import run_rounds
    from collapse_guard.metrics import HeldoutPerplexity, diversity_metrics
    from collapse_guard.mixing import MixingCollator, mix_datasets
    from collapse_guard.policy_guard import PolicyGuardCallback
    from collapse_guard.probe import ProbeConfig
    from collapse_guard.provenance import with_provenance
    from collapse_guard.report import write_report
    from collapse_guard.selection import (
        ContaminationFilter,
        DedupSelector,
        PerplexitySelector,
        PrivacyFilter,
        RewardModelSelector,
        SelectionPipeline,
        Selector,
        VerifierSelector,
    )
    from collapse_guard.token_budget import TokenBudgetCallback
