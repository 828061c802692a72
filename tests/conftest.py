import os

import pytest
import torch
from hypothesis import settings

# Tests never touch a hub: everything is built in-process or ships in installed packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# Tiny models are dominated by per-op overhead: one intra-op thread is faster, and far faster on a busy
# machine.
torch.set_num_threads(1)
# Property tests draw the same examples on every run, so CI's verdict on a commit does not depend on luck;
# draw new ones with `pytest --hypothesis-profile explore` (and pin what fails with @example).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def tokenizer():
    from collapse_guard.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    from collapse_guard.testing import tiny_causal_lm

    return tiny_causal_lm(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from collapse_guard.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))
