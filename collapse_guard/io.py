"""Atomic artifact writes in strict JSON: a crash never leaves a half-written file or dataset behind, and
every JSON file we write parses with any strict JSON parser.

Temp names carry the writer's pid (`<name>.tmp<pid>`, `<name>.old<pid>`, `.<name>.tmp<pid>.<random>`),
so a resumed run can tell the leftovers of a killed writer (`stale_temp_files`) from its own.

JSON has no NaN or Infinity. `atomic_write_json` never writes them:

- `non_finite="null"` (the default: measured values) writes `null` in their place and records what was
  there, with its JSON pointer, in a top-level `"nonfinite"` map (`{"/rounds/3/heldout_ppl": "NaN"}`);
  `read_json` puts the values back, so a resumed run judges exactly what the killed one measured.
- `non_finite="refuse"` (settings: a recipe, a config) raises `ValueError` naming the key and the value.

Example:

```python
>>> import json, math, tempfile, os
>>> from collapse_guard.io import atomic_write_json, read_json
>>> path = os.path.join(tempfile.mkdtemp(), "eval.json")
>>> atomic_write_json(path, {"heldout_ppl": float("nan"), "steps": 4})
>>> json.loads(open(path).read(), parse_constant=None)["heldout_ppl"] is None
True
>>> math.isnan(read_json(path)["heldout_ppl"])
True

```
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

NON_FINITE_KEY = "nonfinite"
# What a killed writer leaves behind: see the module docstring. The pid is group "pid".
_TEMP_NAME = re.compile(r"^(?:\.(?P<hidden>.+)\.tmp(?P<pid_h>\d+)\..+|(?P<base>.+)\.(?:tmp|old)(?P<pid>\d+)"
                        r"(?P<suffix>\.[A-Za-z0-9]+)?)$")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes via a temp file in the same folder + `os.replace`, so readers see old or new, never half."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def strict_json(data: Any, non_finite: Literal["null", "refuse"] = "null", what: str = "the data",
                indent: int | None = 2) -> str:
    """`data` as strict JSON text (sorted keys; `indent=None`: one line). See the module docstring for
    `non_finite`."""
    if non_finite not in ("null", "refuse"):
        raise ValueError(f"non_finite must be 'null' or 'refuse', got {non_finite!r}.")
    found: dict[str, str] = {}
    clean = _replace_non_finite(data, "", found)
    if found and non_finite == "refuse":
        pointer, value = next(iter(found.items()))
        key = pointer.strip("/").replace("/", ".").replace("~1", "/").replace("~0", "~") or "(top level)"
        raise ValueError(f"{what}: {key}={value} is not a finite number (JSON has no NaN or Infinity); "
                         "give a finite value.")
    if found and isinstance(clean, dict):  # (our writers write objects; elsewhere the nulls stay unexplained)
        clean[NON_FINITE_KEY] = found
    return json.dumps(clean, indent=indent, sort_keys=True, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike, data: Any, non_finite: Literal["null", "refuse"] = "null",
                      indent: int | None = 2) -> None:
    """`data` as strict JSON, atomically. Non-finite numbers: see the module docstring."""
    atomic_write_text(path, strict_json(data, non_finite, what=os.fspath(path), indent=indent))


def _pointer_part(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _replace_non_finite(value: Any, pointer: str, found: dict[str, str]) -> Any:
    """A JSON-ready copy of `value`: numpy/torch scalars and arrays as Python values, paths as strings,
    non-finite floats as None (recorded in `found` by JSON pointer)."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        found[pointer] = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return None
    if isinstance(value, Mapping):
        return {str(k): _replace_non_finite(v, f"{pointer}/{_pointer_part(k)}", found)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_non_finite(v, f"{pointer}/{i}", found) for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy / torch arrays and scalars
        return _replace_non_finite(value.tolist(), pointer, found)
    if hasattr(value, "item"):
        return _replace_non_finite(value.item(), pointer, found)
    raise TypeError(f"not JSON serializable: {type(value).__name__} at {pointer or 'the top level'}")


_RESTORE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """A JSON file (or `default` when there is none), with the non-finite values `atomic_write_json`
    recorded put back in place."""
    if not os.path.exists(path):
        return default
    with open(path) as fh:
        data = json.load(fh)
    if isinstance(data, dict) and isinstance(data.get(NON_FINITE_KEY), dict):
        for pointer, literal in data.pop(NON_FINITE_KEY).items():
            _set_pointer(data, pointer, _RESTORE.get(literal))
    return data


def _set_pointer(data: Any, pointer: str, value: Any) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    if not parts:
        return
    node = data
    try:
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        elif isinstance(node, dict) and last in node:
            node[last] = value
    except (KeyError, IndexError, ValueError, TypeError):
        return  # the file was edited by hand since: keep what it says


def atomic_save_dataset(dataset, path: str | os.PathLike) -> None:
    """`Dataset.save_to_disk` into a temp folder, then swap it in place."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(tmp)
    old = f"{path}.old{os.getpid()}"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# ----- leftovers of killed writers ----------------------------------------------------------------------
def temp_pid(name: str) -> int | None:
    """The writer's pid if `name` is one of our temp names (see the module docstring), else None."""
    match = _TEMP_NAME.match(name)
    if match is None:
        return None
    return int(match.group("pid") or match.group("pid_h"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_temp_files(folder: str | os.PathLike, locked: bool = False) -> Iterator[Path]:
    """Our temp files and folders under `folder` whose writer is gone: not this process, and not alive.

    `locked`: the caller holds the folder's exclusive run lock, so no other process writes in it and every
    temp but this process's own is stale (a live pid there is a reused one). Only names of the forms in
    the module docstring count, and a temp folder is not searched inside.
    """
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs) + sorted(files):
            pid = temp_pid(name)
            if pid is not None and pid != os.getpid() and (locked or not pid_alive(pid)):
                if name in dirs:
                    dirs.remove(name)
                yield Path(root) / name


def remove_stale_temp_files(folder: str | os.PathLike, locked: bool = False) -> list[Path]:
    """Removes `stale_temp_files(folder, locked)`; returns what it removed."""
    removed = list(stale_temp_files(folder, locked))
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed
