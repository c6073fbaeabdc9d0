import json

import numpy as np
import pytest
import torch

from pretrain.data import PackedDataset, TrainLoader, val_batches
from pretrain.errors import DataError

SEED = 3
MB = 4

# 3 workers on a 2-core test machine is deliberate: it gives runs of unequal length.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def epoch_stream(ds, epoch):
    """The epoch's samples in global-stream order, written out independently of the loader."""
    order = np.random.default_rng(SEED + epoch).permutation(len(ds.shards))
    return [tuple(s.tolist()) for i in order for s in ds.read_segment(int(i), 0, ds.shards[i][1])]


@pytest.fixture(scope="module")
def stream0(train_set):
    s = epoch_stream(train_set, 0)
    assert len(set(s)) == len(s) == train_set.num_samples  # samples are identified by content
    # The cases below want a tail dropped at dp 2, and worker runs of unequal length.
    assert len(s) % (2 * MB) != 0 and (len(s) // (2 * MB)) % 2 == 1 and (len(s) // (2 * MB)) % 3 != 0
    return s


def per_rank(n, dp, mb=MB):
    """Micro-batches per rank in an epoch of n samples."""
    return n // (dp * mb)


def make(ds, rank, dp, workers, mb=MB):
    return TrainLoader(ds, dp_rank=rank, dp_size=dp, micro_batch=mb, num_workers=workers, seed=SEED)


def take(loader, n):
    """Samples (as tuples) of the next n micro-batches."""
    rows = []
    for _ in range(n):
        batch = next(loader)
        assert batch.dtype == torch.int64 and batch.shape == (loader.layout.micro_batch, 17)
        rows += [tuple(r) for r in batch.tolist()]
    return rows


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_epoch_covers_usable_stream_once(train_set, stream0, workers):
    b = per_rank(len(stream0), 2)
    loaders = [make(train_set, r, 2, workers) for r in range(2)]
    seen = [take(l, b) for l in loaders]
    # Rank r reads the r-th contiguous half of the usable stream; the tail is dropped.
    half = b * MB
    assert set(seen[0]) == set(stream0[:half]) and len(seen[0]) == half
    assert set(seen[1]) == set(stream0[half : 2 * half]) and len(seen[1]) == half
    stream1 = set(epoch_stream(train_set, 1))
    for l in loaders:
        assert set(take(l, 1)) <= stream1 and l.epoch == 1
        assert l.samples_consumed_total == (b + 1) * 2 * MB


def test_deterministic(train_set):
    a, b = make(train_set, 1, 2, 2), make(train_set, 1, 2, 2)
    n = 2 * per_rank(train_set.num_samples, 2) + 5  # two epochs and a bit
    assert take(a, n) == take(b, n)
    assert take(make(train_set, 1, 2, 0), 20) != take(make(train_set, 1, 3, 0), 20)


@pytest.mark.parametrize("workers,stop,m", [
    (0, (0, 5), 10), (2, (0, 5), 10), (3, (0, 7), 11),
    (3, (1, -4), 9),  # resumed 4 micro-batches before the end of epoch 0: the m cross into epoch 1
    (2, (1, 3), 4),  # stopped inside epoch 1
])
def test_resume_same_layout(train_set, workers, stop, m):
    """Stop after k micro-batches, resume: the next m are those an uninterrupted run gives."""
    k = stop[0] * per_rank(train_set.num_samples, 2) + stop[1]
    ref = [take(make(train_set, r, 2, workers), k + m) for r in range(2)]
    first = [make(train_set, r, 2, workers) for r in range(2)]
    for r in range(2):
        assert take(first[r], k) == ref[r][: k * MB]
    state = json.loads(json.dumps(first[0].state_dict()))
    assert first[1].state_dict() == state
    for r in range(2):
        resumed = make(train_set, r, 2, workers)
        resumed.load_state_dict(state)
        assert take(resumed, m) == ref[r][k * MB :]
        assert resumed.samples_consumed_total == (k + m) * 2 * MB


def run_phases(ds, stream, phases):
    """Consume epoch 0 in phases (dp, workers, mb, micro-batches per rank or None = to epoch end),
    each resuming from the state the previous one saved. Returns all samples seen, in order."""
    seen, state = [], None
    for dp, workers, mb, n in phases:
        loaders = [make(ds, r, dp, workers, mb) for r in range(dp)]
        if state is not None:
            for l in loaders:
                l.load_state_dict(json.loads(json.dumps(state)))
        if n is None:
            # What is left, in stream order, is re-split; only its tail that does not fill a global
            # micro-batch of the new layout goes unused.
            done = set(seen)
            rest = [s for s in stream if s not in done]
            n = len(rest) // (dp * mb)
            for r, l in enumerate(loaders):
                rows = take(l, n)
                assert set(rows) == set(rest[r * n * mb : (r + 1) * n * mb])
                seen += rows
            for l in loaders:  # and then epoch 1 starts
                take(l, 1)
                assert l.epoch == 1
        else:
            for l in loaders:
                seen += take(l, n)
        state = loaders[0].state_dict()
        assert all(l.state_dict() == state for l in loaders)
    return seen


@pytest.mark.parametrize("phases", [
    [(2, 2, MB, 30), (1, 0, MB, None)],
    [(1, 0, MB, 33), (2, 3, MB, None)],
    [(2, 3, MB, 13), (1, 2, MB, 21), (2, 2, MB, 7), (2, 0, 5, None)],
])
def test_resume_resplit(train_set, stream0, phases):
    seen = run_phases(train_set, stream0, phases)
    assert len(seen) == len(set(seen))  # no duplicate
    # No gap: everything up to the last used sample (in stream order) was seen.
    last = max(stream0.index(s) for s in seen)
    assert set(seen) == set(stream0[: last + 1])


def test_resplit_then_next_epoch_matches_fresh_run(train_set, stream0):
    old = make(train_set, 0, 2, 2)
    take(old, 40)
    new = make(train_set, 0, 1, 2)
    new.load_state_dict(old.state_dict())
    n = train_set.num_samples
    take(new, per_rank(n - 2 * 40 * MB, 1))
    fresh = make(train_set, 0, 1, 2)
    take(fresh, per_rank(n, 1))
    assert new.epoch == fresh.epoch == 0
    assert take(new, 15) == take(fresh, 15)


def test_errors(train_set, prepared):
    with pytest.raises(DataError, match="fewer than one global micro-batch"):
        make(train_set, 0, 8, 0, mb=200)
    state = make(train_set, 0, 1, 0).state_dict()
    with pytest.raises(DataError, match="seed"):
        TrainLoader(train_set, dp_rank=0, dp_size=1, micro_batch=MB, num_workers=0, seed=SEED + 1) \
            .load_state_dict(state)
    val = PackedDataset(prepared[0], "val")
    with pytest.raises(DataError, match="different dataset"):
        make(val, 0, 1, 0).load_state_dict(state)


def test_val_batches(prepared):
    val = PackedDataset(prepared[0], "val")
    first = [tuple(s.tolist()) for i, (_, n) in enumerate(val.shards) for s in val.read_segment(i, 0, n)]
    ranks = [list(val_batches(val, dp_rank=r, dp_size=2, micro_batch=2, max_batches=3)) for r in range(2)]
    assert [len(b) for b in ranks] == [3, 3]
    rows = [tuple(x) for b in ranks[0] + ranks[1] for x in b.tolist()]
    assert rows == first[:12]
    assert all(torch.equal(a, b) for a, b in zip(ranks[1], val_batches(val, dp_rank=1, dp_size=2,
                                                                         micro_batch=2, max_batches=3)))
    everything = list(val_batches(val, dp_rank=0, dp_size=2, micro_batch=2, max_batches=None))
    assert sum(len(b) for b in everything) == val.num_samples // 2
    # a split smaller than one micro-batch per rank still gives every rank the same, partial batch
    big = [list(val_batches(val, dp_rank=r, dp_size=2, micro_batch=val.num_samples, max_batches=4)) for r in range(2)]
    assert [[len(b) for b in r] for r in big] == [[val.num_samples // 2]] * 2
    assert [tuple(x) for r in big for b in r for x in b.tolist()] == first[:2 * (val.num_samples // 2)]
