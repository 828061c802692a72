"""Tokens counted where the model sees them, and a training budget in those tokens.

Arms of an experiment are compared fairly only at equal compute. Rows are not compute: a floor that tops up
with real rows, packing, truncation at `max_length` and padding all change how many tokens a "row" costs. So
the count is taken at the model input, by a forward pre-hook on the training model: every token of every
micro-batch the optimizer learns from (top-ups included; padding excluded through the attention mask), and
separately the supervised ones (labels != -100: what the loss is computed on).

`TokenBudgetCallback(max_tokens=N)` stops training at the first optimizer step at which N input tokens have
been trained (all ranks summed, so every rank stops at the same step), so arms given the same N train the same
tokens to within one optimizer step; the exact counts are reported either way.

Example:

```python
>>> from collapse_guard.token_budget import TokenBudgetCallback
>>> budget = TokenBudgetCallback(max_tokens=4096)
>>> budget.counts
{'input_tokens': 0, 'supervised_tokens': 0, 'micro_batches': 0}

```
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from transformers import TrainerCallback

from collapse_guard.distributed import all_reduce_sum, is_main
from collapse_guard.io import atomic_write_json

logger = logging.getLogger(__name__)

STATE_FILE = os.path.join("collapse_guard", "token_budget.json")
_IGNORE_INDEX = -100


def _tokens_of(kwargs: dict[str, Any], args: tuple) -> tuple[int, int]:
    """(input tokens, supervised tokens) of one forward call's batch."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask")
    labels = kwargs.get("labels")
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
        inputs = int(mask.sum())
    elif input_ids is not None:  # padding-free / packed batches carry no mask: every position is a token
        inputs = int(input_ids.numel())
    else:
        inputs = 0
    supervised = int((labels[..., 1:] != _IGNORE_INDEX).sum()) if labels is not None else 0
    return inputs, supervised


class TokenBudgetCallback(TrainerCallback):
    """Counts trained tokens at the model input and, with `max_tokens`, stops training at that many.

    Args:
        max_tokens: stop at the first optimizer step by which this many input tokens (all ranks summed) have
            been trained; None only counts.

    The counts survive a resume: they are saved in every checkpoint (`collapse_guard/token_budget.json`) and
    read back when the Trainer resumes from one.
    """

    def __init__(self, max_tokens: int | None = None):
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens must be an int >= 1 (tokens at the model input) or None, got "
                             f"{max_tokens!r}.")
        self.max_tokens = max_tokens
        self._local = [0, 0, 0]  # this rank's input tokens, supervised tokens, micro-batches since the sync
        self._total = [0, 0, 0]  # all ranks, up to the last optimizer step
        self._hook = None

    @property
    def counts(self) -> dict[str, int]:
        """Tokens trained so far, all ranks summed (as of the last optimizer step)."""
        return dict(zip(("input_tokens", "supervised_tokens", "micro_batches"), self._total, strict=True))

    def _count(self, module, args, kwargs) -> None:
        if not module.training:  # the guard's and the evaluator's forwards are not training
            return
        inputs, supervised = _tokens_of(kwargs, args)
        self._local[0] += inputs
        self._local[1] += supervised
        self._local[2] += 1

    def _sync(self) -> None:
        import torch

        step = all_reduce_sum(torch.tensor(self._local, dtype=torch.float64))
        self._total = [t + int(round(float(v))) for t, v in zip(self._total, step, strict=True)]
        self._local = [0, 0, 0]

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any):
        if model is None:
            raise ValueError("TokenBudgetCallback needs the Trainer's model (add it with "
                             "trainer.add_callback).")
        if self._hook is None:
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        if state.global_step > 0:  # resumed: the checkpoint holds what was trained before it
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            try:
                with open(path) as fh:
                    saved = json.load(fh)
                self._total = [int(saved[k]) for k in ("input_tokens", "supervised_tokens", "micro_batches")]
            except (OSError, KeyError, ValueError):
                logger.warning("TokenBudgetCallback: resuming at step %d without %s; the token count "
                               "restarts at 0 for this run.", state.global_step, path)

    def on_step_end(self, args, state, control, **kwargs: Any):
        self._sync()  # an all-reduce: every rank then decides the same
        if self.max_tokens is not None and self._total[0] >= self.max_tokens:
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs: Any):
        if is_main():
            atomic_write_json(os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE),
                              self.counts)

    def on_train_end(self, args, state, control, **kwargs: Any):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.max_tokens is not None and self._total[0] < self.max_tokens and is_main():
            logger.warning("token budget: training ended after %d of the %d tokens asked for (the data ran "
                           "out after %g epoch(s)); raise num_train_epochs or give more rows.",
                           self._total[0], self.max_tokens, args.num_train_epochs)
