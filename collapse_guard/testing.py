"""Offline test kit: tiny real models and data built in-process, no hub, no network.

Used by the test suite, the examples (their default model) and the benchmarks. Everything here is
deterministic for a given seed and takes well under a second on a CPU.

Example:

```python
>>> from collapse_guard.testing import tiny_tokenizer, tiny_causal_lm
>>> tok = tiny_tokenizer()
>>> model = tiny_causal_lm(tok)
>>> model.config.num_hidden_layers
2

```
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

# ChatML, as used by SmolLM2 and Qwen2 (without a default system prompt). The
# `{% generation %}` markers let TRL build assistant-only masks.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]

_SUBJECTS = ["the river", "a farmer", "the council", "our team", "the old bridge", "a small bird",
             "the market", "my neighbour", "the storm", "a young doctor", "the museum", "the train"]
_VERBS = ["crossed", "opened", "watched", "repaired", "described", "followed", "visited", "painted",
          "measured", "carried", "announced", "remembered"]
_OBJECTS = ["the valley", "a long letter", "the quiet harbour", "three red apples", "the new school",
            "an empty field", "the morning news", "a wooden box", "the city wall", "a narrow road",
            "the winter garden", "seven blue stones"]
_TAILS = ["before the rain", "after lunch", "with great care", "in the early light", "for the first time",
          "without a word", "near the station", "during the festival", "on a cold day", "at dusk"]


def human_like_sentences(n: int, seed: int = 0) -> list[str]:
    """Varied, grammatical sentences standing in for human text (rich vocabulary, many n-grams)."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
        f"{rng.choice(_TAILS)}."
        for _ in range(n)
    ]


def degenerate_sentences(
    n: int, sentence: str = "The the the model model said said the same thing."
) -> list[str]:
    """The collapsed end state: one repeated sentence."""
    return [sentence] * n


@lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = human_like_sentences(2000, seed=1) + degenerate_sentences(5)
    corpus += ["What is 2 + 3? The answer is 5.", "Write a short poem about the sea.", "user", "assistant"]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 512, chat_template: str | None = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer trained in-process, with pad/eos tokens and a ChatML chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<unk>",
    )
    tok.chat_template = chat_template
    return tok


def tiny_causal_lm(tokenizer, hidden_size: int = 32, num_layers: int = 2, seed: int = 0):
    """A 2-layer Llama with hidden size 32 matching `tokenizer` (random weights, fixed seed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_reward_model(tokenizer, hidden_size: int = 32, seed: int = 0):
    """A tiny Llama sequence-classification model (one logit = the reward)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


def save_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Writes a tiny causal LM and its tokenizer to `directory` (for CLI and multi-process tests)."""
    directory = Path(directory)
    tok = tiny_tokenizer()
    tiny_causal_lm(tok, seed=seed).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def tiny_text_datasets(n_real: int = 64, n_synthetic: int = 64, seed: int = 0):
    """(real, synthetic) `datasets.Dataset`s with a `text` column; synthetic text is low-diversity."""
    from datasets import Dataset

    real = Dataset.from_dict({"text": human_like_sentences(n_real, seed=seed)})
    rng = random.Random(seed + 1)
    synthetic = Dataset.from_dict(
        {"text": [f"The model said the same thing number {rng.randint(0, 9)}." for _ in range(n_synthetic)]}
    )
    return real, synthetic


def tiny_chat_datasets(n_real: int = 32, n_synthetic: int = 32, seed: int = 0):
    """(real, synthetic) datasets in the chat `messages` format."""
    from datasets import Dataset

    real_texts = human_like_sentences(2 * n_real, seed=seed)

    def conv(q: str, a: str) -> list[dict]:
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    real = Dataset.from_dict(
        {"messages": [conv(real_texts[2 * i], real_texts[2 * i + 1]) for i in range(n_real)]}
    )
    synthetic = Dataset.from_dict(
        {"messages": [conv(f"Say thing {i % 5}.", "The model said the same thing.")
                      for i in range(n_synthetic)]}
    )
    return real, synthetic


def launch_two_processes(script: str | Path, *args: str, timeout: float = 240, **env: str):
    """Runs `script` on 2 CPU processes under torchrun (gloo; a free rendezvous port, so tests never collide)
    with one thread each and `env` added; returns the `subprocess.CompletedProcess` (text output)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(script), *map(str, args)]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True,
                          text=True, timeout=timeout)
