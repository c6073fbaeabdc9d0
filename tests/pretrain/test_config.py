import pytest

from pretrain.config import RunConfig, check_layout, load_config, padded_vocab, parse_overrides
from pretrain.errors import ConfigError
from tests.helpers import TINY_CONFIG


def test_yaml_and_dotted_overrides_are_typed():
    cfg = load_config(TINY_CONFIG, ["model.d_model=96", "training.dtype=bf16", "optimizer.lr=1e-4",
                                    "model.tie_embeddings=false", "optimizer.betas=[0.9, 0.99]"])
    assert cfg.model.d_model == 96 and isinstance(cfg.model.d_model, int)
    assert cfg.training.dtype == "bf16" and cfg.optimizer.lr == 1e-4
    assert cfg.model.tie_embeddings is False and cfg.optimizer.betas == (0.9, 0.99)
    assert cfg.model.structure == "TTTT"  # untouched keys keep the file's value


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(TINY_CONFIG, ["model.vocab_size=512"])
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override, field", [
    (["model.d_modle=64"], "model.d_modle: unknown key"),
    (["trainin.steps=3"], "trainin: unknown key"),
    (["model.n_heads=many"], "model.n_heads"),
    (["parallel.zero_stage=4"], "parallel.zero_stage"),
    (["model.d_model=100", "model.n_heads=3"], "not divisible by n_heads"),
    (["schedule.decay_fraction=1.5"], "schedule.decay_fraction"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(TINY_CONFIG, override)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["model.d_model"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_layout_checks():
    cfg = RunConfig.model_validate({"model": {"n_heads": 6, "d_model": 192, "n_kv_heads": 3},
                                    "parallel": {"tensor": 2}, "training": {"micro_batch_size": 2,
                                                                            "global_batch_size": 8}})
    with pytest.raises(ConfigError, match="n_heads=6 .*|n_kv_heads=3 is not divisible by parallel.tensor=2"):
        check_layout(cfg, world_size=4)
    ok = cfg.model_copy(update={"model": cfg.model.model_copy(update={"n_kv_heads": 6})})
    assert check_layout(ok, world_size=4) == 2  # dp = 4 / tp 2
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        check_layout(ok, world_size=3)
    with pytest.raises(ConfigError, match="global_batch_size=8 is not a multiple"):
        check_layout(ok, world_size=6)  # dp 3: 2 x 3 does not divide 8
    assert padded_vocab(4097, 128) == 4224 and padded_vocab(32000, 128) == 32000
