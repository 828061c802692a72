"""What the real-data floor costs: construction at 1M rows (before vs after), packed tokens per batch, and
collator / SFTTrainer step time, side by side.

    python benchmarks/mixing.py                   # full: ~30-45 min on 2 quiet CPU cores
    python benchmarks/mixing.py --quick           # smoke run, ~3-5 min (20k rows, short packing and steps)
    python benchmarks/mixing.py --skip-smollm2    # tiny tokenizer/model only
    python benchmarks/mixing.py --sections construction   # or packing, step (comma-separated)
    python benchmarks/mixing.py --before-max-rows 100000  # BEFORE (last release) at 100k rows only

Writes benchmarks/results/mixing.json (--quick: mixing_quick.json next to it). Sections:

1. construction (issue #9: "collator construction time and memory per row at 1M rows, before vs after"):
   a real pool of short human texts (word windows of 6-39 words cut from gensim's Lee and Wikipedia
   corpora, all distinct), saved once with `save_to_disk` and memory-mapped like a large pool would be.
   Every measurement runs in a fresh subprocess (resident memory is that process's own):
   - AFTER, the current code: `MixingCollator(real_dataset=ds, tokenizer=tok)` (tokenizes nothing), its
     first real top-up (the stream's 4-byte-per-row permutation), and the real-pool fingerprint index
     recognition falls back to (`real_pool_index`, batched tokenisation + numpy hashing): time, bytes per
     row of the `SourceIndex` (`.nbytes`), anonymous resident memory kept, and its cached rebuild in the same
     process and in the next run (a fresh process, same on-disk cache).
   - BEFORE, the last release (`git archive a55a33d`, imported with PYTHONPATH): its
     `MixingCollator(real_dataset=ds, tokenizer=tok)`, which tokenized every row in Python and kept token
     lists. Run at 100k rows and at 1M rows unless --before-max-rows says otherwise (see the JSON).
   "Kept" memory is the growth of RssAnon (anonymous pages, after gc): pages of the memory-mapped Arrow
   file (RssFile) are the page cache's, shared and reclaimable, and are reported apart.
2. packing (issue #9: "top-ups are packed into the batch's rows, no more than 5% fewer tokens per batch than
   the base packed collator"): TRL SFTTrainer with packing=True (BFD, padding-free), a tiny model, one epoch
   over a mix_datasets set, `MixingCollator(real_dataset=..., unit="tokens").attach(trainer)`. Each
   micro-batch's rows are counted as the trainer's own (BFD-packed) collator would get them and as the
   MixingCollator hands them to it, in the same run (no padding in padding-free batches: tokens = the rows'
   lengths). Two training sets per floor f: "matched" (built by mix_datasets at the same f) and
   "synthetic_heavy" (10% real rows: the floor tops up most batches).
3. step: collator time per batch (base vs MixingCollator, same features), and SFTTrainer step time with and
   without the collator, tiny model and SmolLM2-135M-Instruct. Both arms pad every row to max_length and the
   collator runs with max_growth=1.0 (no micro-batch grows), so a difference is the collator's own cost.
   Arms alternate within each repeat; medians over steps and repeats.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BEFORE_COMMIT = "a55a33d"
BENCH_CACHE = Path(
    os.environ.get("COLLAPSE_GUARD_BENCH_CACHE", Path(tempfile.gettempdir()) / "collapse_guard_bench")
)


# ----- helpers --------------------------------------------------------------------------------------------
def memory() -> dict[str, int]:
    """This process's resident memory from /proc/self/status, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def load(label: str) -> list[float]:
    value = [round(x, 2) for x in os.getloadavg()]
    print(f"[{time.strftime('%H:%M:%S')}] load average {value} ({label})", flush=True)
    return value


def corpus_words() -> list[str]:
    from collapse_guard.resources import human_texts

    return " ".join(human_texts("lee_background") + human_texts("wiki")).split()


