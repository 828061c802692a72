"""The multi-round self-training loop: generate -> select -> mix -> train -> evaluate -> detect -> artifacts.

Round 0 measures the starting model (the baseline every later round is compared with). Round r
generates with round r-1's model, keeps the best `n_samples` of a `pool_factor`-times larger pool,
mixes them with real data (replace / accumulate / fresh; `rows_per_round` fixes the budget), trains
under the guard and the real-data floor, measures (`Probe`, the same settings as the guard) and asks
the `CollapseDetector` for the round's verdict.

A run folder is claimed with an exclusive lock; `run_state.json` records the recipe and each finished
step, every artifact is written atomically, and a re-run of the same command continues after a kill,
mid-training from the Trainer's last checkpoint. Under `accelerate launch` every rank runs this code:
rank 0 alone generates, selects, mixes and writes; training and measurements run on every rank, and
decisions come from files every rank reads.

Example:

```python
from collapse_guard.config import load_config
from collapse_guard.loop import run_rounds

summary = run_rounds(load_config("recipes/tiny_loop.yaml", ["rounds=2"]))
print(summary["stopped"])
```
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collapse_guard.config import (
    Lazy,
    LoopConfig,
    build_component,
    check_config,
    expand,
    recorded_config,
    to_dict,
)
from collapse_guard.distributed import barrier, broadcast, init_process_group, is_main
from collapse_guard.history import FILENAME as HISTORY_FILENAME
from collapse_guard.history import History, measurement, write_verdict
from collapse_guard.io import atomic_save_dataset, atomic_write_json, read_json
from collapse_guard.rundir import RunFolderError, RunLock, RunState, claim
from collapse_guard.signals import finite

logger = logging.getLogger("collapse_guard.loop")

STEPS = ("generate", "select", "mix", "train", "evaluate", "detect", "artifacts")
# Human documents a selector's reference band is computed from (scored once per round).
HUMAN_REFERENCE_SIZE = 64


# ----- what every step needs -----------------------------------------------------------------------
@dataclass
class RunContext:
    config: LoopConfig
    run_dir: Path
    state: RunState
    tokenizer: Any
    base_model_dir: Path
    real: Any
    heldout_texts: list[str]
    eval_prompts: list[str]
    extra_heldout: dict[str, list[str]]
    history: History
    progress: Progress
    cache: dict[str, Any] = field(default_factory=dict)
    # shared by the runs of one recipe (one process): round 0's model and measurement, when they agree
    shared: dict[str, Any] = field(default_factory=dict)

    def round_dir(self, r: int) -> Path:
        return self.run_dir / f"round_{r}"

    def model_dir(self, r: int) -> Path:
        return self.base_model_dir if r == 0 else self.round_dir(r) / "model"

    def reference_model(self):
        """Round 0's model, frozen (selection bands, perplexity of generated text); loaded once."""
        key = f"reference:{self.base_model_dir}:{self.config.model.dtype}"
        if key not in self.shared:
            self.shared[key] = load_model(self.base_model_dir, self.config.model.dtype)
        return self.shared[key]

    def round0_key(self) -> str:
        """What round 0's measurement depends on; runs of a recipe that agree on it measure it once."""
        c = to_dict(self.config)
        return json.dumps({"model": str(self.base_model_dir), "dtype": c["model"]["dtype"], "data": c["data"],
                           "evaluation": c["evaluation"], "seed": c["seed"]}, sort_keys=True, default=str)


