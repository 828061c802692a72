"""A run folder that cannot be corrupted: one process at a time, the recipe it belongs to, what is done.

- `RunLock`: an exclusive `flock` on `output_dir/.lock`, held for the whole run; a second run into the
  same folder is refused with a message naming the holder (pid, host, command, start time). The
  kernel releases it when the holder dies, so a killed run never leaves a stale lock behind.
- `RunState` (`run_state.json`): the recipe the folder belongs to and the finished steps of each round.
  A re-run with the same recipe continues; a different recipe is refused once any round step has
  finished (`--restart` starts over), and silently replaces a run that never got that far.
- Leftovers of a killed run: a folder that holds only our lock and a half-written `run_state.json`
  (a kill between taking the lock and the first rename) is a run that never started and is taken; temp
  files of killed writers anywhere in a run folder (`round_1/eval.json.tmp<pid>`, ...) are removed when
  the next run claims it. Nothing else is ever removed from a folder that is not a run folder.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collapse_guard.io import atomic_write_json, read_json, remove_stale_temp_files, strict_json, temp_pid

logger = logging.getLogger("collapse_guard.rundir")

LOCK_NAME = ".lock"
STATE_NAME = "run_state.json"


class RunFolderError(RuntimeError):
    """The run folder is in use, or belongs to another recipe; the message says by whom and what to do."""


class RunLock:
    """`with RunLock(folder):` ... ; non-blocking: refuses at once if another process holds the folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._fh = None

    def __enter__(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.folder / LOCK_NAME, "a+")  # noqa: SIM115 - held for the run's lifetime
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder()
            self._fh.close()
            self._fh = None
            raise RunFolderError(f"output_dir {str(self.folder)!r} is in use by {holder}. Wait for that run "
                                 "to finish, or give another output_dir.") from None
        self._fh.seek(0)
        self._fh.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        self._fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {started} "
                       f"({' '.join(sys.argv)[:200]})")
        self._fh.flush()
        return self

    def _read_holder(self, wait_s: float = 2.0) -> str:
        # The holder writes its name just after taking the lock; a refused process that arrives inside that
        # window would otherwise name nobody, so it waits briefly for the name to appear.
        deadline = time.monotonic() + wait_s
        while True:
            self._fh.seek(0)
            holder = self._fh.read().strip()
            if holder or time.monotonic() > deadline:
                return holder or "another process"
            time.sleep(0.05)

    def __exit__(self, *exc: Any) -> None:
        if self._fh is not None:
            self._fh.seek(0)
            self._fh.truncate()
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


@dataclass
class RunState:
    """`run_state.json`: the recipe, finished steps per round, and why the run ended (if it did)."""

    path: Path
    config: dict[str, Any] | None = None
    done: dict[str, list[str]] = field(default_factory=dict)
    stopped: dict[str, Any] | None = None
    finished: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds per 'round/step' (the run's time split)

    @classmethod
    def load(cls, folder: Path) -> RunState:
        data = read_json(folder / STATE_NAME, default={}) or {}
        return cls(folder / STATE_NAME, data.get("config"), data.get("done", {}), data.get("stopped"),
                   data.get("finished", False), data.get("timings", {}))

    @property
    def started(self) -> bool:
        return any(self.done.values())

    def is_done(self, round_index: int, step: str) -> bool:
        return step in self.done.get(str(round_index), [])

    def mark(self, round_index: int, step: str) -> None:
        steps = self.done.setdefault(str(round_index), [])
        if step not in steps:
            steps.append(step)
        self.save()

    def save(self) -> None:
        from collapse_guard import __version__

        # a recipe is settings, not measurements: a non-finite value in it is refused, never nulled
        atomic_write_json(self.path, {"config": self.config, "done": self.done, "stopped": self.stopped,
                                      "finished": self.finished, "timings": self.timings,
                                      "version": __version__}, non_finite="refuse")


def _differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(stored) | set(current))
    out = []
    for key in keys:
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return out


def claim(folder: Path, config: dict[str, Any], restart: bool = False,
          normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> RunState:
    """The folder's run state for `config` (rank 0, under the lock): continue, start, or refuse.

    `normalize` rebuilds a stored recipe with the current schema before the comparison, so that a setting
    added by a later version, at its default, does not make a run made before it "another recipe".

    Before anything is written: a recipe with a non-finite number is refused (`ConfigError`); leftovers of a
    killed run are removed (see the module docstring).
    """
    from collapse_guard.config import ConfigError

    try:
        strict_json(config, "refuse", what="the recipe")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    state = RunState.load(folder)
    ours = state.path.exists()
    if not ours:
        # A kill between taking the lock and the first rename of run_state.json leaves exactly these.
        half_written = [c for c in folder.iterdir() if c.is_file() and c.name.startswith(f"{STATE_NAME}.tmp")
                        and temp_pid(c.name) not in (None, os.getpid())]
        strangers = [c for c in folder.iterdir() if c.name != LOCK_NAME and c not in half_written]
        if strangers:
            raise RunFolderError(f"output_dir {str(folder)!r} holds files but no run_state.json: it is not a "
                                 "collapse_guard run folder, and nothing in it is overwritten. Give an empty "
                                 "or a new folder.")
        for leftover in half_written:
            leftover.unlink(missing_ok=True)
    else:
        removed = remove_stale_temp_files(folder, locked=True)  # we hold the lock: no one else writes here
        if removed:
            logger.info("%s: removed %d temp file(s) a killed run left (%s).", folder, len(removed),
                        ", ".join(str(p.relative_to(folder)) for p in removed[:3])
                        + (", ..." if len(removed) > 3 else ""))
    others = [c for c in folder.iterdir() if c.name != LOCK_NAME]
    stored = state.config or {}
    if ours and normalize is not None and stored:
        try:
            stored = normalize(stored)
        except (TypeError, ValueError):  # a stored recipe the schema no longer takes: compare it as written
            stored = state.config or {}
    changed = ours and stored != config
    if ours and changed and state.started and not restart:
        changes = _differences(stored, config)
        raise RunFolderError(
            f"output_dir {str(folder)!r} holds a run of another recipe ({'; '.join(changes[:4])}"
            f"{'; ...' if len(changes) > 4 else ''}). Re-run the same recipe and overrides to continue it, "
            "give another output_dir, or pass --restart to discard it.")
    # discarded on request, or it never finished a step: nothing worth keeping
    if ours and (restart or changed):
        for child in others:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        state = RunState(folder / STATE_NAME)
    state.config = config
    state.save()
    return state
