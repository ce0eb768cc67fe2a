"""Strict config loading: unknown/duplicate keys, types, ranges, dotted overrides."""
import functools
import math
import re

import pytest
import torch
import yaml

from fasttrain import cli
from fasttrain.config import (CIFAR10_TEST_IMAGES, CIFAR10_TRAIN_IMAGES, CLI_OPTIONS, Config, ConfigError,
                              config_changes, config_from_dict, config_to_dict, load_config, parse_overrides,
                              parse_yaml, save_config)
from fasttrain.optim import build_optimizer, clip_gradients


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_papers_recipe():
    cfg = config_from_dict({})
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 5e-4)
    assert (cfg.optim.lookahead_k, cfg.optim.lookahead_alpha, cfg.optim.clip_value) == (5, 0.5, 0.1)
    assert cfg.model.blocks == [4, 4, 3] and cfg.train.batch_size == 128 and cfg.train.epochs == 200


def test_every_key_is_documented_where_it_is_declared():
    """The README's promise, "every key is documented (with units) in fasttrain/config.py": each field of a
    config section carries a comment on its line (a new key without one fails here)."""
    import ast
    import inspect

    from fasttrain import config as config_module

    lines = inspect.getsource(config_module).splitlines()
    undocumented = []
    for node in ast.parse("\n".join(lines)).body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and node.name != "Config":
            fields = [f for f in node.body if isinstance(f, ast.AnnAssign)]
            assert fields, node.name
            undocumented += [f"{node.name}.{f.target.id}" for f in fields if "#" not in lines[f.lineno - 1]]
    assert undocumented == []


def test_unknown_key_names_it_and_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "optim:\n  learning_rate: 0.1\n"))
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "lr" in msg and "momentum" in msg
    assert "did you mean" not in msg  # nothing close enough to guess


@pytest.mark.parametrize("args, guess", [
    (["--train.epoch", "2"], "train.epochs"),
    (["--train.batch-size", "64"], "train.batch_size"),  # the dash other tools write
    (["--trian.epochs", "2"], "train"),
    (["--optim", "{lrr: 0.1}"], "optim.lr"),
])
def test_an_unknown_key_close_to_a_real_one_names_it(args, guess):
    with pytest.raises(ConfigError, match=f"unknown key .*; did you mean '{re.escape(guess)}'\\? valid keys in"):
        load_config(None, args)


@pytest.mark.parametrize("args", [["--model.blocks", "[2,", "2,", "2]"], ["--train", "{epochs:", "2}"]])
def test_an_unquoted_list_split_by_the_shell_says_to_quote_it(args):
    message = f"--{re.escape(args[0][2:])} '.*' is cut short: the shell splits .* quote it"
    with pytest.raises(ConfigError, match=message):
        parse_overrides(args)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optimizer'.*data, model, optim, train, output"):
        load_config(write(tmp_path, "optimizer:\n  lr: 0.1\n"))


