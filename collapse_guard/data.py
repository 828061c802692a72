"""The data layer: what format a data set is in, its plain text, and where it comes from.

Every part of collapse_guard (mixing, selection, generation, the loop) reads data through these
functions, so they agree on what a row is. Supported SFT formats (TRL's names):

| format              | columns                          | example                                          |
|---------------------|----------------------------------|--------------------------------------------------|
| `text`              | `text`                           | `{"text": "The river ..."}`                      |
| `messages`          | `messages` (chat)                | `{"messages": [{"role": "user", ...}, ...]}`     |
| `prompt_completion` | `prompt` + `completion`          | strings, or lists of messages                    |
| `tokens`            | `input_ids` (+ `labels`)         | already tokenized                                |

Preference data (`chosen` / `rejected`) is recognised and refused where it cannot be mixed. Other
columns (a `provenance` column, a continuation's `prefix`, scores) are carried along, never read as
the text.

Example:

```python
>>> from collapse_guard.data import data_format, texts_of
>>> data_format(["text", "provenance"]), data_format(["prompt", "completion"])
('text', 'prompt_completion')
>>> texts_of({"messages": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]})
['Hello!']

```
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

FORMATS = ("text", "messages", "prompt_completion", "tokens")
PREFERENCE = "preference"
TEXT_COLUMNS = ("text", "messages", "prompt", "completion", "input_ids", "labels")
# Built-in human text (gensim's test data, ships on PyPI) and the offline tiny sets of the test kit.
HUMAN_SETS = ("lee_background", "lee", "wiki")
TINY_SETS = ("human", "heldout", "chat")
SOURCE_HELP = ("'human:lee_background' | 'human:lee' | 'human:wiki' (ship on PyPI via gensim), "
               "'tiny:human' | 'tiny:heldout' | 'tiny:chat' (offline test sets), a .txt file (one document a "
               "line), a .json/.jsonl file, a dataset folder saved with save_to_disk, or a Hub dataset id")


class DataFormatError(ValueError):
    """A data set is in a format the operation does not support; the message names the supported ones."""


def column_names(data: Any) -> list[str]:
    """Column names of a Dataset / IterableDataset / dict of columns / list of row dicts."""
    names = getattr(data, "column_names", None)
    if names is None and hasattr(data, "features") and data.features is not None:
        names = list(data.features)
    if names is None and hasattr(data, "features"):  # a streaming dataset of unknown features: peek
        first = next(iter(data), None)
        names = list(first) if isinstance(first, Mapping) else []
    if names is not None:
        return list(names)
    if isinstance(data, Mapping):
        return list(data)
    if isinstance(data, Sequence) and data and isinstance(data[0], Mapping):
        return list(data[0])
    if isinstance(data, Sequence) and data and isinstance(data[0], str):
        return ["text"]
    return []


def data_format(data_or_columns: Any) -> str:
    """'text' | 'messages' | 'prompt_completion' | 'tokens' | 'preference' | 'unknown'.

    Accepts a data set, a batch (dict of columns) or a list of column names.
    """
    if isinstance(data_or_columns, (list, tuple, set)) and all(isinstance(c, str) for c in data_or_columns):
        columns = set(data_or_columns)
    else:
        columns = set(column_names(data_or_columns))
    if {"chosen", "rejected"} <= columns:
        return PREFERENCE
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    if "input_ids" in columns:
        return "tokens"
    return "unknown"


def require_format(data: Any, name: str, allowed: Sequence[str] = FORMATS) -> str:
    """The data's format, or a `DataFormatError` that names the columns found and the formats supported."""
    fmt = data_format(data)
    if fmt in allowed:
        return fmt
    columns = column_names(data)
    if fmt == PREFERENCE:
        raise DataFormatError(
            f"{name} is preference data (columns {columns}: 'chosen'/'rejected'), which cannot be mixed into "
            f"SFT batches. Supported: {', '.join(allowed)}. For DPO, use CollapseGuardCallback without "
            "MixingCollator (held-out perplexity and generation diversity), or give SFT-format real data."
        )
    raise DataFormatError(
        f"{name} has columns {columns}: expected one of the formats {', '.join(allowed)} "
        "('text'; 'messages'; 'prompt' + 'completion'; 'input_ids'). Rename your text column, e.g. "
        "dataset.rename_column('content', 'text')."
    )


