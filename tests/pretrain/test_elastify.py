"""Flextron's importance permutation (pretrain/elastify.py): the permuted full model is the same function,
its units come out sorted by importance, the scores follow the formula, and `python -m pretrain elastify`
writes a loadable elastic model (and refuses bad input without touching anything). End to end: elastic
continued training from it at TP=2, then a budget's sub-network exported == served from the run."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from parallel.distributed import init_distributed
from pretrain.config import ModelConfig
from pretrain.elastify import calibration_batches, importance, orders, permute_state
from pretrain.models import build_network
from pretrain.models.layers import apply_rotary
from tests.helpers import TINY_CONFIG, cli, tiny_overrides

VOCAB = 128


def build(structure: str, seed: int = 0):
    init_distributed(1)
    cfg = ModelConfig(arch="subllm" if "(" in structure else "llama", structure=structure, d_model=32, n_heads=4,
                      n_kv_heads=2, ffn_hidden=48, vocab_size=VOCAB, seq_len=16, init_std=0.1)
    torch.manual_seed(seed)
    return build_network(cfg).eval()


def token_batches(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (3, 16), generator=g) for _ in range(n)]


@pytest.mark.parametrize("structure", ["TT", "T(T(T)T)T"])
def test_permutation_keeps_the_function_and_sorts_the_units(structure):
    net, batches = build(structure), token_batches()
    scores = importance(net, batches)
    order = orders(scores)
    assert sorted(scores) == list(range(net.cfg.n_blocks))
    assert any(not torch.equal(o["mlp"], torch.arange(48)) for o in order.values())  # a real permutation
    fresh = build(structure, seed=1)
    fresh.load_state_dict(permute_state(net.state_dict(), net.cfg, order))
    with torch.no_grad():
        for x in batches:
            torch.testing.assert_close(fresh(x), net(x), rtol=1e-5, atol=1e-5)
    after = importance(fresh, batches)  # the same data: unit j now carries the j-th largest score
    for layer, acc in scores.items():
        for kind, s in acc.items():
            torch.testing.assert_close(after[layer][kind], s[order[layer][kind]], rtol=1e-6, atol=1e-9)
            assert bool((after[layer][kind].diff() <= 1e-9 * s.abs().max()).all()), (layer, kind)


def test_permute_state_moves_whole_units():
    """Hand-checked layout: head_dim 2, two query heads per group (q/o blocks of 4), three neurons."""
    cfg = ModelConfig(structure="T", d_model=8, n_heads=4, n_kv_heads=2, ffn_hidden=3, vocab_size=VOCAB)
    rows = lambda n: torch.arange(float(n))[:, None].repeat(1, 8)  # noqa: E731  row i holds i
    p = "layers.1."
    state = {p + "attn.q.weight": rows(8), p + "attn.k.weight": rows(4), p + "attn.v.weight": rows(4),
             p + "attn.o.weight": rows(8).T, p + "mlp.gate.weight": rows(3), p + "mlp.up.weight": rows(3),
             p + "mlp.down.weight": rows(3).T, "layers.0.tok.weight": rows(5)}
    out = permute_state(state, cfg, {0: {"mlp": torch.tensor([2, 0, 1]), "heads": torch.tensor([1, 0])}})
    assert out[p + "attn.q.weight"][:, 0].tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert out[p + "attn.o.weight"][0].tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert out[p + "attn.k.weight"][:, 0].tolist() == out[p + "attn.v.weight"][:, 0].tolist() == [2, 3, 0, 1]
    assert out[p + "mlp.gate.weight"][:, 0].tolist() == out[p + "mlp.up.weight"][:, 0].tolist() == [2, 0, 1]
    assert out[p + "mlp.down.weight"][0].tolist() == [2, 0, 1]
    assert out["layers.0.tok.weight"] is state["layers.0.tok.weight"]


def test_importance_follows_the_formula():
    """Recompute both scores from each block's inputs: z by hand, attention with an explicit causal
    softmax and repeat_interleave GQA (query head h reads KV head h // r, so group g = heads g*r..)."""
    net, batches = build("TT"), token_batches()
    seen = {}
    for block in net.blocks():  # (x, rope) into the attention, x into the SwiGLU
        i = block.layer_id
        block.attn.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(("attn", i), []).append(a[:2]))
        block.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(("mlp", i), []).append(a[0]))
    scores = importance(net, batches)
    for block in net.blocks():
        a, mlp, i = block.attn, block.mlp, block.layer_id
        heads = torch.zeros(a.kv_heads, dtype=torch.float64)
        for x, rope in seen[("attn", i)]:
            b, s, _ = x.shape
            q = (x @ a.q.weight.T).view(b, s, a.heads, a.head_dim).transpose(1, 2)
            k = (x @ a.k.weight.T).view(b, s, a.kv_heads, a.head_dim).transpose(1, 2)
            v = (x @ a.v.weight.T).view(b, s, a.kv_heads, a.head_dim).transpose(1, 2)
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            r = a.heads // a.kv_heads
            k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
            att = (q @ k.transpose(-1, -2)) / a.head_dim ** 0.5
            att = att.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
            per_head = (att @ v).norm(dim=-1).sum(dim=(0, 2)).double()  # [heads]
            heads += per_head.view(a.kv_heads, r).sum(1)
        neurons = sum((F.silu(x @ mlp.gate.weight.T) * (x @ mlp.up.weight.T)).abs().sum(dim=(0, 1)).double()
                      for x in seen[("mlp", i)])
        torch.testing.assert_close(scores[i]["heads"], heads, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scores[i]["mlp"], neurons, rtol=1e-5, atol=1e-6)


