"""Round-robin tensor-parallel layout of elastic (Flextron) units (parallel/elastic_layout.py) and
`checkpoint.load_weights` across TP sizes.

Pure: shard/unshard invert each other for every layout; round-robin ranks are balanced and hold the
global first k units as their first k/T slots; state dicts go logical <-> local, buffers untouched,
wrong shapes named. Spawned (one TP=2 group): dealing keeps the seed's logical model and its logits;
a TP=1 weights folder loads at TP=2, and TP=2 per-rank checkpoints (round-robin and contiguous)
load at TP=1, all with TP=1's logits. Bad checkpoints give a CheckpointError that names the problem."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from parallel.elastic_layout import local_state_dict, logical_state_dict, round_robin_index, shard, unshard
from tests.helpers import worker

WORKER = Path(__file__).with_name("elastic_layout_worker.py")


def attrs(p: nn.Parameter, dim: int | None = None, unit: int | None = None) -> nn.Parameter:
    if dim is not None:
        p.tensor_model_parallel, p.partition_dim = True, dim
    if unit is not None:
        p.elastic_unit = unit
    return p


class Fake(nn.Module):
    """One parameter of every layout, at TP size `tp`."""

    def __init__(self, tp: int):
        super().__init__()
        self.rows = attrs(nn.Parameter(torch.zeros(24 // tp, 5)), 0, 2)  # 12 units of 2 rows
        self.cols = attrs(nn.Parameter(torch.zeros(3, 36 // tp)), 1, 3)  # 12 units of 3 columns
        self.vocab = attrs(nn.Parameter(torch.zeros(12 // tp, 3)), 0)  # contiguous (megatron)
        self.norm = attrs(nn.Parameter(torch.zeros(5)))  # replicated
        self.register_buffer("buf", torch.zeros(2))


def test_round_robin_index_balanced_and_nested():
    for n, tp in ((12, 1), (12, 2), (12, 3), (16, 4)):
        held = [round_robin_index(n, tp, r) for r in range(tp)]
        assert sorted(torch.cat(held).tolist()) == list(range(n))
        assert {len(h) for h in held} == {n // tp}
        for k in range(tp, n + 1, tp):  # the first k/T slots of all ranks are the global first k units
            assert sorted(torch.cat([h[:k // tp] for h in held]).tolist()) == list(range(k))


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_shard_unshard_round_trip(tp):
    model = Fake(1)
    for name, p in model.named_parameters():
        logical = torch.randn(p.shape)
        shards = [shard(logical, p, r, tp) for r in range(tp)]
        assert all(s.shape == shards[0].shape for s in shards), name
        assert torch.equal(unshard(shards, p), logical), name
    contiguous = torch.randn(12, 3)
    assert torch.equal(shard(contiguous, model.vocab, 1, 2), contiguous[6:])  # megatron's split


@pytest.mark.parametrize("dim", [0, 1])
def test_first_units_are_a_local_prefix(dim):
    """At T=2 the sub-network of the first k units is the first k/2 local units on each rank."""
    unit, n_units, tp = 3, 8, 2
    ids = torch.arange(n_units).repeat_interleave(unit)  # each row/column holds its unit's id
    logical = (ids[:, None] if dim == 0 else ids[None, :]).expand(*((-1, 4) if dim == 0 else (4, -1))).float()
    p = attrs(nn.Parameter(torch.zeros(1)), dim, unit)
    local = [shard(logical, p, r, tp) for r in range(tp)]
    for r, s in enumerate(local):
        held = s.select(1 - dim, 0).view(-1, unit)[:, 0].long()
        assert held.tolist() == round_robin_index(n_units, tp, r).tolist()
    for k in (2, 4, 6, 8):
        prefix = torch.cat([s.narrow(dim, 0, k // tp * unit) for s in local], dim=dim)
        assert sorted(set(prefix.flatten().long().tolist())) == list(range(k))


def test_shard_rejects_uneven_units():
    p = attrs(nn.Parameter(torch.zeros(1)), 0, 2)
    with pytest.raises(ValueError, match="units of 2"):
        shard(torch.zeros(6, 3), p, 0, 2)  # 3 units over 2 ranks
    with pytest.raises(ValueError, match="differ in shape"):
        unshard([torch.zeros(4, 3), torch.zeros(2, 3)], p)


def test_state_dict_logical_local_round_trip():
    logical = {k: torch.randn(v.shape) for k, v in Fake(1).state_dict().items()}
    for tp in (1, 2):
        model = Fake(tp)
        local = [local_state_dict(logical, model, r, tp) for r in range(tp)]
        assert all(model.state_dict()[k].shape == v.shape for s in local for k, v in s.items())
        back = logical_state_dict(local, model)
        assert back.keys() == logical.keys() and all(torch.equal(back[k], v) for k, v in logical.items())
    # a non-elastic model's shards: contiguous, whatever elastic_unit the loading model has
    dense = [{k: (v.chunk(2, dim=1 if k == "cols" else 0)[r] if k not in ("norm", "buf") else v)
              for k, v in logical.items()} for r in range(2)]
    back = logical_state_dict(dense, Fake(2), round_robin=False)
    assert all(torch.equal(back[k], v) for k, v in logical.items())
    with pytest.raises(ValueError, match=r"rows: the checkpoint has shape \(10, 5\), the model \(24, 5\)"):
        local_state_dict({**logical, "rows": torch.zeros(10, 5)}, Fake(2), 0, 2)


def _load_into_seed1(folder: Path, cfg=None):
    from pretrain.checkpoint import load_weights
    from tests.parallel.elastic_layout_worker import CFG, build

    net = build(1, cfg or CFG)
    load_weights(folder, net)
    return net


@pytest.mark.timeout(180)
def test_tp2_layout_and_cross_tp_loading(tmp_path):
    from parallel.distributed import init_distributed
    from parallel.elastic_layout import deal_round_robin
    from pretrain.checkpoint import save_weights
    from tests.parallel.elastic_layout_worker import build, logits, run_meta, tensors

    init_distributed(1)
    ref = build(0)
    deal_round_robin(ref)  # identity at TP=1
    ref_logits, ref_state = logits(ref), tensors(ref.state_dict())
    assert not torch.allclose(logits(build(1)), ref_logits)  # seed 1 differs: loading must do the work
    save_weights(tmp_path / "tp1", ref_state, run_meta(1, elastic=True))
    worker(WORKER, str(tmp_path), nproc=2, timeout=150)
    res = torch.load(tmp_path / "tp2.pt")

    params = dict(ref.named_parameters())
    assert res["logical"].keys() == params.keys()
    for name, t in res["logical"].items():  # the same seed gives the same logical model at TP=2
        assert torch.equal(t, params[name].detach()), name
    gate = ref_state["layers.1.mlp.gate.weight"]
    assert torch.equal(res["rank0_gate"], gate[0::2])  # rank 0 holds neurons 0, 2, 4, ...
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res["dealt"], ref_logits, **close)
    torch.testing.assert_close(res["loaded"], ref_logits, **close)  # TP=1 folder -> TP=2
    for folder in ("tp2_elastic", "tp2_dense"):  # TP=2 per-rank files -> TP=1
        net = _load_into_seed1(tmp_path / folder)
        state = tensors(net.state_dict())
        assert all(torch.equal(state[k], v) for k, v in ref_state.items()), folder
        torch.testing.assert_close(logits(net), ref_logits, **close)


def test_load_weights_rejects_bad_checkpoints(tmp_path):
    from parallel.distributed import init_distributed
    from pretrain.checkpoint import META, CheckpointError, model_file, save_weights
    from tests.parallel.elastic_layout_worker import CFG, build, run_meta, tensors

    init_distributed(1)
    wide = CFG.model_copy(update={"ffn_hidden": 128})
    save_weights(tmp_path / "wide", tensors(build(0, wide).state_dict()), run_meta(1, elastic=True, cfg=wide))
    with pytest.raises(CheckpointError, match=r"mlp.gate.weight: the checkpoint has shape \(128, 64\), the model \(96, 64\)"):
        _load_into_seed1(tmp_path / "wide")

    short = CFG.model_copy(update={"structure": "TT"})
    save_weights(tmp_path / "short", tensors(build(0, short).state_dict()), run_meta(1, elastic=True, cfg=short))
    with pytest.raises(CheckpointError, match="missing"):
        _load_into_seed1(tmp_path / "short")

    half = tmp_path / "half"  # written at TP=2, but rank 1's file is gone
    half.mkdir()
    torch.save({"module": {}}, half / model_file(0))
    (half / META).write_text(json.dumps(run_meta(2, elastic=True)))
    with pytest.raises(CheckpointError, match="missing .*mp_rank_01_model_states.pt"):
        _load_into_seed1(half)

    meta = run_meta(2, elastic=True)
    meta["config"]["parallel"]["zero_stage"] = 3
    (half / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="ZeRO-3 checkpoint written at parallel.tensor=2"):
        _load_into_seed1(half)


def test_load_weights_consolidates_zero3(tmp_path, monkeypatch):
    """A ZeRO-3 step folder: the weights come from DeepSpeed's zero_to_fp32 (stubbed here: it needs a
    real engine's optimizer shards), asked for the checkpoint folder and its tag."""
    import deepspeed.utils.zero_to_fp32 as z2f

    from parallel.distributed import init_distributed
    from pretrain.checkpoint import META
    from tests.parallel.elastic_layout_worker import build, run_meta, tensors

    init_distributed(1)
    ref_state, calls = tensors(build(0).state_dict()), []
    monkeypatch.setattr(z2f, "get_fp32_state_dict_from_zero_checkpoint",
                        lambda folder, tag: calls.append((folder, tag)) or dict(ref_state))
    step = tmp_path / "checkpoints" / "step_000010"
    step.mkdir(parents=True)
    meta = run_meta(1, elastic=True)
    meta["config"]["parallel"]["zero_stage"] = 3
    (step / META).write_text(json.dumps(meta))
    state = tensors(_load_into_seed1(step).state_dict())
    assert calls == [(str(step.parent), "step_000010")]
    assert all(torch.equal(state[k], v) for k, v in ref_state.items())
