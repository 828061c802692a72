"""`collapse-guard`: run recipes, write reports, run the embedded demo, generate data.

```
collapse-guard demo [--fast] [--out DIR]          # replace loop vs guarded loop on SmolLM2, then the report
collapse-guard run RECIPE.yaml [key.sub=value ...] # a multi-round loop (also under `accelerate launch`)
collapse-guard report RUN_DIR                      # (re)writes report.md/.html/.json and plots
collapse-guard generate magpie|continuation ...    # synthetic data on its own
```
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from collapse_guard.config import ConfigError, builtin_recipe, builtin_recipes, help_text, load_config


def _resolve_recipe(recipe: str) -> Path:
    """A path, or the name of a recipe shipped in the package (`demo`, `demo.yaml`)."""
    path = Path(recipe)
    if path.exists():
        return path
    name = recipe if recipe.endswith(".yaml") else f"{recipe}.yaml"
    if builtin_recipe(name).exists():
        return builtin_recipe(name)
    raise ConfigError(f"recipe {recipe!r} not found: give a YAML path or a built-in recipe {builtin_recipes()}.")


def _print_results(results: dict, output_dir: str) -> None:
    """Prints each loop's verdict from the report the run just wrote (in the recipe's variant order)."""
    from collapse_guard.io import read_json
    from collapse_guard.loop import is_main

    if not is_main():
        return
    folder = Path(output_dir) if len(results) > 1 else Path(next(iter(results.values()))["run_dir"])
    stem = "comparison" if len(results) > 1 else "report"
    print("\n".join(read_json(folder / f"{stem}.json")["verdicts"]))
    print(f"report: {folder / f'{stem}.md'}\n        {folder / f'{stem}.html'}")


def cmd_run(args: argparse.Namespace) -> int:
    if args.help_config:
        print(help_text())
        return 0
    if not args.recipe:
        raise ConfigError("run needs a recipe: collapse-guard run RECIPE.yaml [key.sub=value ...]")
    from collapse_guard.loop import run_recipe

    config = load_config(_resolve_recipe(args.recipe), args.overrides)
    results = run_recipe(config)
    _print_results(results, config.output_dir)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from collapse_guard.report import report_path

    paths = report_path(args.run_dir)
    print("\n".join(paths["verdicts"]))
    print(f"report: {paths['markdown']}\n        {paths['html']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from collapse_guard.loop import run_recipe

    recipe = builtin_recipe("demo_fast.yaml" if args.fast else "demo.yaml")
    overrides = [f"output_dir={args.out}"] if args.out else []
    config = load_config(recipe, overrides + list(args.overrides))
    results = run_recipe(config)
    _print_results(results, config.output_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collapse-guard", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a multi-round recipe (resumes if its output_dir holds a partial run)")
    run.add_argument("recipe", nargs="?", help="recipe YAML (or a built-in name: " + ", ".join(builtin_recipes()) + ")")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. training.learning_rate=1e-4")
    run.add_argument("--help-config", action="store_true", help="list every recipe key with its default and help")
    run.set_defaults(func=cmd_run)

    report = sub.add_parser("report", help="write the report of a run folder (or of a folder of runs)")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="replace loop vs guarded loop on SmolLM2-135M-Instruct (CPU, < 20 min)")
    demo.add_argument("--fast", action="store_true", help="a smaller setting that finishes in a few minutes")
    demo.add_argument("--out", default=None, help="output folder (default: runs/demo or runs/demo_fast)")
    demo.add_argument("overrides", nargs="*", help="key.sub=value overrides of the demo recipe")
    demo.set_defaults(func=cmd_demo)

    try:
        from collapse_guard.generation.cli import add_generate_commands
    except ModuleNotFoundError:  # the generation CLI is optional for the loop
        add_generate_commands = None
    if add_generate_commands is not None:
        add_generate_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"collapse-guard: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
