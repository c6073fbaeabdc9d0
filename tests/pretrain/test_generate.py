import torch

from pretrain.generate import SamplingConfig, sample_next


def test_greedy_and_nucleus_sampling():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(4, 1)
    assert sample_next(logits, SamplingConfig(temperature=0), gen).tolist() == [1, 1, 1, 1]
    # top_p tiny: only the most likely token survives the nucleus
    assert sample_next(logits, SamplingConfig(temperature=1.0, top_p=1e-3), gen).tolist() == [1, 1, 1, 1]
    # top_p 0.8 keeps exactly {1, 2} (0.46 + 0.43 >= 0.8); sampling never leaves the nucleus
    draws = torch.cat([sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.8), gen) for _ in range(200)])
    assert set(draws.tolist()) == {1, 2}
    # without top-p every token can appear
    draws = torch.cat([sample_next(logits, SamplingConfig(temperature=3.0, top_p=1.0), gen) for _ in range(400)])
    assert set(draws.tolist()) == {0, 1, 2, 3, 4}
