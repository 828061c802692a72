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

Presets carry the chat templates of the families users fine-tune (`FAMILIES` maps names to presets):
Llama 3.0 and 3.1-3.3 (default system block with the knowledge-cutoff date), ChatML (plain, Qwen2,
Qwen2.5 with its default system prompt, Qwen3, SmolLM2, SmolLM3 with its metadata system block), Gemma
1/2 (no system turn) and Gemma 3 (system folded into the first user turn), Phi-3/3.5/4-mini and Phi-4,
Mistral v0.1, v0.3/Nemo and Small 3, DeepSeek V3/R1. They are written from the families' published
templates with the parts that do not change the pre-query (tool calls, reasoning-content stripping)
left out, for tokenizers without a chat template or when asked by name; the tests derive each one's
pre-query from the template itself.

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
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') "
    "}}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = "
    "message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% "
    "endfor %}"
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

LLAMA31_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] | "
    "trim %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system_message = '' %}{% set loop_messages = "
    "messages %}"
    "{% endif %}{% if not date_string is defined %}{% set date_string = '26 Jul 2024' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\n' }}{{ 'Cutting Knowledge Date: December 2023\n' }}"
    "{{ 'Today Date: ' + date_string + '\n\n' }}{{ system_message }}{{ '<|eot_id|>' }}"
    "{% for message in loop_messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen3: ChatML without a default system prompt; `enable_thinking=False` pre-fills an empty think block.
QWEN3_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif "
    "%}"
    "{% endif %}"
)

# Gemma 3 has no system turn either, but folds a system message into the first user turn.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] "
    "%}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

PHI4_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] "
    "+ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% "
    "endif %}"
)

# Mistral v0.3 / Nemo: a system message is prepended to the last user turn.
MISTRAL_V3_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{% if loop.last and system_message is defined %}"
    "{{ '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor "
    "%}"
)

# Mistral Small 3 / Magistral: a separate [SYSTEM_PROMPT] block.
MISTRAL_SMALL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST]' + message['content'] + '[/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

SMOLLM3_SYSTEM = ("## Metadata\n\nKnowledge Cutoff Date: June 2025\nReasoning Mode: /no_think\n\n"
                  "## Custom Instructions\n\n")
SMOLLM3_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face."
SMOLLM3_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set custom = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set custom = '" + SMOLLM3_DEFAULT + "' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{{ '<|im_start|>system\n" + SMOLLM3_SYSTEM.replace("\n", "\\n") + "' + custom + '\n\n<|im_end|>\n' }}"
    "{% for message in loop_messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# DeepSeek V3 / R1 (and the R1 distills): no end-of-user marker; the assistant tag ends a user turn.
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + "
    "'<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

_LLAMA_USER = "<|start_header_id|>user<|end_header_id|>\n\n"
_LLAMA31_SYSTEM = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                   "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")
_CHATML = {"eos_token": "<|im_end|>"}
_IM_USER = "<|im_start|>user\n"
_DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"
_LLAMA = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}

