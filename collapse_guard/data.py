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
        if path.is_file():
            _check_file(path, key)
        return
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1 or os.sep in spec.split("/", 1)[0]:
        raise ValueError(f"{key}={spec!r}: no such file or folder. Give {SOURCE_HELP}.")


# A data file is checked from its first bytes (all of it when small): enough to refuse an empty, blank,
# binary or wrongly shaped file before a run writes anything, without reading a large corpus twice.
_PEEK_BYTES = 1 << 20
_PARSE_WHOLE_JSON_BYTES = 32 << 20


def _check_file(path: Path, key: str) -> None:
    """Refuses a data file that cannot give one document: empty, blank, binary, not UTF-8, `[]`, a JSON
    lines file without rows, or rows in no supported format. Raises `DataFormatError`."""
    import codecs
    import json

    spec = str(path)
    size = path.stat().st_size
    if size == 0:
        raise DataFormatError(f"{key}={spec!r} is an empty file (0 bytes): give a file with documents.")
    with open(path, "rb") as fh:
        head = fh.read(_PEEK_BYTES)
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataFormatError(f"{key}={spec!r} is not a text file (byte {nul} is NUL: binary data?): give "
                              "UTF-8 text, one document a line, or JSON.")
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) == size)
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{key}={spec!r} is not UTF-8 text ({err.reason} at byte {err.start}): "
                              "save it as UTF-8.") from None
    whole = len(head) == size
    if whole and not text.strip():
        raise DataFormatError(f"{key}={spec!r} holds only whitespace ({size} bytes): no document in it.")
    if path.suffix == ".jsonl":
        lines = [line for line in text.splitlines() if line.strip()]
        if not whole:
            lines = lines[:-1]  # the last line may be cut by the peek
        if whole and not lines:
            raise DataFormatError(f"{key}={spec!r} holds no JSON lines: no document in it.")
        rows = []
        for number, line in enumerate(lines if whole else lines[:1], start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{key}={spec!r}: JSON line {number} is not valid JSON ({err}).") \
                    from None
        if rows:
            _check_rows(rows, key, spec, every=whole)
    elif path.suffix == ".json" and size <= _PARSE_WHOLE_JSON_BYTES:
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataFormatError(f"{key}={spec!r} is not valid JSON ({err}).") from None
        if isinstance(rows, dict):
            rows = [dict(zip(rows, values, strict=False)) for values in zip(*rows.values(), strict=False)] \
                if all(isinstance(v, list) for v in rows.values()) else [rows]
        if not isinstance(rows, list) or not rows:
            raise DataFormatError(f"{key}={spec!r} holds {json.dumps(rows)[:40]}: expected a non-empty list "
                                  "of strings or of rows (or a dict of equally long columns).")
        _check_rows(rows, key, spec, every=True)


def _check_rows(rows: list[Any], key: str, spec: str, every: bool) -> None:
    """The first row's format; with `every` (the whole file is at hand), that some row has text."""
    first = rows[0]
    if not isinstance(first, (str, Mapping)):
        raise DataFormatError(f"{key}={spec!r}: a row is {type(first).__name__} ({str(first)[:40]!r}); "
                              "expected a string or an object such as {\"text\": ...}.")
    if isinstance(first, Mapping):
        require_format(dict(first), f"{key}={spec!r}", ("text", "messages", "prompt_completion"))
    if not every:
        return
    try:
        texts = [row if isinstance(row, str) else texts_of({k: [row.get(k)] for k in first})[0]
                 for row in rows]
    except (AttributeError, KeyError, TypeError):
        return  # rows of mixed shapes: loading says what is wrong with which
    if not any(isinstance(text, str) and text.strip() for text in texts):
        raise DataFormatError(f"{key}={spec!r}: every one of its {len(rows)} rows has blank text: no "
                              "document in it.")


def peek_format(spec: str) -> str | None:
    """The format of a source without loading it ('text', 'messages', ...), or None where that would need
    a download or a full read (Hub datasets, large .json files)."""
    import json

    kind, _, arg = spec.partition(":")
    if kind == "human" and arg:
        return "text"
    if kind == "tiny" and arg:
        return "messages" if arg == "chat" else "text"
    path = Path(spec)
    try:
        if path.is_dir():
            from datasets import load_from_disk

            return data_format(load_from_disk(spec))
        if path.suffix == ".txt":
            return "text"
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                first = next((line for line in fh if line.strip()), None)
            row = json.loads(first) if first else None
            return data_format(list(row)) if isinstance(row, Mapping) else "text" if row is not None else None
        if path.suffix == ".json" and path.stat().st_size <= _PARSE_WHOLE_JSON_BYTES:
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, dict):
                return data_format(list(rows))
            return data_format(list(rows[0])) if rows and isinstance(rows[0], Mapping) else "text"
    except (OSError, ValueError, IndexError, TypeError):
        return None
    return None


