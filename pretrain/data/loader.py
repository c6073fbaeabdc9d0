"""Training loader with an exact, re-splittable position in the data.

The epoch stream. Epoch e visits the train shards in the order `default_rng(seed + e).permutation`
and their samples in file order; that is a stream of N samples. It is held as a list of segments
`(shard, start, end)`, so a position in it is cheap to store and to re-split.

The split. A "base" (the segments still to read this epoch; the whole stream at epoch start) is
split under a layout (dp_size, num_workers, micro_batch):
  * drop-last: only the first floor(len / (dp_size * micro_batch)) * dp_size * micro_batch samples
    are used, so every rank gets the same number of micro-batches (ranks step in lockstep);
  * rank r reads the r-th of dp_size contiguous equal parts (shards split by DP rank, not node);
  * a rank's B micro-batches are cut into num_workers contiguous runs, the first B % num_workers
    workers taking one more. Each DataLoader worker streams its run from its own shards.

The order. DataLoader asks its workers round-robin and skips a worker once it is exhausted. Since
the longer runs come first, that is a plain round-robin: the rank's j-th micro-batch is batch
j // W of worker j % W. So "c micro-batches consumed" pins down exactly which samples each worker
has delivered, whatever was prefetched; __next__ asserts every batch against this schedule.

Resume. The state is (epoch, base, layout, c). Same layout: continue the same split, with the
DataLoader workers rotated so that round-robin starts at worker c % W. Other layout: subtract the
consumed samples from the base, and the rest (still in stream order) becomes the new base.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.dataset import PackedDataset
from pretrain.errors import DataError

Segment = tuple[int, int, int]  # (shard index, first sample, end sample): samples [start, end) of a shard
STATE_FORMAT = "frugal-loader-v1"


def _length(segments: list[Segment]) -> int:
    return sum(end - start for _, start, end in segments)


def _slice(segments: list[Segment], lo: int, hi: int) -> list[Segment]:
    """Samples [lo, hi) of the stream formed by concatenating `segments`."""
    out, pos = [], 0
    for shard, start, end in segments:
        a, b = max(lo - pos, 0), min(hi - pos, end - start)
        if a < b:
            out.append((shard, start + a, start + b))
        pos += end - start
        if pos >= hi:
            break
    return out


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbours that continue each other, to keep the saved state small."""
    out: list[Segment] = []
    for seg in segments:
        if out and out[-1][0] == seg[0] and out[-1][2] == seg[1]:
            out[-1] = (seg[0], out[-1][1], seg[2])
        else:
            out.append(seg)
    return out


@dataclass(frozen=True)
class Layout:
    dp_size: int
    num_workers: int  # DataLoader workers per rank; 0 = read in the main process
    micro_batch: int


class _Split:
    """One base cut under one layout: which samples rank r / worker w reads."""

    def __init__(self, base: list[Segment], layout: Layout):
        self.base, self.layout = base, layout
        self.mb = layout.micro_batch
        self.workers = max(layout.num_workers, 1)
        self.batches_per_rank = _length(base) // (layout.dp_size * self.mb)  # drop-last
        q, rem = divmod(self.batches_per_rank, self.workers)
        self.counts = [q + (w < rem) for w in range(self.workers)]  # longer runs first
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).tolist()

    def schedule(self, j: int) -> tuple[int, int]:
        """(worker, batch index within worker) of the rank's j-th micro-batch."""
        return j % self.workers, j // self.workers

    def consumed(self, c: int) -> list[int]:
        """Batches taken from each worker after the first c micro-batches of the round-robin."""
        return [c // self.workers + (w < c % self.workers) for w in range(self.workers)]

    def worker_segments(self, rank: int, w: int, skip: int) -> list[Segment]:
        """Worker w's run on `rank`, without its first `skip` batches."""
        rank_start = rank * self.batches_per_rank
        lo = (rank_start + self.starts[w] + skip) * self.mb
        hi = (rank_start + self.starts[w + 1]) * self.mb
        return _slice(self.base, lo, hi)

    def remaining(self, c: int) -> list[Segment]:
        """The base minus what every rank consumed in its first c micro-batches, in stream order."""
        taken = []  # [lo, hi) sample ranges of the base, increasing
        for rank in range(self.layout.dp_size):
            for w, n in enumerate(self.consumed(c)):
                lo = (rank * self.batches_per_rank + self.starts[w]) * self.mb
                taken.append((lo, lo + n * self.mb))
        out, pos = [], 0
        for lo, hi in taken:
            out += _slice(self.base, pos, lo)
            pos = hi
        out += _slice(self.base, pos, _length(self.base))
        return _merge(out)


class _RankStream(IterableDataset):
    """What DataLoader worker i reads: `parts[i] = (worker, first batch index, segments)`.

    Items are (worker, batch index, LongTensor [micro_batch, seq_len + 1]); the indices let the
    consumer check the arrival order against the schedule.
    """

    def __init__(self, dataset: PackedDataset, parts: list, micro_batch: int):
        self.dataset, self.parts, self.mb = dataset, parts, micro_batch

    def __iter__(self):
        info = get_worker_info()
        worker, index, segments = self.parts[info.id if info else 0]
        buf = []
        for shard, start, end in segments:
            for sample in self.dataset.read_segment(shard, start, end):
                buf.append(sample)
                if len(buf) == self.mb:
                    yield worker, index, torch.from_numpy(np.stack(buf).astype(np.int64))
                    index, buf = index + 1, []


class TrainLoader:
    """Infinite iterator of this rank's micro-batches, LongTensor [micro_batch, seq_len + 1].

    Epochs roll over seamlessly; each uses floor(N / (dp_size * micro_batch)) * dp_size *
    micro_batch samples of the N in the train split (drop-last, so ranks stay in lockstep).
    Every rank must call next() the same number of times: state_dict() assumes it.
    """

    def __init__(self, dataset: PackedDataset, *, dp_rank: int, dp_size: int, micro_batch: int,
                 num_workers: int, seed: int, pin_memory: bool = False):
        if not 0 <= dp_rank < dp_size or micro_batch < 1 or num_workers < 0:
            raise ValueError(f"bad loader layout: {dp_rank=} {dp_size=} {micro_batch=} {num_workers=}")
        if dataset.num_samples < dp_size * micro_batch:
            raise DataError(
                f"{dataset.path}: split {dataset.split!r} has {dataset.num_samples} samples, fewer than "
                f"one global micro-batch (dp_size * micro_batch = {dp_size * micro_batch})"
            )
        self.dataset, self.dp_rank, self.seed, self.pin_memory = dataset, dp_rank, seed, pin_memory
        self.layout = Layout(dp_size, num_workers, micro_batch)
        self.samples_consumed_total = 0  # all ranks, all epochs
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.dataset.shards))
        base = [(int(i), 0, self.dataset.shards[i][1]) for i in order if self.dataset.shards[i][1] > 0]
        self._set_base(base, 0)

    def _set_base(self, base: list[Segment], consumed: int) -> None:
        self._split = _Split(base, self.layout)
        self._consumed = consumed  # micro-batches each rank has taken since the base
        self._it = None  # the DataLoader iterator, opened on demand

    def _open(self) -> Iterator:
        split, c = self._split, self._consumed
        skip = split.consumed(c)
        # Rotate so DataLoader's round-robin (which starts at its worker 0) starts at worker c % W.
        # The rotated remaining counts are non-increasing, so its skipping of exhausted workers
        # still amounts to a plain round-robin.
        first = c % split.workers
        parts = []
        for i in range(split.workers):
            w = (first + i) % split.workers
            parts.append((w, skip[w], split.worker_segments(self.dp_rank, w, skip[w])))
        stream = _RankStream(self.dataset, parts, self.layout.micro_batch)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.layout.num_workers,
                               pin_memory=self.pin_memory))

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> torch.Tensor:
        while self._consumed == self._split.batches_per_rank:
            self._start_epoch(self.epoch + 1)  # a resumed base can be too short to use: skip it
        if self._it is None:
            self._it = self._open()
        try:
            worker, index, batch = next(self._it)
        except StopIteration:
            raise RuntimeError("data loader workers ended before the epoch did") from None
        except Exception as e:
            # Shut the workers down now. The traceback (DataLoader internals; a worker's own
            # traceback is in the message) would keep the iterator alive until some later garbage
            # collection, which may run in a queue's feeder thread and stall 5 s per worker.
            self._it = None
            if isinstance(e, DataError):  # from a worker: keep the message, drop the traceback text
                raise DataError(str(e).rstrip().splitlines()[-1].removeprefix("pretrain.errors.DataError: ")) from None
            raise e.with_traceback(None)
        expected = self._split.schedule(self._consumed)
        if (worker, index) != expected:
            raise RuntimeError(f"DataLoader delivered batch {(worker, index)}, expected {expected}: "
                               "its worker interleaving differs from the one this loader relies on")
        self._consumed += 1
        self.samples_consumed_total += self.layout.dp_size * self.layout.micro_batch
        return batch

    def state_dict(self) -> dict:
        """JSON-able global position; identical on every DP rank."""
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "num_samples": self.dataset.num_samples,
            "epoch": self.epoch,
            "base": [list(s) for s in self._split.base],
            "layout": asdict(self.layout),
            "consumed": self._consumed,
            "samples_consumed_total": self.samples_consumed_total,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue right after the last micro-batch the saved loader handed out, under this layout."""
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"data loader state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        if state["num_samples"] != self.dataset.num_samples:
            raise DataError(f"data loader state is for a train split of {state['num_samples']} samples, "
                            f"but {self.dataset.path} has {self.dataset.num_samples}: a different dataset?")
        if state["seed"] != self.seed:
            raise DataError(f"data loader state was saved with seed {state['seed']}, this run uses {self.seed}; "
                            "resuming would not continue the same data order")
        base = [tuple(s) for s in state["base"]]
        saved = Layout(**state["layout"])
        self.epoch = state["epoch"]
        self.samples_consumed_total = state["samples_consumed_total"]
        if saved == self.layout:
            self._set_base(base, state["consumed"])
        else:
            self._set_base(_Split(base, saved).remaining(state["consumed"]), 0)


def val_batches(dataset: PackedDataset, *, dp_rank: int, dp_size: int, micro_batch: int,
                max_batches: int | None) -> Iterator[torch.Tensor]:
    """The first samples of `dataset` (the val split), the same every call.

    Each rank gets a contiguous, equal share of min(max_batches * micro_batch, N // dp_size)
    samples, in micro-batches (the last one may be smaller), so all ranks run the same number of
    eval steps even when the split is smaller than one micro-batch per rank.
    """
    per_rank = dataset.num_samples // dp_size
    if max_batches is not None:
        per_rank = min(per_rank, max_batches * micro_batch)
    segments = [(i, 0, n) for i, (_, n) in enumerate(dataset.shards)]
    lo = dp_rank * per_rank
    batch: list[np.ndarray] = []
    for shard, start, end in _slice(segments, lo, lo + per_rank):
        for sample in dataset.read_segment(shard, start, end):
            batch.append(sample)
            if len(batch) == micro_batch:
                yield torch.from_numpy(np.stack(batch).astype(np.int64))
                batch = []
    if batch:
        yield torch.from_numpy(np.stack(batch).astype(np.int64))