@pytest.mark.parametrize("text, key, lines", [
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", "optim.lr", (2, 3)),  # named by its full dotted key
    ("train:\n  epochs: 2\noptim:\n  lr: 0.1\ntrain:\n  seed: 1\n", "train", (1, 5)),
    ("x: &m {se: true}\nmodel:\n  blocks: [1, 1, 1]\n  se: true\n  se: false\n", "model.se", (4, 5)),
    ("x: &m {lr: 0.1, lr: 0.2}\noptim: *m\n", "x.lr", (1, 1)),  # a shared mapping: named where it is written
])
def test_duplicate_key_is_an_error(tmp_path, text, key, lines):
    message = f"duplicate key '{re.escape(key)}' \\(line {lines[0]} and line {lines[1]}\\)"
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


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
    # a flag whose value was forgotten does not take the next flag as it (output.dir was '--data.dir=/d')
    for args in (["--output.dir", "--data.dir=/d"], ["--name", "--train.epochs", "3"]):
        with pytest.raises(ConfigError, match=rf"{args[0]} needs a value, e.g. {args[0]} 0.1 \({args[1]} is the next "
                                              rf"flag; a value that starts with -- goes as {args[0]}=VALUE\)"):
            parse_overrides(args)
    assert parse_overrides(["--name=--odd", "--optim.lr", "-0.5"]) == {"name": "--odd", "optim.lr": -0.5}
    with pytest.raises(ConfigError, match="given twice"):
        parse_overrides(["--optim.lr", "1", "--optim.lr", "2"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["lr=3"])
    with pytest.raises(ConfigError, match=r"unknown option --lr: did you mean --optim\.lr\?"):
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


def _laughs(levels):
    """The "billion laughs": each level a list of nine aliases of the one before, 9^levels strings."""
    lines = ['l0: &l0 ["lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\ndata:\n  loader: *l{levels}\n"


def test_yaml_alias_expansion_is_bounded(tmp_path):
    """A few lines of aliases can stand for billions of values, which a type message's repr (or any walk)
    would expand: refused from the node graph, before anything is built. Small aliases still work."""
    with pytest.raises(ConfigError, match="expands to over 100,000 values"):
        load_config(write(tmp_path, _laughs(10)))  # 3.5e9 strings: without the bound, hours and all memory
    with pytest.raises(ConfigError, match="expands to over 100,000 values"):
        load_config(write(tmp_path, _laughs(5)))  # ~270,000 values: the bound is the one the message names
    with pytest.raises(ConfigError, match="unknown key 'l0'"):
        load_config(write(tmp_path, _laughs(4)))  # ~30,000: under it, read on to its first mistake
    with pytest.raises(ConfigError, match="a recursive structure"):
        load_config(write(tmp_path, "data: &d\n  loader: [*d]\n"))
    cfg = load_config(write(tmp_path, "model:\n  blocks: &b [1, 1, 1]\n  conv_kernel: *b\n"))
    assert cfg.model.blocks == cfg.model.conv_kernel == [1, 1, 1]
    with pytest.raises(ConfigError, match="data.loader") as refused:  # under the bound: the type error
        load_config(write(tmp_path, "data:\n  loader: [&a [1, 2, 3], *a, *a]\n"))
    assert "\n" not in str(refused.value)


def test_a_config_file_without_a_name_is_named_after_the_file(tmp_path):
    """The run folder (runs/<name>-<time>) and the summary carry it; a name in the file wins."""
    assert load_config(write(tmp_path, "train:\n  epochs: 2\n")).name == "c"
    assert load_config(write(tmp_path, "name: mine\n")).name == "mine"


@pytest.mark.parametrize("text, args, message", [
    ("optim: 3\n", ["--optim.lr", "0.2"], r"--optim\.lr: 'optim' is not a section"),
    ("name: x\n", ["--name.first", "1"], r"--name\.first: 'name' is not a section"),
    ("optim:\n  ? [lr, momentum]\n  : 0.1\n", [], r"line 2: a key must be a plain value, not a list"),
])
def test_a_file_that_cannot_take_the_overrides_is_a_config_error(tmp_path, text, args, message):
    """Not a TypeError from deep inside the loader: a ConfigError naming the key and the line."""
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), args)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


@pytest.mark.parametrize("name", ["seed", "resnet18", "best", "smoke"])
def test_shipped_configs_load(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.name == name


# ------------------------------------------------------------------------------------ YAML 1.2 floats
@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("5E-4", 5e-4), ("-2e+1", -20.0), ("2e-1", 0.2), ("1.0e3", 1000.0), ("1.e3", 1000.0),
    ("-.5", -0.5), ("+.5", 0.5), ("007e1", 70.0),
])
def test_exponent_floats_are_numbers(text, value):
    """YAML 1.1 (PyYAML's default) leaves these strings; the loader reads them as YAML 1.2 does."""
    parsed = parse_overrides(["--optim.lr", text])["optim.lr"]
    assert isinstance(parsed, float) and parsed == value


