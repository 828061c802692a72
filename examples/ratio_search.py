"""The smallest real-data share that keeps held-out perplexity in bounds, found by short loops.

    python examples/ratio_search.py                           # the offline tiny loop: a few minutes on a CPU
    collapse-guard ratio-search demo_fast rounds=2 seeds=[0,1] # the demo's setting on SmolLM2 (see README)

`ratio_search` runs the recipe's loop once per real share on a grid (and per seed), bisects between
the largest failing and the smallest passing share, and writes a table and a plot of the held-out
perplexity ratio against the real share to the recipe's output folder. Every run is an ordinary,
resumable run folder. The tiny model is random, so its answer means nothing; the mechanics are real.
"""

import argparse

from collapse_guard.config import load_config
from collapse_guard.ratio_search import ratio_search


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="runs/example_ratio_search")
    parser.add_argument("--recipe", default="recipes/tiny_loop.yaml")
    args = parser.parse_args(argv)

    config = load_config(args.recipe, [f"output_dir={args.output_dir}", "rounds=1", "generation.n_samples=8",
                                       "guard.enabled=false", "end_run_on_alarm=false"])
    result = ratio_search(config, fractions=[0.1, 0.5, 0.9], tolerance=1.05, refine=1)
    print(result["answer_text"])
    print(f"table and plot: {result['markdown']}")
    return result


if __name__ == "__main__":
    main()