def has_chat_template(tokenizer_or_folder: Any) -> bool | None:
    """Whether a tokenizer (or a model folder's saved tokenizer) has a chat template; None if unknown."""
    if isinstance(tokenizer_or_folder, (str, os.PathLike)):
        folder = Path(tokenizer_or_folder)
        if not (folder / "tokenizer_config.json").exists():
            return None
        if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
            return True
        import json

        try:
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return bool(config.get("chat_template"))
    return bool(getattr(tokenizer_or_folder, "chat_template", None))


def require_chat_template(data_format_name: str | None, tokenizer_or_folder: Any, what: str,
                          model: str) -> None:
    """Refuses chat data ('messages') for a tokenizer that cannot render it (`DataFormatError`): TRL and the
    collator's top-ups render every row with the chat template, deep inside the first training."""
    if data_format_name != "messages" or has_chat_template(tokenizer_or_folder) is not False:
        return
    raise DataFormatError(
        f"{what} is chat data ('messages') but the tokenizer of {model} has no chat template, so "
        "its rows cannot be rendered for training. Use a chat (Instruct) model, set tokenizer.chat_template, "
        "or give the data as text (tokenizer.apply_chat_template(messages, tokenize=False) with a template "
        "of your choice).")


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
        try:
            text = Path(spec).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataFormatError(f"source {spec!r} is not UTF-8 text ({err.reason} at byte {err.start}): "
                                  "save it as UTF-8.") from None
        dataset = Dataset.from_dict({"text": [line.strip() for line in text.splitlines() if line.strip()]})
    elif spec.endswith((".json", ".jsonl")):
        dataset = _load_json(spec)
    else:
        dataset = load_dataset(spec, split="train")
    require_format(dataset, f"source {spec!r}", ("text", "messages", "prompt_completion"))
    if len(dataset) == 0:
        raise DataFormatError(f"source {spec!r} holds no rows: no document in it.")
    if max_items is not None and len(dataset) > max_items:
        dataset = dataset.select(range(max_items))
    if max_words is not None and "text" in dataset.column_names:
        dataset = dataset.map(lambda ex: {"text": _truncate_words(ex["text"], max_words)})
    dataset = dataset.select_columns([c for c in TEXT_COLUMNS if c in dataset.column_names])
    if not any(text.strip() for text in texts_of(dataset)):
        raise DataFormatError(f"source {spec!r}: every one of its {len(dataset)} rows has blank text: no "
                              "document in it.")
    return dataset


def _load_json(path: str):
    """A .json (list of strings or of rows) or .jsonl (rows) file."""
    import json

    from datasets import Dataset

    try:
        raw = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"source {path!r} is not UTF-8 text ({err.reason} at byte {err.start}): save "
                              "it as UTF-8.") from None
    try:
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()] if path.endswith(".jsonl") \
            else json.loads(raw)
    except json.JSONDecodeError as err:
        lines = " lines" if path.endswith(".jsonl") else ""
        raise DataFormatError(f"source {path!r} is not valid JSON{lines}: {err}.") from None
    if isinstance(rows, dict):
        return Dataset.from_dict(rows)
    if not isinstance(rows, list) or not rows:
        raise DataFormatError(f"source {path!r}: expected a non-empty list of strings or of rows.")
    return as_dataset(rows, f"source {path!r}")


def load_texts(spec: str, max_items: int | None = None, max_words: int | None = None) -> list[str]:
    """The plain texts of a source (see `texts_of`)."""
    return texts_of(load_source(spec, max_items, max_words))


