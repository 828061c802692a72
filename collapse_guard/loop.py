"""The multi-round self-training loop: generate -> select -> mix -> train -> evaluate -> detect -> artifacts.

Round 0 measures the starting model (the baseline every later round is compared with). Each later
round r generates with round r-1's model, selects, mixes with real data (replace / accumulate /
fresh), trains, evaluates and asks the `CollapseDetector` for a verdict; an alarm can end the run.

Resumable: `run_state.json` records each finished step of each round. Every artifact is written
atomically (temp + rename), so re-running the same command after a kill continues from the last
finished step, and mid-training from the Trainer's last checkpoint.

Distributed (`accelerate launch`): every rank runs this code. Rank 0 alone generates, selects, mixes
and writes artifacts; the others wait at a barrier and read the results from disk. Training and the
held-out perplexity (all-reduced) run on every rank; decisions are taken from files every rank reads.

Example:

```python
from collapse_guard.config import load_config
from collapse_guard.loop import run_rounds

summary = run_rounds(load_config("recipes/tiny_loop.yaml", ["rounds=2"]))
print(summary["stopped"])
```
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from collapse_guard.config import ConfigError, LoopConfig, build_component, check_config, variant_configs
from collapse_guard.io import atomic_save_dataset, atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)

STEPS = ("generate", "select", "mix", "train", "evaluate", "detect", "artifacts")
BASELINE_STEPS = ("evaluate", "detect", "artifacts")
TEXT_COLUMNS = ("text", "messages", "prompt", "completion")
# Human documents a selector's reference band is computed from (scored once per round).
HUMAN_REFERENCE_SIZE = 64


# ----- distributed plumbing ------------------------------------------------------------------------
def _state():
    import torch
    from accelerate import PartialState

    # cpu=True is what makes `accelerate launch --multi_gpu` on a CPU machine start a gloo group
    return PartialState(cpu=not torch.cuda.is_available())


def is_main() -> bool:
    return _state().is_main_process


def barrier() -> None:
    _state().wait_for_everyone()


# ----- run state: which steps of which round are done ----------------------------------------------
@dataclass
class RunState:
    """`run_state.json`: finished steps per round, and why the run stopped (if it did)."""

    path: Path
    done: dict[str, list[str]] = field(default_factory=dict)
    stopped: dict[str, Any] | None = None
    finished: bool = False

    @classmethod
    def load(cls, path: Path) -> RunState:
        data = read_json(path, default={}) or {}
        return cls(path, data.get("done", {}), data.get("stopped"), data.get("finished", False))

    def is_done(self, round_index: int, step: str) -> bool:
        return step in self.done.get(str(round_index), [])

    def mark(self, round_index: int, step: str) -> None:
        self.done.setdefault(str(round_index), []).append(step)
        self.save()

    def save(self) -> None:
        if is_main():
            atomic_write_json(self.path, {"done": self.done, "stopped": self.stopped, "finished": self.finished})


# ----- what every step needs -----------------------------------------------------------------------
@dataclass
class RunContext:
    config: LoopConfig
    run_dir: Path
    state: RunState
    tokenizer: Any
    base_model_dir: Path
    real: Any  # datasets.Dataset of the real pool ('text' or 'messages')
    heldout_texts: list[str]
    eval_prompts: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)

    def round_dir(self, r: int) -> Path:
        return self.run_dir / f"round_{r}"

    def model_dir(self, r: int) -> Path:
        return self.base_model_dir if r == 0 else self.round_dir(r) / "model"


def _truncate_words(text: str, max_words: int | None) -> str:
    return text if max_words is None else " ".join(text.split()[:max_words])


def load_texts(source: str, max_items: int | None = None, max_words: int | None = None):
    """A data source spec (see `DataConfig.real`) -> a `datasets.Dataset` with 'text' or 'messages'."""
    from datasets import Dataset, load_dataset, load_from_disk

    kind, _, arg = source.partition(":")
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
    elif os.path.isdir(source):
        dataset = load_from_disk(source)
    elif source.endswith(".txt"):
        lines = [line.strip() for line in Path(source).read_text().splitlines() if line.strip()]
        dataset = Dataset.from_dict({"text": lines})
    else:
        dataset = load_dataset("json", data_files=source, split="train")
    columns = [c for c in TEXT_COLUMNS if c in dataset.column_names]
    if not columns:
        raise ConfigError(f"data source {source!r} has columns {dataset.column_names}: expected 'text' or 'messages'.")
    if max_items is not None and len(dataset) > max_items:
        dataset = dataset.select(range(max_items))
    if max_words is not None and "text" in dataset.column_names:
        dataset = dataset.map(lambda ex: {"text": _truncate_words(ex["text"], max_words)})
    return dataset.select_columns(columns)


def _texts_of(dataset) -> list[str]:
    """Plain text of each row (chat rows: the assistant turns)."""
    if "text" in dataset.column_names:
        return list(dataset["text"])
    if "messages" in dataset.column_names:
        return [" ".join(m["content"] for m in msgs if m["role"] == "assistant") for msgs in dataset["messages"]]
    return [p + c for p, c in zip(dataset["prompt"], dataset["completion"], strict=True)]


def load_model(directory: str | os.PathLike, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
    if torch.cuda.is_available():
        model = model.to(_state().device)
    model.eval()
    return model


def load_tokenizer(directory: str | os.PathLike):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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

            tmp = run_dir / "base_model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_tiny_model(tmp, seed=config.seed)
            os.replace(tmp, target)
        barrier()
        return target
    return Path(name) if Path(name).exists() else Path(_snapshot_dir(name))


def _snapshot_dir(hub_id: str) -> str:
    from huggingface_hub import snapshot_download

    if is_main():
        snapshot_download(hub_id)  # one download; the other ranks then read the cache
    barrier()
    return snapshot_download(hub_id)


def _write_config_once(config: LoopConfig, run_dir: Path) -> None:
    """Stores the run's config; a re-run with a different one is refused (it would mix two runs)."""
    path = run_dir / "config.yaml"
    current = dataclasses.asdict(config)
    if path.exists():
        stored = yaml.safe_load(path.read_text())
        if stored != current:
            changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
            raise ConfigError(
                f"output_dir={str(run_dir)!r} holds a run with a different config (keys {changed} differ). "
                "Re-run with the same recipe and overrides to resume, or choose another output_dir."
            )
    elif is_main():
        atomic_write_text(path, yaml.safe_dump(current, sort_keys=False))


def _make_context(config: LoopConfig) -> RunContext:
    run_dir = Path(config.output_dir)
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    _write_config_once(config, run_dir)
    base_dir = _prepare_base_model(config, run_dir)
    data = config.data
    real = load_texts(data.real, data.max_real, data.max_words)
    heldout = load_texts(data.heldout, data.max_heldout, data.max_words)
    heldout_texts = _texts_of(heldout)
    eval_prompts = heldout_texts[: config.evaluation.n_prompts]  # the generator cuts their prefixes
    return RunContext(
        config=config,
        run_dir=run_dir,
        state=RunState.load(run_dir / "run_state.json"),
        tokenizer=load_tokenizer(base_dir),
        base_model_dir=base_dir,
        real=real,
        heldout_texts=heldout_texts,
        eval_prompts=eval_prompts,
        history=read_json(run_dir / "history.json", default=[]) or [],
    )


def save_dataset(dataset, path: Path) -> None:
    """`atomic_save_dataset`, except that an empty dataset (e.g. selection kept nothing) is recorded as a
    small JSON file: `datasets` writes zero shards for it and then cannot load it back."""
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


# ----- the steps -----------------------------------------------------------------------------------
def _generator(ctx: RunContext, model):
    from collapse_guard.generation import (
        ContinuationConfig,
        ContinuationGenerator,
        MagpieConfig,
        MagpieGenerator,
    )

    g = ctx.config.generation
    common = {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
              "batch_size": g.batch_size, "prefix_tokens": g.prefix_tokens, "decoding": g.decoding}
    if g.method == "magpie":
        return MagpieGenerator(model, ctx.tokenizer, _make(MagpieConfig, common, g.options))
    return ContinuationGenerator(model, ctx.tokenizer, _make(ContinuationConfig, common, g.options))


def _make(config_cls: type, common: dict[str, Any], options: dict[str, Any]):
    """Builds a generator config from the loop's common fields it has, plus the recipe's `options`."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = [k for k in options if k not in names]
    if unknown:
        raise ConfigError(f"generation.options.{unknown[0]} is not a {config_cls.__name__} field; valid: {sorted(names)}.")
    return config_cls(**{**{k: v for k, v in common.items() if k in names}, **options})


def generate_step(ctx: RunContext, r: int):
    """Round r's synthetic data from round r-1's model (data-parallel over ranks; rank 0 saves round_r/generated)."""

    path = ctx.round_dir(r) / "generated"
    g = ctx.config.generation
    model = load_model(ctx.model_dir(r - 1), ctx.config.model.dtype)
    generator = _generator(ctx, model)
    # batch seeds depend on the run seed and the batch position only: any world size gives the same data
    if g.method == "magpie":
        generated = generator.generate(g.n_samples, seed=ctx.config.seed + r, round_index=r)
    else:
        generated = generator.generate(_continuation_prompts(ctx, r), seed=ctx.config.seed + r, round_index=r)
    if is_main():
        save_dataset(generated, path)
        stats = getattr(generator, "stats", None)
        if stats:
            atomic_write_json(ctx.round_dir(r) / "generation.json", stats)
    barrier()
    return load_dataset_dir(path)


def _continuation_prompts(ctx: RunContext, r: int) -> list[str]:
    """Real documents whose prefixes the model continues (Shumailov et al.): a seeded sample per round."""
    import numpy as np

    texts = _texts_of(ctx.real)
    rng = np.random.default_rng([ctx.config.seed, r])
    n = ctx.config.generation.n_samples
    order = [int(i) for i in rng.permutation(len(texts))]
    order = (order * (n // len(order) + 1))[:n]
    return [texts[i] for i in order]


def select_step(ctx: RunContext, r: int, generated):
    """Runs the recipe's selectors (rank 0; kept rows saved to round_r/selected, counts to selection.json)."""

    path = ctx.round_dir(r) / "selected"
    if is_main():
        report: dict[str, Any] = {"generated": len(generated)}
        if ctx.config.selectors:
            pipeline = build_selection(ctx, r)
            selected = pipeline(generated)
            report.update(pipeline.report if isinstance(pipeline.report, dict) else {"report": pipeline.report})
        else:
            selected = generated
        report["selected"] = len(selected)
        save_dataset(selected, path)
        atomic_write_json(ctx.round_dir(r) / "selection.json", report)
    barrier()
    return load_dataset_dir(path)


class _Lazy:
    """A value built only if a component asks for it (e.g. a reference model no selector needs)."""

    def __init__(self, make):
        self.make, self.value, self.made = make, None, False

    def get(self):
        if not self.made:
            self.value, self.made = self.make(), True
        return self.value


