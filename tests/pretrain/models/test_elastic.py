"""Flextron in one process: a sub-network inside the elastic model == the exported plain model;
rows routed to different widths == each row alone; sliced sub-networks are smaller; the router's
sampling is seeded by the micro-batch; the budget loss drives the realized cost to the target;
the vocab-parallel KL is the KL."""
import pytest
import torch
import torch.nn.functional as F

from parallel.distributed import init_distributed
from pretrain.config import ModelConfig
from pretrain.models import build_network
from pretrain.models.elastic import subnetwork


def elastic_cfg(**kw) -> ModelConfig:
    e = dict(enabled=True, neuron_granularity=8, ffn_fractions=[1.0, 0.75, 0.5, 0.25], head_fractions=[1.0, 0.5],
             budgets=[0.25, 0.5, 0.75])
    e.update(kw.pop("elastic", {}))
    base = dict(d_model=64, n_heads=8, n_kv_heads=4, ffn_hidden=96, vocab_size=256, seq_len=16, structure="TTT",
                elastic=e)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def world():
    init_distributed(1)


def tokens(b=3, s=16, seed=1):
    return torch.randint(1, 256, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", [{}, dict(arch="subllm", structure="T(T(T)T)T", init_std=0.1)], ids=["llama", "subllm"])
def test_budget_inside_elastic_model_equals_export(kw):
    torch.manual_seed(0)
    net = build_network(elastic_cfg(**kw)).eval()
    x = tokens()
    costs = []
    with torch.no_grad():
        full = net(x)
        for budget in (0.25, 0.5, 0.75):
            inside = net(x, elastic=net.elastic_state(3, budget))
            mi, hi = net.router.static_choice(budget)
            e = net.cfg.elastic
            cfg, state = subnetwork(net.cfg, [e.ffn_widths(96)[i] for i in mi], [e.head_groups(4)[i] for i in hi],
                                    net.state_dict())
            sub = build_network(cfg)
            sub.load_state_dict(state)
            torch.testing.assert_close(sub(x), inside, rtol=1e-5, atol=1e-5)
            assert (inside - full).abs().max() > 1e-3  # a real sub-network, not the full model
            n_sub, n_full = (sum(p.numel() for n, p in m.named_parameters() if "router" not in n) for m in (sub, net))
            assert n_sub < n_full
            costs.append(net.router.cost.predict(mi, hi))
    assert costs == sorted(costs) and len(set(costs)) == 3  # the untrained router's prior follows the budget


def test_rows_routed_apart_equal_each_row_alone():
    """An adaptive router gives rows different widths; the grouped forward equals each row alone."""
    torch.manual_seed(0)
    net = build_network(elastic_cfg(elastic=dict(router="adaptive", router_after=1))).eval()
    out = net.router.adapt[-1]
    torch.nn.init.normal_(out.weight, std=50.0)  # a trained-looking router: choices depend on the input
    x = tokens(b=6)
    with torch.no_grad():
        state = net.elastic_state(6, 0.5)
        batched = net(x, elastic=state)
        p = net.payload(x)
        for layer in net.layers[:net.router_at + 1]:
            p = layer(p)
        chosen = net.router(p._replace(elastic=state)).elastic
        assert len({tuple(r) for r in chosen.mlp.tolist()}) > 1, "the test needs rows with different widths"
        for i in range(6):
            alone = net(x[i:i + 1], elastic=net.elastic_state(1, 0.5))
            torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_gumbel_sampling_follows_the_seed_and_reaches_the_router():
    torch.manual_seed(0)
    net = build_network(elastic_cfg())
    x, y = tokens(), tokens(seed=2)

    def choice(seed):
        state = net.elastic_state(3, 0.5, torch.Generator().manual_seed(seed))
        p = net.payload(x)
        return net.router(net.layers[0](p)._replace(elastic=state)).elastic

    a, b = choice(7), choice(7)
    assert torch.equal(a.mlp, b.mlp) and torch.equal(a.heads, b.heads)
    assert any(not torch.equal(choice(7).mlp, choice(s).mlp) for s in range(8, 20))
    loss = net(x, y, elastic=net.elastic_state(3, 0.5, torch.Generator().manual_seed(7)))
    loss.backward()
    assert net.router.mlp_logits.grad.abs().sum() > 0 and net.router.heads_logits.grad.abs().sum() > 0


def test_budget_loss_drives_the_cost_to_the_target():
    """Start from a router that prefers the full widths; training on CE + budget loss moves the
    realized cost of the sampled sub-networks within the tolerance of the 0.5 budget."""
    torch.manual_seed(0)
    net = build_network(elastic_cfg())
    with torch.no_grad():
        net.router.mlp_logits.copy_(torch.linspace(2, -2, 4).expand_as(net.router.mlp_logits))
        net.router.heads_logits.copy_(torch.tensor([2.0, -2.0]).expand_as(net.router.heads_logits))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    x, y = tokens(), tokens(seed=2)
    ratios = []
    for step in range(60):
        loss = net(x, y, elastic=net.elastic_state(3, 0.5, torch.Generator().manual_seed(step)))
        ratios.append(net.router.cost_ratio.item())
        (loss + 5.0 * net.router.budget_loss).backward()
        opt.step()
        opt.zero_grad()
    assert ratios[0] > 1.5  # starts near the full model (ratio 2 = twice the budget)
    assert sum(ratios[-10:]) / 10 < 1.3, ratios[-10:]  # sampled sub-networks: explored around the target
    mi, hi = net.router.static_choice(0.5)  # the router's own pick (argmax) meets the budget
    assert abs(net.router.cost.predict(mi, hi) / net.router.cost.full / 0.5 - 1) <= 0.1


def test_vocab_parallel_kl_is_the_kl():
    from parallel.tensor_parallel import vocab_parallel_cross_entropy, vocab_parallel_kl

    logits = torch.randn(2, 5, 40)
    kept = logits.clone()
    vocab_parallel_cross_entropy(logits, torch.randint(0, 40, (2, 5)))  # megatron's works in place: not on ours
    assert torch.equal(logits, kept)
    assert vocab_parallel_kl(logits, kept).abs().max() < 1e-6

    s, t = torch.randn(2, 5, 40), torch.randn(2, 5, 40)
    for temp in (1.0, 2.0):
        expect = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                          reduction="none").sum(-1)
        torch.testing.assert_close(vocab_parallel_kl(s, t, temp), expect, rtol=1e-5, atol=1e-6)


