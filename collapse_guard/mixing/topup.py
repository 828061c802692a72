"""Real top-ups: the next rows of the real stream, cut like the trainer cuts its rows, that carry loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from collapse_guard.mixing.segments import carries_loss, shape_like, truncate
from collapse_guard.mixing.stream import RealStream

# Draws per top-up before giving up on a pool whose rows carry no loss when cut: a prompt-completion pool
# whose prompts fill max_length would otherwise be drawn from forever.
TOP_UP_TRIES = 16


def draw_top_up(stream: RealStream, like: Sequence[str], limit: int | None, keep_end: bool = False,
                fit: int | None = None) -> tuple[dict[str, Any] | None, int]:
    """(a real row cut to the trainer's `limit`, then to its first `fit` tokens to fill a packed row's free
    space, shaped like the batch's rows (`like`), that carries loss; the draws it took that carried none).

    The row is None after `TOP_UP_TRIES` draws that all carried none: a top-up whose labels are all -100 would
    count toward the floor while training nothing, so the floor goes short instead (the caller says so).
    """
    for misses in range(TOP_UP_TRIES):  # misses: draws so far that carried no loss
        example = stream.next()
        if limit is not None:
            example = truncate(example, limit, keep_end=keep_end)
        if fit is not None:
            example = truncate(example, fit)  # a packed row's free space: keep the start
        if carries_loss(example):
            return shape_like(example, like or ["input_ids", "labels"]), misses
    return None, TOP_UP_TRIES


def no_loss_warning(tries: int, cut_note: str, so_far: int) -> str:
    return (f"MixingCollator: {tries} real top-ups in a row carry no loss{cut_note} "
            "(all their labels are -100: prompt-completion rows whose prompt fills max_length, say), so they "
            "are not used and this micro-batch gets fewer real rows (tokens) than the floor asks "
            f"({so_far} such draws so far). Fix: raise max_length "
            "(SFTConfig.max_length) or shorten the prompts of the real data.")
