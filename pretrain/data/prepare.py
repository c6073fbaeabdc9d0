"""Raw text -> tokenized, packed webdataset shards (what `python -m pretrain prepare-data` runs).

Output directory:
    tokenizer.json                  the tokenizer the ids belong to
    train-000000.tar, ...           samples of exactly seq_len + 1 token ids (inputs + shifted targets)
    val-000000.tar, ...
    meta.json                       written last: its presence means the directory is complete

Documents are packed back to back with EOS between them (no padding), GPT-2 style. All token ids
are held in memory while packing (2 bytes per token for vocab < 65536), which is fine for the
corpora this framework targets and keeps the shuffle exact.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import re
import zlib
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from pretrain.data.tokenizer import eos_id, load_tokenizer, train_tokenizer_from_iterator
from pretrain.errors import ConfigError, DataError

FORMAT = "frugal-packed-v1"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")

# Tokenizer work is shipped to the pool in batches of about this many characters: big enough to
# amortize pickling, small enough that a few batches in flight per worker stay cheap in memory.
BATCH_CHARS = 1 << 20


def prepare_data(
    inputs: list[str],
    tokenizer: str,
    seq_len: int,
    out: Path,
    *,
    vocab_size: int = 8192,
    val_fraction: float = 0.01,
    samples_per_shard: int = 2048,
    workers: int | None = None,
    seed: int = 1234,
    overwrite: bool = False,
) -> dict:
    """Tokenize `inputs`, split train/val, pack and write shards to `out`. Returns the meta dict."""
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    workers = workers or os.cpu_count() or 1
    files = expand_inputs(inputs)
    out = Path(out)

    # Read an existing tokenizer before touching `out`: it may live there (re-running with overwrite).
    tok_json = None
    if tokenizer != "train":
        load_tokenizer(tokenizer)  # validates, with a clear error
        tok_json = Path(tokenizer).read_text(encoding="utf-8")
    _claim_output_dir(out, overwrite)
    tok_path = out / TOKENIZER_FILE
    if tok_json is None:
        texts = (text for _, text in iter_documents(files))
        train_tokenizer_from_iterator(texts, vocab_size, tok_path)
    else:
        tok_path.write_text(tok_json, encoding="utf-8")
    tok = load_tokenizer(tok_path)
    vocab, eos = tok.get_vocab_size(), eos_id(tok)
    dtype = np.dtype(np.uint16 if vocab < 65536 else np.int32)

    tokens, lengths, hashes = _tokenize(files, tok.to_str(), eos, dtype, workers, seed)
    is_val = hashes < val_fraction
    if val_fraction > 0:
        _ensure_val_sample(is_val, lengths, hashes, seq_len + 1)

    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rng = np.random.default_rng(seed)
    splits = {}
    for split in ("train", "val"):
        docs = rng.permutation(np.flatnonzero(is_val == (split == "val")))
        if split == "train" and lengths[docs].sum() < seq_len + 1:
            raise DataError(
                f"corpus too small: {int(lengths[docs].sum())} training tokens, "
                f"need at least seq_len + 1 = {seq_len + 1} for one sample"
            )
        samples = _pack(tokens, offsets, docs, seq_len + 1)
        splits[split] = _write_split(out, split, samples, samples_per_shard)

    meta = {
        "format": FORMAT,
        "seq_len": seq_len,
        "vocab_size": vocab,
        "eos_id": eos,
        "dtype": dtype.name,
        "tokenizer": TOKENIZER_FILE,
        "splits": splits,
    }
    # Atomic rename: a reader never sees a half-written meta.json.
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / META_FILE)
    return meta


def expand_inputs(inputs: list[str]) -> dict[Path, str]:
    """Files and globs (`**` recursive) -> {file: source name}, in the given order.

    A `.jsonl` file holds one document per line (field `text`); any other file (.txt, source
    code, docs) is one UTF-8 document.

    The source name is the path relative to the glob's fixed leading directory (the file name for
    a plain path), so that the train/val split, which hashes it, does not depend on where the
    corpus happens to be mounted.
    """
    files: dict[Path, str] = {}
    seen: set[Path] = set()
    for pattern in inputs:
        if any(c in pattern for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]
            if not matches:
                raise DataError(f"no input files match {pattern!r}")
            parts = Path(pattern).parts
            fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
            root = Path(*parts[:fixed]) if fixed else Path(".")
        else:
            if not os.path.isfile(pattern):
                raise DataError(f"input file not found: {pattern}")
            matches, root = [Path(pattern)], Path(pattern).parent
        for m in matches:
            if m.resolve() not in seen:
                seen.add(m.resolve())
                files[m] = m.relative_to(root).as_posix()
    if not files:
        raise DataError("no input files given")
    return files


def iter_documents(files: dict[Path, str]) -> Iterator[tuple[str, str]]:
    """Yield (source name, text): a .jsonl line is one document (field `text`), any other file is one."""
    for f, source in files.items():
        try:
            if f.suffix != ".jsonl":
                yield source, f.read_text(encoding="utf-8")
                continue
            with open(f, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{f}:{lineno}: invalid JSON: {e}") from None
                    text = obj.get("text") if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        raise DataError(f"{f}:{lineno}: expected a JSON object with a string field 'text'")
                    yield f"{source}:{lineno}", text
        except UnicodeDecodeError as e:
            raise DataError(f"{f}: not valid UTF-8: {e}") from None


def doc_hash(name: str, seed: int) -> float:
    """Seeded hash of a document's source name, uniform in [0, 1): decides train vs val.

    Hashing the name (not the position in the input order) keeps a document in the same split
    when other files are added, the input order changes or the worker count changes.
    """
    h = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


# --- tokenization in a process pool -------------------------------------------------------------

_worker_state: dict = {}


def _init_worker(tok_json: str, eos: int, dtype: str) -> None:
    from tokenizers import Tokenizer

    _worker_state.update(tok=Tokenizer.from_str(tok_json), eos=eos, dtype=np.dtype(dtype))


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents; return their ids concatenated (EOS after each) and per-document lengths."""
    tok, eos, dtype = _worker_state["tok"], _worker_state["eos"], _worker_state["dtype"]
    docs = [enc.ids + [eos] for enc in tok.encode_batch(texts, add_special_tokens=False)]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    return np.concatenate([np.asarray(d, dtype=dtype) for d in docs]), lengths