def test_latency_table_drives_the_cost_model(tmp_path):
    """elastic-profile's table (measured here on the CPU) becomes the router's cost; a table for
    other widths is refused by name."""
    import json

    from pretrain.elastic_profile import profile, write
    from pretrain.errors import ConfigError
    from pretrain.models.router import CostModel

    cfg = elastic_cfg()
    table = profile(cfg, batch=2, context=8, repeats=2)
    assert table["mlp_widths"] == [96, 72, 48, 24] and table["head_groups"] == [4, 2]
    assert len(table["mlp_ms"]) == 3 and all(t > 0 for t in table["mlp_ms"][0] + table["attn_ms"][0])
    path = write(table, tmp_path / "lat.json")
    lat = elastic_cfg(elastic=dict(cost="latency", latency_table=str(path)))
    cost = CostModel(lat)
    assert cost.unit == "ms" and cost.full == pytest.approx(table["full_ms"])
    assert cost.predict([1, 1, 1], [0, 0, 0]) == pytest.approx(table["fixed_ms"] + 3 * (table["mlp_ms"][0][1]
                                                                                      + table["attn_ms"][0][0]))
    table["mlp_widths"] = [96, 48]
    path.write_text(json.dumps(table))
    with pytest.raises(ConfigError, match="measured for widths"):
        CostModel(lat)