class Progress:
    """One plain line per phase of each round, with the time spent and an estimate of the time left."""

    def __init__(self, name: str, rounds: int):
        self.name, self.rounds = name, rounds
        self.started = time.perf_counter()
        self.round_seconds: list[float] = []
        self._round_start = self.started

    def round_done(self) -> None:
        now = time.perf_counter()
        self.round_seconds.append(now - self._round_start)
        self._round_start = now

    def phase(self, r: int, text: str) -> None:
        if not is_main():
            return
        elapsed = time.perf_counter() - self.started
        trained = [s for s in self.round_seconds[1:]]  # round 0 only measures
        left = ""
        if trained:
            remaining = (self.rounds + 1 - len(self.round_seconds)) * (sum(trained) / len(trained))
            left = f", ~{_clock(max(remaining - (time.perf_counter() - self._round_start), 0))} left"
        label = "round 0 (baseline)" if r == 0 else f"round {r}/{self.rounds}"
        logger.info("%s | %s: %s  [%s%s]", self.name, label, text, _clock(elapsed), left)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def load_model(directory: str | os.PathLike, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
    if torch.cuda.is_available():
        model = model.to(init_process_group().device)
    model.eval()
    return model


def load_tokenizer(directory: str | os.PathLike):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > _vocab_size(directory):
        raise ValueError(f"the tokenizer in {directory} has {len(tokenizer)} tokens but the model's "
                         f"vocabulary holds {_vocab_size(directory)}: they do not belong together. Save them "
                         "with the same model.")
    return tokenizer


def _vocab_size(directory) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    return int(getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", 0)
               or 1 << 30)


def _private_temp(target: Path) -> Path:
    """A temp folder next to `target` that no other process uses (atomic rename target); its name carries
    the pid, so the next run can remove it if a kill leaves it behind (`io.stale_temp_files`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp{os.getpid()}.", dir=target.parent))


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def _prepare_base_model(config: LoopConfig, run_dir: Path) -> Path:
    name = config.model.name_or_path
    if name == "smollm2":
        from collapse_guard.resources import smollm2_dir

        if is_main():
            smollm2_dir()  # converts the GGUF once; the other ranks wait
        barrier()
        return smollm2_dir()
    if name == "tiny":
        target = run_dir / "base_model"
        if is_main() and not (target / "config.json").exists():
            from collapse_guard.testing import save_tiny_model

            tmp = _private_temp(target)
            save_tiny_model(tmp, seed=config.seed)
            _replace_dir(tmp, target)
        barrier()
        return target
    if Path(name).exists():
        return Path(name)
    from huggingface_hub import snapshot_download

    if is_main():
        snapshot_download(name)  # one download; the other ranks then read the cache
    barrier()
    return Path(snapshot_download(name))


def _make_context(config: LoopConfig, state: RunState, run_dir: Path,
                  shared: dict[str, Any] | None = None) -> RunContext:
    from collapse_guard.data import data_format, load_source, require_chat_template, texts_of

    progress = Progress(config.name, config.rounds)
    progress.phase(0, f"loading {config.model.name_or_path} and the data")
    base_dir = _prepare_base_model(config, run_dir)
    data = config.data
    real = load_source(data.real, data.max_real, data.max_words)
    heldout_texts = texts_of(load_source(data.heldout, data.max_heldout + (data.report_heldout or 0)
                                         if data.max_heldout else None, data.max_words))
    extra = {name: texts_of(load_source(spec, data.max_heldout, data.max_words))
             for name, spec in data.extra_heldout.items()}
    if data.report_heldout:
        # decide on the first max_heldout documents, report on the rest: the same source, never the same text
        heldout_texts, extra["report"] = heldout_texts[: data.max_heldout], heldout_texts[data.max_heldout:]
        if len(extra["report"]) < 2:
            raise ValueError(f"data.report_heldout={data.report_heldout}: {data.heldout!r} has "
                             f"{len(heldout_texts) + len(extra['report'])} documents, too few after the "
                             f"first max_heldout={data.max_heldout} for a report set; lower max_heldout.")
    history = History.load(run_dir / HISTORY_FILENAME)
    tokenizer = load_tokenizer(base_dir)
    # before round 0: TRL would fail on it deep inside round 1's training
    require_chat_template(data_format(real), tokenizer, f"data.real={data.real!r}",
                          repr(config.model.name_or_path))
    return RunContext(
        config=config, run_dir=run_dir, state=state, tokenizer=tokenizer,
        base_model_dir=base_dir, real=real, heldout_texts=heldout_texts,
        eval_prompts=heldout_texts[: config.evaluation.n_prompts], extra_heldout=extra,
        history=history, progress=progress, shared=shared if shared is not None else {},
    )


def save_dataset(dataset, path: Path) -> None:
    """`atomic_save_dataset`, except that an empty dataset is recorded as a small JSON file (`datasets` writes
    zero shards for it and then cannot load it back)."""
    empty = path.with_name(path.name + ".empty.json")
    if len(dataset) == 0:
        atomic_write_json(empty, {"features": dataset.features.to_dict()})
        shutil.rmtree(path, ignore_errors=True)
    else:
        atomic_save_dataset(dataset, path)
        empty.unlink(missing_ok=True)


def load_dataset_dir(path: Path):
    from datasets import Dataset, Features, load_from_disk

    empty = path.with_name(path.name + ".empty.json")
    if empty.exists():
        features = Features.from_dict(read_json(empty)["features"])
        return Dataset.from_dict({name: [] for name in features}, features=features)
    return load_from_disk(str(path))


def _tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0


# ----- the steps -----------------------------------------------------------------------------------
def generate_step(ctx: RunContext, r: int):
    """Round r's synthetic pool from round r-1's model (data-parallel over ranks; rank 0 saves it)."""
    from collapse_guard.data import texts_of
    from collapse_guard.generation import ContinuationGenerator, MagpieGenerator

    c = ctx.config
    if c.mixing.min_real_fraction >= 1.0 and c.mixing.mode != "accumulate":  # a real-only control needs none
        return _save_generated(ctx, r, ctx.real.select([]).map(lambda ex: ex), {"rows": 0, "tokens": 0})
    n = math.ceil(c.n_samples * c.pool_factor)
    ctx.progress.phase(r, f"generating {n} {c.generation.method} samples"
                          + (f" (a {c.pool_factor:g}x pool: selection keeps {c.n_samples})"
                             if c.pool_factor > 1 else ""))
    model = load_model(ctx.model_dir(r - 1), c.model.dtype)
    settings = copy.copy(c.generation.settings)  # a copy: show_progress is set per rank below
    if c.generation.method == "magpie":
        generator = MagpieGenerator(model, ctx.tokenizer, settings)
        generated = generator.generate(n, seed=c.seed + r, round_index=r)
    elif c.generation.method == "task":
        from collapse_guard.generation.task_samples import TaskSampler

        generator = TaskSampler(model, ctx.tokenizer, settings.samples_per_problem, settings.max_new_tokens,
                                settings.temperature, settings.top_p, batch_size=settings.batch_size)
        # fresh training problems every round and seed; the held-out problems are never among them
        problems = settings.training_problems(math.ceil(n / settings.samples_per_problem),
                                              seed=c.seed * 1000 + r)
        generated = generator.generate(problems, seed=c.seed + r, round_index=r)
    else:
        settings.show_progress = is_main()
        generator = ContinuationGenerator(model, ctx.tokenizer, settings)
        generated = generator.generate(_continuation_prompts(ctx, r, n), seed=c.seed + r, round_index=r)
    stats = dict(getattr(generator, "stats", {}) or {})
    stats.update(rows=len(generated),
                 tokens=_tokens(ctx.tokenizer, texts_of(generated)) if len(generated) else 0)
    return _save_generated(ctx, r, generated, stats)


def _save_generated(ctx: RunContext, r: int, generated, stats: dict[str, Any]):
    path = ctx.round_dir(r) / "generated"
    if is_main():
        save_dataset(generated, path)
        atomic_write_json(ctx.round_dir(r) / "generation.json", stats)
    barrier()
    return load_dataset_dir(path)


def _continuation_prompts(ctx: RunContext, r: int, n: int) -> list[str]:
    """Real documents whose prefixes the model continues (Shumailov et al.): a seeded sample per round."""
    import numpy as np

    from collapse_guard.data import texts_of

    texts = texts_of(ctx.real)
    order = [int(i) for i in np.random.default_rng([ctx.config.seed, r]).permutation(len(texts))]
    order = (order * (n // len(order) + 1))[:n]
    return [texts[i] for i in order]


def _available(ctx: RunContext) -> dict[str, Any]:
    """What a selector's constructor may ask for by name (`config.PROVIDED`)."""
    import numpy as np

    from collapse_guard.data import texts_of

    real_texts = texts_of(ctx.real)
    sample = np.random.default_rng(ctx.config.seed).permutation(len(real_texts))[:HUMAN_REFERENCE_SIZE]
    return {"tokenizer": ctx.tokenizer, "model": Lazy(ctx.reference_model),
            "reference_model": Lazy(ctx.reference_model), "real_texts": real_texts,
            "human_texts": [real_texts[int(i)] for i in sample], "eval_texts": ctx.heldout_texts,
            "heldout_texts": ctx.heldout_texts, "keep": ctx.config.n_samples}


def build_selection(ctx: RunContext):
    """The recipe's selectors; parameters left unset are filled by name (see `LoopConfig.selectors`)."""
    from collapse_guard.selection import SelectionPipeline

    available = _available(ctx)
    return SelectionPipeline([build_component(spec, f"selectors[{i}]", ctx.config.trust_recipe_code,
                                              **available)
                              for i, spec in enumerate(ctx.config.selectors)])


def select_step(ctx: RunContext, r: int, generated):
    """Keeps the best `n_samples` of the pool (rank 0; kept rows to round_r/selected, counts to
    selection.json)."""
    from collapse_guard.data import texts_of

    c = ctx.config
    path = ctx.round_dir(r) / "selected"
    if is_main():
        report: dict[str, Any] = {"generated": len(generated), "wanted": c.n_samples,
                                  "pool_factor": c.pool_factor}
        selected = generated
        if c.selectors and len(generated):
            ctx.progress.phase(r, f"selecting from {len(generated)} samples ({len(c.selectors)} selectors)")
            pipeline = build_selection(ctx)
            selected = pipeline(generated)
            report.update(pipeline.report)
        if len(selected) > c.n_samples:  # filters kept more than the round needs: an unbiased subset
            selected = selected.shuffle(seed=c.seed + r).select(range(c.n_samples)).flatten_indices()
        report.update(selected=len(selected), kept_share=len(selected) / max(len(generated), 1),
                      tokens=_tokens(ctx.tokenizer, texts_of(selected)) if len(selected) else 0)
        if len(selected) < c.n_samples and c.mixing.min_real_fraction < 1.0:
            logger.warning("%s | round %d: selection kept %d of %d samples, fewer than the %d a round trains "
                           "on; the round trains on fewer synthetic rows (see the report).", c.name, r,
                           len(selected), len(generated), c.n_samples)
        save_dataset(selected, path)
        atomic_write_json(ctx.round_dir(r) / "selection.json", report)
    barrier()
    return load_dataset_dir(path)


def _previous_synthetic(ctx: RunContext, r: int):
    """accumulate: every earlier round's selected synthetic rows."""
    from datasets import concatenate_datasets

    parts = [load_dataset_dir(ctx.round_dir(k) / "selected") for k in range(1, r)]
    parts = [p for p in parts if len(p)]
    return concatenate_datasets(parts) if parts else None


def mix_step(ctx: RunContext, r: int, selected):
    """Round r's training set (rank 0; saved to round_r/train)."""
    from collapse_guard.mixing import mix_datasets

    m, c = ctx.config.mixing, ctx.config
    path = ctx.round_dir(r) / "train"
    if is_main():
        if len(selected) and "text" in ctx.real.column_names and "text" not in selected.column_names:
            selected = _as_chat_text(selected, ctx.tokenizer)
        columns = [col for col in ctx.real.column_names if col in selected.column_names] + ["provenance"]
        if len(selected) == 0 and m.mode != "accumulate" and m.min_real_fraction <= 0:
            raise RuntimeError(f"round {r}: selection kept no synthetic sample and "
                               "mixing.min_real_fraction=0 allows no real data: nothing to train on. Loosen "
                               "the selectors or set a real floor.")
        fraction = m.min_real_fraction
        if len(selected) == 0 and m.mode == "replace" and 0 < fraction < 1:
            # a floor is a share of the synthetic rows' company: with none kept, the round is real rows only
            logger.warning("%s | round %d: no synthetic row to train on; the round trains on real rows only.",
                           c.name, r)
            fraction = 1.0
        mixed = mix_datasets(ctx.real, selected.select_columns([col for col in columns if col in
                                                                selected.column_names]) if len(selected) else
                             selected, mode=m.mode, min_real_fraction=fraction, seed=c.seed + r,
                             round_index=r,
                             previous=_previous_synthetic(ctx, r) if m.mode == "accumulate" else None,
                             allow_low_real_fraction=m.allow_low_real_fraction)
        if m.rows_per_round:
            mixed = _to_budget(mixed, m.rows_per_round, m.min_real_fraction, c.seed + r)
        ctx.progress.phase(r, f"mixing: {_describe_mix(mixed)}")
        save_dataset(mixed, path)
    barrier()
    return load_dataset_dir(path)


def _as_chat_text(rows, tokenizer):
    """Chat rows (a task's questions and kept answers) as plain text rendered with the model's chat template,
    so one SFT dataset holds them beside the human documents of a plain-text real pool."""
    from collapse_guard.data import conversations

    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in conversations(rows)]
    return rows.add_column("text", texts).select_columns(["text", "provenance"])


