import pytest

from pretrain.config import ModelConfig
from pretrain.errors import ConfigError
from pretrain.models.structure import parse_structure


def test_nested_levels_parse_in_order():
    items = parse_structure("TTTTT(TTTTT(TTTT)TTTTT)TTTTT")
    assert [(i.kind, i.index, i.depth) for i in items if i.kind != "block"] == [
        ("open", 0, 0), ("open", 1, 1), ("close", 1, 1), ("close", 0, 0)]
    blocks = [i for i in items if i.kind == "block"]
    assert [b.index for b in blocks] == list(range(24))
    assert [b.depth for b in blocks] == [0] * 5 + [1] * 5 + [2] * 4 + [1] * 5 + [0] * 5


@pytest.mark.parametrize("structure, message", [
    ("TT(TT", "opened at position 2 is never closed"),
    ("TT)T", "')' at position 2 closes no level"),
    ("T()T", "opened at position 1 holds no block"),
    ("T((T))(T", "opened at position 6 is never closed"),
    ("TXT", "unknown block type 'X' at position 1"),
    ("", "empty"),
    ("()", "holds no block"),
])
def test_invalid_structures_name_the_problem(structure, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_structure(structure)


def test_model_config_checks_levels_and_ratios():
    cfg = ModelConfig(arch="subllm", structure="T(T(T)T)T", subsample={"keep_ratios": [0.5, 0.8]})
    assert cfg.subsample.ratio(0) == 0.5 and cfg.subsample.ratio(1) == 0.8 and cfg.n_blocks == 5
    with pytest.raises(ValueError, match="keep_ratios has 1 entries, the structure has 2 levels"):
        ModelConfig(arch="subllm", structure="T(T(T)T)T", subsample={"keep_ratios": [0.5]})
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
            ModelConfig(arch="subllm", structure="T(T)T", subsample={"keep_ratio": bad})
    assert ModelConfig(arch="subllm", structure="T(T)T", subsample={"keep_ratio": 1.0}).subsample.keep_ratio == 1.0
    with pytest.raises(ValueError, match="needs arch: subllm"):
        ModelConfig(structure="T(T)T")
    with pytest.raises(ValueError, match="is never closed"):
        ModelConfig(arch="subllm", structure="T(T")
