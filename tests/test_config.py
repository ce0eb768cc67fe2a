"""Strict config loading: unknown/duplicate keys, types, ranges, dotted overrides."""
import pytest

from fasttrain.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, parse_overrides


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_papers_recipe():
    cfg = config_from_dict({})
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 5e-4)
    assert (cfg.optim.lookahead_k, cfg.optim.lookahead_alpha, cfg.optim.clip_value) == (5, 0.5, 0.1)
    assert cfg.model.blocks == [4, 4, 3] and cfg.train.batch_size == 128 and cfg.train.epochs == 200


def test_unknown_key_names_it_and_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "optim:\n  learning_rate: 0.1\n"))
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "lr" in msg and "momentum" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optimizer'.*data, model, optim, train, output"):
        load_config(write(tmp_path, "optimizer:\n  lr: 0.1\n"))


def test_duplicate_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="duplicate key 'lr'.*line 2.*line 3"):
        load_config(write(tmp_path, "optim:\n  lr: 0.1\n  lr: 0.2\n"))


@pytest.mark.parametrize("text, key, expected", [
    ("train:\n  epochs: ten\n", "train.epochs", "int"),
    ("train:\n  epochs: 2.5\n", "train.epochs", "int"),
    ("optim:\n  nesterov: 1\n", "optim.nesterov", "bool"),
    ("optim:\n  lr: true\n", "optim.lr", "float"),
    ("model:\n  blocks: 4\n", "model.blocks", "list of int"),
    ("model:\n  blocks: [4, four, 3]\n", "model.blocks[1]", "int"),
    ("data:\n  dir: 3\n", "data.dir", "str or null"),
    ("model: 3\n", "model", "mapping"),
])
def test_wrong_type_names_key_and_type(tmp_path, text, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert key in str(e.value) and expected in str(e.value)


def test_int_is_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("override, key", [
    ("--optim.lr=-0.1", "optim.lr"),
    ("--train.epochs=0", "train.epochs"),
    ("--data.crop_padding=40", "data.crop_padding"),
    ("--data.cutout=33", "data.cutout"),
    ("--data.cutout=-1", "data.cutout"),
    ("--data.flip_mode=sometimes", "data.flip_mode"),
    ("--model.pool_kernel=16", "model.pool_kernel"),
    ("--model.blocks=[2,2]", "model.blocks"),
    ("--optim.schedule=step", "optim.schedule"),
    ("--train.precision=fp8", "train.precision"),
    ("--data.std=[0.2,0,0.2]", "data.std"),
    ("--optim.lookahead_alpha=0", "optim.lookahead_alpha"),
])
def test_out_of_range_values(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config("configs/seed.yaml", ["--optim.lr", "0.2", "--train.epochs=5",
                                            "--model.blocks", "[2,2,2]", "--optim.nesterov", "true",
                                            "--data.dir", "/x/y"])
    assert cfg.optim.lr == 0.2 and cfg.train.epochs == 5 and cfg.model.blocks == [2, 2, 2]
    assert cfg.optim.nesterov is True and cfg.data.dir == "/x/y"
    assert cfg.name == "seed"


def test_override_errors():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--optim.lr"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_overrides(["--optim.lr", "1", "--optim.lr", "2"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["lr=3"])
    with pytest.raises(ConfigError, match="unknown key 'lr'"):
        load_config(None, ["--lr", "3"])
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        load_config(None, ["--optim.lrr", "1"])


def test_round_trip_through_dict():
    cfg = load_config("configs/best.yaml")
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg and isinstance(again, Config)


def test_yaml_cannot_construct_objects(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n"))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


@pytest.mark.parametrize("name", ["seed", "resnet18", "best", "smoke"])
def test_shipped_configs_load(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.name == name
