"""Flextron under TP: TP=2 == TP=1 at a given budget (loss, every logical gradient) for a static
router, an adaptive one and a SUBLLM model; every TP rank applies the same choice to a micro-batch;
router gradients are identical on all ranks; the vocab-parallel KL and its gradient equal TP=1's."""
from pathlib import Path

import torch

from tests.helpers import worker

WORKER = Path(__file__).with_name("elastic_worker.py")


def test_elastic_tp2_matches_tp1(tmp_path):
    worker(WORKER, str(tmp_path / "tp1.pt"), nproc=1)
    worker(WORKER, str(tmp_path / "tp2.pt"), nproc=2)
    tp1, tp2 = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tp2.pt")
    for key in ("static", "adaptive", "subllm"):
        a, b = tp1[key], tp2[key]
        assert b["choice_same"], f"{key}: TP ranks chose different widths for one micro-batch"
        assert b["router_spread"] == 0.0, f"{key}: router gradients differ across TP ranks"
        assert torch.equal(a["mlp"], b["mlp"]) and torch.equal(a["heads"], b["heads"])
        assert (a["mlp"] > 0).any(), "budget 0.5 should slice some MLP"
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
        for name, ga in a["grads"].items():
            gb = b["grads"][name]
            if ga is None:
                assert gb is None, name
                continue
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key} {name}: {m}")
        assert a["grads"]["router.mlp_logits"].abs().sum() > 0
    assert len({tuple(r) for r in tp1["adaptive"]["mlp"].tolist()}) > 1, "adaptive rows should differ"
    torch.testing.assert_close(tp1["kl"], tp2["kl"], rtol=1e-5, atol=1e-6)
    # the gradient too: each shard's, not weighted by its share of the teacher's mass
    torch.testing.assert_close(tp1["kl_grad"], tp2["kl_grad"], rtol=1e-5, atol=1e-7)