def word_windows(words: list[str], n: int, min_words: int, max_words: int, seed: int) -> list[str]:
    """n distinct (start, length) word windows of the corpus: short, varied, human texts."""
    import numpy as np

    span = max_words - min_words + 1
    starts = len(words) - max_words
    if n > starts * span:
        raise ValueError(f"{n} windows asked for, the corpus has {starts * span}.")
    idx = np.random.default_rng(seed).choice(starts * span, size=n, replace=False)
    return [
        " ".join(words[s : s + length])
        for s, length in zip((idx // span).tolist(), (min_words + idx % span).tolist(), strict=True)
    ]


def pool_dir(rows: int) -> Path:
    """A saved Dataset of `rows` distinct short human texts (built once, then reused)."""
    path = BENCH_CACHE / f"pool_{rows}"
    if not (path / "dataset_info.json").exists():
        from datasets import Dataset

        start = time.perf_counter()
        texts = word_windows(corpus_words(), rows, 6, 39, seed=0)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        Dataset.from_dict({"text": texts}).save_to_disk(str(tmp))
        os.replace(tmp, path)
        print(f"built {path} ({rows} rows) in {time.perf_counter() - start:.1f}s", flush=True)
    return path


def tokenizer_dirs(skip_smollm2: bool) -> dict[str, str]:
    from collapse_guard.testing import tiny_tokenizer

    tiny = BENCH_CACHE / "tiny_tokenizer"
    if not (tiny / "tokenizer.json").exists():
        tiny_tokenizer().save_pretrained(str(tiny))
    out = {"tiny": str(tiny)}
    if not skip_smollm2:
        try:
            from collapse_guard.resources import smollm2_dir

            out["smollm2_135m_instruct"] = str(smollm2_dir())
        except (ModuleNotFoundError, FileNotFoundError) as err:
            print(f"SmolLM2 unavailable ({err}); tiny tokenizer only", flush=True)
    return out


def auto_tokenizer(directory: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ----- 1. construction (subprocess workers) ---------------------------------------------------------------
def worker_after(pool: str, tokenizer: str, rows: int, max_length: int) -> dict:
    from datasets import load_from_disk

    from collapse_guard.mixing import MixingCollator, RowFormat
    from collapse_guard.mixing.rows import real_pool_index

    tok = auto_tokenizer(tokenizer)
    ds = load_from_disk(pool)
    ds = ds.select(range(rows)) if rows < len(ds) else ds
    gc.collect()
    m0 = memory()
    start = time.perf_counter()
    collator = MixingCollator(real_dataset=ds, tokenizer=tok)
    construct_s = time.perf_counter() - start
    gc.collect()
    m1 = memory()
    start = time.perf_counter()
    collator.stream().next()  # the first real top-up: the stream's permutation of the pool
    first_top_up_s = time.perf_counter() - start
    gc.collect()
    m2 = memory()
    start = time.perf_counter()
    index = real_pool_index(ds, tok, RowFormat(max_length=max_length))
    index_s = time.perf_counter() - start
    gc.collect()
    m3 = memory()
    del index
    gc.collect()
    start = time.perf_counter()
    cached = real_pool_index(ds, tok, RowFormat(max_length=max_length))
    cached_s = time.perf_counter() - start
    sample = tok(list(ds.select(range(min(2000, len(ds))))["text"]))["input_ids"]
    return {
        "rows": len(ds),
        "tokens_per_row_mean": sum(map(len, sample)) / len(sample),
        "construct_s": construct_s,
        "construct_rss_anon_delta_bytes": m1["RssAnon"] - m0["RssAnon"],
        "first_top_up_s": first_top_up_s,
        "first_top_up_rss_anon_delta_bytes": m2["RssAnon"] - m1["RssAnon"],
        "index_build_s": index_s,
        "index_us_per_row": 1e6 * index_s / len(ds),
        "index_keys": len(cached),
        "index_nbytes": cached.nbytes,
        "index_bytes_per_row": cached.nbytes / len(ds),
        "index_rss_anon_delta_bytes": m3["RssAnon"] - m2["RssAnon"],
        "index_peak_rss_delta_bytes": m3["VmHWM"] - m2["VmHWM"],
        "rss_file_after_index_bytes": m3["RssFile"],
        "index_cached_same_process_s": cached_s,
        "index_origin_cached": cached.origin,
    }


def worker_after_cached(pool: str, tokenizer: str, rows: int, max_length: int) -> dict:
    """The next run: a fresh process, the on-disk cache of the previous one."""
    from datasets import load_from_disk

    from collapse_guard.mixing import RowFormat
    from collapse_guard.mixing.rows import real_pool_index

    tok = auto_tokenizer(tokenizer)
    ds = load_from_disk(pool)
    ds = ds.select(range(rows)) if rows < len(ds) else ds
    start = time.perf_counter()
    index = real_pool_index(ds, tok, RowFormat(max_length=max_length))
    return {"index_cached_next_run_s": time.perf_counter() - start, "origin": index.origin}


def worker_before(pool: str, tokenizer: str, rows: int, max_length: int) -> dict:
    import collapse_guard

    if not str(collapse_guard.__file__).startswith(os.environ.get("CG_BEFORE_ROOT", "/nonexistent")):
        raise RuntimeError(f"BEFORE worker imported {collapse_guard.__file__}, not the extracted release.")
    from datasets import load_from_disk

    from collapse_guard.mixing import MixingCollator

    tok = auto_tokenizer(tokenizer)
    ds = load_from_disk(pool)
    ds = ds.select(range(rows)) if rows < len(ds) else ds
    gc.collect()
    m0 = memory()
    start = time.perf_counter()
    collator = MixingCollator(real_dataset=ds, tokenizer=tok, max_length=max_length)
    construct_s = time.perf_counter() - start
    gc.collect()
    m1 = memory()
    assert collator is not None
    return {
        "rows": len(ds),
        "construct_s": construct_s,
        "construct_us_per_row": 1e6 * construct_s / len(ds),
        "construct_rss_anon_delta_bytes": m1["RssAnon"] - m0["RssAnon"],
        "construct_bytes_per_row": (m1["RssAnon"] - m0["RssAnon"]) / len(ds),
        "construct_peak_rss_delta_bytes": m1["VmHWM"] - m0["VmHWM"],
    }


SECTIONS = ("construction", "packing", "step")
WORKERS = {"after": worker_after, "after_cached": worker_after_cached, "before": worker_before}


def run_worker(
    kind: str, pool: Path, tokenizer: str, rows: int, max_length: int, env: dict[str, str]
) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--pool",
        str(pool),
        "--tokenizer",
        tokenizer,
        "--rows",
        str(rows),
        "--max-length",
        str(max_length),
    ]
    full_env = {**os.environ, **env}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, cwd=str(env.get("CWD", REPO)))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    out["process_wall_s"] = time.perf_counter() - start
    return out


def extract_before() -> Path:
    root = BENCH_CACHE / f"cg_before_{BEFORE_COMMIT}"
    if not (root / "collapse_guard" / "mixing.py").exists():
        root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", BEFORE_COMMIT, "collapse_guard"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def derive(after: list[dict], before: dict | None, rows: int) -> dict:
    """Medians of the AFTER runs, memory kept per row, and the ratios against BEFORE."""
    a = {k: median_of(after, k) for k in after[0] if isinstance(after[0][k], (int, float))}
    # by structure: the index's 8-byte keys + the real stream's int32 permutation (made at the first top-up)
    a["kept_bytes_per_row"] = a["index_nbytes"] / rows + 4
    # as measured: the index + the RssAnon growth at the first top-up (page granularity: noisy at small sizes)
    a["kept_bytes_per_row_measured"] = (
        a["index_nbytes"] + max(a["first_top_up_rss_anon_delta_bytes"], 0)
    ) / rows
    entry: dict = {
        "after_median": a,
        "after_runs": after,
        "kept_bytes_per_row_definition": "SourceIndex.nbytes / rows + 4 (RealStream's int32 permutation, "
        "made at the first top-up); _measured: RssAnon growth at the "
        "first top-up instead of the 4 bytes",
    }
    if before is not None:
        c = a["construct_s"]
        entry.update(
            before=before,
            speedup_construct=before["construct_s"] / c,
            speedup_construct_plus_index=before["construct_s"] / (c + a["index_build_s"]),
            speedup_construct_plus_cached_index=before["construct_s"] / (c + a["index_cached_next_run_s"]),
            memory_ratio_before_over_kept=before["construct_bytes_per_row"] / a["kept_bytes_per_row"],
        )
    return entry


def construction(
    sizes: list[int], before_max_rows: int, repeats: int, tokenizers: dict[str, str], max_length: int
) -> dict:
    before_root = extract_before()
    out: dict = {
        "pool": "distinct word windows (6-39 words) of gensim's lee_background + Wikipedia sample, "
        "save_to_disk, memory-mapped (load_from_disk); the first `rows` rows",
        "max_length": max_length,
        "before_commit": BEFORE_COMMIT,
        "after_repeats": repeats,
        "before_repeats": 1,
        "before_rows_measured": [n for n in sizes if n <= before_max_rows],
        "before_rows_skipped": [n for n in sizes if n > before_max_rows],
        "kept_memory": "growth of RssAnon after gc.collect(), in a fresh process per measurement",
        "load_average_start": load("construction start"),
    }
    for name, tokdir in tokenizers.items():
        per_size = {}
        for rows in sizes:
            pool = pool_dir(max(sizes))
            after, before = [], None
            # interleaved: before first (when measured), then the AFTER repeats, each in its own process
            if rows <= before_max_rows:
                load(f"{name} BEFORE {rows} rows")
                before = run_worker(
                    "before",
                    pool,
                    tokdir,
                    rows,
                    max_length,
                    {
                        "PYTHONPATH": str(before_root),
                        "CG_BEFORE_ROOT": str(before_root),
                        "CWD": str(before_root),
                    },
                )
                print(
                    f"  BEFORE {name} {rows}: {before['construct_s']:.1f}s, "
                    f"{before['construct_bytes_per_row']:.0f} B/row",
                    flush=True,
                )
            for _ in range(repeats):
                cache = tempfile.mkdtemp(prefix="cg_fp_cache_", dir=str(BENCH_CACHE))
                env = {"COLLAPSE_GUARD_CACHE": cache}
                run = run_worker("after", pool, tokdir, rows, max_length, env)
                run.update(run_worker("after_cached", pool, tokdir, rows, max_length, env))
                after.append(run)
                print(
                    f"  AFTER {name} {rows}: construct {run['construct_s'] * 1e3:.1f} ms, index "
                    f"{run['index_build_s']:.1f}s {run['index_bytes_per_row']:.1f} B/row, cached "
                    f"{run['index_cached_next_run_s']:.3f}s",
                    flush=True,
                )
            entry = derive(after, before, rows)
            per_size[str(rows)] = entry
        out[name] = per_size
    out["goals"] = {
        "bytes_per_row_kept": "<= 16",
        "construction_speedup": ">= 10x",
        "cached_between_runs": True,
    }
    out["load_average_end"] = load("construction end")
    return out


# ----- 2. packed tokens per batch -------------------------------------------------------------------------
class TokenRecorder:
    """Per micro-batch: the rows the trainer's own collator would get, and those the MixingCollator gives."""

    def __init__(self, collator, max_length: int):
        self.collator, self.max_length = collator, max_length
        self.incoming: list[tuple[int, int]] = []  # (tokens, rows) of the sampler's micro-batch
        self.outgoing: list[tuple[int, int]] = []
        self.mixing_s = 0.0
        self.base_s = 0.0
        base = collator.base_collator

        def recording_base(rows):
            self.outgoing.append((sum(len(r["input_ids"]) for r in rows), len(rows)))
            start = time.perf_counter()
            try:
                return base(rows)
            finally:
                self.base_s += time.perf_counter() - start

        collator.base_collator = recording_base

    def __call__(self, features):
        self.incoming.append((sum(len(f["input_ids"]) for f in features), len(features)))
        start = time.perf_counter()
        batch = self.collator(features)
        self.mixing_s += time.perf_counter() - start
        return batch


def packing_texts(tok, n_real_pool: int, n_synthetic: int) -> tuple:
    from datasets import Dataset

    from collapse_guard.resources import human_texts

    real_words = " ".join(human_texts("lee_background")).split()
    wiki_words = " ".join(human_texts("wiki")).split()
    real = Dataset.from_dict({"text": word_windows(real_words, n_real_pool, 8, 120, seed=1)})
    # stand-in synthetic rows: other text of the same length distribution (never in the real pool)
    synthetic = Dataset.from_dict({"text": word_windows(wiki_words, n_synthetic, 8, 120, seed=2)})
    return real, synthetic


def packing_run(
    tok,
    real,
    synthetic,
    f: float,
    train_f: float,
    max_growth: float,
    max_length: int,
    batch_size: int,
    accumulation: int,
    workdir: Path,
) -> dict:
    import numpy as np
    import torch
    from trl import SFTConfig, SFTTrainer

    from collapse_guard import MixingCollator, mix_datasets
    from collapse_guard.testing import tiny_causal_lm

    train = mix_datasets(
        real, synthetic, mode="replace", min_real_fraction=train_f, seed=0, allow_low_real_fraction=True
    )
    args = SFTConfig(
        output_dir=str(workdir),
        packing=True,
        max_length=max_length,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=10_000,
        learning_rate=1e-5,
        seed=0,
    )
    trainer = SFTTrainer(model=tiny_causal_lm(tok), args=args, train_dataset=train, processing_class=tok)
    start = time.perf_counter()
    collator = MixingCollator(
        real_dataset=real, min_real_fraction=f, unit="tokens", max_growth=max_growth
    ).attach(trainer)
    attach_s = time.perf_counter() - start
    recorder = TokenRecorder(collator, max_length)
    trainer.data_collator = recorder
    # the batches, not the model, are measured: the Trainer's loop, sampler, callbacks and collators run as in
    # training, but no forward/backward pass (a model step would only add minutes of CPU time)
    trainer.training_step = lambda *a, **k: torch.zeros(())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    n = min(len(recorder.incoming), len(recorder.outgoing))
    inc = np.array(recorder.incoming[:n], float)
    out = np.array(recorder.outgoing[:n], float)
    ratio = out[:, 0] / inc[:, 0]
    per_step = [
        (inc[i : i + accumulation, 0].sum(), out[i : i + accumulation, 0].sum())
        for i in range(0, n, accumulation)
    ]
    step_ratio = np.array([o / i for i, o in per_step])
    c = collator.counts
    n_syn = sum(1 for p in train["provenance"] if p["source"] == "synthetic")
    return {
        "training_set": {
            "rows": len(train),
            "real_rows": len(train) - n_syn,
            "synthetic_rows": n_syn,
            "built_with_min_real_fraction": train_f,
        },
        "max_growth": max_growth,
        "micro_batches": n,
        "rows_per_micro_batch": batch_size,
        "gradient_accumulation_steps": accumulation,
        "base_tokens_per_batch_mean": float(inc[:, 0].mean()),
        "mixing_tokens_per_batch_mean": float(out[:, 0].mean()),
        "ratio_of_means": float(out[:, 0].mean() / inc[:, 0].mean()),
        "per_batch_ratio": {
            "min": float(ratio.min()),
            "p05": float(np.percentile(ratio, 5)),
            "median": float(np.median(ratio)),
            "max": float(ratio.max()),
            "share_below_0.95": float((ratio < 0.95).mean()),
        },
        "largest_batch_tokens": {"base": int(inc[:, 0].max()), "mixing": int(out[:, 0].max())},
        "per_step_ratio": {
            "min": float(step_ratio.min()),
            "p05": float(np.percentile(step_ratio, 5)),
            "median": float(np.median(step_ratio)),
        },
        "base_rows_per_batch_mean": float(inc[:, 1].mean()),
        "mixing_rows_per_batch_mean": float(out[:, 1].mean()),
        "base_fill": float(inc[:, 0].sum() / (inc[:, 1].sum() * max_length)),
        "mixing_fill": float(out[:, 0].sum() / (out[:, 1].sum() * max_length)),
        "realised_real_token_fraction": collator.real_fraction,
        "real_top_up_segments": int(c["real_top_up"]),
        "grown_batches": int(c["grown_batches"]),
        "synthetic_segments_served": int(c["synthetic_served"]),
        "synthetic_pending_at_end": len(collator.synthetic_buffer),
        "recognition": collator.recognition,
        "real_segments_recognised": int(c["real_seen"]),
        "attach_s": attach_s,
        "collator_ms_per_batch": {
            "mixing_total": 1000 * recorder.mixing_s / max(n, 1),
            "of_which_base_collator": 1000 * recorder.base_s / max(n, 1),
            "mixing_own": 1000 * (recorder.mixing_s - recorder.base_s) / max(n, 1),
        },
    }


def packing(
    tok_name: str,
    tok,
    fractions: list[float],
    n_real_pool: int,
    n_synthetic: int,
    max_length: int,
    batch_size: int,
    accumulation: int,
    workdir: Path,
) -> dict:
    real, synthetic = packing_texts(tok, n_real_pool, n_synthetic)
    out: dict = {
        "tokenizer": tok_name,
        "model": "tiny 2-layer Llama; training_step replaced by a no-op (the "
        "batches, not the model, are measured: sampler, callbacks and collators run as in training)",
        "max_length": max_length,
        "real_pool_rows": n_real_pool,
        "synthetic_rows": n_synthetic,
        "texts": "real: word windows (8-120 words) of lee_background; synthetic: word windows (8-120 words) "
        "of the Wikipedia sample",
        "goal": "mixing tokens per batch >= 0.95 x base",
        "compositions": {
            "matched": "training set built by mix_datasets at the floor f (default max_growth=2)",
            "matched_max_growth_1": "the same, max_growth=1.0: batches cannot grow, so the "
            "token count shows the packing of top-ups alone",
            "synthetic_heavy": "10% real rows: the floor tops up most batches",
        },
        "load_average_start": load("packing start"),
    }
    for f in fractions:
        for composition, train_f, growth in (
            ("matched", f, 2.0),
            ("matched_max_growth_1", f, 1.0),
            ("synthetic_heavy", 0.1, 2.0),
        ):
            run = packing_run(
                tok,
                real,
                synthetic,
                f,
                train_f,
                growth,
                max_length,
                batch_size,
                accumulation,
                workdir / f"pack_{f}_{composition}",
            )
            out[f"f={f}/{composition}"] = run
            print(
                f"  packing f={f} {composition}: base {run['base_tokens_per_batch_mean']:.0f} mixing "
                f"{run['mixing_tokens_per_batch_mean']:.0f} tokens/batch (x{run['ratio_of_means']:.3f}), "
                f"per-batch min x{run['per_batch_ratio']['min']:.3f}",
                flush=True,
            )
    out["load_average_end"] = load("packing end")
    return out


# ----- 3. collator and step time --------------------------------------------------------------------------
class StepTimer:
    """Wall time between consecutive step ends: includes data loading and collation."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                if timer._last is not None:
                    timer.times.append(now - timer._last)
                timer._last = now

        self.callback = _CB()
        self.times: list[float] = []
        self._last: float | None = None


def step_data(n_real: int, n_synthetic: int):
    from datasets import Dataset

    from collapse_guard.resources import human_texts

    real_texts = human_texts("lee_background")[:n_real]
    real = Dataset.from_dict({"text": real_texts})
    synthetic = Dataset.from_dict(
        {
            "text": [f"{t.split('.')[0]}. The model repeats itself." for t in real_texts[::-1]]
            * (n_synthetic // max(len(real_texts), 1) + 1)
        }
    ).select(range(n_synthetic))
    return real, synthetic


def collator_time(tokenizer, real, synthetic, max_length: int, batch_size: int, repeats: int) -> dict:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from collapse_guard import MixingCollator, mix_datasets
    from collapse_guard.mixing import tokenize_like_sft

    base = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=max_length)
    variants = {}
    # as the previous benchmark: synthetic rows, no provenance (fingerprint lookups, half the rows top-ups)
    feats = [tokenize_like_sft(ex, tokenizer, max_length=max_length) for ex in synthetic]
    variants["all_synthetic_fingerprints"] = feats
    # as attach() delivers a set built at the floor: rows carry their provenance
    mixed = mix_datasets(
        real, synthetic.select(range(len(real))), mode="replace", min_real_fraction=0.5, seed=0
    )
    variants["mixed_with_provenance"] = [
        {**tokenize_like_sft(ex, tokenizer, max_length=max_length), "provenance": ex["provenance"]}
        for ex in mixed
    ]
    out = {"batch_size": batch_size}
    for name, rows in variants.items():
        batches = [rows[i : i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]
        mixing = MixingCollator(
            base,
            real_dataset=real,
            tokenizer=tokenizer,
            min_real_fraction=0.5,
            max_length=max_length,
            max_growth=1.0,
        ).plan(1)
        mixing(batches[0])  # warm-up: builds the real-pool index on first need
        times = {"base_ms": [], "mixing_ms": []}
        for _ in range(repeats):
            for arm, fn in (("base_ms", base), ("mixing_ms", mixing)):
                start = time.perf_counter()
                for b in batches:
                    fn(b)
                times[arm].append(1000 * (time.perf_counter() - start) / len(batches))
        b_ms, m_ms = statistics.median(times["base_ms"]), statistics.median(times["mixing_ms"])
        out[name] = {
            "base_collator_ms_per_batch": b_ms,
            "mixing_collator_ms_per_batch": m_ms,
            "collator_overhead_ms_per_batch": m_ms - b_ms,
            "batches": len(batches),
            "real_top_up_per_batch": mixing.counts["real_top_up"] / max(mixing.counts["micro_batches"], 1),
        }
    return out


def step_time(
    make_model,
    tokenizer,
    real,
    synthetic,
    max_length: int,
    batch_size: int,
    steps: int,
    repeats: int,
    workdir: Path,
) -> dict:
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from collapse_guard import MixingCollator, mix_datasets

    train = mix_datasets(real, synthetic, mode="replace", min_real_fraction=0.5)
    medians: dict[str, list[float]] = {"base": [], "mixing": []}
    grown = []
    for repeat in range(repeats):
        for arm in ("base", "mixing") if repeat % 2 == 0 else ("mixing", "base"):
            model = make_model()
            base = DataCollatorForLanguageModeling(
                pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=max_length
            )
            args = SFTConfig(
                output_dir=str(workdir / f"{arm}{repeat}"),
                max_steps=steps + 2,
                per_device_train_batch_size=batch_size,
                max_length=max_length,
                report_to=[],
                use_cpu=True,
                bf16=False,
                save_strategy="no",
                disable_tqdm=True,
                logging_steps=10_000,
                learning_rate=1e-5,
                seed=repeat,
            )
            trainer = SFTTrainer(
                model=model, args=args, train_dataset=train, processing_class=tokenizer, data_collator=base
            )
            collator = None
            if arm == "mixing":
                collator = MixingCollator(real_dataset=real, min_real_fraction=0.5, max_growth=1.0).attach(
                    trainer
                )
            timer = StepTimer()
            trainer.add_callback(timer.callback)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.train()
            medians[arm].append(statistics.median(timer.times[1:]))  # the first steps warm up
            if collator is not None:
                grown.append(collator.counts["grown_batches"])
    base_s, mixing_s = statistics.median(medians["base"]), statistics.median(medians["mixing"])
    paired = [m / b - 1.0 for b, m in zip(medians["base"], medians["mixing"], strict=True)]
    return {
        "base_step_s": base_s,
        "mixing_step_s": mixing_s,
        "overhead": mixing_s / base_s - 1.0,
        # the two arms of one repeat ran back to back: their ratio is steadier under a changing load
        "overhead_per_repeat": paired,
        "overhead_median_of_repeats": statistics.median(paired),
        "per_repeat_base_s": medians["base"],
        "per_repeat_mixing_s": medians["mixing"],
        "steps_timed_per_run": steps,
        "batch_size": batch_size,
        "max_length": max_length,
        "grown_batches_per_run": grown,
        "note": "max_growth=1.0 and pad_to_multiple_of=max_length: same shapes",
    }


def step_section(args, workdir: Path) -> dict:
    from collapse_guard.testing import tiny_causal_lm, tiny_tokenizer

    out: dict = {"goal": "step-time overhead <= 2%", "load_average_start": load("step start")}
    tok = tiny_tokenizer()
    real, synthetic = step_data(200, 400)
    out["tiny"] = {
        "collator": collator_time(tok, real, synthetic, max_length=128, batch_size=16, repeats=args.repeats),
        "sft_step": step_time(
            lambda: tiny_causal_lm(tok),
            tok,
            real,
            synthetic,
            128,
            16,
            args.steps,
            args.repeats,
            workdir / "tiny",
        ),
    }
    print(json.dumps(out["tiny"], indent=1), flush=True)
    if not args.skip_smollm2:
        from collapse_guard.resources import load_smollm2

        _, tok = load_smollm2()
        real, synthetic = step_data(100, 200)
        out["smollm2_135m_instruct"] = {
            "collator": collator_time(
                tok, real, synthetic, max_length=128, batch_size=4, repeats=args.repeats
            ),
            "sft_step": step_time(
                lambda: load_smollm2()[0],
                tok,
                real,
                synthetic,
                128,
                4,
                args.smollm2_steps,
                args.repeats,
                workdir / "smollm2",
            ),
        }
        print(json.dumps(out["smollm2_135m_instruct"], indent=1), flush=True)
    out["load_average_end"] = load("step end")
    return out


# ----- main -----------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 20k rows, short packing and step runs"
    )
    parser.add_argument("--sections", default="construction,packing,step")
    parser.add_argument("--rows", default=None, help="pool sizes, comma-separated (default 100000,1000000)")
    parser.add_argument(
        "--before-max-rows",
        type=int,
        default=None,
        help="measure the last release at sizes up to this (default: all sizes)",
    )
    parser.add_argument("--after-repeats", type=int, default=None)
    parser.add_argument(
        "--max-length", type=int, default=1024, help="RowFormat.max_length of the index (SFT default)"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--smollm2-steps", type=int, default=None)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's own; 1 is steadier on a machine loaded by others)",
    )
    # worker mode (internal)
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--pool")
    parser.add_argument("--tokenizer")
    args = parser.parse_args()

    if args.worker:
        result = WORKERS[args.worker](args.pool, args.tokenizer, int(args.rows), args.max_length)
        print("RESULT " + json.dumps(result), flush=True)
        return

    q = args.quick
    sizes = [int(x) for x in (args.rows or ("20000" if q else "100000,1000000")).split(",")]
    before_max = args.before_max_rows if args.before_max_rows is not None else max(sizes)
    after_repeats = args.after_repeats or (1 if q else 3)
    args.repeats = args.repeats or (1 if q else 3)
    args.steps = args.steps or (4 if q else 10)
    args.smollm2_steps = args.smollm2_steps or (2 if q else 4)
    out_path = (
        Path(args.out)
        if args.out
        else (BENCH_CACHE / "mixing_quick.json" if q else HERE / "results" / "mixing.json")
    )
    sections = set(args.sections.split(","))
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)

    import torch

    from collapse_guard.io import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)

    # sections not re-run keep their previous results (a partial re-run updates the file)
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    kept = {k: previous[k] for k in SECTIONS if k in previous and k not in sections}
    results: dict = {
        "machine": machine(),
        "quick": q,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "load_average_start": load("start"),
        "sections_kept_from_previous_run": sorted(kept),
        **kept,
    }
    started = time.perf_counter()
    tokenizers = tokenizer_dirs(args.skip_smollm2)
    with tempfile.TemporaryDirectory() as tmp:
        if "construction" in sections:
            results["construction"] = construction(
                sizes, before_max, after_repeats, tokenizers, args.max_length
            )
            atomic_write_json(out_path, results)
        if "packing" in sections:
            # SmolLM2's tokenizer on real text when available (the tiny model only carries the batches)
            name = "smollm2_135m_instruct" if "smollm2_135m_instruct" in tokenizers else "tiny"
            results["packing"] = packing(
                name,
                auto_tokenizer(tokenizers[name]),
                [0.25, 0.5],
                n_real_pool=600 if q else 4000,
                n_synthetic=300 if q else 2000,
                max_length=256,
                batch_size=4,
                accumulation=2,
                workdir=Path(tmp),
            )
            atomic_write_json(out_path, results)
        if "step" in sections:
            torch.manual_seed(0)
            results["step"] = step_section(args, Path(tmp))
    results["load_average_end"] = load("end")
    results["wall_s"] = time.perf_counter() - started
    atomic_write_json(out_path, results)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