@pytest.mark.parametrize("text, value", [
    ("10", 10), ("-3", -3), ("1_000", 1000), ("0x1F", 31), ("1.5", 1.5), (".5", 0.5), ("1.0e-3", 1e-3),
    (".inf", math.inf), ("1e", "1e"), ("e5", "e5"), ("1e3.5", "1e3.5"), ("1 e3", "1 e3"), ("--1e3", "--1e3"),
])
def test_what_yaml_1_1_already_read_reads_the_same(text, value):
    parsed = parse_yaml(text)
    assert parsed == value and type(parsed) is type(value) and parsed == yaml.safe_load(text)


def test_exponent_floats_on_the_command_line_and_in_a_file(tmp_path):
    cfg = load_config("configs/smoke.yaml", ["--optim.lr", "1e-3", "--optim.weight_decay=5E-4"])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-3, 5e-4)
    cfg = load_config(write(tmp_path, "optim:\n  lr: 2e-1\n  eps: 1E-8\n  betas: [.9, 999e-3]\n"))
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.betas) == (0.2, 1e-8, [0.9, 0.999])
    with pytest.raises(ConfigError, match="train.epochs: expected int, got 1000.0"):  # an int field stays int
        load_config(None, ["--train.epochs", "1e3"])


@pytest.mark.parametrize("text", ["1e5", "1e-3", "-.5", "5E-4", "1.0e3", "10", "0x1F", "1_000", ".inf", "yes"])
def test_strings_that_read_as_numbers_keep_their_text(tmp_path, text):
    """A name or a path typed like a number stays the string typed, on the command line and through
    the run's saved config.yaml (written with the quoting the YAML 1.2 floats need)."""
    cfg = load_config("configs/smoke.yaml", ["--name", text, "--output.dir", text, "--data.dir", text])
    assert (cfg.name, cfg.output.dir, cfg.data.dir) == (text, text, text)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert (again.name, again.output.dir, again.data.dir) == (text, text, text) and again == cfg


@pytest.mark.parametrize("flag, text", [
    ("--output.dir", "/tmp/x/run #2"), ("--name", "exp #3"), ("--data.dir", "data #1"), ("--name", "a: b"),
    ("--name", "[x]"), ("--name", "null"), ("--output.dir", "- x"),
])
def test_a_string_keys_value_is_taken_as_typed(tmp_path, flag, text):
    """YAML cut "run #2" at the comment, and a name like "a: b" was a mapping: a string key now takes the
    command line's text as it is, through the saved config.yaml too."""
    cfg = load_config("configs/smoke.yaml", [flag, text])
    assert functools.reduce(getattr, flag[2:].split("."), cfg) == text
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_a_quoted_string_is_read_as_yaml():
    """benchmarks/recipe_verdict.py writes a string override quoted (--train.tta="flip_shift")."""
    assert parse_overrides(['--train.tta="flip_shift"', "--name", "'exp #3'", "--output.dir", '"null"']) == {
        "train.tta": "flip_shift", "name": "exp #3", "output.dir": "null"}
    assert parse_overrides(["--data.dir", "null", "--output.dir", "~"]) == {"data.dir": None, "output.dir": None}


@pytest.mark.parametrize("key, text, message", [
    ("train.epochs", "1:30", r"train\.epochs: expected int, got '1:30' \(str\)"),
    ("optim.lr", "1:30", r"optim\.lr: expected float, got '1:30' \(str\)"),
    ("optim.lr", "-1:30.5", r"optim\.lr: expected float, got '-1:30\.5' \(str\)"),
    ("train.compile", "yes", r"train\.compile: expected bool, got 'yes' \(str\): use true or false"),
    ("train.compile", "on", r"train\.compile: expected bool, got 'on' \(str\): use true or false"),
    ("optim.nesterov", "Off", r"optim\.nesterov: expected bool, got 'Off' \(str\): use true or false"),
    ("data.flip", "NO", r"data\.flip: expected bool, got 'NO' \(str\): use true or false"),
    ("train.epochs", "010", r"train\.epochs: expected int, got '010' \(str\)"),  # 1.1: the octal 8
    ("train.seed", "+010", r"train\.seed: expected int, got '\+010' \(str\)"),  # signed: the octal 8 too
])
def test_yaml_1_1_base_60_numbers_and_yes_no_bools_are_refused(tmp_path, key, text, message):
    """YAML 1.1 read 1:30 as 90 and yes/on as true; YAML 1.2 reads them as strings, so a number or a bool
    key refuses them, the same on the command line, in a section mapping and in a file."""
    section, name = key.split(".")
    for load in (lambda: load_config(None, [f"--{key}", text]),
                 lambda: load_config(None, [f"--{section}", f"{{{name}: {text}}}"]),
                 lambda: load_config(write(tmp_path, f"{section}:\n  {name}: {text}\n"))):
        with pytest.raises(ConfigError, match=message):
            load()


