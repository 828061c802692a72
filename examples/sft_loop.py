"""sft_plain.py as a loop: rounds of generate -> select -> mix -> train -> evaluate -> detect.

    python examples/sft_loop.py                       # the offline tiny model, 2 rounds, under a minute
    python examples/sft_loop.py --model path/to/model --rounds 5

Instead of one SFTTrainer run on a fixed mix, `run_rounds` lets each round's model write the next
round's data (continuations of real text), selects it, mixes it with a 50% real floor, trains with
SFTTrainer under the guard, measures held-out perplexity and diversity, and asks the collapse
detector for a verdict. The same config as a YAML recipe runs with `collapse-guard run RECIPE.yaml`.
"""

import argparse

from collapse_guard.config import config_from_dict
from collapse_guard.loop import run_rounds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a model directory (default: the offline tiny model)")
    parser.add_argument("--output-dir", default="runs/example_loop")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    config = config_from_dict({
        "name": "example_loop",
        "output_dir": args.output_dir,
        "rounds": args.rounds,
        "model": {"name_or_path": args.model or "tiny"},
        "data": {"real": "tiny:human", "heldout": "tiny:heldout", "max_real": 64},
        "generation": {"n_samples": 16, "prefix_tokens": 4, "max_new_tokens": 12},
        "selectors": [{"class": "collapse_guard.selection.DedupSelector"}],
        "mixing": {"mode": "replace", "min_real_fraction": 0.5},
        "training": {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "max_length": 128},
        "evaluation": {"context_length": 64, "n_prompts": 16, "prompt_tokens": 4, "max_new_tokens": 12},
        "guard": {"eval_steps": 1000},
        "end_run_on_alarm": False,  # the tiny model is random: its verdicts are noise
    })
    summary = run_rounds(config)
    for entry in summary["history"]:
        print(f"round {entry['round']}: held-out ppl {entry['heldout_ppl']:.1f} ({entry['level']})"
              + (f": {entry['reasons'][0]}" if entry["reasons"] else ""))
    print(f"report: {summary['run_dir']}/report.md")
    return summary


if __name__ == "__main__":
    main()