def build_selection(ctx: RunContext, r: int):
    """The recipe's selectors. Constructor parameters the recipe leaves unset are filled by name:
    `model` / `reference_model` (the round-0 model, frozen), `tokenizer`, `real_texts` (the real pool),
    `human_texts` (a seeded sample of it, the human reference band), `eval_texts` / `heldout_texts`
    (the held-out set: contamination checks)."""
    import inspect

    import numpy as np

    from collapse_guard.config import import_object
    from collapse_guard.selection import SelectionPipeline

    real_texts = _texts_of(ctx.real)
    sample = np.random.default_rng(ctx.config.seed).permutation(len(real_texts))[:HUMAN_REFERENCE_SIZE]
    reference = _Lazy(lambda: load_model(ctx.base_model_dir, ctx.config.model.dtype))
    available = {"tokenizer": ctx.tokenizer, "model": reference, "reference_model": reference,
                 "real_texts": real_texts, "human_texts": [real_texts[int(i)] for i in sample],
                 "eval_texts": ctx.heldout_texts, "heldout_texts": ctx.heldout_texts}
    selectors = []
    for i, spec in enumerate(ctx.config.selectors):
        params = inspect.signature(import_object(spec["class"])).parameters
        wanted = {k: (v.get() if isinstance(v, _Lazy) else v) for k, v in available.items()
                  if k in params and k not in spec}
        selectors.append(build_component(spec, key=f"selectors[{i}]", **wanted))
    return SelectionPipeline(selectors)


def _previous_synthetic(ctx: RunContext, r: int):
    """accumulate: every earlier round's synthetic training rows (from round r-1's training set)."""

    if r <= 1:
        return None
    previous = load_dataset_dir(ctx.round_dir(r - 1) / "train")
    return previous.filter(lambda ex: ex["provenance"]["source"] == "synthetic")


def mix_step(ctx: RunContext, r: int, selected):
    """Round r's training set (rank 0; saved to round_r/train)."""

    from collapse_guard.mixing import mix_datasets

    path = ctx.round_dir(r) / "train"
    if is_main():
        m = ctx.config.mixing
        # the real pool's format decides (continuations also carry their 'prompt', which is not a completion)
        columns = [c for c in ctx.real.column_names if c in selected.column_names] + ["provenance"]
        if len(selected) == 0 and m.mode != "accumulate":
            mixed = _real_only(ctx, r, n_rows=len(load_dataset_dir(ctx.round_dir(r) / "generated")))
        else:
            mixed = mix_datasets(ctx.real, selected.select_columns(columns), mode=m.mode,
                                 min_real_fraction=m.min_real_fraction, seed=ctx.config.seed + r, round_index=r,
                                 previous=_previous_synthetic(ctx, r) if m.mode == "accumulate" else None,
                                 allow_low_real_fraction=m.allow_low_real_fraction)
        save_dataset(mixed, path)
    barrier()
    return load_dataset_dir(path)


def _real_only(ctx: RunContext, r: int, n_rows: int):
    """Selection rejected every synthetic sample: the round trains on as many real rows as it generated
    (the floor at 100%) rather than on nothing. Refused when the recipe asked for no real data."""
    from collapse_guard.provenance import REAL, with_provenance

    if ctx.config.mixing.min_real_fraction <= 0:
        raise RuntimeError(
            f"round {r}: selection rejected all {n_rows} generated samples and mixing.min_real_fraction=0 allows "
            "no real data, so there is nothing to train on. Loosen the selectors or allow a real floor."
        )
    logger.warning("round %d: selection rejected every synthetic sample; training on %d real rows.", r, n_rows)
    rows = ctx.real.shuffle(seed=ctx.config.seed + r).select(range(min(n_rows, len(ctx.real))))
    return with_provenance(rows, REAL).flatten_indices()


def _sft_config(ctx: RunContext, r: int, output_dir: Path):
    import torch
    from trl import SFTConfig

    t = ctx.config.training
    on_cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "learning_rate": t.learning_rate,
        "num_train_epochs": t.num_train_epochs,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "max_length": t.max_length,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_steps": t.warmup_steps,
        "weight_decay": t.weight_decay,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": 2,
        "logging_steps": t.logging_steps,
        "seed": ctx.config.seed + r,
        "report_to": [],
        "use_cpu": on_cpu,
        "bf16": False if on_cpu else torch.cuda.is_bf16_supported(),
        "disable_tqdm": not is_main(),
        "dataset_text_field": "text",
    }
    kwargs.update(t.sft_args)
    return SFTConfig(**kwargs)