def _describe_mix(dataset) -> str:
    sources = [p["source"] for p in dataset["provenance"]]
    return f"{sources.count('synthetic')} synthetic + {sources.count('real')} real rows"


def _to_budget(mixed, rows: int, fraction: float, seed: int):
    """Exactly `rows` rows: a uniform sample of the round's data (so accumulate keeps its real share), then
    real rows swapped in for synthetic ones until at least `fraction` are real (real rows repeat only if too
    few)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sources = np.array([p["source"] for p in mixed["provenance"]])
    order = rng.permutation(len(mixed))
    picked = list(np.resize(order, rows)) if len(order) < rows else list(order[:rows])
    real_idx = [int(i) for i in rng.permutation(np.flatnonzero(sources == "real"))]
    need = math.ceil(fraction * rows - 1e-9) - sum(sources[i] == "real" for i in picked)
    if need > 0:
        if not real_idx:
            raise RuntimeError(f"rows_per_round={rows} needs real rows but the round has none.")
        unused = [i for i in real_idx if i not in set(picked)] or real_idx
        synthetic_slots = [k for k, i in enumerate(picked) if sources[i] != "real"]
        for n, k in enumerate(synthetic_slots[:need]):
            picked[k] = unused[n % len(unused)]
    return mixed.select(sorted(int(i) for i in picked)).shuffle(seed=seed).flatten_indices()


def _sft_config(ctx: RunContext, r: int, output_dir: Path):
    import torch
    from trl import SFTConfig

    on_cpu = not torch.cuda.is_available()
    # the per-round and per-machine values; the loop's other defaults are `TrainingConfig`'s
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir), "seed": ctx.config.seed + r, "use_cpu": on_cpu,
        "bf16": False if on_cpu else torch.cuda.is_bf16_supported(), "disable_tqdm": not is_main(),
    }
    training = ctx.config.training.sft_kwargs()
    if "gradient_checkpointing" not in training:  # TRL's default (on), by the name transformers 5 asks for
        kwargs["activation_checkpointing"] = True
    kwargs.update(training)
    return SFTConfig(**kwargs)


def _last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete checkpoint: a kill can leave the newest one half written. Trainer writes
    trainer_state.json after weights, optimizer and RNG states, and the collator state after that."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not output_dir.is_dir():
        return None
    candidates = sorted(output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"),
                        key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True)
    for checkpoint in candidates:
        if (checkpoint / "trainer_state.json").exists() and \
                (checkpoint / "collapse_guard" / "mixing_collator_rank0.json").exists():
            return str(checkpoint)
    return None


def _quiet_progress(trainer) -> None:
    """The Trainer prints every log dict under its progress bar; keep the bar, drop the dicts."""
    from transformers.trainer_callback import ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            return

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BarOnly())


def train_step(ctx: RunContext, r: int, train_dataset) -> dict[str, Any]:
    """SFTTrainer (full or LoRA) under the guard and the floor; saves round_r/model atomically."""
    from trl import SFTTrainer

    from collapse_guard.callbacks import CollapseGuardCallback
    from collapse_guard.data import texts_of
    from collapse_guard.mixing import MixingCollator
    from collapse_guard.token_budget import TokenBudgetCallback

    c, m = ctx.config, ctx.config.mixing
    init_dir = ctx.model_dir(r - 1) if c.model.init_from == "previous" else ctx.base_model_dir
    output_dir = ctx.round_dir(r) / "trainer"
    model = load_model(init_dir, c.model.dtype)
    model.train()
    lora = None
    if c.model.lora is not None:
        from peft import LoraConfig

        lora = LoraConfig(task_type="CAUSAL_LM", **{"target_modules": "all-linear", **c.model.lora})
    trainer = SFTTrainer(model=model, args=_sft_config(ctx, r, output_dir),
                         train_dataset=train_dataset, processing_class=ctx.tokenizer, peft_config=lora)
    if not logger.isEnabledFor(logging.DEBUG):
        _quiet_progress(trainer)
    floor = m.min_real_fraction if m.batch_floor else 0.0
    # Top-ups continue the real stream where the previous round's stopped: with one seed and a fresh stream
    # each round, every round would top up with the same first rows, and a high floor then memorises them.
    previous = (read_json(ctx.round_dir(r - 1) / "train.json", default={}) or {}) if r > 1 else {}
    synthetic_filter = None
    if m.synthetic_filter is not None:
        synthetic_filter = build_component(m.synthetic_filter, "mixing.synthetic_filter", c.trust_recipe_code,
                                           **_available(ctx)).as_batch_filter()
    collator = MixingCollator(real_dataset=ctx.real, min_real_fraction=floor, unit=m.unit, seed=c.seed,
                              floor_scope=m.floor_scope, allow_low_real_fraction=True,
                              max_growth=m.max_growth, synthetic_filter=synthetic_filter,
                              real_stream_start=int(previous.get("real_stream_draws", 0)))
    guard = None
    if c.guard.enabled:
        start = ctx.history.at(r - 1, _final_step(ctx, r - 1)) if c.model.init_from == "previous" \
            else ctx.history.baseline
        guard = CollapseGuardCallback(
            ctx.heldout_texts, prompts=ctx.eval_prompts, collator=collator,
            config=c.guard.for_round(r, str(ctx.run_dir / HISTORY_FILENAME)), probe=c.evaluation.probe(),
            detector=c.detector, start=measurement(start) if start is not None else None,
            floor=c.guard.floor, training_texts=texts_of(train_dataset))
        guard.attach(trainer)
    else:
        collator.attach(trainer)
    # counted at the model input: what the arms of one report are compared on (top-ups included)
    budget = TokenBudgetCallback(m.tokens_per_round)
    trainer.add_callback(budget)
    for i, spec in enumerate(c.callbacks):
        trainer.add_callback(build_component(spec, f"callbacks[{i}]", c.trust_recipe_code))
    checkpoint = _last_checkpoint(output_dir)
    ctx.progress.phase(r, f"training on {len(train_dataset)} rows "
                          + (f"(until {m.tokens_per_round:,} tokens at the model input)" if m.tokens_per_round
                             else f"({trainer.args.num_train_epochs:g} epoch(s))")
                          + (f", resuming from {os.path.basename(checkpoint)}" if checkpoint else ""))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    _save_trained_model(ctx, r, trainer, init_dir)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    counts = collator.counts
    info = {
        # the mean of logged losses survives a resume (log_history is checkpointed); training_loss does not
        "train_loss": float(sum(losses) / len(losses)) if losses else float(result.training_loss),
        "train_steps": int(result.global_step), "max_steps": int(trainer.state.max_steps),
        "stopped_by_guard_at": guard.stopped_at if guard is not None else None,
        "resumed_from": os.path.basename(checkpoint) if checkpoint else None,
        "real_fraction": collator.real_fraction, "synthetic_rows_trained": int(counts["synthetic_served"]),
        "synthetic_tokens_trained": int(counts["synthetic_tokens"]),
        "real_tokens_trained": int(counts["real_tokens"]),
        "synthetic_rows_untrained": len(collator.synthetic_buffer), "real_top_up": int(counts["real_top_up"]),
        "real_stream_draws": int(broadcast(collator.real_stream_draws)),  # rank 0's: every rank goes on alike
        "floor": collator.min_real_fraction,
        "input_tokens_trained": budget.counts["input_tokens"],
        "supervised_tokens_trained": budget.counts["supervised_tokens"],
        "tokens_per_round": m.tokens_per_round,
        "guard_cost_share": guard.cost_share() if guard is not None else None,
        "unit": m.unit, "epochs": float(trainer.args.num_train_epochs),
    }
    if is_main():
        atomic_write_json(ctx.round_dir(r) / "train.json", info)
    ctx.history = History.load(ctx.run_dir / HISTORY_FILENAME)  # the guard wrote into it
    barrier()
    return info


def _final_step(ctx: RunContext, r: int) -> int:
    finals = [e for e in ctx.history.finals() if e["round"] == r]
    return finals[-1]["step"] if finals else 0


def _save_trained_model(ctx: RunContext, r: int, trainer, init_dir: Path) -> None:
    """Saves to a private temp folder, then renames: a kill never leaves a half-written round model."""
    target = ctx.model_dir(r)
    tmp = _private_temp(target) if is_main() else None
    tmp = Path(broadcast(str(tmp) if tmp else None))
    if ctx.config.model.lora is not None:
        adapter_tmp = tmp.with_name(tmp.name + ".adapter")
        trainer.save_model(str(adapter_tmp))  # every rank: FSDP/DeepSpeed gather inside
        if is_main():
            from peft import PeftModel

            merged = PeftModel.from_pretrained(load_model(init_dir, ctx.config.model.dtype), str(adapter_tmp))
            merged.merge_and_unload().save_pretrained(tmp)
            _replace_dir(adapter_tmp, target.with_name("adapter"))
    else:
        trainer.save_model(str(tmp))
    if is_main():
        ctx.tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, target)
    barrier()


def _probe(ctx: RunContext, reference: bool):
    from collapse_guard.probe import Probe

    key = "probe_ref" if reference else "probe"
    if key not in ctx.cache:
        ctx.cache[key] = Probe(ctx.heldout_texts, ctx.tokenizer, ctx.config.evaluation.probe(),
                               ctx.eval_prompts, reference_model=ctx.reference_model() if reference else None)
    return ctx.cache[key]


def evaluate_step(ctx: RunContext, r: int) -> dict[str, Any]:
    """The round's closing measurement (the guard's final one when it took it, else the probe's), plus extra
    held-out corpora and the perplexity of the round's data and generations under round 0's model."""
    from collapse_guard.metrics import HeldoutPerplexity, document_perplexities
    from collapse_guard.metrics.diversity import perplexity_concentration

    c = ctx.config
    if r == 0 and (known := ctx.shared.get(ctx.round0_key())) is not None:
        # Same base model, data, evaluation settings and seed as a run before it in this recipe: round 0 would
        # measure exactly the same numbers (the generations are seeded), so they are reused.
        ctx.progress.phase(r, f"measured already by {known['by']} (same model, data, settings and seed)")
        entry, payload = copy.deepcopy(known["entry"]), copy.deepcopy(known["eval"])
        if is_main():
            atomic_write_json(ctx.round_dir(r) / "eval.json", payload)
        barrier()
        return entry
    extras_wanted = c.evaluation.generated_perplexity
    entry = next((e for e in reversed(ctx.history.entries) if e["round"] == r and e.get("final")), None)
    model = None
    if entry is None or "generations" not in entry:
        ctx.progress.phase(r, f"measuring: held-out perplexity on {len(ctx.heldout_texts)} documents, "
                              f"{len(ctx.eval_prompts)} generations")
        model = load_model(ctx.model_dir(r), c.model.dtype)
        step = _final_step(ctx, r) if r else 0
        entry = {"round": r, "step": step, "final": True, **_probe(ctx, False).measure(model)}
        entry.pop("cost", None)
    entry = {k: v for k, v in entry.items() if k not in ("level", "reasons", "evidence")}
    extra: dict[str, Any] = {}
    if ctx.extra_heldout:
        model = model or load_model(ctx.model_dir(r), c.model.dtype)
        e = c.evaluation
        for name, texts in ctx.extra_heldout.items():
            result = HeldoutPerplexity(texts, ctx.tokenizer, e.context_length, e.stride,
                                       e.max_batch_tokens).compute(model)
            entry[f"heldout_ppl@{name}"] = result.perplexity
            # per document, for paired intervals between rounds and arms (eval.json: the history stays lean)
            extra[f"heldout_doc_nll@{name}"] = result.document_nll
            extra[f"heldout_doc_tokens@{name}"] = result.document_tokens
    if c.generation.method == "task":
        model = model or load_model(ctx.model_dir(r), c.model.dtype)
        ctx.progress.phase(r, "scoring the task's held-out problems (greedy answers)")
        entry.update(_task_scores(ctx, model))
    if extras_wanted and entry.get("generations"):
        ctx.progress.phase(r, "scoring generations and generated data with round 0's model")
        reference = ctx.reference_model()
        e = c.evaluation
        human = ctx.cache.get("human_ref_ppl")
        if human is None:
            human = ctx.cache["human_ref_ppl"] = document_perplexities(
                reference, ctx.tokenizer, ctx.heldout_texts, e.context_length, e.max_batch_tokens)
        scored = document_perplexities(reference, ctx.tokenizer,
                                       [g if g.strip() else " " for g in entry["generations"]],
                                       e.context_length, e.max_batch_tokens)
        entry.update(perplexity_concentration(scored, human))
        extra["human_reference_ppl"] = human
        finite = sorted(p for p in human if math.isfinite(p))
        # the low-ppl rule's 25th pct
        extra["human_low_ppl_cut"] = finite[len(finite) // 4] if finite else None
        if r > 0:
            generated = load_dataset_dir(ctx.round_dir(r) / "generated")
            from collapse_guard.data import texts_of

            extra["generated_ppl"] = document_perplexities(reference, ctx.tokenizer, texts_of(generated),
                                                           e.context_length, e.max_batch_tokens) \
                if len(generated) else []
    payload = {"metrics": {k: v for k, v in entry.items() if k not in ("generations",)}, **extra,
               "generations": entry.get("generations", [])}
    if is_main():
        atomic_write_json(ctx.round_dir(r) / "eval.json", payload)
    if r == 0:
        ctx.shared[ctx.round0_key()] = copy.deepcopy({"entry": entry, "eval": payload, "by": c.name})
    barrier()
    return entry


def _task_scores(ctx: RunContext, model) -> dict[str, Any]:
    """Task accuracy on the decision problems (`task_accuracy`, read by the verdict) and on the report
    problems (`task_accuracy@report`, only reported), each with its Wilson interval and per-problem outcomes
    (for paired changes between rounds)."""
    from collapse_guard.generation.backends import ModelDivergedError
    from collapse_guard.task import TaskEvaluator

    settings = ctx.config.generation.settings
    if "task" not in ctx.cache:
        decision, report = settings.heldout_sets()
        ctx.cache["task"] = [(suffix, TaskEvaluator(p["prompt"], p["answer"], ctx.tokenizer,
                                                    max_new_tokens=settings.max_new_tokens,
                                                    batch_size=settings.batch_size))
                             for suffix, p in (("", decision), ("@report", report)) if p is not None]
    scores: dict[str, Any] = {}
    for suffix, evaluator in ctx.cache["task"]:
        try:
            score = evaluator.score(model)
        except ModelDivergedError:  # the held-out perplexity already carries the divergence and its alarm
            scores[f"task_accuracy{suffix}"] = None
            continue
        scores.update({f"task_accuracy{suffix}": score.accuracy, f"task_accuracy_low{suffix}": score.low,
                       f"task_accuracy_high{suffix}": score.high,
                       f"task_correct{suffix}": [int(x) for x in score.correct]})
    return scores


def detect_step(ctx: RunContext, r: int, entry: dict[str, Any]):
    """The round's verdict: its closing measurement against the baseline and earlier rounds' closings."""
    from collapse_guard.detector import CollapseDetector

    ctx.history.add(entry)
    finals = [e for e in ctx.history.finals() if e["round"] <= r]
    verdict = CollapseDetector(ctx.config.detector).check(finals)
    write_verdict(entry, verdict)
    if is_main():
        atomic_write_json(ctx.round_dir(r) / "verdict.json", verdict.to_dict())
        ctx.history.save()
    barrier()
    ctx.progress.phase(r, verdict_line(verdict, entry, r))
    return verdict


def verdict_line(verdict, entry: dict[str, Any], r: int) -> str:
    """The round's console line: the level, held-out ppl, and the reasons that set the level (an alarm's
    alarms, not a warning the detector happened to find first: those are only counted)."""
    word = {"ok": "ok", "warn": "WARNING", "alarm": "ALARM"}[verdict.level]
    ratio = entry.get("heldout_ppl_ratio")
    deciding = verdict.deciding_reasons()
    others = len(verdict.reasons) - len(deciding)
    return (f"verdict {word}: held-out ppl {entry['heldout_ppl']:.2f}"
            + (f" (x{ratio:.3f} of round 0)" if ratio is not None and r else "")
            + (f", task accuracy {entry['task_accuracy']:.0%}" if finite(entry.get("task_accuracy")) else "")
            + "".join(f"; {reason}" for reason in deciding)
            + (f" (and {others} warning{'s' if others > 1 else ''}: see verdict.json)" if others else ""))


def artifacts_step(ctx: RunContext, r: int) -> None:
    """Refreshes the report and drops what a resume no longer needs (trainer checkpoints, old models)."""
    if is_main():
        from collapse_guard.report import write_report

        write_report(ctx.run_dir)
        shutil.rmtree(ctx.round_dir(r) / "trainer", ignore_errors=True)
        if ctx.config.keep_models == "last" and r >= 2:
            shutil.rmtree(ctx.model_dir(r - 1), ignore_errors=True)
    barrier()


# ----- the loop ------------------------------------------------------------------------------------
def _step(ctx: RunContext, r: int, step: str, run, load=None):
    """Runs a step (on every rank; it decides what rank 0 alone does) unless run_state.json says it
    finished."""
    if ctx.state.is_done(r, step) and load is not None:
        return load()
    started = time.perf_counter()
    result = run()
    if is_main():
        ctx.state.timings[f"{r}/{step}"] = round(time.perf_counter() - started, 2)
        ctx.state.mark(r, step)
    barrier()
    return result


def _closing_entry(ctx: RunContext, r: int):
    return next(e for e in reversed(ctx.history.entries) if e["round"] == r and e.get("final"))


def run_round(ctx: RunContext, r: int):
    """One round; each step is skipped when run_state.json says it finished."""
    from collapse_guard.detector import Verdict

    if r > 0:
        generated = _step(ctx, r, "generate", lambda: generate_step(ctx, r),
                          lambda: load_dataset_dir(ctx.round_dir(r) / "generated"))
        selected = _step(ctx, r, "select", lambda: select_step(ctx, r, generated),
                         lambda: load_dataset_dir(ctx.round_dir(r) / "selected"))
        train = _step(ctx, r, "mix", lambda: mix_step(ctx, r, selected),
                      lambda: load_dataset_dir(ctx.round_dir(r) / "train"))
        _step(ctx, r, "train", lambda: train_step(ctx, r, train), lambda: None)
    entry = _step(ctx, r, "evaluate", lambda: evaluate_step(ctx, r), lambda: _closing_entry(ctx, r))
    verdict = _step(ctx, r, "detect", lambda: detect_step(ctx, r, entry),
                    lambda: Verdict.from_dict(read_json(ctx.round_dir(r) / "verdict.json")))
    _step(ctx, r, "artifacts", lambda: artifacts_step(ctx, r), lambda: None)
    ctx.progress.round_done()
    return verdict


def _claim(config: LoopConfig, run_dir: Path, restart: bool):
    """Rank 0 takes the folder's lock and its run state; every rank learns whether that worked."""
    lock = RunLock(run_dir) if is_main() else nullcontext()
    error = None
    try:
        if is_main():
            lock.__enter__()
            claim(run_dir, to_dict(config), restart, normalize=recorded_config)
    except RunFolderError as err:
        error = str(err)
    error = broadcast(error)
    if error is not None:
        raise RunFolderError(error)
    barrier()
    return lock, RunState.load(run_dir)