# ----- a tokenizer and the model it feeds ---------------------------------------------------------------
def require_tokenizer(tokenizer: Any, where: str) -> None:
    """A clear `TypeError` when `tokenizer` is not a tokenizer object (a model name, a path, None)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        name = os.fspath(tokenizer)
        raise TypeError(f"{where}: tokenizer must be a tokenizer object, got the {type(tokenizer).__name__} "
                        f"{name!r}; load it first: AutoTokenizer.from_pretrained({name!r}).")
    if not callable(tokenizer):
        raise TypeError(f"{where}: tokenizer must be a tokenizer object (a transformers tokenizer or "
                        f"processor), got {type(tokenizer).__name__}.")


def tokenizer_facts(tokenizer: Any, max_id: int | None = None) -> dict[str, Any]:
    """What `check_tokenizer_fits` compares with a model: size, name, special ids (and, when known, the
    largest id the tokenizer produced for the data at hand)."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    try:
        size = len(inner)
    except TypeError:
        size = None
    return {"size": size, "name": getattr(inner, "name_or_path", None) or None, "max_id": max_id,
            "eos": getattr(inner, "eos_token_id", None), "bos": getattr(inner, "bos_token_id", None)}


def _model_config(model: Any) -> tuple[Any, Any]:
    """(the model inside DDP / DeepSpeed wrappers, its text config); PEFT models pass `config` through."""
    for _ in range(4):
        if getattr(model, "config", None) is not None or not hasattr(model, "module"):
            break
        model = model.module
    config = getattr(model, "config", None)
    if getattr(config, "vocab_size", None) is None and hasattr(config, "get_text_config"):
        config = config.get_text_config()  # multimodal: the language model's vocabulary
    return model, config


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple, set)) else {int(value)}


def check_tokenizer_fits(tokenizer_or_facts: Any, model: Any, where: str) -> None:
    """Refuses a tokenizer whose ids the model cannot embed (`ValueError`), and warns when the tokenizer is
    most likely another model's (its special ids all differ from the model's, it covers a small part of the
    model's vocabulary, or the two name different Hub models): its ids would fit, and every number
    measured with it would be quietly wrong (a perplexity of 535 instead of 20)."""
    import warnings

    facts = tokenizer_or_facts if isinstance(tokenizer_or_facts, Mapping) \
        else tokenizer_facts(tokenizer_or_facts)
    inner, config = _model_config(model)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and hasattr(inner, "get_input_embeddings"):
        vocab = getattr(inner.get_input_embeddings(), "num_embeddings", None)
    size, max_id = facts.get("size"), facts.get("max_id")
    model_name = getattr(config, "_name_or_path", "") or ""
    too_big = max_id is not None and max_id >= vocab if vocab is not None else False
    if vocab is not None and (too_big or (size is not None and size > vocab)):
        raise ValueError(
            f"{where}: the tokenizer ({facts.get('name') or 'unnamed'}) has {size} tokens"
            + (f" and produced id {max_id}" if too_big else "")
            + f", but the model ({model_name or type(inner).__name__}) embeds only {vocab} ids: they do not "
            "belong together. Use the model's own tokenizer (AutoTokenizer.from_pretrained(<the model's "
            "name or folder>)).")
    hints = []
    generation = getattr(inner, "generation_config", None)
    special = {k: (facts.get(k), _ids(getattr(config, f"{k}_token_id", None))
                   | _ids(getattr(generation, f"{k}_token_id", None))) for k in ("eos", "bos")}
    known = {k: (tok, ids) for k, (tok, ids) in special.items() if tok is not None and ids}
    if known and all(tok not in ids for tok, ids in known.values()):
        ours = ", ".join(f"{k} {tok}" for k, (tok, _) in known.items())
        theirs = ", ".join(f"{k} {sorted(ids)}" for k, (_, ids) in known.items())
        hints.append(f"its special ids ({ours}) are not the model's ({theirs})")
    if vocab is not None and size is not None and size < 0.9 * vocab and vocab - size > 64:
        hints.append(f"it has {size} tokens for a model that embeds {vocab}")
    tok_name = facts.get("name") or ""
    if _hub_id(model_name) and _hub_id(tok_name) and model_name != tok_name:
        hints.append(f"it is {tok_name!r}'s tokenizer and the model is {model_name!r}")
    if hints:
        warnings.warn(f"{where}: the tokenizer looks like another model's: {'; '.join(hints)}. Its ids fit, "
                      "so nothing fails, but every perplexity measured with it is meaningless. Use the "
                      "model's own tokenizer.", UserWarning, stacklevel=3)


def _hub_id(name: str) -> bool:
    """'org/name' that is not a local path: names compare; local folders (round checkpoints) do not."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()