def _lora_config(ctx: RunContext):
    if not ctx.config.model.lora:
        return None
    from peft import LoraConfig

    m = ctx.config.model
    return LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                      target_modules=m.lora_target_modules, task_type="CAUSAL_LM")


def _callbacks(ctx: RunContext, r: int, collator, init_dir: Path) -> list:
    callbacks = [build_component(spec, key=f"training.callbacks[{i}]")
                 for i, spec in enumerate(ctx.config.training.callbacks)]
    guard = ctx.config.guard
    if guard.enabled:
        from collapse_guard.callbacks import CollapseGuardCallback

        callbacks.append(CollapseGuardCallback(
            ctx.heldout_texts, tokenizer=ctx.tokenizer, eval_steps=guard.eval_steps, collator=collator,
            stop_on_alarm=guard.stop_on_alarm, history_path=str(ctx.run_dir / "guard_history.json"),
            round_index=r, detector_config=_detector_config(ctx),
            context_length=ctx.config.evaluation.context_length,
        ))
    elif collator is not None:
        from collapse_guard.mixing import MixingCollatorCallback

        callbacks.append(MixingCollatorCallback(collator))
    return callbacks


def _collator(ctx: RunContext):
    m = ctx.config.mixing
    if not m.batch_floor or m.min_real_fraction <= 0:
        return None
    from collapse_guard.mixing import MixingCollator

    return MixingCollator(real_dataset=ctx.real, tokenizer=ctx.tokenizer, min_real_fraction=m.min_real_fraction,
                          unit=m.unit, seed=ctx.config.seed, max_length=ctx.config.training.max_length,
                          allow_low_real_fraction=m.allow_low_real_fraction)


