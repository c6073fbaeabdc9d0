"""The affine maps parallel/universal_layout.py hands DeepSpeed's universal checkpoint describe the
same layouts as parallel/elastic_layout.py: for every kind of parameter and TP size, DeepSpeed's
`rebuild` of the shards is `unshard` and its `extract` of the logical tensor is `shard`; `describe`
attaches the save-side and load-side descriptions. (Spawned resumes: tests/pretrain/test_resume_resize.py.)"""
import re

import pytest
import torch
from deepspeed.checkpoint.affine import ParamAffineMap
from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META, UNIVERSAL_CHECKPOINT_INFO

from parallel.elastic_layout import shard, unshard
from parallel.universal_layout import affine_map, describe
from tests.parallel.test_elastic_layout import Fake


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 6])
def test_maps_match_the_elastic_layout(tp):
    torch.manual_seed(tp)
    model, logical = Fake(tp), Fake(1)
    for (name, p), (_, full) in zip(model.named_parameters(), logical.named_parameters()):
        full = torch.randn_like(full)
        m = ParamAffineMap.from_dict(affine_map(p, tp).to_dict())  # through its stored form
        m.validate_coverage()  # every element held, round-robin pieces included
        assert tuple(m.logical_shape) == tuple(full.shape), name
        shards = [shard(full, p, r, tp) for r in range(tp)]
        for r in range(tp):
            assert torch.equal(m.extract(full, r), shards[r]), (name, r)
            assert tuple(m.shard_shapes[r]) == tuple(p.shape), (name, r)
        assert torch.equal(m.rebuild(dict(enumerate(shards))), unshard(shards, p)), name
        assert torch.equal(m.rebuild(dict(enumerate(shards))), full), name


def test_describe_attaches_save_and_load_descriptions():
    model = Fake(2)
    describe(model, 2)
    info = getattr(model, UNIVERSAL_CHECKPOINT_INFO)
    patterns = info["affine_map"]["params"]
    for name, p in model.named_parameters():
        (pattern,) = [k for k in patterns if re.match(k, name)]  # exactly one, anchored
        meta = getattr(p, DS_AUTOTP_UC_META)
        assert meta["conversion"]["affine_map"] == patterns[pattern]
        assert meta["replicated"] == (name == "norm")
        assert meta["partition_dim"] == {"rows": 0, "cols": 1, "vocab": 0, "norm": None}[name]
    assert getattr(model.rows, DS_AUTOTP_UC_META)["logical_shape"] == [24, 5]
