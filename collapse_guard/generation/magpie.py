"""Magpie: an aligned model writes its own instructions, then answers them (Xu et al. 2024).

Step 1 feeds the model only the pre-query prefix of its chat template (`<|im_start|>user\\n`) and
samples what it writes until the end of the user turn: an instruction. Step 2 renders that
instruction as a user turn with the generation prompt and generates the answer. Pairs are cleaned
(empty, cut at max tokens, trailing ':', non-text, too short) with every reason counted.

Steering (Magpie's "control" system prompts): `system_prompts` is a list (or a `{prompt: weight}`
dict) of system prompts; each sample draws one, seeded, and the pre-query then opens with that system
turn, so the model writes an instruction on that topic. `task` picks a preset list with its own
decoding defaults (`TASKS`: general, math, code, translation, creative, reasoning). The choice of each
sample is recorded in its provenance (`meta.system_prompt`, `meta.system_prompt_index`, `meta.task`)
and counted in `stats["system_prompts"]`.

Example:

```python
>>> import json
>>> from collapse_guard.testing import tiny_tokenizer, tiny_causal_lm
>>> from collapse_guard.generation import MagpieConfig, MagpieGenerator
>>> tok = tiny_tokenizer(); model = tiny_causal_lm(tok)
>>> gen = MagpieGenerator(model, tok, MagpieConfig(instruction_max_new_tokens=8, response_max_new_tokens=8,
...                       min_instruction_words=0, clean=False, show_progress=False))
>>> ds = gen.generate(4, seed=0)
>>> ds.column_names, gen.stats["kept"]
(['messages', 'provenance'], 4)
>>> steered = MagpieGenerator(model, tok, MagpieConfig(task="math", instruction_max_new_tokens=8,
...     response_max_new_tokens=8, min_instruction_words=0, clean=False, show_progress=False)).generate(2)
>>> json.loads(steered["provenance"][0]["meta"])["task"]
'math'

```
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collapse_guard.generation.backends import (
    BACKENDS,
    Completion,
    Decoding,
    batch_seed,
    generate_texts,
    make_backend,
)
from collapse_guard.generation.templates import PRESETS, derive_template, describe
from collapse_guard.provenance import SYNTHETIC, make_provenance


@dataclass(frozen=True)
class MagpieTask:
    """A steering preset: the system prompts that set the topic, and decoding defaults that suit it."""

    name: str
    system_prompts: tuple[str, ...]
    instruction_temperature: float = 1.0
    instruction_top_p: float = 1.0
    response_temperature: float = 0.0
    description: str = ""


# Written after the Magpie repository's "control task" system prompts (math, code, translation): the
# system turn says what the user will ask about, so the model writes that kind of instruction. Several
# phrasings per task vary the instructions more than one fixed prompt does. The decoding defaults are
# ours: exact tasks get slightly cooler instructions (fewer malformed problems), creative ones hotter.
TASKS: dict[str, MagpieTask] = {
    t.name: t
    for t in [
        MagpieTask("general", (), description="No system prompt of ours: the paper's unconditioned Magpie."),
        MagpieTask("math", (
            "You are an AI assistant designed to provide helpful, step-by-step guidance on solving math "
            "problems. "
            "The user will ask you a wide range of mathematical questions. Your purpose is to help users "
            "understand "
            "mathematical concepts, work through equations and arrive at the correct solutions.",
            "You are a patient math tutor. Users ask you arithmetic, algebra, geometry, probability and word "
            "problems; you solve them step by step and state the final answer clearly.",
        ), instruction_temperature=0.9, description="Math word problems and exercises."),
        MagpieTask("code", (
            "You are an AI assistant designed to provide helpful, step-by-step guidance on coding problems. "
            "The user "
            "will ask you a wide range of programming questions. Your purpose is to help users understand "
            "coding "
            "concepts, write and debug code, and arrive at correct solutions.",
            "You are an expert software engineer. Users ask you to write, explain, review or fix code in "
            "Python, "
            "JavaScript, SQL and other languages; you answer with working code and a short explanation.",
        ), instruction_temperature=0.9, description="Programming questions and code tasks."),
        MagpieTask("translation", (
            "You are an AI assistant specifically designed to provide accurate and contextually appropriate "
            "translations. Users will ask you to translate texts between various languages. Your purpose is "
            "to "
            "translate the text, keeping the original meaning and nuances.",
            "You are a professional translator. Users give you sentences or short texts and ask for a "
            "translation "
            "into another language, such as French, Spanish, German, Chinese or English.",
        ), description="Translation requests between languages."),
        MagpieTask("creative", (
            "You are a creative writing assistant. Users ask you for stories, poems, song lyrics, slogans "
            "and "
            "other imaginative texts, and you write them with style and originality.",
        ), instruction_temperature=1.1, response_temperature=0.7,
            description="Stories, poems and other creative text."),
        MagpieTask("reasoning", (
            "You are an AI assistant that solves logic puzzles and reasoning problems. Users give you "
            "riddles, "
            "deduction puzzles and questions that need careful step-by-step thinking.",
        ), instruction_temperature=0.9, description="Logic puzzles and multi-step reasoning."),
    ]
}


def _system_prompt_table(value: Any) -> list[tuple[str, float]]:
    """`system_prompts` as (prompt, weight) pairs: a list, a {prompt: weight} dict, JSON or a file."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{")):
            value = json.loads(text)
        elif Path(value).is_file():
            path = Path(value)
            value = json.loads(path.read_text()) if path.suffix == ".json" else [
                line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            raise ValueError(
                f"MagpieConfig.system_prompts={value[:60]!r} is a string: give a list of prompts, a dict "
                "{prompt: weight}, a JSON list / dict, or the path of a .txt (one prompt a line) / .json "
                "file."
            )
    pairs = list(value.items()) if isinstance(value, dict) else [(p, 1.0) for p in value]
    if not isinstance(value, dict) and all(isinstance(p, str) for p, _ in pairs):
        counts = Counter(p for p, _ in pairs)  # a list naming a prompt twice weighs it twice
        pairs = [(p, float(c)) for p, c in counts.items()]
    if not pairs:
        raise ValueError("MagpieConfig.system_prompts is empty; give at least one prompt or None.")
    for prompt, weight in pairs:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"MagpieConfig.system_prompts holds {prompt!r}; every prompt must be a "
                             "non-empty string.")
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not number or not weight >= 0 or math.isinf(weight):
            raise ValueError(f"MagpieConfig.system_prompts weight of {prompt[:40]!r} is {weight!r}; use "
                             "a number >= 0.")
    if sum(w for _, w in pairs) <= 0:
        raise ValueError("MagpieConfig.system_prompts weights sum to 0; give at least one positive weight.")
    return [(p, float(w)) for p, w in pairs]