def _last_checkpoint(output_dir: Path, with_collator: bool) -> str | None:
    """The newest complete checkpoint: a kill can leave the newest one half written.

    Trainer writes trainer_state.json after the weights, optimizer and RNG states, and the collator
    state comes after that (on_save), so their presence marks a finished checkpoint."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not output_dir.is_dir():
        return None
    candidates = sorted(output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]),
                        reverse=True)
    for checkpoint in candidates:
        complete = (checkpoint / "trainer_state.json").exists()
        if with_collator:
            complete = complete and (checkpoint / "collapse_guard" / "mixing_collator_rank0.json").exists()
        if complete:
            return str(checkpoint)
    return None


def train_step(ctx: RunContext, r: int, train_dataset) -> dict[str, Any]:
    """SFTTrainer (full or LoRA) under the guard and the batch floor; saves round_r/model atomically."""
    from trl import SFTTrainer

    init_dir = ctx.model_dir(r - 1) if ctx.config.model.init_from == "previous" else ctx.base_model_dir
    output_dir = ctx.round_dir(r) / "trainer"
    model = load_model(init_dir, ctx.config.model.dtype)
    model.train()
    collator = _collator(ctx)
    trainer = SFTTrainer(
        model=model,
        args=_sft_config(ctx, r, output_dir),
        train_dataset=train_dataset.remove_columns([c for c in train_dataset.column_names if c == "provenance"]),
        processing_class=ctx.tokenizer,
        data_collator=collator,
        peft_config=_lora_config(ctx),
        callbacks=_callbacks(ctx, r, collator, init_dir),
    )
    checkpoint = _last_checkpoint(output_dir, with_collator=collator is not None)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    _save_trained_model(ctx, r, trainer, init_dir)
    guard = next((c for c in trainer.callback_handler.callbacks if type(c).__name__ == "CollapseGuardCallback"), None)
    verdict = getattr(guard, "last_verdict", None)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    info = {
        # the mean of logged losses survives a resume (log_history is checkpointed); training_loss does not
        "train_loss": float(sum(losses) / len(losses)) if losses else float(result.training_loss),
        "train_steps": int(result.global_step),
        "resumed_from": os.path.basename(checkpoint) if checkpoint else None,
        "guard_level": verdict.level if verdict is not None else None,
        "guard_reasons": list(verdict.reasons) if verdict is not None else [],
    }
    if collator is not None:
        info["realized_real_fraction"] = collator.metrics()["real_fraction"]
    if is_main():
        atomic_write_json(ctx.round_dir(r) / "train.json", info)
    barrier()
    return info


def _save_trained_model(ctx: RunContext, r: int, trainer, init_dir: Path) -> None:
    """Saves to a temp folder, then renames: a kill never leaves a half-written round model."""
    target = ctx.model_dir(r)
    tmp = target.with_name("model.tmp")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    if ctx.config.model.lora:
        adapter_tmp = target.with_name("adapter.tmp")
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


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def _detector_config(ctx: RunContext):
    from collapse_guard.detector import DetectorConfig

    return DetectorConfig(**ctx.config.detector.thresholds)


def evaluate_step(ctx: RunContext, r: int) -> dict[str, Any]:
    """Held-out human perplexity and a fixed prompt set's generations (all ranks), then their diversity and
    perplexity under the round-0 model (rank 0). Saved to round_r/eval.json; every rank reads it back."""
    from collapse_guard.metrics import HeldoutPerplexity, document_perplexities
    from collapse_guard.metrics.diversity import diversity_metrics, perplexity_concentration

    e = ctx.config.evaluation
    model = load_model(ctx.model_dir(r), ctx.config.model.dtype)
    heldout = HeldoutPerplexity(ctx.heldout_texts, ctx.tokenizer, context_length=e.context_length).compute(model)
    texts = _eval_generations(ctx, model)
    path = ctx.round_dir(r) / "eval.json"
    if is_main():
        metrics: dict[str, Any] = {"round": r, "heldout_ppl": heldout.perplexity}
        metrics.update(diversity_metrics(texts, human_texts=ctx.heldout_texts, embedding_model=e.embedding_model))
        extra: dict[str, Any] = {"heldout_per_document": heldout.per_document, "generations": texts}
        if e.generated_perplexity:
            reference = model if r == 0 else load_model(ctx.base_model_dir, ctx.config.model.dtype)
            generated_ppl = document_perplexities(reference, ctx.tokenizer, texts, context_length=e.context_length)
            human_ppl = heldout.per_document if r == 0 else _baseline_extra(ctx)["heldout_per_document"]
            metrics.update(perplexity_concentration(generated_ppl, human_ppl))
            extra["generated_ppl"] = generated_ppl
        train_info = read_json(ctx.round_dir(r) / "train.json", default={}) or {}
        if "train_loss" in train_info:
            metrics["train_loss"] = train_info["train_loss"]
        atomic_write_json(path, {"metrics": metrics, **extra})
    barrier()
    return read_json(path)["metrics"]


def _baseline_extra(ctx: RunContext) -> dict[str, Any]:
    return read_json(ctx.round_dir(0) / "eval.json")


def _eval_generations(ctx: RunContext, model) -> list[str]:
    """The model's continuations of the fixed held-out prompts (same seed every round, so rounds compare)."""
    from collapse_guard.generation import ContinuationConfig, ContinuationGenerator

    e = ctx.config.evaluation
    config = ContinuationConfig(prefix_tokens=e.prompt_tokens, max_new_tokens=e.max_new_tokens, decoding="sample",
                                temperature=e.temperature, output="continuation",
                                batch_size=ctx.config.generation.batch_size)
    generated = ContinuationGenerator(model, ctx.tokenizer, config).generate(ctx.eval_prompts, seed=ctx.config.seed)
    return list(generated["text"])


