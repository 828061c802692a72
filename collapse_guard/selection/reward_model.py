"""Score samples with a sequence-classification reward model.

Fast on CPU and GPU: each batch is tokenized once, sorted by length and run in micro-batches (little
padding), under `torch.inference_mode`. Under `accelerate launch` / `torchrun` the work is split
across ranks (each scores a length-balanced shard) and gathered back in order, so every rank
returns the same scores.

Example:

```python
>>> from collapse_guard.selection import RewardModelSelector
>>> from collapse_guard.testing import tiny_chat_datasets, tiny_reward_model, tiny_tokenizer
>>> tok = tiny_tokenizer()
>>> _, synthetic = tiny_chat_datasets()
>>> kept = RewardModelSelector(tiny_reward_model(tok), tok, top_fraction=0.5)(synthetic)
>>> len(kept), "reward_model_score" in kept.column_names
(16, True)

```
"""

from __future__ import annotations

import os
from typing import Any

from collapse_guard.data import conversations, prompts_and_responses
from collapse_guard.distributed import gather, rank_world
from collapse_guard.selection.base import Selector


def _base_model(model):
    get_base = getattr(model, "get_base_model", None)  # PEFT wrappers
    model = get_base() if callable(get_base) else model
    return getattr(model, "module", model)  # DDP / accelerate wrappers


def check_reward_model(model, label_index: int | None) -> int:
    """The logit index holding the reward; a clear error for models without a classification head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    base = _base_model(model)
    cls = type(base).__name__
    if not (cls.endswith("ForSequenceClassification")
            or cls in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()):
        raise TypeError(
            f"model is a {cls}, which has no sequence-classification (reward) head. Load the reward model "
            "with AutoModelForSequenceClassification.from_pretrained(path, num_labels=1) (a plain causal LM "
            "cannot score samples; use PerplexitySelector for that)."
        )
    num_labels = int(getattr(base.config, "num_labels", 1))
    if label_index is None:
        if num_labels != 1:
            raise ValueError(
                f"the reward model has num_labels={num_labels}; pass label_index=... to pick the logit that "
                "is the reward (e.g. label_index=1 for the 'good' class of a 2-class classifier)."
            )
        return 0
    if isinstance(label_index, bool) or not isinstance(label_index, int) or not 0 <= label_index < num_labels:
        raise ValueError(f"label_index must be an int in [0, {num_labels}), got {label_index!r}.")
    return label_index


class RewardModelSelector(Selector):
    """Keeps the samples a reward model rates highest (threshold, top-k, top-fraction or best-of-n).

    Args:
        model: an `AutoModelForSequenceClassification` model (or a path to one); PEFT/DDP wrappers are fine.
        tokenizer: its tokenizer (loaded from `model` when that is a path). When it has a chat template,
            prompt + response are rendered with it; plain `text` rows are scored as they are.
        label_index: the logit to use when the head has more than one label.
        forward_batch_size: sequences per forward pass (after length sorting).
        max_length: truncation length in tokens.
        **kwargs: the keep policy and options of `Selector` (`threshold`, `top_k`, `top_fraction`,
            `best_of_n`, `batch_size`, `rejects_path`, `name`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        label_index: int | None = None,
        forward_batch_size: int = 16,
        max_length: int = 1024,
        **kwargs: Any,
    ):
        kwargs.setdefault("name", "reward_model")
        super().__init__(**kwargs)
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = AutoModelForSequenceClassification.from_pretrained(model)
        if tokenizer is None:
            raise ValueError("RewardModelSelector needs tokenizer=... (the reward model's own tokenizer).")
        self.label_index = check_reward_model(model, label_index)
        if not isinstance(forward_batch_size, int) or forward_batch_size < 1:
            raise ValueError(f"forward_batch_size must be a positive integer, got {forward_batch_size!r}.")
        if tokenizer.pad_token_id is None:
            # batching needs a pad token; eos is the usual stand-in (the head reads the last non-pad token)
            tokenizer.pad_token = tokenizer.eos_token
        config = _base_model(model).config
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        self.model = model
        self.tokenizer = tokenizer
        self.forward_batch_size = forward_batch_size
        self.max_length = max_length

    def format(self, batch: dict[str, list]) -> list[str]:
        """Prompt + response as the reward model expects them (its chat template when it has one)."""
        chats = conversations(batch)
        if chats is not None and getattr(self.tokenizer, "chat_template", None):
            return [self.tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
        prompts, responses = prompts_and_responses(batch)
        return [f"{p}\n{r}" if p else r for p, r in zip(prompts, responses, strict=True)]

    def encode(self, texts: list[str]) -> list[list[int]]:
        # templates already hold the special tokens; plain text gets the tokenizer's usual ones
        special = not getattr(self.tokenizer, "chat_template", None)
        enc = self.tokenizer(texts, add_special_tokens=special, truncation=True, max_length=self.max_length)
        return [list(ids) for ids in enc["input_ids"]]

    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """Rewards of token sequences: length-sorted micro-batches, original order restored."""
        import torch

        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        device = next(self.model.parameters()).device
        out = [0.0] * len(sequences)
        was_training = self.model.training
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), self.forward_batch_size):
                idx = order[start : start + self.forward_batch_size]
                inputs = self.tokenizer.pad({"input_ids": [sequences[i] for i in idx]}, return_tensors="pt")
                inputs = {k: v.to(device) for k, v in inputs.items()}
                logits = self.model(**inputs).logits[:, self.label_index].float().cpu().tolist()
                for i, value in zip(idx, logits, strict=True):
                    out[i] = value
        self.model.train(was_training)
        return out

    def score(self, batch: dict[str, list]) -> list[float]:
        sequences = self.encode(self.format(batch))
        rank, world = rank_world()
        if world == 1:
            return self.score_ids(sequences)
        # stride over the length order so every rank gets a similar mix of long and short samples
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        mine = order[rank::world]
        local = list(zip(mine, self.score_ids([sequences[i] for i in mine]), strict=True))
        scores = [0.0] * len(sequences)
        for part in gather(local):
            for i, value in part:
                scores[i] = value
        return scores
