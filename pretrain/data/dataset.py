"""Read access to one split of a prepared dataset (see prepare.py for the on-disk format).

Everything that can be checked cheaply is checked when the dataset is opened (meta.json, shard
presence and sizes), so a bad path or a truncated copy fails at startup instead of hours into a
run. Content corruption is caught per shard on first read, via the CRC32 recorded in meta.json.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from webdataset import tariterators

from pretrain.data.prepare import FORMAT, META_FILE
from pretrain.errors import DataError


class PackedDataset:
    def __init__(self, path: str | Path, split: str):
        self.path = Path(path)
        self.split = split
        if not self.path.is_dir():
            raise DataError(f"dataset directory not found: {self.path}")
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise DataError(f"{meta_path} not found: not a prepared dataset, or its prepare-data did not finish")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{meta_path}: cannot read: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise DataError(f"{meta_path}: format is {found!r}, expected {FORMAT!r}")
        splits = meta.get("splits")
        if not isinstance(splits, dict) or split not in splits:
            raise DataError(f"{meta_path}: no split {split!r}")
        try:
            self._load_meta(meta, split)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{meta_path}: malformed ({type(e).__name__}: {e})") from None

        for (name, _), expected in zip(self.shards, self._bytes):
            shard = self.path / name
            if not shard.is_file():
                raise DataError(f"shard missing: {shard}")
            found = shard.stat().st_size
            if found != expected:
                raise DataError(f"shard {shard} has {found} bytes, meta.json says {expected} (truncated or replaced?)")

    def _load_meta(self, meta: dict, split: str) -> None:
        self.seq_len: int = meta["seq_len"]
        self.vocab_size: int = meta["vocab_size"]
        self.eos_id: int = meta["eos_id"]
        self.dtype = np.dtype(meta["dtype"])
        self.tokenizer_path = self.path / meta["tokenizer"]
        entries = meta["splits"][split]["shards"]
        self.shards: list[tuple[str, int]] = [(s["name"], s["samples"]) for s in entries]
        self.num_samples: int = sum(n for _, n in self.shards)
        if self.num_samples != meta["splits"][split]["samples"]:
            raise ValueError(f"split {split!r}: shard sample counts do not add up to its total")
        self._bytes = [s["bytes"] for s in entries]
        self._crc32 = [s["crc32"] for s in entries]
        # Index of each shard's first sample within the split, to check sample keys.
        self._first = np.concatenate([[0], np.cumsum([n for _, n in self.shards])]).astype(int).tolist()

    def read_segment(self, shard_idx: int, start: int, end: int) -> Iterator[np.ndarray]:
        """Yield samples [start, end) of shard `shard_idx`, in order, each of shape [seq_len + 1]."""
        name, count = self.shards[shard_idx]
        if not 0 <= start <= end <= count:
            raise IndexError(f"segment [{start}, {end}) out of range for {name} with {count} samples")
        if start == end:
            return
        shard = self.path / name
        # The whole shard is read and checksummed before any sample is used: a tar has no checksum
        # over file contents, so flipped bytes in token data would otherwise go unnoticed. Shards
        # are small (samples_per_shard * (seq_len + 1) ids), so holding one in memory is cheap.
        data = shard.read_bytes()
        if zlib.crc32(data) != self._crc32[shard_idx]:
            raise DataError(f"shard {shard} is corrupted: its CRC32 does not match meta.json")
        files = tariterators.tar_file_expander([{"url": str(shard), "stream": io.BytesIO(data)}])
        samples = tariterators.group_by_keys(files)
        found = 0
        try:
            for sample in samples:
                if found >= start:
                    yield self._decode(sample, shard_idx, found)
                found += 1
                if found == end:
                    return
        except DataError:
            raise
        except Exception as e:  # tarfile / grouping errors surface as assorted exception types
            raise DataError(f"shard {shard}: cannot read sample {found}: {e}") from None
        raise DataError(f"shard {shard} holds {found} samples, meta.json says {count}")

    def _decode(self, sample: dict, shard_idx: int, i: int) -> np.ndarray:
        where = f"shard {self.path / self.shards[shard_idx][0]}, sample {i}"
        key = f"{self.split}{self._first[shard_idx] + i:09d}"
        if sample.get("__key__") != key or "tokens.npy" not in sample:
            raise DataError(f"{where}: expected key {key!r} with tokens.npy, found {sample.get('__key__')!r}")
        try:
            arr = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        except Exception as e:
            raise DataError(f"{where}: cannot decode tokens.npy: {e}") from None
        if arr.shape != (self.seq_len + 1,) or arr.dtype != self.dtype:
            raise DataError(
                f"{where}: expected {self.dtype} array of shape ({self.seq_len + 1},), found {arr.dtype} {arr.shape}"
            )
        if arr.size and int(arr.max()) >= self.vocab_size:
            raise DataError(f"{where}: token id {int(arr.max())} >= vocab_size {self.vocab_size}")
        return arr
