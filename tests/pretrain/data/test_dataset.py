import io
import json
import tarfile
import zlib

import numpy as np
import pytest

from pretrain.data import PackedDataset, TrainLoader
from pretrain.errors import DataError


def raw_samples(path):
    with tarfile.open(path) as tf:
        return [np.load(io.BytesIO(tf.extractfile(m).read())) for m in tf.getmembers()]


def rewrite_meta(out, shard_name, data):
    """Make meta.json agree with new shard bytes, so only the content checks can catch them."""
    meta = json.loads((out / "meta.json").read_text())
    for split in meta["splits"].values():
        for s in split["shards"]:
            if s["name"] == shard_name:
                s.update(bytes=len(data), crc32=zlib.crc32(data))
    (out / "meta.json").write_text(json.dumps(meta))


def test_attributes(train_set, prepared):
    meta = prepared[1]
    assert (train_set.seq_len, train_set.vocab_size, train_set.eos_id) == (16, 300, meta["eos_id"])
    assert train_set.dtype == np.uint16
    assert train_set.shards == [(s["name"], s["samples"]) for s in meta["splits"]["train"]["shards"]]
    assert train_set.num_samples == meta["splits"]["train"]["samples"]
    assert PackedDataset(prepared[0], "val").num_samples == meta["splits"]["val"]["samples"]


@pytest.mark.parametrize("start,end", [(0, 40), (0, 1), (5, 17), (39, 40), (7, 7)])
def test_read_segment(train_set, start, end):
    expected = raw_samples(train_set.path / train_set.shards[2][0])[start:end]
    got = list(train_set.read_segment(2, start, end))
    assert len(got) == end - start
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    with pytest.raises(IndexError):
        list(train_set.read_segment(2, 0, 41))


def test_bad_paths(prepared_copy, tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        PackedDataset(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="meta.json"):
        PackedDataset(tmp_path / "empty", "train")
    with pytest.raises(DataError, match="'test'"):
        PackedDataset(prepared_copy, "test")
    meta = json.loads((prepared_copy / "meta.json").read_text())
    (prepared_copy / "meta.json").write_text(json.dumps({**meta, "format": "other-v0"}))
    with pytest.raises(DataError, match="other-v0"):
        PackedDataset(prepared_copy, "train")


def test_missing_and_truncated_shard(prepared_copy):
    shard = prepared_copy / "train-000003.tar"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size - 700])
    with pytest.raises(DataError, match=f"train-000003.tar has {size - 700} bytes.*says {size}"):
        PackedDataset(prepared_copy, "train")
    shard.unlink()
    with pytest.raises(DataError, match="missing.*train-000003.tar"):
        PackedDataset(prepared_copy, "train")


def test_corrupted_shard(prepared_copy):
    shard = prepared_copy / "train-000004.tar"
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0x5A for b in data[mid : mid + 8])
    shard.write_bytes(bytes(data))
    ds = PackedDataset(prepared_copy, "train")  # same size: only reading can tell
    list(ds.read_segment(3, 0, 40))  # other shards still read fine
    with pytest.raises(DataError, match="train-000004.tar is corrupted"):
        list(ds.read_segment(4, 0, 1))
    # Through DataLoader workers, the worker's error reaches the trainer.
    loader = TrainLoader(ds, dp_rank=0, dp_size=1, micro_batch=4, num_workers=2, seed=0)
    with pytest.raises(DataError, match="train-000004.tar"):
        for _ in range(ds.num_samples // 4):
            next(loader)


def test_damaged_tar_content(prepared_copy):
    """Damage that a matching checksum lets through is still caught by the decode checks."""
    shard = prepared_copy / "train-000001.tar"
    data = shard.read_bytes()
    cut = data[: 1024 * 10]  # 10 whole samples (512-byte header + 512-byte npy block each)
    shard.write_bytes(cut)
    rewrite_meta(prepared_copy, shard.name, cut)
    ds = PackedDataset(prepared_copy, "train")
    assert len(list(ds.read_segment(1, 0, 10))) == 10
    with pytest.raises(DataError, match=r"train-000001.tar.*(holds 10 samples|sample 10)"):
        list(ds.read_segment(1, 0, 11))

    samples = raw_samples(prepared_copy / "train-000002.tar")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, a in enumerate(samples):
            if i == 3:
                a = a[:-1]  # one token short
            npy = io.BytesIO()
            np.save(npy, a)
            info = tarfile.TarInfo(f"train{80 + i:09d}.tokens.npy")
            info.size = len(npy.getvalue())
            tf.addfile(info, io.BytesIO(npy.getvalue()))
    (prepared_copy / "train-000002.tar").write_bytes(buf.getvalue())
    rewrite_meta(prepared_copy, "train-000002.tar", buf.getvalue())
    ds = PackedDataset(prepared_copy, "train")
    assert len(list(ds.read_segment(2, 0, 3))) == 3
    with pytest.raises(DataError, match=r"train-000002.tar, sample 3: .*shape \(17,\)"):
        list(ds.read_segment(2, 0, 4))
