"""Property-based fuzzing of the config loader: whatever comes in (nested dicts, YAML text, command
line overrides), the result is a valid Config or a clean ConfigError, never another exception, and a
valid Config holds nothing that training would refuse later (an infinite float, a seed torch cannot
take, more images than CIFAR-10 has).

Inputs are built from the real section and key names and from values of the right type as well as
of every other type, so the fuzzer reaches the type checks and the range checks, not only the
"unknown key" error. Examples are capped so the file runs in about 10 s on 2 CPU cores; the
@example cases pin inputs that once escaped as other exceptions.
"""
import dataclasses
import math
import string
import typing
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fasttrain.config import (CHOICES, CIFAR10_TEST_IMAGES, CIFAR10_TRAIN_IMAGES, Config, ConfigError, config_from_dict,
                              config_to_dict, load_config, validate)

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

SECTIONS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
            if dataclasses.is_dataclass(typing.get_type_hints(Config)[f.name])}
FIELDS = {name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}
ALL_KEYS = sorted({"name", *SECTIONS} | {k for hints in FIELDS.values() for k in hints})
CHOICE_WORDS = sorted({v for values in CHOICES.values() for v in values})

# ---------------------------------------------------------------------------------------- values
# 10**5000 is built, not listed: hypothesis reprs its strategies, and that int has no repr by default
EXTREME_INTS = st.sampled_from([0, -1, 2**31, 2**63, -(2**63), 10**400, -(10**400)]) | st.builds(pow, st.just(10),
                                                                                          st.just(5000))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), EXTREME_INTS,
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.sampled_from(CHOICE_WORDS),
)
hashable_keys = st.one_of(st.sampled_from(ALL_KEYS), st.text(max_size=6), st.integers(), st.booleans(), st.none())
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hashable_keys, inner, max_size=4),
    max_leaves=8,
)


