"""Plug-ins the loop tests name by dotted path in a recipe (`training.callbacks`)."""

import time

from transformers import TrainerCallback


class SlowSteps(TrainerCallback):
    """Sleeps after every optimizer step, so a test can kill the process while training runs."""

    def __init__(self, seconds: float = 0.2):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)