def _batches(files: dict[Path, str], seed: int, hashes: list[float]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for name, text in iter_documents(files):
        if not text:
            continue  # an empty document would only add a lone EOS
        hashes.append(doc_hash(name, seed))
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize(files, tok_json, eos, dtype, workers, seed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (all token ids, length of each document, hash of each document), in input order."""
    hashes: list[float] = []
    batches = _batches(files, seed, hashes)
    chunks, lengths = [], []
    init_args = (tok_json, eos, dtype.name)
    with tqdm(desc="tokenize", unit="doc") as bar:
        if workers == 1:
            # No pool for one worker: forking buys nothing and costs startup time.
            _init_worker(*init_args)
            results = map(_encode_batch, batches)
        else:
            pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=init_args)
            results = _bounded_imap(pool, batches, in_flight=4 * workers)
        try:
            for toks, lens in results:
                chunks.append(toks)
                lengths.append(lens)
                bar.update(len(lens))
        finally:
            if workers != 1:
                pool.terminate()
    if not chunks:
        raise DataError("all input documents are empty")
    return np.concatenate(chunks), np.concatenate(lengths), np.array(hashes)


def _bounded_imap(pool, batches, in_flight: int):
    # Pool.imap drains its input eagerly (a feeder thread), which would queue the whole corpus's
    # text in memory; feeding it windows of `in_flight` batches bounds that. Order is preserved.
    while window := list(islice(batches, in_flight)):
        yield from pool.imap(_encode_batch, window)


# --- split, pack, write -------------------------------------------------------------------------


def _ensure_val_sample(is_val: np.ndarray, lengths: np.ndarray, hashes: np.ndarray, sample_len: int) -> None:
    """Move train documents to val until val holds one full sample, if train can spare them.

    Candidates go in order of hash: those are the documents a slightly larger val_fraction would
    have picked, so the choice stays deterministic and consistent with the hash split.
    """
    val_tokens, train_tokens = int(lengths[is_val].sum()), int(lengths[~is_val].sum())
    moved = []
    for i in np.argsort(hashes):
        if val_tokens >= sample_len:
            break
        if is_val[i]:
            continue
        if train_tokens - lengths[i] < sample_len:
            return  # corpus too small to give both splits a sample: leave val without one
        moved.append(i)
        val_tokens += int(lengths[i])
        train_tokens -= int(lengths[i])
    if val_tokens >= sample_len:
        is_val[moved] = True


def _pack(tokens: np.ndarray, offsets: np.ndarray, docs: np.ndarray, sample_len: int) -> Iterator[np.ndarray]:
    """Concatenate documents in `docs` order and cut into samples; the final partial one is dropped."""
    pending, n = [], 0
    for d in docs:
        pending.append(tokens[offsets[d] : offsets[d + 1]])
        n += len(pending[-1])
        if n >= sample_len:
            flat = np.concatenate(pending)
            k = n // sample_len
            yield from flat[: k * sample_len].reshape(k, sample_len)
            pending, n = [flat[k * sample_len :]], n - k * sample_len


def _write_split(out: Path, split: str, samples: Iterator[np.ndarray], samples_per_shard: int) -> dict:
    shards: list[dict] = []
    writer, n = None, 0

    def close():
        writer.close()
        path = out / shards[-1]["name"]
        data = path.read_bytes()
        shards[-1].update(bytes=len(data), crc32=zlib.crc32(data))

    for sample in samples:
        if n % samples_per_shard == 0:
            if writer is not None:
                close()
            shards.append({"name": f"{split}-{len(shards):06d}.tar", "samples": 0})
            # mtime=0 makes the tar bytes a pure function of the data (reproducible checksums).
            writer = wds.TarWriter(str(out / shards[-1]["name"]), mtime=0)
        writer.write({"__key__": f"{split}{n:09d}", "tokens.npy": sample})
        shards[-1]["samples"] += 1
        n += 1
    if writer is not None:
        close()
    return {"samples": n, "shards": shards}


def _claim_output_dir(out: Path, overwrite: bool) -> None:
    if (out / META_FILE).exists():
        if not overwrite:
            raise DataError(f"{out} already holds a prepared dataset ({META_FILE}); refusing to overwrite it")
        # Delete meta.json first: if we crash from here on, the directory no longer looks complete.
        (out / META_FILE).unlink()
    out.mkdir(parents=True, exist_ok=True)
    # Shards left by an earlier (possibly crashed) run would otherwise sit next to the new ones.
    for f in out.iterdir():
        if SHARD_RE.match(f.name):
            f.unlink()