def run_rounds(config: LoopConfig, restart: bool = False,
               shared: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs (or continues) one loop; returns {"run_dir", "history", "stopped", "finished"}.

    `shared`: a dict that `run_recipe` hands to each of its runs, so that they load round 0's model once and
    measure round 0 once when they agree on what it depends on (base model, data, evaluation, seed).
    """
    check_config(config)  # everything a recipe can get wrong, before the first byte is written
    init_process_group()
    run_dir = Path(config.output_dir)
    lock, state = _claim(config, run_dir, restart)
    try:
        if state.finished:
            if is_main():
                logger.info("%s: %s already holds this finished run; showing its results.",
                            config.name, run_dir)
            return _summary(run_dir, state)
        if state.started and is_main():
            logger.info("%s: continuing the run in %s.", config.name, run_dir)
        ctx = _make_context(config, state, run_dir, shared)
        verdict = run_round(ctx, 0)
        for r in range(1, config.rounds + 1):
            # a diverged model cannot generate the next round's data: the run ends, whatever end_run_on_alarm
            if r == 1 and verdict.diverged:  # the starting model itself
                state.stopped = {"round": 0, "reason": "; ".join(verdict.reasons)}
                ctx.progress.phase(0, "ending the run (the starting model diverged): "
                                      f"{state.stopped['reason']}")
                break
            verdict = run_round(ctx, r)
            diverged = verdict.is_alarm and verdict.diverged
            if verdict.is_alarm and (config.end_run_on_alarm or diverged) and r < config.rounds:
                state.stopped = {"round": r, "reason": "; ".join(verdict.reasons)}
                why = "end_run_on_alarm" if config.end_run_on_alarm else "the model diverged"
                ctx.progress.phase(r, f"ending the run ({why}): {state.stopped['reason']}")
                break
        state.finished = True
        if is_main():
            state.save()
            from collapse_guard.report import write_report

            write_report(run_dir)
        barrier()
        return _summary(run_dir, state)
    finally:
        lock.__exit__(None, None, None)


def _summary(run_dir: Path, state: RunState) -> dict[str, Any]:
    history = History.load(run_dir / HISTORY_FILENAME)
    return {"run_dir": str(run_dir), "history": history.finals(), "stopped": state.stopped,
            "finished": state.finished}


def run_recipe(config: LoopConfig, restart: bool = False) -> dict[str, Any]:
    """Runs every variant (x seed) of a recipe and, for several, a comparison report."""
    runs = expand(config)
    for run in runs.values():
        check_config(run)  # all of them before the first expensive step
    results, shared = {}, {}
    for k, (name, run) in enumerate(runs.items(), start=1):
        if len(runs) > 1 and is_main():
            logger.info("%s: run %d of %d: %s -> %s", config.name, k, len(runs), name, run.output_dir)
        results[name] = run_rounds(run, restart, shared)
    if len(runs) > 1 and is_main():
        from collapse_guard.report import write_comparison

        arms: dict[str, list[str]] = {}
        for name, result in results.items():
            arms.setdefault(name.split("/")[0], []).append(result["run_dir"])
        compared = [r["run_dir"] for r in results.values()]
        # the title and the runs' order (JSON keys are written sorted) let `collapse-guard report` write
        # this comparison again as it is now
        atomic_write_json(Path(config.output_dir) / "variants.json",
                          {"title": config.name, "arms": arms, "runs": compared, "seeds": config.seeds})
        write_comparison(config.output_dir, compared, title=config.name)
    barrier()
    return results
