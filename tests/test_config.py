import pytest

from longtail.config import apply_overrides, config_from_dict, load_config
from longtail.errors import ConfigError


def test_defaults_are_the_ldam_recipe():
    cfg = config_from_dict({})
    t = cfg.train
    assert (t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs) == (0.1, 0.9, 2e-4, 128, 200)
    assert (t.warmup_epochs, t.milestones, t.lr_decay) == (5, [160, 180], 0.01)
    assert cfg.model.name == "resnet32" and cfg.loss.name == "ce"


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr' \(did you mean 'lr'\?\)"):
        config_from_dict({"train": {"lrr": 0.1}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="'train.epochs' must be int, got str"):
        config_from_dict({"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match="'train.lr' must be float, got bool"):
        config_from_dict({"train": {"lr": True}})


def test_int_accepted_for_float():
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0


@pytest.mark.parametrize("ratio", [0.5, -1, 0.999])
def test_imbalance_ratio_below_one(ratio):
    with pytest.raises(ConfigError, match="data.imbalance_ratio' must be a number >= 1"):
        config_from_dict({"data": {"imbalance_ratio": ratio}})


def test_overrides_parse_yaml_values():
    values = apply_overrides({}, ["train.lr=0.05", "train.milestones=[3, 4]", "data.root=null", "loss.params.beta=0.9"])
    assert values == {"train": {"lr": 0.05, "milestones": [3, 4]}, "data": {"root": None},
                      "loss": {"params": {"beta": 0.9}}}


def test_bad_override():
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=2"])


def test_load_config_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 3\n")
    assert load_config(p, ["train.batch_size=7"]).train.batch_size == 7
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    p.write_text("train: {epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_unknown_choice_suggests():
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        config_from_dict({"train": {"lr_schedule": "cosin"}})
    with pytest.raises(ConfigError, match="data.source"):
        config_from_dict({"data": {"source": "cifar1000"}})


def test_exponent_floats_that_yaml_reads_as_strings():
    # PyYAML reads 1e-3 (no dot) as a string; where a float is expected it is converted
    assert config_from_dict({"train": {"lr": "1e-3"}}).train.lr == 0.001
    assert load_config(None, ["train.weight_decay=5e-4"]).train.weight_decay == 0.0005
    with pytest.raises(ConfigError, match="must be float, got str"):
        config_from_dict({"train": {"lr": "fast"}})
