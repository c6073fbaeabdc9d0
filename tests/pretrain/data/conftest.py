"""A tiny prepared dataset shared by the data tests (built once per session: training the
tokenizer and packing take a few hundred milliseconds we don't want to pay per test)."""

import random
import shutil

import pytest

from pretrain.data import PackedDataset, prepare_data

SYLLABLES = ["ka", "lo", "mi", "re", "tsu", "van", "e", "o", "qu", "zy", "ph", "nd", "é", "ß", "日"]


def random_text(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        out.append("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
        out.append("\n" if i % 13 == 12 else rng.choice([" ", " ", " ", ", ", ". "]))
    return "".join(out)


def write_corpus(root, n_docs: int, seed: int = 0) -> list[str]:
    """n_docs random .txt documents in root/a and root/b/c (to exercise recursive globs)."""
    rng = random.Random(seed)
    texts = []
    for i in range(n_docs):
        d = root / ("a" if i % 2 else "b/c")
        d.mkdir(parents=True, exist_ok=True)
        text = random_text(rng, rng.randint(20, 120))
        (d / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    texts = write_corpus(root, 80)
    return root, texts


@pytest.fixture(scope="session")
def prepared(corpus, tmp_path_factory):
    """(out dir, meta): seq_len 16, vocab 300, ~15 train shards of 40 samples (the last partial)."""
    root, _ = corpus
    out = tmp_path_factory.mktemp("prepared") / "data"
    meta = prepare_data([str(root / "**" / "*.txt")], "train", 16, out, vocab_size=300,
                        val_fraction=0.1, samples_per_shard=40, workers=2, seed=7)
    return out, meta


@pytest.fixture
def prepared_copy(prepared, tmp_path):
    """A private copy of the prepared dataset, for tests that damage it."""
    out = tmp_path / "data"
    shutil.copytree(prepared[0], out)
    return out


@pytest.fixture(scope="session")
def train_set(prepared):
    return PackedDataset(prepared[0], "train")