def detect_step(ctx: RunContext, r: int, metrics: dict[str, Any]):
    """Appends round r to the history and asks the detector; every rank holds the same history."""
    from collapse_guard.detector import CollapseDetector

    ctx.history = [h for h in ctx.history if h.get("round") != r] + [metrics]
    verdict = CollapseDetector(_detector_config(ctx)).check(ctx.history)
    ctx.history[-1] = {**metrics, "level": verdict.level, "reasons": verdict.reasons}
    if is_main():
        atomic_write_json(ctx.round_dir(r) / "verdict.json", verdict.to_dict())
        atomic_write_json(ctx.run_dir / "history.json", ctx.history)
    barrier()
    return verdict


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
def _run_step(ctx: RunContext, r: int, step: str, fn, *args):
    """Runs `fn` (on every rank; it decides what rank 0 alone does) and records the step as done."""
    result = fn(ctx, r, *args)
    if not ctx.state.is_done(r, step):
        ctx.state.mark(r, step)
    barrier()
    return result


def _load_or(ctx: RunContext, r: int, step: str, name: str, fn, *args):

    if ctx.state.is_done(r, step):
        return load_dataset_dir(ctx.round_dir(r) / name)
    return _run_step(ctx, r, step, fn, *args)


def run_round(ctx: RunContext, r: int):
    """One round; each step is skipped when run_state.json says it finished."""
    generated = _load_or(ctx, r, "generate", "generated", generate_step)
    selected = _load_or(ctx, r, "select", "selected", select_step, generated)
    train_dataset = _load_or(ctx, r, "mix", "train", mix_step, selected)
    if not ctx.state.is_done(r, "train"):
        _run_step(ctx, r, "train", train_step, train_dataset)
    return _evaluate_and_detect(ctx, r)


def _evaluate_and_detect(ctx: RunContext, r: int):
    from collapse_guard.detector import Verdict

    if ctx.state.is_done(r, "evaluate"):
        metrics = read_json(ctx.round_dir(r) / "eval.json")["metrics"]
    else:
        metrics = _run_step(ctx, r, "evaluate", evaluate_step)
    if ctx.state.is_done(r, "detect"):
        verdict = Verdict.from_dict(read_json(ctx.round_dir(r) / "verdict.json"))
    else:
        verdict = _run_step(ctx, r, "detect", detect_step, metrics)
    if not ctx.state.is_done(r, "artifacts"):
        _run_step(ctx, r, "artifacts", artifacts_step)
    return verdict


def run_rounds(config: LoopConfig) -> dict[str, Any]:
    """Runs (or resumes) one loop; returns {"run_dir", "history", "stopped", "finished"}."""
    from tqdm.auto import tqdm

    check_config(config)
    ctx = _make_context(config)
    if ctx.state.finished:
        return _summary(ctx)
    _evaluate_and_detect(ctx, 0)
    rounds = tqdm(range(1, config.rounds + 1), desc=f"{config.name}: rounds", disable=not is_main())
    for r in rounds:
        verdict = run_round(ctx, r)
        rounds.set_postfix(level=verdict.level)
        if verdict.is_alarm and config.detector.stop_on_alarm and r < config.rounds:
            ctx.state.stopped = {"round": r, "reason": "; ".join(verdict.reasons)}
            logger.warning("%s: stopped after round %d: %s", config.name, r, ctx.state.stopped["reason"])
            break
    ctx.state.finished = True
    ctx.state.save()
    if is_main():
        from collapse_guard.report import write_report

        write_report(ctx.run_dir)
    barrier()
    return _summary(ctx)


def _summary(ctx: RunContext) -> dict[str, Any]:
    return {"run_dir": str(ctx.run_dir), "history": ctx.history, "stopped": ctx.state.stopped,
            "finished": ctx.state.finished}


def run_recipe(config: LoopConfig) -> dict[str, Any]:
    """Runs every variant of a recipe (or the recipe itself) and, for several, a comparison report."""
    variants = variant_configs(config)
    for variant in variants.values():
        check_config(variant)  # all of them before the first expensive step
    results = {name: run_rounds(variant) for name, variant in variants.items()}
    if config.variants and is_main():
        from collapse_guard.report import write_comparison

        write_comparison(config.output_dir, [r["run_dir"] for r in results.values()], title=config.name)
    barrier()
    return results