@dataclass
class MagpieConfig:
    """Settings of `MagpieGenerator` (defaults follow the Magpie paper: T=1, top_p=1 instructions, greedy
    answers)."""

    preset: str | None = field(
        default=None,
        metadata={"help": f"Chat template preset ({', '.join(PRESETS)}); None = the tokenizer's own "
                          "template."},
    )
    drop_system_prompt: bool = field(
        default=False,
        metadata={
            "help": "Remove a default system prompt the template inserts. Off by default: a model always "
            "trained "
            "with one (SmolLM2) rarely ends an instruction without it (1/16 vs 12/16 measured)."
        },
    )
    task: str | None = field(
        default=None,
        metadata={"help": f"Steering preset ({', '.join(TASKS)}): its system prompts and decoding defaults."},
    )
    system_prompts: list[str] | dict[str, float] | str | None = field(
        default=None,
        metadata={
            "help": "System prompts that steer the topic: a list (drawn uniformly), a {prompt: weight} dict, "
            "or a "
            "JSON string / .txt / .json file; each sample draws one (seeded). Overrides the task's prompts."
        },
    )
    system_prompt_in_messages: bool = field(
        default=False,
        metadata={"help": "Keep the steering system turn in the saved conversations (it is in provenance "
                          "either way)."},
    )
    n_turns: int = field(default=1, metadata={"help": "Instruction/response turns per conversation."})
    output: str = field(default="messages", metadata={
        "help": "'messages' (a `messages` column of chat turns) or 'prompt_completion' (conversational "
                "`prompt` and `completion` columns, TRL's prompt-completion format: the loss covers the "
                "answer only)."})
    instruction_max_new_tokens: int = field(default=128, metadata={"help": "Token budget of an instruction."})
    instruction_temperature: float | None = field(
        default=None,
        metadata={"help": "Sampling temperature of instructions (default: the task's, else 1.0)."},
    )
    instruction_top_p: float | None = field(
        default=None, metadata={"help": "Nucleus top_p of instructions (default: the task's, else 1.0)."}
    )
    response_max_new_tokens: int = field(default=512, metadata={"help": "Token budget of a response."})
    response_temperature: float | None = field(
        default=None, metadata={"help": "Response temperature; 0 = greedy (default: the task's, else 0)."}
    )
    response_top_p: float = field(
        default=1.0, metadata={"help": "Nucleus top_p of responses (when sampling)."}
    )
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty of responses."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate call (per process)."})
    backend: str = field(default="auto", metadata={"help": f"Generation backend: one of {BACKENDS}."})
    clean: bool = field(default=True, metadata={"help": "Drop bad pairs (reasons are counted either way)."})
    min_instruction_words: int = field(default=3, metadata={"help": "Shorter instructions are dropped."})
    min_alpha_ratio: float = field(
        default=0.5,
        metadata={"help": "Minimum share of letters among non-space characters (else 'non_text')."},
    )
    max_passes: int = field(
        default=3,
        metadata={
            "help": "Generate again for the shortfall (scaled by the survival rate so far) until n pairs "
            "survive, "
            "at most this many passes."
        },
    )
    show_progress: bool = field(default=True, metadata={"help": "tqdm progress bar (rank 0 only)."})

    def __post_init__(self) -> None:
        if self.output not in ("messages", "prompt_completion"):
            raise ValueError(f"MagpieConfig.output={self.output!r} is unknown; choose 'messages' or "
                             "'prompt_completion'.")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"MagpieConfig.task={self.task!r} is unknown; choose one of {sorted(TASKS)} "
                             "or None.")
        task = TASKS[self.task] if self.task is not None else TASKS["general"]
        # None = the task's default; the command line hands numbers over as strings
        for name in ("instruction_temperature", "instruction_top_p", "response_temperature"):
            value = getattr(self, name)
            setattr(self, name, float(getattr(task, name) if value is None else value))
        if self.system_prompts is None and task.system_prompts:
            self.system_prompts = list(task.system_prompts)
        if self.system_prompts is not None:
            self.system_prompts = dict(_system_prompt_table(self.system_prompts))
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"MagpieConfig.preset={self.preset!r} is unknown; choose one of "
                             f"{sorted(PRESETS)} or None.")
        if self.backend not in BACKENDS:
            raise ValueError(f"MagpieConfig.backend={self.backend!r} is unknown; choose one of {BACKENDS}.")
        for name in ("n_turns", "instruction_max_new_tokens", "response_max_new_tokens", "batch_size",
                     "max_passes"):
            if getattr(self, name) < 1:
                raise ValueError(f"MagpieConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.min_instruction_words < 0:
            raise ValueError(f"MagpieConfig.min_instruction_words must be >= 0, got "
                             f"{self.min_instruction_words}.")
        if not 0 <= self.min_alpha_ratio <= 1:
            raise ValueError(f"MagpieConfig.min_alpha_ratio must be in [0, 1], got {self.min_alpha_ratio}.")
        # Building the decodings validates temperatures and top_p with a named error.
        self.instruction_decoding()
        self.response_decoding()

    def instruction_decoding(self) -> Decoding:
        return Decoding(self.instruction_max_new_tokens, self.instruction_temperature, self.instruction_top_p)

    def response_decoding(self) -> Decoding:
        return Decoding(
            self.response_max_new_tokens, self.response_temperature, self.response_top_p,
            repetition_penalty=self.repetition_penalty,
        )


def is_non_text(text: str, min_alpha_ratio: float) -> bool:
    """Replacement characters (broken bytes) or too few letters among the visible characters."""
    visible = [c for c in text if not c.isspace()]
    if "\ufffd" in text or not visible:
        return True
    return sum(c.isalpha() for c in visible) / len(visible) < min_alpha_ratio


def drop_reason(completion: Completion, kind: str, config: MagpieConfig) -> str | None:
    """Why an instruction (`kind="instruction"`) or a response should be dropped, or None to keep it."""
    text = completion.text.strip()
    if not text:
        return f"{kind}_empty"
    if completion.truncated:
        return f"{kind}_truncated"
    if is_non_text(text, config.min_alpha_ratio):
        return f"{kind}_non_text"
    if kind == "instruction":
        if text.endswith(":"):
            return "instruction_ends_with_colon"
        if len(text.split()) < config.min_instruction_words:
            return "instruction_too_short"
    return None


class MagpieGenerator:
    """Instruction/response pairs from an aligned chat model, with provenance and cleaning stats.

    After `generate`, `self.stats` holds the report: requested / attempted / kept counts, dropped
    counts by reason, tokens and throughput, the pre-query template used.
    """

    def __init__(self, model, tokenizer, config: MagpieConfig | None = None):
        self.config = config or MagpieConfig()
        self.tokenizer = tokenizer
        # Derive first: a tokenizer without a template fails here, before any model work.
        self.template = derive_template(tokenizer, self.config.preset, self.config.drop_system_prompt)
        self.backend = make_backend(model, tokenizer, self.config.backend, self.config.batch_size)
        name = getattr(getattr(model, "config", None), "_name_or_path", "")
        self.model_name = str(name or model.__class__.__name__)
        self.system_prompts = list((self.config.system_prompts or {}).items())
        if self.system_prompts:
            self._check_system_turn()
        self.stats: dict[str, Any] = {}

    def _check_system_turn(self) -> None:
        """Steering needs a template that writes a system turn before the user text (checked up front)."""
        probe = "MAGPIESYSTEMPROBE"
        try:
            text = self.template.pre_query_for(self.tokenizer, [{"role": "system", "content": probe}])
        except Exception as exc:  # Gemma 1/2, Mistral v0.1 raise on a system message
            raise ValueError(
                f"system_prompts / task need a chat template with a system turn, but this one refuses a "
                f"system "
                f"message ({exc}). Use a family that has one (Gemma 3, Mistral v0.3 and most others do), or "
                f"leave "
                "system_prompts=None and task=None."
            ) from exc
        if probe not in text:
            raise ValueError("the chat template drops the system message, so system_prompts cannot steer it; "
                             "leave system_prompts=None and task=None for this model.")

    def _draw_system_prompt(self, seed: int, stage: str, index: int) -> int | None:
        """The index of the system prompt sample `index` of `stage` uses (seeded, independent of batching)."""
        if not self.system_prompts:
            return None
        rng = random.Random(batch_seed(seed, "system_prompt", stage, index))
        return rng.choices(range(len(self.system_prompts)), weights=[w for _, w in self.system_prompts])[0]

    def generate(self, n: int, seed: int = 0, round_index: int = 0):
        """Generates up to `n` cleaned conversations (exactly `n` unless `max_passes` runs out)."""
        from datasets import Dataset

        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"MagpieGenerator.generate: n must be a positive int, got {n!r}.")
        cfg = self.config
        start = time.perf_counter()
        kept: list[list[dict[str, str]]] = []
        chosen: list[int | None] = []
        dropped: Counter[str] = Counter()
        tokens = Counter()
        attempted, passes = 0, 0
        while len(kept) < n and passes < cfg.max_passes:
            need = _attempts(n - len(kept), len(kept), attempted)
            choices = [self._draw_system_prompt(seed, f"pass{passes}", i) for i in range(need)]
            convs: list[list[dict[str, str]]] = [
                [] if c is None else [{"role": "system", "content": self.system_prompts[c][0]}]
                for c in choices
            ]
            alive = list(range(need))
            for turn in range(cfg.n_turns):
                alive = self._turn(convs, alive, seed, f"pass{passes}/turn{turn}", dropped, tokens)
            kept.extend(convs[i] for i in alive)
            chosen.extend(choices[i] for i in alive)
            attempted += need
            passes += 1
        surplus = max(len(kept) - n, 0)  # clean pairs beyond n from an oversampled pass
        kept, chosen = kept[:n], chosen[:n]
        if not cfg.system_prompt_in_messages:
            kept = [c[1:] if c and c[0]["role"] == "system" else c for c in kept]
        meta = {
            "generator": "magpie",
            "model": self.model_name,
            "pre_query": self.template.pre_query,
            "system_prompt_dropped": bool(self.template.system_prefix),
            "n_turns": cfg.n_turns,
            "instruction_decoding": cfg.instruction_decoding().to_dict(),
            "response_decoding": cfg.response_decoding().to_dict(),
            "seed": seed,
            "task": cfg.task,
        }
        rows = {
            "messages": kept,
            "provenance": [
                make_provenance(SYNTHETIC, round_index, **meta, sample=i, system_prompt_index=c,
                                system_prompt=None if c is None else self.system_prompts[c][0])
                for i, c in enumerate(chosen)
            ],
        }
        if cfg.output == "prompt_completion":  # everything before the last assistant turn is the prompt
            rows = {"prompt": [c[:-1] for c in kept], "completion": [c[-1:] for c in kept],
                    "provenance": rows["provenance"]}
        dataset = Dataset.from_dict(rows, features=chat_features(cfg.output))
        seconds = time.perf_counter() - start
        self.stats = {
            "requested": n,
            "attempted": attempted,
            "kept": len(kept),
            "passes": passes,
            "surplus": surplus,
            "dropped": dict(sorted(dropped.items())),
            "instruction_tokens": tokens["instruction"],
            "response_tokens": tokens["response"],
            "seconds": round(seconds, 3),
            "tokens_per_second": round((tokens["instruction"] + tokens["response"]) / max(seconds, 1e-9), 2),
            "template": describe(self.template),
            "task": cfg.task,
            "system_prompts": [
                {"index": j, "prompt": p, "weight": w, "kept": sum(c == j for c in chosen)}
                for j, (p, w) in enumerate(self.system_prompts)
            ],
            "seed": seed,
            "round": round_index,
        }
        return dataset

    def _turn(
        self, convs, alive: list[int], seed: int, stage: str, dropped: Counter, tokens: Counter
    ) -> list[int]:
        cfg, tok, tpl = self.config, self.tokenizer, self.template
        prompts = [tpl.pre_query_for(tok, convs[i]) for i in alive]
        instructions = self._generate(
            prompts, cfg.instruction_decoding(), seed, tpl.instruction_stops, stage + "/ins"
        )
        asked = []
        for i, completion in zip(alive, instructions, strict=True):
            tokens["instruction"] += len(completion.token_ids)
            reason = drop_reason(completion, "instruction", cfg)
            if reason:
                dropped[reason] += 1
                if cfg.clean:
                    continue
            convs[i].append({"role": "user", "content": completion.text.strip()})
            asked.append(i)
        prompts = [tpl.render(tok, convs[i], add_generation_prompt=True) for i in asked]
        responses = self._generate(prompts, cfg.response_decoding(), seed, tpl.response_stops, stage + "/res")
        answered = []
        for i, completion in zip(asked, responses, strict=True):
            tokens["response"] += len(completion.token_ids)
            reason = drop_reason(completion, "response", cfg)
            if reason:
                dropped[reason] += 1
                if cfg.clean:
                    continue
            convs[i].append({"role": "assistant", "content": completion.text.strip()})
            answered.append(i)
        return answered

    def _generate(self, prompts: list[str], decoding: Decoding, seed: int, stops: list[str], stage: str):
        if not prompts:
            return []
        return generate_texts(
            self.backend, prompts, decoding, seed, stops=stops, batch_size=self.config.batch_size,
            stage=f"magpie {stage}", show_progress=self.config.show_progress,
        )


def _attempts(shortfall: int, kept: int, attempted: int) -> int:
    """Attempts for the next pass: the shortfall scaled by the survival rate so far (at most 4x)."""
    if attempted == 0:
        return shortfall
    rate = max(kept / attempted, 0.25)
    return min(math.ceil(shortfall * 1.1 / rate), 4 * shortfall)


def chat_features(output: str = "messages"):
    """Schema of Magpie datasets (explicit, so an empty result still has the right columns)."""
    from datasets import Features, List, Value

    turns = List({"role": Value("string"), "content": Value("string")})
    columns = {"messages": turns} if output == "messages" else {"prompt": turns, "completion": turns}
    return Features({
        **columns,
        "provenance": {"source": Value("string"), "round": Value("int64"), "meta": Value("string")},
    })