def test_cli_flextron_end_to_end(tiny_data, tmp_path, capsys):
    from pretrain.__main__ import main
    from pretrain.generate import Generator

    run = tmp_path / "run"
    over = tiny_overrides(tiny_data, run, **{"training.steps": 4, "checkpoint.every": 4, "training.eval_every": 0,
                                             "model.n_kv_heads": 4})
    res = cli("train", "--config", TINY_CONFIG, *over, "tracking.enabled=false")
    assert res.returncode == 0, res.stdout[-3000:]
    out = tmp_path / "elastic"
    # the tiny widths (64 neurons, 2 groups) need a finer grid than the defaults
    sets = ["--set", "neuron_granularity=16", "ffn_fractions=[1.0,0.5]", "head_fractions=[1.0,0.5]"]
    args = ["--calib-data", str(tiny_data), "--calib-batches", "2", "--batch-size", "4", *sets]
    res = cli("elastify", "--checkpoint", str(run), "--out", str(out), *args)
    assert res.returncode == 0 and "verified" in res.stdout, res.stdout[-3000:]
    meta = json.loads((out / "frugal.json").read_text())
    elastic = meta["config"]["model"]["elastic"]
    assert meta["format"] == "weights" and elastic["enabled"] and elastic["ffn_fractions"] == [1.0, 0.5]
    assert meta["elastify"]["tokens"] == 2 * 4 * 32 and meta["elastify"]["max_logit_diff"] < 1e-3
    res = cli("generate", "--checkpoint", str(out), "--prompt", "def", "--max-new-tokens", "4")
    assert res.returncode == 0 and "--- sample 0 ---" in res.stdout, res.stdout[-3000:]

    # in this process: the saved model is the source's function with its units in importance order
    src, new = Generator(run, dtype=torch.float32), Generator(out, dtype=torch.float32)
    assert new.cfg.model.vocab_size == src.cfg.model.vocab_size
    calib = calibration_batches(tiny_data, src.cfg.model, 2, 4)
    torch.testing.assert_close(new.logits(calib[0]), src.logits(calib[0]), rtol=1e-4, atol=1e-4)
    for acc in importance(new.model, calib).values():
        assert all(bool((s.diff() <= 1e-9 * s.max()).all()) for s in acc.values())

    # bad input: exit 2, one clear line, nothing written or replaced
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["elastify", "--checkpoint", str(run), "--out", str(out), *args]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert main(["elastify", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o2"), *args]) == 2
    assert "no checkpoint" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    assert main(["elastify", "--checkpoint", str(run), "--out", str(tmp_path / "o3"), *args[:-4]]) == 2
    assert "repeated widths" in capsys.readouterr().err and not (tmp_path / "o3").exists()

    # elastic continued training from it at TP=2 (distilled from the elastified model), then the budget's
    # sub-network: exported in one process from the TP=2 checkpoint == served by generate --budget
    el, sub = tmp_path / "el", tmp_path / "sub"
    elastic = ["model.elastic.enabled=true", "model.elastic.neuron_granularity=16", "model.elastic.budgets=[0.5]",
               "model.elastic.ffn_fractions=[1.0,0.5]", "model.elastic.head_fractions=[1.0,0.5]"]
    res = cli("train", "--config", TINY_CONFIG, *tiny_overrides(tiny_data, el, **{
        "training.steps": 3, "checkpoint.every": 3, "training.eval_every": 3, "model.n_kv_heads": 4,
        "parallel.tensor": 2}), *elastic, "training.elastic.enabled=true", f"checkpoint.init_from={out}",
        "tracking.enabled=false", nproc=2)
    assert res.returncode == 0, res.stdout[-3000:]
    rows = [json.loads(line) for line in (el / "metrics.jsonl").read_text().splitlines()]
    assert "val_loss_budget_0.5" in rows[-1] and any("elastic/kl" in r for r in rows)
    # the same at PP=2 (the router on stage 0, the teacher stage by stage): the same steps, budgets,
    # losses and metrics, logged from the last stage's objective
    pp = tmp_path / "el_pp"
    res = cli("train", "--config", TINY_CONFIG, *tiny_overrides(tiny_data, pp, **{
        "training.steps": 3, "checkpoint.every": 3, "training.eval_every": 3, "model.n_kv_heads": 4,
        "parallel.pipeline": 2}), *elastic, "training.elastic.enabled=true", f"checkpoint.init_from={out}",
        "tracking.enabled=false", nproc=2)
    assert res.returncode == 0 and "x pp 2" in res.stdout, res.stdout[-3000:]
    pp_rows = [json.loads(line) for line in (pp / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in pp_rows] == [sorted(r) for r in rows]
    for a, b in zip(pp_rows, rows):
        for key in a:
            if key.startswith(("loss", "val_loss", "elastic/", "grad_norm", "lr")):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    pp_sub = tmp_path / "pp_sub"  # the stages' layer files and the router merged for export
    res = cli("export", "--checkpoint", str(pp), "--budget", "0.5", "--out", str(pp_sub))
    assert res.returncode == 0 and "MLP widths [32, 32]" in res.stdout, res.stdout[-3000:]
    res = cli("export", "--checkpoint", str(el), "--budget", "0.5", "--out", str(sub))
    assert res.returncode == 0 and "MLP widths [32, 32]" in res.stdout, res.stdout[-3000:]
    x = calib[0][:2]
    served, exported = Generator(el, budget=0.5, dtype=torch.float32), Generator(sub, dtype=torch.float32)
    torch.testing.assert_close(served.logits(x), exported.logits(x), rtol=1e-5, atol=1e-5)
    assert exported.cfg.model.ffn_hidden_layers == [32, 32] and exported.cfg.model.kv_heads_layers == [2, 2]
    assert main(["export", "--checkpoint", str(el), "--budget", "0.3", "--out", str(tmp_path / "s2")]) == 2
    assert "not one the router was trained for" in capsys.readouterr().err and not (tmp_path / "s2").exists()
    assert main(["generate", "--checkpoint", str(el), "--prompt", "def", "--budget", "auto"]) == 2
    assert "adaptive router" in capsys.readouterr().err
