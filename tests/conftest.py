"""Session fixtures shared by the whole suite."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import stdlib_files


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared folder: byte-level BPE (vocab 384), sequences of 32 tokens, several shards."""
    from pretrain.data import prepare_data

    out = tmp_path_factory.mktemp("data") / "stdlib"
    prepare_data(stdlib_files(40), "train", 32, out, vocab_size=384, val_fraction=0.05,
                 samples_per_shard=128, workers=2, seed=0)
    return out
