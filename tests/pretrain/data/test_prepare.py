import io
import json
import tarfile

import numpy as np
import pytest

from pretrain.data import eos_id, load_tokenizer, prepare_data
from pretrain.data.prepare import doc_hash
from pretrain.errors import DataError


def read_tar(path):
    """(key, array) pairs of a shard, read with plain tarfile (independent of the code under test)."""
    with tarfile.open(path) as tf:
        return [(m.name.removesuffix(".tokens.npy"), np.load(io.BytesIO(tf.extractfile(m).read())))
                for m in tf.getmembers()]


def split_samples(out, meta, split):
    return [s for shard in meta["splits"][split]["shards"] for s in read_tar(out / shard["name"])]


def test_meta_and_shards(prepared):
    out, meta = prepared
    assert json.loads((out / "meta.json").read_text()) == meta
    tok = load_tokenizer(out / "tokenizer.json")
    assert meta["format"] == "frugal-packed-v1"
    assert (meta["seq_len"], meta["vocab_size"], meta["eos_id"], meta["dtype"]) == (
        16, tok.get_vocab_size(), eos_id(tok), "uint16")
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["samples"] > 0
        assert sum(s["samples"] for s in info["shards"]) == info["samples"]
        assert [s["samples"] for s in info["shards"][:-1]] == [40] * (len(info["shards"]) - 1)
        for i, shard in enumerate(info["shards"]):
            assert shard["name"] == f"{split}-{i:06d}.tar"
            assert (out / shard["name"]).stat().st_size == shard["bytes"]
        samples = split_samples(out, meta, split)
        assert [k for k, _ in samples] == [f"{split}{i:09d}" for i in range(info["samples"])]
        assert all(a.shape == (17,) and a.dtype == np.uint16 for _, a in samples)
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(
        s["name"] for split in meta["splits"].values() for s in split["shards"])


def test_samples_are_packed_documents(prepared, corpus):
    out, meta = prepared
    texts = corpus[1]
    tok = load_tokenizer(out / "tokenizer.json")
    eos = meta["eos_id"]
    found = {}
    for split in ("train", "val"):
        stream = np.concatenate([a for _, a in split_samples(out, meta, split)]).tolist()
        # Every EOS closes a document; the piece after the last EOS is cut by the dropped tail.
        ends = [i for i, t in enumerate(stream) if t == eos]
        starts = [0] + [e + 1 for e in ends[:-1]]
        found[split] = [tok.decode(stream[s:e]) for s, e in zip(starts, ends)]
    assert set(found["train"]) | set(found["val"]) <= set(texts)
    assert not set(found["train"]) & set(found["val"])
    all_found = found["train"] + found["val"]
    assert len(all_found) == len(set(all_found))  # no document twice
    assert len(all_found) >= len(texts) - 2  # at most the last document of each split is cut
    # Nothing is lost but the tail (< one sample) of each split.
    total = sum(len(tok.encode(t).ids) + 1 for t in texts)
    packed = 17 * (meta["splits"]["train"]["samples"] + meta["splits"]["val"]["samples"])
    assert total - 2 * 17 < packed <= total


def test_deterministic(prepared, corpus, tmp_path):
    out, meta = prepared
    args = ([str(corpus[0] / "**" / "*.txt")], "train", 16)
    kwargs = dict(vocab_size=300, val_fraction=0.1, samples_per_shard=40, seed=7)
    again = prepare_data(*args, tmp_path / "again", workers=1, **kwargs)
    assert again == meta  # includes every shard's byte size and CRC32
    other = prepare_data(*args, tmp_path / "other", workers=1, **{**kwargs, "seed": 8})
    assert split_samples(tmp_path / "other", other, "train")[0][1].tolist() != \
        split_samples(out, meta, "train")[0][1].tolist()


def test_refuses_to_overwrite(prepared, prepared_copy, corpus):
    before = {p.name: p.read_bytes() for p in prepared_copy.iterdir()}
    with pytest.raises(DataError, match="already holds"):
        prepare_data([str(corpus[0] / "a" / "*.txt")], "train", 16, prepared_copy, vocab_size=300)
    assert {p.name: p.read_bytes() for p in prepared_copy.iterdir()} == before

    meta = prepare_data([str(corpus[0] / "a" / "*.txt")], str(prepared_copy / "tokenizer.json"), 16,
                        prepared_copy, samples_per_shard=1000, overwrite=True, workers=1)
    assert len(meta["splits"]["train"]["shards"]) == 1
    # Old shards are gone; the tokenizer that was passed in (from the same directory) is kept.
    assert sorted(p.name for p in prepared_copy.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert (prepared_copy / "tokenizer.json").read_bytes() == before["tokenizer.json"]


def test_existing_tokenizer_is_copied(prepared, corpus, tmp_path):
    src = prepared[0] / "tokenizer.json"
    meta = prepare_data([str(corpus[0] / "b" / "**" / "*.txt")], str(src), 16, tmp_path / "o", workers=1)
    assert (tmp_path / "o" / "tokenizer.json").read_text() == src.read_text()
    assert meta["vocab_size"] == prepared[1]["vocab_size"]


def test_jsonl(prepared, tmp_path):
    tok_path = str(prepared[0] / "tokenizer.json")
    docs = [f"document number {i} " + "kalo mi " * (i % 7 + 3) for i in range(40)]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)) + "\n")
    meta = prepare_data([str(good)], tok_path, 16, tmp_path / "o", val_fraction=0.0, workers=1)
    assert meta["splits"]["val"] == {"samples": 0, "shards": []}
    tok = load_tokenizer(tok_path)
    assert meta["splits"]["train"]["samples"] == sum(len(tok.encode(d).ids) + 1 for d in docs) // 17

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
    with pytest.raises(DataError, match="bad.jsonl:3"):
        prepare_data([str(good), str(bad)], tok_path, 16, tmp_path / "o2", workers=1)
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        prepare_data([str(bad)], tok_path, 16, tmp_path / "o3", workers=1)
    assert not (tmp_path / "o2" / "meta.json").exists()


def test_input_errors(prepared, corpus, tmp_path):
    tok_path = str(prepared[0] / "tokenizer.json")
    glob = str(corpus[0] / "**" / "*.md")
    with pytest.raises(DataError, match=r"\*\*/\*\.md"):
        prepare_data([str(corpus[0] / "a" / "*.txt"), glob], tok_path, 16, tmp_path / "o")
    with pytest.raises(DataError, match="missing.txt"):
        prepare_data([str(tmp_path / "missing.txt")], tok_path, 16, tmp_path / "o")
    (tmp_path / "tiny.txt").write_text("ka lo")
    with pytest.raises(DataError, match="too small"):
        prepare_data([str(tmp_path / "tiny.txt")], tok_path, 16, tmp_path / "o", workers=1)


def test_val_gets_a_sample(prepared, corpus, tmp_path):
    # At 0.1% no document hashes into val; one is moved over so val is never empty.
    names = [p.relative_to(corpus[0]).as_posix() for p in corpus[0].rglob("*.txt")]
    assert min(doc_hash(n, 1234) for n in names) >= 0.001
    meta = prepare_data([str(corpus[0] / "**" / "*.txt")], str(prepared[0] / "tokenizer.json"), 16,
                        tmp_path / "o", val_fraction=0.001, workers=1)
    assert meta["splits"]["val"]["samples"] >= 1
    assert meta["splits"]["train"]["samples"] > 10 * meta["splits"]["val"]["samples"]