def typed(tp) -> st.SearchStrategy:
    """Values of the field's own type (often in range, sometimes at the edges)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return st.none() | typed(inner)
    if origin is list:
        return st.lists(typed(typing.get_args(tp)[0]), max_size=7)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-3, 70) | EXTREME_INTS
    if tp is float:
        return st.floats(-1.0, 2.0) | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2, 5)
    if tp is str:
        return st.sampled_from(CHOICE_WORDS) | st.text(max_size=8)
    raise AssertionError(f"no strategy for {tp}")


def section(name: str) -> st.SearchStrategy:
    hints = FIELDS[name]
    keys = st.sampled_from(sorted(hints))
    good = st.dictionaries(keys, st.deferred(lambda: st.one_of(*[typed(hints[k]) for k in hints])), max_size=6)
    precise = st.fixed_dictionaries({}, optional={k: typed(t) for k, t in hints.items()})
    return st.one_of(precise, good, st.dictionaries(hashable_keys, anything, max_size=3), anything)


configs = st.fixed_dictionaries(
    {}, optional={"name": st.text(max_size=8) | scalars, **{name: section(name) for name in SECTIONS}},
) | st.dictionaries(hashable_keys, anything, max_size=4) | anything


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory) -> Path:
    """One file rewritten by every example (a module fixture: hypothesis reruns the test body, not
    function-scoped fixtures)."""
    return tmp_path_factory.mktemp("fuzz") / "fuzz.yaml"


def check(load) -> None:
    """The property: a valid Config or a ConfigError; a Config survives validation and a round trip."""
    try:
        cfg = load()
    except ConfigError as e:
        assert str(e)  # a message, always
        return
    assert isinstance(cfg, Config)
    validate(cfg)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert_trainable(cfg)


def assert_trainable(cfg: Config) -> None:
    """What validation lets through, training takes: finite floats, a seed for torch.manual_seed, a split
    and a batch that CIFAR-10 fills (the checks of fasttrain/data: split_validation, _first, build_data)."""
    for name in SECTIONS:
        for key, value in dataclasses.asdict(getattr(cfg, name)).items():
            floats = value if isinstance(value, list) else [value]
            assert all(math.isfinite(v) for v in floats if isinstance(v, float)), (name, key, value)
    torch.Generator().manual_seed(cfg.train.seed)
    d = cfg.data
    assert 0 <= d.val_size < CIFAR10_TRAIN_IMAGES and 0 <= d.test_subset <= CIFAR10_TEST_IMAGES
    assert 0 <= d.train_subset <= CIFAR10_TRAIN_IMAGES - d.val_size
    assert cfg.train.batch_size <= (d.train_subset or CIFAR10_TRAIN_IMAGES - d.val_size)


# ---------------------------------------------------------------------------------------- dicts
@settings(FUZZ, max_examples=200)
@given(configs)
@example({"optim": {"lr": 10**400}})  # int -> float overflow
@example({"model": {"layers": 10**400}})
@example({"model": {"layers": 10**5000}})  # too long to print in the error message
@example({"train": {"epochs": 5, "batch_size": 2**63}})
@example({"optim": {"lr": math.inf}})  # passed validation, failed in training (the rest below too)
@example({"optim": {"warmup_epochs": math.inf, "clip_value": math.inf}})
@example({"data": {"mean": [math.nan, 0.5, 0.5]}})
@example({"train": {"seed": 10**23}})
@example({"data": {"val_size": 60_000}})
@example({"data": {"train_subset": 100_000}})
@example({"train": {"batch_size": 100_000}})
def test_any_nested_dict_gives_a_config_or_a_config_error(values):
    check(lambda: config_from_dict(values))


# ---------------------------------------------------------------------------------------- YAML text
YAML_BITS = ["\n", "  ", ": ", "- ", "[", "]", "{", "}", ",", "? ", "&a ", "*a", "!!python/object:os.system ",
             "!!binary ", "!!float ", "'", '"', "#", "---\n", "...\n", "|\n", "@", "%YAML 1.1\n", "\t", "~",
             "1e400", "9" * 30, ".nan", ".inf", "0x1F", "0o17", "yes", "null", *ALL_KEYS]
yaml_soup = st.lists(st.sampled_from(YAML_BITS) | st.text(string.printable, max_size=4), max_size=30).map("".join)


@st.composite
def dumped_then_damaged(draw):
    """A real config as YAML, then cut short or with a YAML fragment spliced in."""
    try:
        text = yaml.safe_dump(draw(configs), sort_keys=False, allow_unicode=True)
    except (yaml.YAMLError, ValueError):  # ValueError: an int too long to write out
        text = ""
    cut = draw(st.integers(0, len(text)))
    return text[:cut] + draw(st.sampled_from(["", *YAML_BITS])) + draw(st.sampled_from(["", text[cut:]]))


@settings(FUZZ, max_examples=150)
@given(text=st.one_of(yaml_soup, dumped_then_damaged(), st.text(max_size=40)))
@example("[1]: 2\n")  # an unhashable mapping key
@example("train:\n  ? [epochs]\n  : 3\n")
@example("optim:\n  lr: " + "1" * 5000 + "\n")  # past Python's int-string limit
@example("train: &a\n  epochs: *a\n")  # a recursive structure
@example("!!python/object/apply:os.system [echo pwned]\n")
@example("model:\n  blocks: " + "[" * 1200 + "]" * 1200 + "\n")  # nesting deeper than the recursion limit
@example("train:\n  epochs: !!float \n")  # PyYAML itself fails (IndexError) on an empty tagged float
def test_any_yaml_text_gives_a_config_or_a_config_error(fuzz_file, text):
    text = text.encode("utf-8", "replace").decode("utf-8")  # files are UTF-8; lone surrogates cannot be
    fuzz_file.write_text(text, encoding="utf-8")
    check(lambda: load_config(fuzz_file))


@settings(FUZZ, max_examples=100)
@given(raw=st.binary(max_size=64))
@example(b"name: \xff\xfe\n")  # not UTF-8
@example(b"\x00")
def test_any_file_bytes_give_a_config_or_a_config_error(fuzz_file, raw):
    fuzz_file.write_bytes(raw)
    check(lambda: load_config(fuzz_file))


# ---------------------------------------------------------------------------------------- overrides
dotted = st.one_of(
    st.sampled_from([f"{s}.{k}" for s, hints in FIELDS.items() for k in hints] + ["name", *SECTIONS]),
    st.text(string.ascii_letters + "._-=", max_size=10),
)
value_text = st.one_of(
    st.sampled_from(["0", "-1", "1e400", "1" * 400, "nan", ".inf", "[1,2,3]", "[4, 4, 3]", "true", "null", "",
                     "{a: 1}", "[", "'", "!!python/name:os.system", *CHOICE_WORDS]),
    st.text(max_size=8),
)
flag = st.one_of(
    st.tuples(dotted.map(lambda k: "--" + k), value_text).map(list),
    st.tuples(dotted, value_text).map(lambda kv: [f"--{kv[0]}={kv[1]}"]),
    st.text(max_size=6).map(lambda t: [t]),  # a stray token
)
overrides = st.lists(flag, max_size=6).map(lambda parts: [token for part in parts for token in part])


@settings(FUZZ, max_examples=150)
@given(overrides, st.booleans())
@example(["--optim.lr", "1" * 400], False)
@example(["--train.seed", "9" * 5000], False)
@example(["--optim", "1"], True)
@example(["--train.epochs", "1", "--train.epochs=2"], True)
@example(["--optim.weight_decay", ".inf"], True)
@example(["--dryrun"], True)
@example(["--train"], False)
def test_any_override_list_gives_a_config_or_a_config_error(args, with_file):
    args = [a.encode("utf-8", "replace").decode("utf-8") for a in args]
    base = REPO / "configs" / "smoke.yaml" if with_file else None
    check(lambda: load_config(base, args))
