"""The metrics as `evaluate` modules, loadable offline from the installed package.

Example:

```python
>>> from collapse_guard.metrics import load_metric
>>> diversity = load_metric("diversity")
>>> diversity.compute(predictions=["a a a b"])["distinct_1"]
0.5

```
"""

from __future__ import annotations

from pathlib import Path

MODULES_DIR = Path(__file__).parent
METRICS = ("diversity", "heldout_perplexity")


def module_path(name: str) -> Path:
    """The directory of the `evaluate` module `name` (pass it to `evaluate.load`)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {list(METRICS)}.")
    return MODULES_DIR / name


def load_metric(name: str, **kwargs):
    """`evaluate.load` of one of our modules from its local directory (no hub access)."""
    import evaluate

    return evaluate.load(str(module_path(name)), **kwargs)
