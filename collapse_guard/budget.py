"""When the guard measures, and what measuring costs: `MeasurementBudget`.

A measurement is due every `GuardConfig.eval_steps` optimizer steps, unless it would push the guard's
share of the job past `cost_budget`; the first and the final measurement are always taken. The cost is
counted in wall-clock seconds or in forward tokens (a training token counts 3: forward and backward); the
training tokens come from a forward pre-hook on the model that skips the guard's own forwards.

What the user reads: the schedule once, when training starts (`announce`), and an over-budget warning at
the end only when measurements beyond the required first and final one took the guard over (`warn_if_over`):
on a job too short for the budget, those two alone can exceed it, and no setting of the guard changes that.

Every counter is reset in one place, `start()`, when a trainer starts (or resumes) training.

Example:

```python
>>> from collapse_guard.budget import MeasurementBudget
>>> budget = MeasurementBudget(eval_steps=5, cost_budget=None)
>>> budget.start(last_measured=0)
>>> taken = []
>>> for step in range(1, 13):
...     if budget.due(step, final=step == 12):
...         budget.record(step, {"seconds": 0.1, "forward_tokens": 100})
...         taken.append(step)
>>> taken
[5, 10, 12]

```
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from collapse_guard.distributed import broadcast, is_main

logger = logging.getLogger(__name__)
# What the schedule lines said in this process: a loop's rounds share one schedule, said once.
_ANNOUNCED: set[str | tuple] = set()

# A training token is one forward and one backward pass: about three forward tokens of compute.
TRAIN_TOKEN_COST = 3.0
_COST_PARTS = ("perplexity_seconds", "generation_seconds", "signals_seconds")


class MeasurementBudget:
    """The measurement schedule and its cost account.

    Args:
        eval_steps: fewest optimizer steps between two measurements.
        cost_budget: share of the job the guard may spend measuring (None: no limit).
        budget_unit: "time" (wall-clock seconds) or "tokens" (forward tokens).
        generation_every: generate the prompt set at every N-th measurement only (and always at the final).
        sequential: measurements between the first and the final one may score half the held-out set
            (`GuardConfig.sequential`): until one has been taken, the next is priced at a required one's
            cost less half its held-out part.
    """

    def __init__(self, eval_steps: int = 50, cost_budget: float | None = 0.03,
                 budget_unit: Literal["time", "tokens"] = "time", generation_every: int = 1,
                 sequential: bool = False):
        self.eval_steps, self.cost_budget = eval_steps, cost_budget
        self.unit = "seconds" if budget_unit == "time" else "tokens"
        self.generation_every = generation_every
        self.sequential = sequential
        self._hook = None
        self.measuring = False
        self.start()

    @classmethod
    def from_config(cls, config) -> MeasurementBudget:
        """From a `GuardConfig`: its eval_steps, cost_budget, budget_unit, generation_every, sequential."""
        return cls(config.eval_steps, config.cost_budget, config.budget_unit, config.generation_every,
                   config.sequential)

    def start(self, last_measured: int = -1, model=None) -> None:
        """Resets every counter: a trainer starts (or resumes) training; `last_measured` is the step of the
        latest measurement it continues from (-1: none yet). With `model`, counts its training tokens."""
        self.spent: dict[str, float] = {"seconds": 0.0, "tokens": 0.0, "measurements": 0}
        self.started = time.perf_counter()
        self.trained_tokens = 0.0
        self.last_measured = last_measured
        # measurements beyond the required ones (the first, the final, a forced re-check): the part of the
        # cost that eval_steps, evaluation requests and the budget control
        self.optional_measurements = 0
        self._forced_step: int | None = None
        # what the next measurements will cost: required ones (the first, the final, a re-check) score the
        # whole held-out set; optional ones may stop at half of it (sequential)
        self._required: list[float] = []
        self._held_out_part = 0.0
        self._last_optional: float | None = None
        if model is not None:
            self._count_training_tokens(model)

    # ----- the schedule ------------------------------------------------------------------------------------
    def due(self, step: int, final: bool, max_steps: int = 0, forced: bool = False) -> bool:
        """Whether to measure at `step`: spacing, then the cost budget (rank 0 decides for every rank).

        A due measurement is taken only if it and the final one (always taken) fit in the budget's share of
        the whole job, its length projected from the steps so far. `forced` (a re-check the floor asked for)
        skips the spacing and the budget.
        """
        if step == self.last_measured:
            return False
        if final or forced:
            if not final:
                self._forced_step = step
            return True
        if step - max(self.last_measured, 0) < self.eval_steps:
            return False
        if self.cost_budget is None or not self.spent["measurements"]:
            return True
        final_cost = (sum(self._required) / len(self._required) if self._required
                      else self.spent[self.unit] / self.spent["measurements"])
        next_cost = self._last_optional
        if next_cost is None:
            next_cost = final_cost - (self._held_out_part / 2 if self.sequential else 0.0)
        trained = self._trained()
        projected = trained * max(1.0, max_steps / step) if step > 0 else trained
        planned = self.spent[self.unit] + next_cost + final_cost  # this one and the final one
        fits = bool(broadcast(planned <= self.cost_budget * (projected + planned)))
        said = ("skip", self.eval_steps, self.cost_budget, self.unit)  # once per process, like the schedule
        if not fits and said not in _ANNOUNCED and is_main():
            _ANNOUNCED.add(said)
            logger.info("collapse guard: no measurement at step %d: with the final one it would take the "
                        "guard past its cost_budget of %s of this run (a measurement costs about %.3g %s); "
                        "the final one is still taken.", step, _percent(self.cost_budget), next_cost,
                        self.unit)
        return fits

    def plan(self, max_steps: int) -> str:
        """The schedule in one sentence, for a run of `max_steps` optimizer steps (0: not known)."""
        end = f"the end of training (step {max_steps})" if max_steps > 0 else "the end of training"
        if 0 < max_steps <= self.eval_steps:
            return (f"collapse guard: measures at the start and {end} only: eval_steps={self.eval_steps} "
                    f"leaves no measurement in between on a run of {max_steps} steps.")
        if self.cost_budget is None:
            return f"collapse guard: measures at the start, every {self.eval_steps} steps and at {end}."
        unit = "wall-clock time" if self.unit == "seconds" else "forward tokens"
        return (f"collapse guard: measures at the start and {end}, and every {self.eval_steps} steps in "
                f"between while they fit its cost_budget of {_percent(self.cost_budget)} of the run (in "
                f"{unit}); the first and the final measurement are taken whatever they cost.")

    def announce(self, max_steps: int) -> None:
        """Says the schedule (`plan`) once per process, on rank 0: when a trainer starts training."""
        text = self.plan(max_steps)
        if is_main() and text not in _ANNOUNCED:
            _ANNOUNCED.add(text)
            logger.info(text)

    def generates(self, final: bool) -> bool:
        """Whether the next measurement generates (held-out perplexity alone is cheaper)."""
        return final or self.spent["measurements"] % self.generation_every == 0

    # ----- the account -------------------------------------------------------------------------------------
    @contextmanager
    def measurement(self) -> Iterator[None]:
        """Marks the guard's own forwards, which the training-token count must skip."""
        self.measuring = True
        try:
            yield
        finally:
            self.measuring = False

    def record(self, step: int, cost: dict[str, Any], final: bool = False) -> None:
        """Books a measurement taken at `step` and what it cost (`Probe.measure`'s "cost"); `final`: the
        run's final measurement (required, like the first one and a forced re-check)."""
        spent = cost["seconds"] if self.unit == "seconds" else cost["forward_tokens"]
        if not (final or self.last_measured < 0 or step == self._forced_step):
            self.optional_measurements += 1
            self._last_optional = spent
        else:
            self._required.append(spent)
            part = "perplexity_seconds" if self.unit == "seconds" else "heldout_tokens"
            self._held_out_part = cost.get(part, 0.0)
        self.spent["seconds"] += cost["seconds"]
        self.spent["tokens"] += cost["forward_tokens"]
        self.spent["measurements"] += 1
        for part in _COST_PARTS:
            self.spent[part] = self.spent.get(part, 0.0) + cost.get(part, 0.0)
        self.last_measured = step

    def add_seconds(self, part: str, seconds: float) -> None:
        self.spent[part] = self.spent.get(part, 0.0) + seconds

    def _trained(self) -> float:
        if self.unit == "seconds":
            return time.perf_counter() - self.started - self.spent["seconds"]
        return TRAIN_TOKEN_COST * self.trained_tokens

    def share(self) -> float:
        """What the guard spent as a share of the run so far (its budget unit)."""
        if self.unit == "tokens":
            total = TRAIN_TOKEN_COST * self.trained_tokens + self.spent["tokens"]
            return self.spent["tokens"] / total if total else 0.0
        elapsed = time.perf_counter() - self.started
        return self.spent["seconds"] / elapsed if elapsed > 0 else 0.0

    def warn_if_over(self) -> None:
        """Warns when the guard went over its budget with measurements it could have skipped.

        The first and the final measurement are taken whatever they cost, so on a short job they alone can
        exceed the budget; the schedule said so when training started (`announce`), and the share stays in
        `share()` (the loop's train.json), with a debug line here rather than a warning nobody can act on.
        """
        budget, share = self.cost_budget, self.share()
        if budget is None or share <= budget or not is_main():
            return
        each = self.spent[self.unit] / max(self.spent["measurements"], 1)
        if not self.optional_measurements:
            logger.debug("collapse guard: its required first and final measurements took %.1f%% of this "
                         "training run (about %.3g %s each); they fit its cost_budget of %s from about "
                         "%.3g %s of training.", 100 * share, each, self.unit, _percent(budget),
                         2 * each / budget, self.unit)
            return
        logger.warning(
            "collapse guard: it took %.1f%% of this training run, over its cost_budget of %s: %d "
            "measurement(s) beyond the first and the final one (every eval_steps=%d steps, or asked for by "
            "the Trainer's evaluation), about %.3g %s each. Raise eval_steps, evaluate less often, or make a "
            "measurement cheaper (ProbeConfig: fewer heldout texts, n_prompts, max_new_tokens, a shorter "
            "context_length).",
            100 * share, _percent(budget), self.optional_measurements, self.eval_steps, each, self.unit)

    def _count_training_tokens(self, model) -> None:
        """A forward pre-hook counting the tokens the model trains on, skipping the guard's own forwards.
        One hook per budget: a restart replaces it rather than counting twice."""
        module = getattr(model, "module", model)

        def hook(_module, args, kwargs):
            if not self.measuring:
                mask = kwargs.get("attention_mask")
                ids = kwargs.get("input_ids", args[0] if args else None)
                if mask is not None:
                    self.trained_tokens += float(mask.sum())
                elif ids is not None:
                    self.trained_tokens += float(ids.numel())

        if self._hook is not None:
            self._hook.remove()
        self._hook = module.register_forward_pre_hook(hook, with_kwargs=True)


def _percent(share: float) -> str:
    return f"{100 * share:.3g}%"