PRESETS: dict[str, TemplatePreset] = {
    p.name: p
    for p in [
        TemplatePreset("llama3", LLAMA3_TEMPLATE, _LLAMA, "<|begin_of_text|>" + _LLAMA_USER,
                       "<|begin_of_text|>" + _LLAMA_USER, "<|eot_id|>"),
        TemplatePreset("llama3.1", LLAMA31_TEMPLATE, _LLAMA, _LLAMA31_SYSTEM + _LLAMA_USER,
                       "<|begin_of_text|>" + _LLAMA_USER, "<|eot_id|>"),
        TemplatePreset("chatml", _chatml(None), _CHATML, _IM_USER, _IM_USER, "<|im_end|>"),
        TemplatePreset("qwen2", _chatml(QWEN2_SYSTEM), _CHATML,
                       f"<|im_start|>system\n{QWEN2_SYSTEM}<|im_end|>\n{_IM_USER}", _IM_USER,
                       "<|im_end|>"),
        TemplatePreset("qwen2.5", _chatml(QWEN25_SYSTEM), _CHATML,
                       f"<|im_start|>system\n{QWEN25_SYSTEM}<|im_end|>\n{_IM_USER}", _IM_USER,
                       "<|im_end|>"),
        TemplatePreset("qwen3", QWEN3_TEMPLATE, _CHATML, _IM_USER, _IM_USER, "<|im_end|>"),
        TemplatePreset("smollm2", _chatml(SMOLLM2_SYSTEM), {"bos_token": "<|im_start|>", **_CHATML},
                       f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n{_IM_USER}", _IM_USER,
                       "<|im_end|>"),
        TemplatePreset("smollm3", SMOLLM3_TEMPLATE, _CHATML,
                       f"<|im_start|>system\n{SMOLLM3_SYSTEM}{SMOLLM3_DEFAULT}\n\n<|im_end|>\n{_IM_USER}",
                       "<|im_start|>user\n", "<|im_end|>"),
        TemplatePreset("gemma", GEMMA_TEMPLATE, {"bos_token": "<bos>", "eos_token": "<eos>"},
                       "<bos><start_of_turn>user\n", "<bos><start_of_turn>user\n", "<end_of_turn>"),
        TemplatePreset("gemma3", GEMMA3_TEMPLATE, {"bos_token": "<bos>", "eos_token": "<eos>"},
                       "<bos><start_of_turn>user\n", "<bos><start_of_turn>user\n", "<end_of_turn>"),
        TemplatePreset("phi3", PHI3_TEMPLATE, {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
                       "<|user|>\n", "<|user|>\n", "<|end|>"),
        TemplatePreset("phi4", PHI4_TEMPLATE, {"eos_token": "<|im_end|>"},
                       "<|im_start|>user<|im_sep|>", "<|im_start|>user<|im_sep|>", "<|im_end|>"),
        TemplatePreset("mistral", MISTRAL_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"},
                       "<s>[INST] ", "<s>[INST] ", "[/INST]"),
        TemplatePreset("mistral_v3", MISTRAL_V3_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"},
                       "<s>[INST] ", "<s>[INST] ", "[/INST]"),
        TemplatePreset("mistral_small", MISTRAL_SMALL_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"},
                       "<s>[INST]", "<s>[INST]", "[/INST]"),
        TemplatePreset("deepseek", DEEPSEEK_TEMPLATE,
                       {"bos_token": _DEEPSEEK_BOS, "eos_token": "<｜end▁of▁sentence｜>"},
                       _DEEPSEEK_BOS + "<｜User｜>", _DEEPSEEK_BOS + "<｜User｜>", "<｜Assistant｜>"),
    ]
}

# Which preset each model family uses (the names users know); "gemma" is Gemma 1/2, "mistral" is v0.1/v0.2.
FAMILIES: dict[str, str] = {
    "Llama 3 / 3.0": "llama3", "Llama 3.1 / 3.2 / 3.3": "llama3.1", "Qwen2": "qwen2", "Qwen2.5": "qwen2.5",
    "Qwen3": "qwen3", "SmolLM2": "smollm2", "SmolLM3": "smollm3", "Gemma / Gemma 2": "gemma",
    "Gemma 3": "gemma3",
    "Phi-3 / Phi-3.5 / Phi-4-mini": "phi3", "Phi-4": "phi4", "Mistral 7B v0.1 / v0.2": "mistral",
    "Mistral 7B v0.3 / Nemo": "mistral_v3", "Mistral Small 3 / Magistral": "mistral_small",
    "DeepSeek V3 / R1 / R1 distills": "deepseek", "any ChatML model": "chatml",
}


@dataclass
class ChatTemplateInfo:
    """What generation needs to know about a chat template (see `derive_template`)."""

    chat_template: str
    pre_query: str = field(metadata={"help": "Prefix that makes the model write a user instruction."})
    user_header: str = field(metadata={"help": "Text opening a user turn (no BOS, no system block)."})
    system_prefix: str = field(
        metadata={"help": "BOS + default system block to remove; '' when kept or absent."}
    )
    bos_text: str = field(metadata={"help": "BOS text the template writes first ('' if none)."})
    instruction_stops: list[str] = field(metadata={"help": "Strings ending a user turn."})
    response_stops: list[str] = field(metadata={"help": "Strings ending an assistant turn."})
    default_system_prompt: bool = field(
        metadata={"help": "Whether the template inserts a default system block."}
    )

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


def _render(
    tokenizer, chat_template: str, messages: list[dict[str, str]], add_generation_prompt: bool
) -> str:
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
            raise ValueError(f"preset={preset!r} is unknown; choose one of {sorted(PRESETS)} or pass "
                             "preset=None.")
        chat_template = PRESETS[preset].chat_template
    else:
        chat_template = getattr(tokenizer, "chat_template", None)
        if isinstance(chat_template, dict):
            chat_template = chat_template.get("default")
        if not chat_template:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template and preset=None; "
                f"pass "
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
    # no end-of-user marker (DeepSeek): the assistant tag that follows ends the turn
    if not instruction_stops:
        prompted = _render(tokenizer, chat_template, [{"role": "user", "content": SENTINEL}], True)
        instruction_stops = _first_stop(_after(prompted, SENTINEL))

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