def test_yes_and_base_60_look_alikes_are_strings_in_a_file(tmp_path):
    assert parse_yaml("[yes, on, 1:30, -1:30.5, true, FALSE]") == ["yes", "on", "1:30", "-1:30.5", True, False]
    assert parse_yaml("[010, 0, 10, 0x1F, 0.5, 1_000]") == ["010", 0, 10, 31, 0.5, 1000]
    assert load_config(write(tmp_path, "name: 1:30\noutput:\n  dir: yes\n")).output.dir == "yes"
    assert load_config(write(tmp_path, "name: 1:30\n")).name == "1:30"
    # a date is YAML 1.1's timestamp, not 1.2's: a name typed as a date is that text
    assert parse_yaml("[2024-01-15, 2001-12-14t21:59:43.10-05:00]") == ["2024-01-15", "2001-12-14t21:59:43.10-05:00"]
    assert load_config(write(tmp_path, "name: 2024-01-15\n")).name == "2024-01-15"


@pytest.mark.parametrize("key", ["name", "data.dir", "output.dir"])
def test_a_nul_in_a_folder_name_is_refused_when_the_config_loads(tmp_path, key):
    """YAML's "\\0" is a NUL, which no path may hold: refused as the config loads, not a ValueError
    traceback from mkdir after start-up (a --dry-run passed it)."""
    section, _, leaf = key.rpartition(".")
    text = f'{section}:\n  {leaf}: "runs/a\\0b"\n' if section else f'{leaf}: "runs/a\\0b"\n'
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} = 'runs/a\\x00b' is out of range: no NUL character"):
        load_config(write(tmp_path, text))


def test_a_yaml_merge_key_is_refused_by_name(tmp_path):
    """YAML 1.1's `<<` (1.2 has none) failed by accident, in PyYAML's words ("could not determine a
    constructor for the tag ...merge"); now one line that says what to do."""
    with pytest.raises(ConfigError, match=r"c\.yaml: line 2: YAML merge keys \(<<\) are not read: write the keys out"):
        load_config(write(tmp_path, "train:\n  <<: {epochs: 3}\n"))
    with pytest.raises(ConfigError, match=r"line 3: YAML merge keys"):
        parse_yaml("base: &b {epochs: 3}\ntrain:\n  <<: *b\n")


@pytest.mark.parametrize("name", ["seed", "resnet18", "best", "smoke"])
def test_shipped_configs_read_as_before(name):
    with open(f"configs/{name}.yaml", encoding="utf-8") as f:
        text = f.read()
    assert parse_yaml(text) == yaml.safe_load(text)


# ------------------------------------------------------------------------- values that failed later
@pytest.mark.parametrize("override, key", [
    ("--optim.lr=.inf", "optim.lr"),
    ("--optim.weight_decay=.inf", "optim.weight_decay"),
    ("--optim.eps=.inf", "optim.eps"),
    ("--optim.clip_value=.inf", "optim.clip_value"),
    ("--optim.warmup_epochs=.inf", "optim.warmup_epochs"),
    ("--data.mean=[.nan, 0.5, 0.5]", "data.mean"),
    ("--data.mean=[-.inf, 0.5, 0.5]", "data.mean"),
    ("--data.std=[.inf, 0.2, 0.2]", "data.std"),
    ("--train.seed=18446744073709551616", "train.seed"),
    ("--train.seed=99999999999999999999999", "train.seed"),
])
def test_infinite_values_and_oversized_seeds_are_refused(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + " = .* is out of range"):
        load_config(None, [override])


