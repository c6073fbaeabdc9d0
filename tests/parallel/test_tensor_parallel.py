"""TP=2 == TP=1 for the whole model (loss, every gradient): LLaMA untied and tied, SUBLLM with
two nested levels, and ternary models (HGRN-Bit with fused and unfused BitLinear, a ternary LLaMA);
replicated parameters (norms, scorer, bypass, column-parallel BitLinear norms) get identical gradients
on every TP rank; cached decoding == full forward at both TP sizes (SUBLLM: under the inference
rule; HGRN-Bit: recurrent state); packed 2-bit inference == fake quantization at both TP sizes;
GRIFFIN's scores, per-shard selection and decode logits (LLaMA, SUBLLM, HGRN-Bit latent and packed)."""
from pathlib import Path

import torch

from tests.helpers import worker

WORKER = Path(__file__).with_name("tp_worker.py")


def test_tp2_matches_tp1(tmp_path):
    worker(WORKER, str(tmp_path / "tp1.pt"), nproc=1)
    worker(WORKER, str(tmp_path / "tp2.pt"), nproc=2)
    tp1, tp2 = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tp2.pt")
    for key in ("tie=False", "tie=True", "subllm", "hgrnbit", "hgrnbit-unfused", "llama-ternary"):
        a, b = tp1[key], tp2[key]
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
        assert a["grads"].keys() == b["grads"].keys()
        for name in a["grads"]:
            ga, gb = a["grads"][name], b["grads"][name]
            assert ga.shape == gb.shape, name
            assert ga.abs().sum() > 0, f"{name} got no gradient"
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key} {name}: {m}")
        for res in (a, b):  # KV-cache decoding reproduces the full forward's logits
            torch.testing.assert_close(res["cached"], res["full"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a["full"], b["full"], rtol=1e-4, atol=1e-5)
        assert b["spread"] == 0.0, f"{key}: replicated parameters got different gradients on the TP ranks"
        if "packed" in a:
            for res in (a, b):
                torch.testing.assert_close(res["packed"], res["full"], rtol=1e-4, atol=1e-5)
    # the fused BitLinear (int8 codes saved, quantized activation recomputed) is the reference's function
    for tp in (tp1, tp2):
        fused, ref = tp["hgrnbit"], tp["hgrnbit-unfused"]
        torch.testing.assert_close(fused["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        for name in fused["grads"]:
            torch.testing.assert_close(fused["grads"][name], ref["grads"][name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"fused vs unfused {name}: {m}")
    assert any("score" in n for n in tp1["subllm"]["grads"]) and any("bypass" in n for n in tp1["subllm"]["grads"])

    # GRIFFIN: per-token norms span the shards, so TP=2 scores every neuron as TP=1 does; each rank then
    # keeps its own top-(k/2), which is TP=1's choice under the same rule (top-k/2 of each contiguous half)
    # (HGRN-Bit: the ternary GLU's compact path, latent and packed: the down's norm spans the shards)
    for key, name in [("tie=False", "griffin"), ("subllm", "griffin"), ("hgrnbit", "griffin"),
                      ("hgrnbit", "griffin-packed")]:
        g1, g2 = tp1[key][name], tp2[key][name]["plain"]
        for s1, s2 in zip(g1["plain"]["scores"], g2["scores"]):
            torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(g1["halves"]["index"], g2["index"]))
        torch.testing.assert_close(g1["halves"]["logits"], g2["logits"], rtol=1e-4, atol=1e-5)
        assert not all(torch.equal(a, b) for a, b in zip(g1["plain"]["index"], g2["index"]))  # documented difference