def check_same_format(real: Any, synthetic: Any) -> str:
    """Real and synthetic data must be the same kind; returns it."""
    real_format, synthetic_format = (require_format(real, "real data"),
                                     require_format(synthetic, "synthetic data"))
    if real_format != synthetic_format:
        fix = ("render the messages to text with tokenizer.apply_chat_template(messages, tokenize=False)"
               if {real_format, synthetic_format} == {"text", "messages"}
               else "convert one side to the other's format")
        raise DataFormatError(
            f"real data is in '{real_format}' format but synthetic data is in '{synthetic_format}' format "
            f"(real columns {column_names(real)}, synthetic columns {column_names(synthetic)}): {fix}."
        )
    return real_format


def as_dataset(data: Any, name: str = "data"):
    """A `datasets.Dataset` (or `IterableDataset`, passed through) from a Dataset, a list of strings
    (-> 'text'), a list of row dicts or a dict of columns."""
    from datasets import Dataset, IterableDataset

    if data is None or isinstance(data, (Dataset, IterableDataset)):
        return data
    if isinstance(data, Mapping):
        return Dataset.from_dict(dict(data))
    if isinstance(data, (list, tuple)):
        if not data:
            return Dataset.from_dict({"text": []})
        if all(isinstance(x, str) for x in data):
            return Dataset.from_dict({"text": list(data)})
        if all(isinstance(x, Mapping) for x in data):
            return Dataset.from_list([dict(x) for x in data])
    raise TypeError(
        f"{name} must be a datasets.Dataset, an IterableDataset, a list of strings or a list of row dicts, "
        f"got {type(data).__name__}."
    )


def content(value: Any) -> str:
    """The text of a string, a message dict or a list of messages (their contents joined by newlines)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return str(value.get("content", ""))
    if isinstance(value, Iterable):
        return "\n".join(content(v) for v in value)
    return str(value)


def _last_assistant(messages: Sequence[Mapping[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i
    return -1


def _batch(data: Any) -> dict[str, list]:
    if isinstance(data, Mapping):
        return data  # a batch: dict of columns
    dataset = as_dataset(data)
    return dataset[:] if hasattr(dataset, "__getitem__") \
        else {c: [r[c] for r in dataset] for c in column_names(dataset)}


def prompts_and_responses(data: Any) -> tuple[list[str], list[str]]:
    """(prompt, response) strings per row: the turns before the last assistant turn, and that turn.

    Plain text rows have an empty prompt and the whole text as the response.
    """
    batch = _batch(data)
    fmt = data_format(list(batch))
    if fmt == "messages":
        prompts, responses = [], []
        for messages in batch["messages"]:
            end = _last_assistant(messages)
            prompts.append(content(messages[:end] if end >= 0 else messages))
            responses.append(content(messages[end]) if end >= 0 else "")
        return prompts, responses
    if fmt == "prompt_completion":
        return [content(p) for p in batch["prompt"]], [content(c) for c in batch["completion"]]
    if fmt == "text":
        return [""] * len(batch["text"]), [str(t) for t in batch["text"]]
    require_format(list(batch), "the data", ("text", "messages", "prompt_completion"))
    raise AssertionError("unreachable")


def texts_of(data: Any) -> list[str]:
    """The text a model learns from, per row: `text`; a chat's last assistant turn; a completion."""
    return prompts_and_responses(data)[1]


def conversations(data: Any) -> list[list[dict[str, str]]] | None:
    """Each row as a chat (messages up to and including the last assistant turn); None for plain text."""
    batch = _batch(data)
    fmt = data_format(list(batch))
    if fmt == "messages":
        out = []
        for messages in batch["messages"]:
            end = _last_assistant(messages)
            out.append(list(messages[: end + 1]) if end >= 0 else list(messages))
        return out
    if fmt == "prompt_completion":
        out = []
        for prompt, completion in zip(batch["prompt"], batch["completion"], strict=True):
            prompt_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            completion_msgs = completion if isinstance(completion, list) else [{"role": "assistant",
                                                                                "content": completion}]
            out.append(list(prompt_msgs) + list(completion_msgs))
        return out
    return None