def test_the_largest_seed_is_the_largest_torch_takes():
    cfg = load_config(None, ["--train.seed", str(2**64 - 1)])
    torch.manual_seed(cfg.train.seed)  # what Trainer does with it
    with pytest.raises((RuntimeError, ValueError)):
        torch.manual_seed(2**64)


# ------------------------------------------------------------------------------- CIFAR-10's sizes
@pytest.mark.parametrize("overrides, key", [
    (["--data.val_size", "50000"], "data.val_size"),
    (["--data.train_subset", "50001"], "data.train_subset"),
    (["--data.val_size", "5000", "--data.train_subset", "45001"], "data.train_subset"),
    (["--data.test_subset", "10001"], "data.test_subset"),
    (["--train.batch_size", "50001"], "train.batch_size"),
    (["--data.val_size", "49990", "--train.batch_size", "11"], "train.batch_size"),
    (["--data.train_subset", "640", "--train.batch_size", "641"], "train.batch_size"),
])
def test_data_sizes_beyond_cifar10_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + " = .* is out of range"):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides", [
    ["--data.val_size", "49999", "--train.batch_size", "1"],
    ["--data.val_size", "5000", "--data.train_subset", "45000", "--train.batch_size", "45000"],
    ["--data.train_subset", "640", "--train.batch_size", "640"],
    ["--data.test_subset", "10000", "--train.batch_size", "50000"],
])
def test_data_sizes_at_the_limits_are_accepted(overrides):
    load_config(None, overrides)


@pytest.mark.parametrize("classes", [2, 9])
def test_fewer_outputs_than_cifar10_has_classes_are_refused(classes):
    """Label 9 past the last output was an IndexError in the first training step, not a config error."""
    with pytest.raises(ConfigError, match=rf"model\.num_classes = {classes} is out of range: must be >= 10: "
                                          r"CIFAR-10's labels are 0\.\.9"):
        load_config(None, ["--model.num_classes", str(classes)])
    assert load_config(None, ["--model.num_classes", "11"]).model.num_classes == 11


def test_the_size_limits_are_cifar10s():
    from fasttrain.data.cifar import BINARY_LAYOUT, RECORDS_PER_BATCH

    assert CIFAR10_TRAIN_IMAGES == len(BINARY_LAYOUT.train_files) * RECORDS_PER_BATCH == 50_000
    assert CIFAR10_TEST_IMAGES == RECORDS_PER_BATCH == 10_000


