"""Session fixtures shared by the whole suite."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under its interpreter. @triton.jit picks interpreter or compiler
# when it decorates (at import, of triton's own helpers too), so the switch is set before anything
# imports triton (megatron-core and DeepSpeed do). Production dispatch never runs Triton on the CPU;
# kernel tests ask for it with use_triton=True.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import stdlib_files  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared folder: byte-level BPE (vocab 384), sequences of 32 tokens, several shards."""
    from pretrain.data import prepare_data

    out = tmp_path_factory.mktemp("data") / "stdlib"
    prepare_data(stdlib_files(40), "train", 32, out, vocab_size=384, val_fraction=0.05,
                 samples_per_shard=128, workers=2, seed=0)
    return out