# ----- sources ------------------------------------------------------------------------------------------
def check_source(spec: Any, key: str = "source") -> None:
    """Cheap validation of a source spec (no loading): raises ValueError naming the value and the fix."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{key}={spec!r}: give {SOURCE_HELP}.")
    kind, _, arg = spec.partition(":")
    if kind == "human" and arg:
        if arg not in HUMAN_SETS:
            raise ValueError(f"{key}={spec!r}: choose human:{' | human:'.join(HUMAN_SETS)}.")
        import importlib.util

        if importlib.util.find_spec("gensim") is None:
            raise ValueError(f"{key}={spec!r} needs gensim for the human text: pip install gensim.")
        return
    if kind == "tiny" and arg:
        if arg not in TINY_SETS:
            raise ValueError(f"{key}={spec!r}: choose tiny:{' | tiny:'.join(TINY_SETS)}.")
        return
    path = Path(spec)
    if path.exists():
        if path.is_dir() and not ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                                  or (path / "dataset_dict.json").exists()):
            raise ValueError(f"{key}={spec!r} is a folder but not a dataset saved with save_to_disk.")
        if path.is_file() and path.suffix not in (".txt", ".json", ".jsonl"):
            raise ValueError(f"{key}={spec!r}: files must be .txt (one document a line), .json or .jsonl.")
        return
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1 or os.sep in spec.split("/", 1)[0]:
        raise ValueError(f"{key}={spec!r}: no such file or folder. Give {SOURCE_HELP}.")


def _truncate_words(text: str, max_words: int | None) -> str:
    return text if max_words is None else " ".join(text.split()[:max_words])


def load_source(spec: str, max_items: int | None = None, max_words: int | None = None):
    """A source spec -> a `datasets.Dataset` in one of the SFT formats (its text columns only).

    `spec`: see `SOURCE_HELP`. `max_items` keeps the first N rows; `max_words` truncates every text
    document to its first N words.
    """
    from datasets import Dataset, load_dataset, load_from_disk

    check_source(spec)
    kind, _, arg = spec.partition(":")
    if kind == "human" and arg:
        from collapse_guard.resources import human_texts

        dataset = Dataset.from_dict({"text": human_texts(arg)})
    elif kind == "tiny" and arg:
        from collapse_guard.testing import human_like_sentences, tiny_chat_datasets

        if arg == "chat":
            dataset = tiny_chat_datasets(n_real=200)[0]
        else:  # disjoint seeds: held-out sentences are not the training pool's
            dataset = Dataset.from_dict({"text": human_like_sentences(400 if arg == "human" else 40,
                                                                      seed=7 if arg == "human" else 99)})
    elif os.path.isdir(spec):
        dataset = load_from_disk(spec)
    elif spec.endswith(".txt"):
        lines = [line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines() if line.strip()]
        dataset = Dataset.from_dict({"text": lines})
    elif spec.endswith((".json", ".jsonl")):
        dataset = _load_json(spec)
    else:
        dataset = load_dataset(spec, split="train")
    require_format(dataset, f"source {spec!r}", ("text", "messages", "prompt_completion"))
    if len(dataset) == 0:
        raise ValueError(f"source {spec!r} holds no rows.")
    if max_items is not None and len(dataset) > max_items:
        dataset = dataset.select(range(max_items))
    if max_words is not None and "text" in dataset.column_names:
        dataset = dataset.map(lambda ex: {"text": _truncate_words(ex["text"], max_words)})
    return dataset.select_columns([c for c in TEXT_COLUMNS if c in dataset.column_names])


def _load_json(path: str):
    """A .json (list of strings or of rows) or .jsonl (rows) file."""
    import json

    from datasets import Dataset

    raw = Path(path).read_text(encoding="utf-8")
    try:
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()] if path.endswith(".jsonl") \
            else json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"source {path!r} is not valid JSON{' lines' if path.endswith('.jsonl') else ''}: "
                         f"{err}.") from None
    if isinstance(rows, dict):
        return Dataset.from_dict(rows)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"source {path!r}: expected a non-empty list of strings or of rows.")
    return as_dataset(rows, f"source {path!r}")


def load_texts(spec: str, max_items: int | None = None, max_words: int | None = None) -> list[str]:
    """The plain texts of a source (see `texts_of`)."""
    return texts_of(load_source(spec, max_items, max_words))