# --------------------------------------------------------------------------------- mistyped flags
@pytest.mark.parametrize("args, message", [
    (["--dryrun"], r"unknown option --dryrun: did you mean --dry-run\?"),
    (["--dry_run", "--optim.lr", "1"], r"unknown option --dry_run: did you mean --dry-run\?"),
    (["--jsn"], r"unknown option --jsn: did you mean --json\?"),
    (["--devcie=cpu"], r"unknown option --devcie: did you mean --device\?"),
    (["--epoch", "3"], r"unknown option --epoch: did you mean --train\.epochs\?"),
    (["--zzz", "1"], r"unknown option --zzz: the options are --config, .*--dry-run.*--section\.key VALUE"),
    (["--train"], r"--train is a config section, not a key: .*--train\.epochs VALUE \(train keys: epochs, "),
    (["--optim", "--optim.lr", "1"], r"--optim is a config section, not a key"),
])
def test_a_flag_that_is_no_config_key_is_named_with_suggestions(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides(args)


def test_top_level_flags_without_a_dot_still_work():
    assert parse_overrides(["--name", "x", "--train", "{epochs: 2}"]) == {"name": "x", "train.epochs": 2}
    assert load_config(None, ["--name", "x", "--train", "{epochs: 2}"]).train.epochs == 2
    with pytest.raises(ConfigError, match=r"did you mean --steps\?"):  # another program's own options
        parse_overrides(["--stpes", "3"], options=("--steps",))


def test_a_section_mapping_changes_only_the_keys_it_names():
    """--train "{...}" once replaced the whole section with the defaults: best.yaml's batch 512, compile,
    CUDA graph and flip TTA, and the earlier --train.batch_size, silently gone."""
    best = load_config("configs/best.yaml")
    cfg = load_config("configs/best.yaml", ["--train.batch_size", "64", "--train", "{epochs: 2, seed: 3}"])
    assert config_changes(best, cfg) == ["train.epochs 36 -> 2", "train.batch_size 512 -> 64", "train.seed 0 -> 3"]
    assert load_config("configs/best.yaml", {"train": {"epochs": 2}}) == load_config("configs/best.yaml",
                                                                                     ["--train.epochs", "2"])


@pytest.mark.parametrize("args, message", [
    (["--train", "null"], r"--train takes a mapping of train keys, e\.g\. --train '\{epochs: VALUE\}' or "
                          r"--train\.epochs VALUE; got None"),
    (["--train", "3"], r"--train takes a mapping of train keys.*got 3"),
    (["--train.epochs", "3", "--train", "{epochs: 2}"], r"--train\.epochs is given twice on the command line"),
    (["--train", "{epochz: 2}"], r"unknown key 'train\.epochz'"),
    (["--train", "{epochs: ten}"], r"train\.epochs: expected int"),
])
def test_a_section_mapping_is_checked_like_dotted_keys(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/best.yaml", args)


def test_cli_options_match_the_training_parser():
    actions = cli._train_parser()._actions
    assert set(CLI_OPTIONS) == {flag for a in actions for flag in a.option_strings} - {"-h", "--help"}


# ------------------------------------------------------------------ the audit's commands, end to end
@pytest.mark.parametrize("extra, message", [
    (["--optim.lr", "1e-3"], None),
    (["--model.base_channels", "100000000"], "trainable parameters, over the budget model.max_params"),
    (["--train.seed", "99999999999999999999999"], "train.seed = "),
    (["--optim.lr", ".inf"], "optim.lr = inf is out of range"),
    (["--data.val_size", "60000"], "data.val_size = 60000 is out of range"),
    (["--data.train_subset", "100000"], "data.train_subset = 100000 is out of range"),
    (["--train.batch_size", "100000"], "train.batch_size = 100000 is out of range"),
    (["--dryrun"], "unknown option --dryrun: did you mean --dry-run?"),
])
def test_dry_run_refuses_what_training_would_with_one_error_line(capsys, extra, message):
    code = cli.main(["--config", "configs/smoke.yaml", "--dry-run", "--json", *extra])
    out, err = capsys.readouterr()
    if message is None:
        assert code == 0 and '"lr": 0.001' in out
    else:
        assert code == cli.EXIT_USAGE and err.startswith("error: ") and message in err
        assert err.count("\n") == 1, err


@pytest.mark.parametrize("args", [["--config", "configs/smoke.yaml", "--config", "configs/best.yaml"],
                                  ["--config", "configs/smoke.yaml", "--resume", "a.pt", "--resume", "auto"]])
def test_a_command_option_given_twice_is_refused_like_a_config_key(capsys, args):
    """argparse alone keeps the last --config silently: a run of the other config than the user meant."""
    with pytest.raises(SystemExit) as stop:
        cli.main([*args, "--dry-run"])
    assert stop.value.code == cli.EXIT_USAGE
    assert f"{args[-2]} is given twice: keep one" in capsys.readouterr().err


# ------------------------------------------------------------------ the edges of the ranges (mutants)
@pytest.mark.parametrize("args, key", [
    (["--train.epochs", "true"], "train.epochs"),  # a bool is no int: not 1 epoch
    (["--data.crop_padding", "32"], "data.crop_padding"),
    (["--data.mean", "[0.5, 0.5]"], "data.mean"),
    (["--optim.nesterov", "true", "--optim.momentum", "0"], "optim.nesterov"),
    (["--optim.betas", "[0.9, 1.0]"], "optim.betas"),
    (["--optim.impl", "fused", "--optim.name", "adamw"], "optim.impl"),  # the fused step is SGD's only
    (["--data.mean", "[0.5, 0.5, 0.5, 0.5]"], "data.mean"),  # RGB: not more than three either
    # pixels are x / 255 in 0..1: a mean on the 0..255 scale or a std under one grey level blows them up
    (["--data.mean", "[125.3, 0.5, 0.5]"], "data.mean"),
    (["--data.mean", "[-0.01, 0.5, 0.5]"], "data.mean"),
    (["--data.std", "[0.2, 0.0039, 0.2]"], "data.std"),
    (["--data.val_size", "-1"], "data.val_size"),
    (["--model.layers", "0", "--model.blocks", "[]", "--model.conv_kernel", "[]", "--model.shortcut_kernel", "[]"],
     "model.layers"),
    # 7 stages halve 32x32 to nothing: named as too many stages, not as a pool kernel over a 0x0 map
    ([f"--model.{k}={v}" for k, v in (("layers", 7), ("blocks", [1] * 7), ("conv_kernel", [3] * 7),
                                      ("shortcut_kernel", [1] * 7), ("pool_kernel", 1))], "model.layers"),
    (["--model.blocks", "[1, 0, 1]"], "model.blocks"),
    (["--model.conv_kernel", "[3, 2, 3]"], "model.conv_kernel"),  # even: the padding would shrink the map
    (["--model.shortcut_kernel", "[1, 2, 1]"], "model.shortcut_kernel"),
    (["--model.base_channels", "0"], "model.base_channels"),
    (["--model.dropout", "1.0"], "model.dropout"),  # every activation dropped
    (["--model.se_reduction", "0"], "model.se_reduction"),
    (["--model.max_params", "0"], "model.max_params"),
    (["--optim.momentum", "1.0"], "optim.momentum"),
    (["--optim.weight_decay", "-1e-4"], "optim.weight_decay"),
    (["--optim.betas", "[0.9, 0.99, 0.9]"], "optim.betas"),
    (["--optim.eps", "0"], "optim.eps"),
    (["--optim.clip_value", "0"], "optim.clip_value"),  # optim.clip none turns clipping off, not 0
    (["--optim.lookahead_k", "-1"], "optim.lookahead_k"),
    (["--optim.warmup_epochs", "-0.5"], "optim.warmup_epochs"),
    (["--optim.final_lr_frac", "1.5"], "optim.final_lr_frac"),  # above the peak
    (["--optim.label_smoothing", "1.0"], "optim.label_smoothing"),
    (["--train.eval_test", "false"], "train.eval_test"),  # nothing left to evaluate
    (["--train.eval_batch_size", "0"], "train.eval_batch_size"),
    (["--train.eval_every", "0"], "train.eval_every"),
    (["--train.checkpoint_every", "0"], "train.checkpoint_every"),
    (["--train.seed", "-1"], "train.seed"),
    (["--train.ema_decay", "1.0"], "train.ema_decay"),  # the EMA would never move
    (["--train.ema_warmup_steps", "-1"], "train.ema_warmup_steps"),
    (["--train.ema_bn_batches", "0"], "train.ema_bn_batches"),
    # the optimizer step hands these to float32 kernels, which cannot take a larger number
    (["--optim.lr", "3.5e38"], "optim.lr"),
    (["--optim.weight_decay", "3.5e38"], "optim.weight_decay"),
    (["--optim.clip_value", "3.5e38"], "optim.clip_value"),
    (["--optim.name", "adamw", "--optim.nesterov", "false", "--optim.lr", "3.5e37"], "optim.lr"),  # / (1 - 0.9)
    # 6 stages leave a 1x1 map: one image per batch is one value per channel, which BatchNorm cannot train on
    ([f"--model.{k}={v}" for k, v in (("layers", 6), ("blocks", [1] * 6), ("conv_kernel", [3] * 6),
                                      ("shortcut_kernel", [1] * 6), ("pool_kernel", 1), ("base_channels", 2))]
     + ["--train.batch_size", "1"], "train.batch_size"),
])
def test_values_just_outside_a_range_are_refused(args, key):
    with pytest.raises(ConfigError, match=re.escape(key) + "( = .* is out of range|: expected)"):
        load_config(None, args)


@pytest.mark.parametrize("args, key, value", [
    (["--data.cutout", "32"], "data.cutout", 32),
    (["--optim.final_lr_frac", "1"], "optim.final_lr_frac", 1.0),  # the schedule ends at its peak
    (["--data.crop_padding", "31"], "data.crop_padding", 31),
    (["--data.mean", "[0, 1, 0]"], "data.mean", [0.0, 1.0, 0.0]),
    (["--data.std", f"[{1 / 255!r}, 1, 1000]"], "data.std", [1 / 255, 1.0, 1000.0]),
    (["--optim.lookahead_alpha", "1"], "optim.lookahead_alpha", 1.0),  # slow = fast: plain SGD, synced every k
    # 6 stages leave a 1x1 map, pooled by a kernel of 1
    ([f"--model.{k}={v}" for k, v in (("layers", 6), ("blocks", [1] * 6), ("conv_kernel", [1] * 6),
                                      ("shortcut_kernel", [1] * 6), ("pool_kernel", 1))], "model.layers", 6),
    (["--optim.momentum", "0", "--optim.lookahead_k", "0", "--optim.warmup_epochs", "0"], "optim.momentum", 0.0),
    (["--train.seed", "0", "--data.val_size", "0", "--train.ema_warmup_steps", "0"], "train.seed", 0),
    (["--train.eval_test", "false", "--data.val_size", "1"], "train.eval_test", False),
    # one image per batch trains wherever the last map is larger than 1x1 (5 stages: 2x2)
    ([f"--model.{k}={v}" for k, v in (("layers", 5), ("blocks", [1] * 5), ("conv_kernel", [3] * 5),
                                      ("shortcut_kernel", [1] * 5), ("pool_kernel", 2))]
     + ["--train.batch_size", "1"], "train.batch_size", 1),
    ([f"--model.{k}={v}" for k, v in (("layers", 6), ("blocks", [1] * 6), ("conv_kernel", [3] * 6),
                                      ("shortcut_kernel", [1] * 6), ("pool_kernel", 1))]
     + ["--train.batch_size", "2"], "train.batch_size", 2),
])
def test_values_at_the_edge_of_a_range_are_allowed(args, key, value):
    cfg = load_config(None, args)
    assert functools.reduce(getattr, key.split("."), cfg) == value


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the weights overflow: the point
@pytest.mark.parametrize("name, impl, clip", [("sgd", "torch", "value"), ("sgd", "fused", "value"),
                                             ("adamw", "torch", "value"), ("sgd", "torch", "norm")])
def test_the_largest_accepted_step_values_reach_the_float32_kernels(name, impl, clip):
    # lr, weight decay and the clip at their largest accepted value: the step runs (a larger one is refused above)
    top = repr(torch.finfo(torch.float32).max)
    cfg = load_config(None, [f"--optim.{k}={v}" for k, v in (("name", name), ("impl", impl), ("clip", clip),
                                                             ("lr", top), ("weight_decay", top), ("clip_value", top),
                                                             ("nesterov", "false"), ("betas", [0.0, 0.999]))])
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    params = list(layer.parameters())
    before = [p.detach().clone() for p in params]
    optimizer = build_optimizer(params, cfg.optim)
    layer(torch.randn(4, 3)).sum().backward()
    clip_gradients(params, cfg.optim, optimizer)
    optimizer.step()
    assert cfg.optim.lr == cfg.optim.clip_value == torch.finfo(torch.float32).max
    assert not all(torch.equal(p, b) for p, b in zip(params, before))


def test_where_the_data_is_read_from_is_no_config_change():
    """A resume on another machine (another data.dir) is not a changed run: no warning, and --resume auto
    does not take that folder's config.yaml for another run's."""
    assert config_changes(load_config(None), load_config(None, ["--data.dir", "/elsewhere",
                                                               "--data.download", "false"])) == []
