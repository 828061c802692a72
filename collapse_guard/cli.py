"""`collapse-guard`: run recipes, write reports, run the embedded demo, generate data, search the real share.

```
collapse-guard demo [--fast] [--out DIR]              # replace loop vs guarded loop on SmolLM2, then
                                                      # the report
collapse-guard run RECIPE.yaml [key.sub=value ...]     # a multi-round loop (also under `accelerate launch`)
collapse-guard report RUN_DIR                          # (re)writes report.md/.html/.json and plots
collapse-guard generate magpie|continuation ...        # synthetic data on its own
collapse-guard ratio-search RECIPE.yaml [key=value...] # the smallest real share that keeps held-out ppl in
                                                       # bounds
```

Importing this module is cheap (no torch): `--help` answers at once; the heavy imports happen in the
command that needs them. Expected failures (a bad recipe, a busy run folder, a missing file) print one
line naming the value and the fix, and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from collapse_guard import __version__

logger = logging.getLogger("collapse_guard")


class UsageError(ValueError):
    """A command-line value is wrong; the message names it and the fix."""


def _configure_logging(verbose: bool) -> None:
    """One readable line per phase on rank 0; library progress bars and chatter only with -v.

    Without -v each library is quietened by its own switch, so the console holds the project's lines only:
    transformers and huggingface_hub (verbosity error, progress bars off: the weight-loading bars and load
    reports), datasets (the map and save bars), and tqdm's `TQDM_DISABLE` default for the bars a library
    opens without a switch of its own (the Trainer's, transformers' GGUF conversion); the collapse-guard
    generation bar follows transformers' switch. A fresh process reads the environment switches when it
    imports each library (nothing heavy is imported yet, so `report` stays quick); a library already
    imported (`main()` called in-process) is switched by its functions.
    """
    from collapse_guard.distributed import MainProcessFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose
                                           else "%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(MainProcessFilter())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if verbose:
        return
    for name, value in (("TQDM_DISABLE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|trl|torch|peft)\.")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()  # huggingface_hub's bars too
    try:
        import datasets  # no environment switch that -v in a later in-process call could undo

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _print_results(results: dict, output_dir: str) -> None:
    from pathlib import Path

    from collapse_guard.distributed import is_main
    from collapse_guard.io import read_json

    if not is_main():
        return
    folder = Path(output_dir) if len(results) > 1 else Path(next(iter(results.values()))["run_dir"])
    stem = "comparison" if len(results) > 1 else "report"
    summary = read_json(folder / f"{stem}.json", default={}) or {}
    print("\n".join(summary.get("verdicts", [])))
    print(f"report: {folder / f'{stem}.md'}\n        {folder / f'{stem}.html'}")


def cmd_run(args: argparse.Namespace) -> int:
    from collapse_guard.config import help_text, load_config

    if args.help_config:
        print(help_text())
        return 0
    if not args.recipe:
        raise UsageError("run needs a recipe: collapse-guard run RECIPE.yaml [key.sub=value ...]")
    config = load_config(args.recipe, args.overrides)
    from collapse_guard.loop import run_recipe

    _print_results(run_recipe(config, restart=args.restart), config.output_dir)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from collapse_guard.config import load_config

    overrides = ([f"output_dir={args.out}"] if args.out else []) + list(args.overrides)
    config = load_config("demo_fast" if args.fast else "demo", overrides)
    from collapse_guard.loop import run_recipe

    _print_results(run_recipe(config, restart=args.restart), config.output_dir)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from collapse_guard.report import report_path

    paths = report_path(args.run_dir)
    print("\n".join(paths["verdicts"]))
    print(f"report: {paths['markdown']}\n        {paths['html']}")
    return 0


def cmd_ratio_search(args: argparse.Namespace) -> int:
    from collapse_guard.config import load_config
    from collapse_guard.ratio_search import ratio_search

    config = load_config(args.recipe, args.overrides)
    result = ratio_search(config, fractions=args.fractions, tolerance=args.tolerance, restart=args.restart)
    print(result["answer_text"])
    print(f"report: {result['markdown']}")
    return 0


def _recipe_names() -> str:
    # read from the folder, not through collapse_guard.config: that module imports the components whose
    # configs its sections hold (transformers), and `--help` must stay instant
    from pathlib import Path

    return ", ".join(sorted(p.stem for p in (Path(__file__).parent / "recipes").glob("*.yaml")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collapse-guard", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"collapse-guard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="library progress bars and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run",
                         help="run a multi-round recipe (continues if its output_dir holds the same run)")
    run.add_argument("recipe", nargs="?", help=f"recipe YAML, or a built-in name ({_recipe_names()})")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. training.learning_rate=1e-4")
    run.add_argument("--restart", action="store_true", help="discard what output_dir holds and start over")
    run.add_argument("--help-config", action="store_true",
                     help="list every recipe key with its default and help")
    run.set_defaults(func=cmd_run)

    report = sub.add_parser("report", help="write the report of a run folder (or of a folder of runs)")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="replace loop vs guarded loop on SmolLM2-135M-Instruct "
                                   "(CPU, ~6 min on 2 cores)")
    demo.add_argument("--fast", action="store_true", help="a smaller, noisier setting (a few minutes)")
    demo.add_argument("--out", default=None,
                      help="output folder (default: runs/demo, or runs/demo_fast with --fast)")
    demo.add_argument("--restart", action="store_true", help="discard a previous demo run in the folder")
    demo.add_argument("overrides", nargs="*", help="key.sub=value overrides of the demo recipe")
    demo.set_defaults(func=cmd_demo)

    search = sub.add_parser("ratio-search", help="find the smallest real share that keeps held-out ppl "
                                                 "within a tolerance (short loops over a grid of shares)")
    search.add_argument("recipe",
                        help="recipe YAML or built-in name (its mixing.min_real_fraction is searched)")
    search.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    search.add_argument("--fractions", type=float, nargs="+", default=None,
                        help="the shares to try (default: 0.1 0.25 0.5 0.75)")
    search.add_argument("--tolerance", type=float, default=1.05,
                        help="largest held-out ppl ratio that passes")
    search.add_argument("--restart", action="store_true", help="discard earlier searches in the folder")
    search.set_defaults(func=cmd_ratio_search)

    from collapse_guard.generation.cli import add_generate_commands

    add_generate_commands(sub)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user fixes (one line, exit status 2); imported only when something failed, since the
    recipe module imports the components whose configs it holds."""
    from collapse_guard.config import ConfigError
    from collapse_guard.data import DataFormatError
    from collapse_guard.generation.backends import ModelDivergedError  # generating from a NaN model
    from collapse_guard.rundir import RunFolderError

    return ConfigError, RunFolderError, DataFormatError, UsageError, FileNotFoundError, ModelDivergedError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        if not isinstance(err, _expected_errors()):
            raise
        print(f"collapse-guard: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("collapse-guard: interrupted; run the same command again to continue.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
