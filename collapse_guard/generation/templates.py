"""Magpie pre-query templates, derived from a tokenizer's own chat template.

The pre-query template is everything a chat template writes before the text of a user turn
(`<|im_start|>user\\n` for ChatML). Given only that prefix, an aligned model writes a user
instruction (Magpie, Xu et al. 2024). We derive it by rendering a user turn that holds a sentinel
string and cutting before the sentinel, so any template works, not only the presets.

Some templates insert a default system prompt (SmolLM2: "You are a helpful AI assistant named
SmolLM, ..."). Magpie found that system prompts lower instruction quality, so it can be dropped
(`drop_system_prompt=True`): the user-turn header is found from a two-turn rendering, and the text
the template writes before the first user header (minus the BOS token) is removed from every
rendered prompt. A model that always saw its default system prompt in training may need it,
though: SmolLM2-135M ends 12 of 16 sampled instructions with it and 1 of 16 without.

Presets carry the real chat templates of Llama-3, ChatML (plain, Qwen2, SmolLM2), Gemma, Phi-3 and
Mistral, for tokenizers without a chat template or when asked by name.

Example:

```python
>>> from collapse_guard.testing import tiny_tokenizer
>>> from collapse_guard.generation.templates import derive_template
>>> derive_template(tiny_tokenizer()).pre_query
'<|im_start|>user\\n'

```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SENTINEL = "MAGPIESENTINELQUERY"
_SENTINEL_2 = "MAGPIESENTINELANSWER"
_SENTINEL_3 = "MAGPIESENTINELFOLLOWUP"


@dataclass(frozen=True)
class TemplatePreset:
    """A model family's chat template and the pre-query prefixes it yields."""

    name: str
    chat_template: str
    special_tokens: dict[str, str]  # bos/eos the template relies on, as the family's tokenizer names them
    pre_query: str  # with the template's default system prompt, if it inserts one
    pre_query_no_system: str
    end_of_turn: str  # stop string ending a user turn


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _chatml(default_system: str | None) -> str:
    system = (
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\n" + default_system + "<|im_end|>\n' }}{% endif %}"
        if default_system
        else ""
    )
    return (
        "{% for message in messages %}" + system
        + "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


QWEN2_SYSTEM = "You are a helpful assistant."
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

PRESETS: dict[str, TemplatePreset] = {
    p.name: p
    for p in [
        TemplatePreset(
            "llama3", LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>",
        ),
        TemplatePreset(
            "chatml", _chatml(None), {"eos_token": "<|im_end|>"},
            "<|im_start|>user\n", "<|im_start|>user\n", "<|im_end|>",
        ),
        TemplatePreset(
            "qwen2", _chatml(QWEN2_SYSTEM), {"eos_token": "<|im_end|>"},
            f"<|im_start|>system\n{QWEN2_SYSTEM}<|im_end|>\n<|im_start|>user\n", "<|im_start|>user\n", "<|im_end|>",
        ),
        TemplatePreset(
            "smollm2", _chatml(SMOLLM2_SYSTEM), {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
            f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\n", "<|im_start|>user\n", "<|im_end|>",
        ),
        TemplatePreset(
            "gemma", GEMMA_TEMPLATE, {"bos_token": "<bos>", "eos_token": "<eos>"},
            "<bos><start_of_turn>user\n", "<bos><start_of_turn>user\n", "<end_of_turn>",
        ),
        TemplatePreset(
            "phi3", PHI3_TEMPLATE, {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
            "<|user|>\n", "<|user|>\n", "<|end|>",
        ),
        TemplatePreset(
            "mistral", MISTRAL_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"},
            "<s>[INST] ", "<s>[INST] ", "[/INST]",
        ),
    ]
}


@dataclass
class ChatTemplateInfo:
    """What generation needs to know about a chat template (see `derive_template`)."""

    chat_template: str
    pre_query: str = field(metadata={"help": "Prefix that makes the model write a user instruction."})
    user_header: str = field(metadata={"help": "Text opening a user turn (no BOS, no system block)."})
    system_prefix: str = field(metadata={"help": "BOS + default system block to remove; '' when kept or absent."})
    bos_text: str = field(metadata={"help": "BOS text the template writes first ('' if none)."})
    instruction_stops: list[str] = field(metadata={"help": "Strings ending a user turn."})
    response_stops: list[str] = field(metadata={"help": "Strings ending an assistant turn."})
    default_system_prompt: bool = field(metadata={"help": "Whether the template inserts a default system block."})

    def render(self, tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """Renders `messages` with the template, minus the default system block when it is dropped."""
        text = _render(tokenizer, self.chat_template, messages, add_generation_prompt)
        if self.system_prefix and text.startswith(self.system_prefix):
            text = self.bos_text + text[len(self.system_prefix):]
        return text

    def pre_query_for(self, tokenizer, messages: list[dict[str, str]]) -> str:
        """The pre-query prefix that follows `messages` (the first turn's when `messages` is empty)."""
        text = self.render(tokenizer, [*messages, {"role": "user", "content": SENTINEL}], False)
        return text[: text.index(SENTINEL)]


def _render(tokenizer, chat_template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _after(text: str, marker: str) -> str:
    return text[text.index(marker) + len(marker):]


def _first_stop(end_text: str) -> list[str]:
    # A turn ends with its marker, maybe followed by a newline or the EOS text: the marker alone is the stop.
    parts = end_text.split()
    return [parts[0]] if parts else []


def derive_template(
    tokenizer, preset: str | None = None, drop_system_prompt: bool = False
) -> ChatTemplateInfo:
    """Derives the pre-query template and stop strings from `tokenizer`'s chat template (or a preset's).

    Args:
        tokenizer: a transformers tokenizer.
        preset: a name from `PRESETS` to use its chat template instead of the tokenizer's; required
            when the tokenizer has none.
        drop_system_prompt: remove a default system prompt the template inserts by itself.
    """
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r} is unknown; choose one of {sorted(PRESETS)} or pass preset=None.")
        chat_template = PRESETS[preset].chat_template
    else:
        chat_template = getattr(tokenizer, "chat_template", None)
        if isinstance(chat_template, dict):
            chat_template = chat_template.get("default")
        if not chat_template:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template and preset=None; pass "
                f"preset= one of {sorted(PRESETS)} (the model family's chat format)."
            )
    try:
        one = _render(tokenizer, chat_template, [{"role": "user", "content": SENTINEL}], False)
    except Exception as exc:  # a Jinja error in the user's template: say which step failed
        raise ValueError(f"cannot render a user turn with the chat template: {exc}") from exc
    if SENTINEL not in one:
        raise ValueError("the chat template does not write the user message content; pass preset= instead.")
    default_pre_query = one[: one.index(SENTINEL)]
    instruction_stops = _first_stop(_after(one, SENTINEL))

    pair = [{"role": "user", "content": SENTINEL}, {"role": "assistant", "content": _SENTINEL_2}]
    two = _render(tokenizer, chat_template, pair, False)
    three = _render(tokenizer, chat_template, [*pair, {"role": "user", "content": _SENTINEL_3}], False)
    assistant_end = _after(two, _SENTINEL_2)
    between = _after(three, _SENTINEL_2)
    between = between[: between.index(_SENTINEL_3)]
    # The text between two turns is "end of assistant turn" + "user header"; some templates (Phi-3)
    # end a rendering with EOS, which is not part of the assistant end inside a conversation.
    end = assistant_end
    eos = tokenizer.eos_token
    if not between.startswith(end) and eos and end.rstrip().endswith(eos):
        end = end.rstrip()[: -len(eos)]
    while end and not between.startswith(end):
        end = end[:-1]
    user_header = between[len(end):]
    response_stops = _first_stop(end or assistant_end)

    bos = tokenizer.bos_token or ""
    system_prefix, bos_text, has_default = "", "", False
    if user_header and default_pre_query.endswith(user_header):
        lead = default_pre_query[: -len(user_header)]
        bos_text = bos if bos and lead.startswith(bos) and not user_header.startswith(bos) else ""
        has_default = lead != bos_text
        if has_default and drop_system_prompt:
            system_prefix = lead
    pre_query = bos_text + user_header if system_prefix else default_pre_query
    for stops in (instruction_stops, response_stops):
        if eos and eos not in stops:
            stops.append(eos)
    return ChatTemplateInfo(
        chat_template=chat_template,
        pre_query=pre_query,
        user_header=user_header,
        system_prefix=system_prefix,
        bos_text=bos_text,
        instruction_stops=instruction_stops,
        response_stops=response_stops,
        default_system_prompt=has_default,
    )


def describe(info: ChatTemplateInfo) -> dict[str, Any]:
    """A JSON-friendly summary (for provenance and stats)."""
    return {
        "pre_query": info.pre_query,
        "default_system_prompt": info.default_system_prompt,
        "system_prompt_dropped": bool(info.system_prefix),
        "instruction_stops": info.instruction_stops,
        "response_stops": info.response_stops,
    }
