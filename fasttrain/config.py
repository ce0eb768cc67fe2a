"""Typed run configuration: YAML files map onto dataclasses, strictly.

A config has five sections (``data``, ``model``, ``optim``, ``train``, ``output``) plus a ``name``.
Loading is strict so that a typo never silently trains the wrong thing:

* an unknown key is an error naming the key and listing the valid ones;
* a duplicate key in a YAML mapping is an error (PyYAML would silently keep the last one);
* a value of the wrong type is an error naming the key and the expected type;
* a flag that is no config key (``--dryrun``) is an error suggesting the closest option or key;
* out-of-range values (negative or infinite lr, zero epochs, more images than CIFAR-10 has, ...) are
  errors naming the valid range.

Every key can be overridden from the command line as a dotted flag (``--optim.lr 0.2``); the value
is parsed as YAML (so ``[4,4,3]``, ``true`` and ``1e-3`` work) and then type-checked like the file,
but a string key's value (a name, a path) is taken as typed unless YAML-quoted (``--name "exp #3"``
keeps its ``#3``, which YAML would read as a comment). A whole section given as a mapping
(``--train "{epochs: 2, seed: 1}"``) sets the keys it names, like dotted flags, and keeps the others.
Scalars are read as YAML 1.2 reads them, in files too: ``1e-3``, ``5E-4`` and ``.5`` are numbers (YAML
1.1, PyYAML's default, would leave the first two strings), and ``yes``/``no``/``on``/``off``, ``1:30``
and ``010`` are strings (1.1 reads bools, the base-60 number 90 and the octal 8), so a bool takes
``true`` or ``false`` and a number is written without a leading zero.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from fasttrain.files import write_text_atomic


class EveryRankFlag:
    """Mixed into an error class whose errors are of two kinds under torchrun. `every_rank` (the class's default,
    or the raise's `every_rank=`): every rank hits this error identically, from the same inputs (command line,
    config, files, environment) or a state the ranks agreed on, so one rank per node prints it; False: it can be
    one rank's own, and every rank that hits it prints it (fasttrain.distributed.report_error)."""

    every_rank = False

    def __init__(self, *args, every_rank: bool | None = None):
        super().__init__(*args)
        if every_rank is not None:  # an instance attribute: it survives pickling (a broadcast ConfigError)
            self.every_rank = every_rank


class ConfigError(EveryRankFlag, ValueError):
    """A configuration problem, with a message that names the key and the fix. Every rank computes it from the
    same command line, config, files and environment (or rank 0's broadcast choice), except where a raise says
    otherwise (a LOCAL_RANK without its GPU)."""

    every_rank = True


# --------------------------------------------------------------------------------------------
# The sections. Units and meanings are in the comments; defaults are the paper's recipe.
# --------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    dir: Optional[str] = None        # folder holding CIFAR-10; None: $FASTTRAIN_DATA, else ./data
    download: bool = True            # fetch the official tarball when nothing is found
    loader: str = "auto"             # auto | dali | torch  (see README: why auto picks what it does)
    dali_graph: str = "sequence"     # data.loader dali only: sequence (the batch as one sample of frames: 280,894
                                     # img/s alone on an H200) | samples (a DALI sample per image: 80,162) | slice
                                     # (fn.slice: 152,044; benchmarks/results/2026-11-28-h200-muon, fasttrain/data/dali.py)
    val_size: int = 0                # images held out from the END of the training set for tuning
    train_subset: int = 0            # use only the first N training images (0: all); smoke runs
    test_subset: int = 0             # evaluate on the first N test images (0: all)
    crop_padding: int = 4            # pixels of zero padding before the random 32x32 crop (0: off)
    flip: bool = True                # random horizontal flip, p = 0.5
    flip_mode: str = "random"        # random: a fresh coin per image and epoch (the paper); alternating:
                                     # a coin per image once, then flipped every other epoch (airbench)
    cutout: int = 0                  # side in pixels of a square set to 0 after normalization (the mean
                                     # colour), centred on a uniform pixel and clipped (DeVries & Taylor
                                     # 2017); 0: off (the paper's recipe)
    mean: list[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])  # per RGB, 0-1
    # the paper's (and kuangliu/pytorch-cifar's) std, kept for the paper's recipe: it is close to the mean
    # of the images' own stds (0.200, 0.199, 0.201 on the JPEG-75 stand-in); the std over all training
    # pixels is 0.245, 0.243, 0.261 there, so the normalized inputs have a std of ~1.2-1.3, not 1
    std: list[float] = field(default_factory=lambda: [0.2023, 0.1994, 0.2010])   # per RGB, 0-1


@dataclass
class ModelConfig:
    layers: int = 3                                                  # N: residual stages
    blocks: list[int] = field(default_factory=lambda: [4, 4, 3])     # B_i: BasicBlocks per stage
    conv_kernel: list[int] = field(default_factory=lambda: [3, 3, 3])      # F_i
    shortcut_kernel: list[int] = field(default_factory=lambda: [1, 1, 1])  # K_i (projection conv)
    base_channels: int = 64          # C_1; stage i has C_1 * 2^(i-1) channels
    pool_kernel: int = 8             # P: average-pool kernel before the head
    dropout: float = 0.0             # after the blocks, before the head
    se: bool = True                  # squeeze-and-excitation on/off
    se_placement: str = "stem"       # stem (the paper: one SE after the stem) | blocks (SE-ResNet)
    se_reduction: int = 16           # SE bottleneck ratio r
    se_impl: str = "torch"           # torch | triton (fused kernel, fasttrain.kernels.se)
    zero_init_residual: bool = False  # each block's last BN starts at gamma 0: blocks start as identities
    stem_init: str = "kaiming"       # kaiming | whiten: the stem conv starts as a whitening of the training
                                     # images' 3x3 patches (airbench; set by the trainer, fasttrain/whiten.py)
    stem_frozen: bool = False        # the stem conv's weights are not trained (nor counted in max_params)
    num_classes: int = 10            # outputs of the head (at least CIFAR-10's 10 classes)
    max_params: int = 5_000_000      # trainable-parameter budget; a bigger model is refused


@dataclass
class OptimConfig:
    name: str = "sgd"                # sgd | adamw | muon (Muon on the conv filters, SGD on the rest: fasttrain/muon.py)
    impl: str = "torch"              # torch | fused (one-launch Lookahead-SGD, fasttrain.kernels)
    lr: float = 0.1                  # peak learning rate (per the global batch, see README; muon: not the filters')
    momentum: float = 0.9            # SGD momentum (AdamW: beta1 comes from `betas`; muon: not the filters')
    nesterov: bool = False           # Nesterov momentum of SGD (and, under muon, of its SGD group; the paper: false)
    weight_decay: float = 5e-4       # L2 as in torch SGD (decoupled for AdamW)
    decay_norm_and_bias: bool = True  # false: no weight decay on 1-D parameters (BN, biases); the paper: true
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW only
    eps: float = 1e-8                # AdamW only
    clip: str = "value"              # none | value (the paper: clamp each gradient element) | norm
    clip_value: float = 0.1          # the clamp for clip=value, the max global L2 norm for norm
    lookahead_k: int = 5             # Lookahead sync period in steps (0: no Lookahead)
    lookahead_alpha: float = 0.5     # slow-weight step size
    schedule: str = "cosine"         # cosine | linear | constant (each after optional warmup)
    warmup_epochs: float = 0.0       # linear warmup, in epochs (fractions allowed): step i of W at lr x (i+1)/W
    final_lr_frac: float = 0.0       # lr at the end, as a fraction of `lr`
    label_smoothing: float = 0.0     # cross-entropy label smoothing, 0-1 (0: off, the paper's recipe)
    muon_lr: float = 0.1             # muon only: the conv filters' peak learning rate (optim.lr: the rest's); the
                                     # CPU proxy's best of 0.02-0.2 (benchmarks/results/2026-11-28-cpu-proxy-muon)
    muon_momentum: float = 0.9       # muon only: the conv filters' (Nesterov) momentum; the CPU proxy's best of
                                     # 0.8-0.95 (Muon's usual 0.95 scored 1.9 points lower there)
    muon_batching: str = "shape"     # muon only: shape (one Newton-Schulz batch per filter-bank shape) | padded
                                     # (all banks zero-padded into one batch: 15 matrix products a step instead
                                     # of 150 on best.yaml, 4.8x their FLOPs); the same update either way
    muon_se: bool = True             # muon only: Muon on the SE blocks' two 1x1 convolutions too (their fully
                                     # connected layers); false: SGD (optim.nesterov) on them, as on the head.
                                     # best.yaml's trained weights (true) have a dead stem SE (every squeeze
                                     # unit's ReLU off on every image, the gate a constant): README, "Muon"
    muon_normalize: bool = False     # muon only: before each step, every Muon filter bank rescaled to Frobenius
                                     # norm sqrt(out channels) (airbench94_muon's), which holds the step's size
                                     # relative to the weights fixed; its weight decay is then not applied (the
                                     # rescaling sets the norm). false: decoupled weight decay, and the weights
                                     # grow (best.yaml's trained banks: 5-10x their initial norm, the stem 52x)
    muon_ns_steps: int = 5           # muon only: Newton-Schulz iterations a step (Muon's 5); each is a fifth of
                                     # the orthogonalization's matrix products, and fewer leave the update's weak
                                     # directions shorter (how much: benchmarks/muon_ns_check.py)


@dataclass
class TrainConfig:
    epochs: int = 200                # passes over the training set; the LR schedule spans them
    batch_size: int = 128            # per process; the global batch is batch_size * world size
    eval_batch_size: int = 1000      # images per evaluation batch, per process (memory only: same accuracy)
    precision: str = "auto"          # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True       # NHWC activations (fast convolutions on GPUs; NCHW kept for CPU nets under
                                     # 8 base channels, see runtime.use_channels_last)
    compile: bool = False            # torch.compile the model
    compile_mode: str = "default"    # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    cuda_graph: bool = False         # the whole training step as one CUDA graph (fasttrain/graph.py; GPU only)
    eval_every: int = 1              # evaluate every N epochs (and always at the end)
    eval_test: bool = True           # false: never evaluate the test set (tuning on data.val_size only)
    tta: str = "none"                # test-time augmentation: none | flip | flip_shift (fasttrain/evaluate.py)
    ema_decay: float = 0.0           # EMA of the weights, per optimizer step (e.g. 0.999; 0: off); evaluated
    ema_warmup_steps: int = 0        # ramp the EMA decay linearly from 0 over this many steps (0: none)
    ema_bn: str = "average"          # the EMA's BN running stats: average (lerped like the weights) | recompute
                                     # (re-estimated from ema_bn_batches training batches before the EMA
                                     # is evaluated or saved; fasttrain/ema.py says why). Like
                                     # ema_warmup_steps, unused when ema_decay is 0
    ema_bn_batches: int = 20         # training batches per recompute (augmented: the first ones of the epoch
                                     # just trained; at most an epoch's). 20 x 512 = 10,240 images; on the
                                     # CPU 4 scored like 20, 1 was noisy
    seed: int = 0                    # initial weights, shuffle and augmentation draws (per epoch: resumable)
    deterministic: bool = False      # cuDNN deterministic algorithms (slower)
    checkpoint_every: int = 1        # write last.pt every N epochs (and at the end)
    sync_bn: bool = False            # SyncBatchNorm under DistributedDataParallel


@dataclass
class OutputConfig:
    dir: Optional[str] = None        # run folder; None: runs/<config name>-<time>
    tensorboard: bool = False        # also write TensorBoard event files
    progress: bool = True            # rich progress bar (falls back to lines without a TTY)


@dataclass
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# CIFAR-10's sizes, for the data checks in `validate` (not imported from fasttrain.data: that imports torch)
CIFAR10_TRAIN_IMAGES = 50_000
CIFAR10_TEST_IMAGES = 10_000
# torch.finfo(torch.float32).max: the optimizer step hands lr, weight decay and the clip to kernels on float32
# tensors, which refuse a larger Python float mid-step ("cannot be converted to type float without overflow")
FLOAT32_MAX = 3.4028234663852886e38
F32_MAX_SHOWN = "3.4e38 (float32's largest)"  # FLOAT32_MAX in the messages that bound by it
MAX_NS_STEPS = 10  # optim.muon_ns_steps: past ~6 the quintic iteration moves nothing (it oscillates in 0.7..1.2)

# The training command's own options (fasttrain/cli.py, _train_parser; a test keeps the two in step):
# a mistyped one reaches parse_overrides, which suggests the closest of these and of the config keys.
CLI_OPTIONS = ("--config", "--device", "--resume", "--overwrite", "--dry-run", "--json")

# Allowed values of the string-valued choices: checked by `validate`.
CHOICES = {
    "data.loader": ("auto", "dali", "torch"),
    "data.flip_mode": ("random", "alternating"),
    "data.dali_graph": ("samples", "sequence", "slice"),
    "model.se_placement": ("stem", "blocks"),
    "model.se_impl": ("torch", "triton"),
    "model.stem_init": ("kaiming", "whiten"),
    "optim.name": ("sgd", "adamw", "muon"),
    "optim.impl": ("torch", "fused"),
    "optim.muon_batching": ("shape", "padded"),
    "optim.clip": ("none", "value", "norm"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "train.tta": ("none", "flip", "flip_shift"),
    "train.ema_bn": ("average", "recompute"),
}


# --------------------------------------------------------------------------------------------
# YAML with duplicate-key detection (safe loader only: a config can never construct objects)
# --------------------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        # YAML 1.2 where 1.1 changes what was typed: yes/no/on/off are strings, not bools (the type check
        # then says "use true or false"), 1:30 is a string, not the base-60 number 90, and so is 010,
        # not the octal 8 (YAML 1.2 would read ten: refused rather than guessed), and 2024-01-15 is a
        # string, not a date (YAML 1.2's core schema has no timestamps)
        tag = super().resolve(kind, value, implicit)
        if (tag == "tag:yaml.org,2002:bool" and value.lower() not in ("true", "false")
                or tag == "tag:yaml.org,2002:timestamp"
                or tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and ":" in value
                or tag == "tag:yaml.org,2002:int" and re.fullmatch(r"[-+]?0[0-7_]+", value)):
            return "tag:yaml.org,2002:str"
        return tag

    def compose_document(self) -> yaml.Node:
        # Aliases (*name) share nodes, so a few lines can stand for billions of values ("billion laughs"):
        # refuse a document that expands past any config's size before anything walks or prints it
        node = super().compose_document()
        if _expanded_size(node, {}, set()) > MAX_YAML_VALUES:
            raise ConfigError(f"expands to over {MAX_YAML_VALUES:,} values through YAML aliases (*name): "
                              "a config is a few dozen; write the values out")
        self.mapping_paths = _mapping_paths(node, (), {})
        return node


MAX_YAML_VALUES = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many nodes the document holds with every alias written out (memoized: shared nodes are
    counted as often as they are used, but walked once). A node inside itself is refused."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise ConfigError(f"line {node.start_mark.line + 1}: a YAML alias refers to a value that holds it "
                          "(a recursive structure): write the values out")
    open_nodes.add(key)
    children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
    sizes[key] = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
    open_nodes.discard(key)
    return sizes[key]


def _mapping_paths(node: yaml.Node, path: tuple[str, ...], paths: dict[int, tuple[str, ...]]) -> dict:
    """Each mapping's dotted place in the document ({id(node): ("optim",)}), so that an error inside it
    names the full key (optim.lr), not the leaf alone. A node shared through an alias keeps its first."""
    if id(node) in paths or not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        return paths
    paths[id(node)] = path
    children = ([(str(k.value), v) for k, v in node.value] if isinstance(node, yaml.MappingNode)
                else [(f"[{i}]", v) for i, v in enumerate(node.value)])
    for name, child in children:
        _mapping_paths(child, path + (name,), paths)
    return paths


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    parent = getattr(loader, "mapping_paths", {}).get(id(node), ())
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # YAML 1.1's <<, which 1.2 dropped: its keys would hide
            raise ConfigError(f"line {key_node.start_mark.line + 1}: YAML merge keys (<<) are not read: write "
                              "the keys out (a config is a few dozen)")
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: a key must be a plain value, "
                              f"not a {type(key).__name__}") from None
        if key in seen:
            raise ConfigError(
                f"duplicate key {'.'.join((*parent, str(key)))!r} (line {seen[key].start_mark.line + 1} and line "
                f"{key_node.start_mark.line + 1}): keep one of them"
            )
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# YAML 1.2 floats that YAML 1.1 leaves strings: no dot (1e-3), an unsigned exponent (1.0e3), a signed
# leading dot (-.5). Checked after PyYAML's own resolvers, so what 1.1 reads as a number (1_000, 0x1F,
# 1.5, .inf) reads the same; a dot or an exponent is required, so 10 stays an int and 1e, e5 strings.
_YAML12_FLOAT = re.compile(r"""^[-+]?(?:[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+
                                     |\.[0-9]+(?:[eE][-+]?[0-9]+)?)$""", re.X)


class _Dumper(yaml.SafeDumper):
    """Writes what _StrictLoader reads back the same: a string that reads as a YAML 1.2 float (a run
    named "1e5") is quoted."""


for _yaml_class in (_StrictLoader, _Dumper):
    _yaml_class.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


def dump_yaml(values: Any) -> str:
    return yaml.dump(values, Dumper=_Dumper, sort_keys=False)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - PyYAML's constructors fail on odd input in many ways:
        # ValueError (an int past Python's int-string limit), IndexError ('!!float' with no value), ...
        raise ConfigError(f"{source}: not valid YAML ({type(e).__name__}: {_show(str(e))})") from None


# --------------------------------------------------------------------------------------------
# dict -> dataclasses, type-checked
# --------------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    """repr for messages, bounded: a huge int cannot even be repr'd (ValueError), a deeply nested
    list overflows the stack, and a message should stay one readable line anyway."""
    try:
        text = repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits(), maybe inside a list
        if isinstance(value, int):
            return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
        return f"<a {type(value).__name__} holding an integer too long to show>"
    except RecursionError:
        return f"<a {type(value).__name__} nested too deeply to show>"
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key` and the expected type."""
    origin = typing.get_origin(tp)
    if origin is Union:
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        try:
            return _coerce(value, inner, key)
        except ConfigError:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)} ({type(value).__name__})") from None
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        fix = ": use true or false" if tp is bool else ""
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)} ({type(value).__name__}){fix}")
    if tp is float:
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range (YAML reads 1e400 as inf, but 1000...0 as int)
            raise ConfigError(f"{key}: {_show(value)} is too large for a float") from None
    return value


def _build(cls: type, values: Any, prefix: str) -> Any:
    where = prefix or "the config"
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {_show(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        # a typo (epoch), or the dash other tools write (batch-size): the closest key, if one is close
        close = difflib.get_close_matches(str(unknown[0]).replace("-", "_"), list(fields), n=1, cutoff=0.75)
        hint = f"did you mean {(prefix + '.' if prefix else '') + close[0]!r}? " if close else ""
        raise ConfigError(f"unknown key {key!r}; {hint}valid keys in {where}: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def config_from_dict(values: Any) -> Config:
    cfg = _build(Config, values, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_changes(before: Config, after: Config) -> list[str]:
    """"section.key OLD -> NEW" for every setting that differs, but where a run's files go (output.*)
    and where the data is read from (data.dir, data.download): what makes two runs different runs."""
    def flat(cfg: Config) -> dict:
        out = {}
        for section, keys in config_to_dict(cfg).items():  # sections, and top-level keys (name)
            out.update({f"{section}.{key}": value for key, value in keys.items()} if isinstance(keys, dict)
                       else {section: keys})
        return {key: value for key, value in out.items()
                if not key.startswith("output.") and key not in ("data.dir", "data.download")}

    old, new = flat(before), flat(after)
    return [f"{key} {old[key]!r} -> {new[key]!r}" for key in new if old.get(key) != new[key]]


# --------------------------------------------------------------------------------------------
# Overrides: ["--optim.lr", "0.2", "--train.epochs=5"] -> nested dict merged over the file
# --------------------------------------------------------------------------------------------
_YAML_NULLS = ("null", "Null", "NULL", "~")  # what sets an optional key (--data.dir) to null


def parse_overrides(args: list[str], options: tuple[str, ...] = CLI_OPTIONS) -> dict[str, Any]:
    """Turn dotted flags into {"optim.lr": 0.2, ...}; values are parsed as YAML scalars/lists (a string
    key's taken as typed), and a section given as a mapping (--train "{epochs: 2}") as its dotted keys.

    `options`: the calling program's own flags, suggested (with the config keys) for a flag that is
    neither; the default is the training command's, another program passes its own."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE (the commands: "
                              "train (the default), eval, plot, export; python -m fasttrain COMMAND --help)")
        inline = "=" in arg
        key, text = arg[2:].split("=", 1) if inline else (arg[2:], args[i + 1] if i + 1 < len(args) else None)
        _check_flag(key, text, options)
        if text is None or not inline and re.match(r"--[A-Za-z]", text):  # the next flag, not this one's value
            hint = ("" if text is None
                    else f" ({text} is the next flag; a value that starts with -- goes as {arg}=VALUE)")
            raise ConfigError(f"{arg} needs a value, e.g. {arg} 0.1{hint}")
        i += 1 if inline else 2
        tp = _field_type(key)
        # a name or a path stays as typed (YAML would read --name 1e-3 as a number and cut "run #2" at the
        # #), unless it is quoted, as benchmarks/recipe_verdict.py writes a string: then it is read as YAML
        quoted = len(text) > 1 and text[0] == text[-1] and text[0] in "'\""
        if (tp is str or tp == Optional[str] and text not in _YAML_NULLS) and not quoted:
            value = text
        else:
            try:
                value = parse_yaml(text, f"--{key}") if text.strip() else ""
            except ConfigError:
                opening = text.lstrip()[:1]
                if opening in ("[", "{") and text.rstrip()[-1:] not in ("]", "}"):
                    example = "[2, 2, 2]" if opening == "[" else "{epochs: 2}"
                    raise ConfigError(f"--{key} {text!r} is cut short: the shell splits an unquoted list or mapping "
                                      f"at its spaces; quote it, e.g. --{key} '{example}'") from None
                raise
        for dotted, v in _section_keys(key, value).items():
            if dotted in out:
                raise ConfigError(f"--{dotted} is given twice on the command line: keep one")
            out[dotted] = v
    return out


def _section_keys(key: Any, value: Any) -> dict[str, Any]:
    """A whole section given as a mapping (--train "{epochs: 2}") as its dotted keys (train.epochs), so that
    it changes the keys it names and keeps the others as the file and earlier flags set them."""
    if key not in _sections():
        return {key: value}
    if not isinstance(value, dict):
        first = dataclasses.fields(_sections()[key])[0].name
        raise ConfigError(f"--{key} takes a mapping of {key} keys, e.g. --{key} '{{{first}: VALUE}}' or "
                          f"--{key}.{first} VALUE; got {_show(value)}")
    return {f"{key}.{k}": v for k, v in value.items()}


def _field_type(dotted: str) -> Any:
    """The declared type of a dotted config key (None for no such key)."""
    *path, last = dotted.split(".")
    cls: Any = Config
    for part in path:
        cls = typing.get_type_hints(cls).get(part)
        if not dataclasses.is_dataclass(cls):
            return None
    return typing.get_type_hints(cls).get(last)


def _check_flag(key: str, text: str | None, options: tuple[str, ...]) -> None:
    """A flag without a dot is a top-level key (name, or a whole section given as a mapping), else no
    config key at all: most likely a mistyped option (--dryrun), which "needs a value" would mislead."""
    if "." in key or key == "name":
        return
    sections = _sections()
    if key in sections:
        if text is None or text.startswith("--"):  # a mapping never does: the next flag, not a value
            keys = [f.name for f in dataclasses.fields(sections[key])]
            raise ConfigError(f"--{key} is a config section, not a key: set one of its keys, e.g. "
                              f"--{key}.{keys[0]} VALUE ({key} keys: {', '.join(keys)})")
        return
    raise ConfigError(f"unknown option --{key}: {_suggest(key, options)}")


def _suggest(key: str, options: tuple[str, ...]) -> str:
    # a config key is compared by its last part, so --lr finds --optim.lr and --epoch --train.epochs
    pairs = [(o, o) for o in (*options, "--name")]
    pairs += [(f"--{s}.{f.name}", f"--{f.name}") for s, cls in _sections().items() for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(f"--{key}", {text for _, text in pairs}, n=3, cutoff=0.75)
    flags = [flag for text in close for flag, other in pairs if other == text][:3]
    if flags:
        return f"did you mean {' or '.join(flags)}?"
    return f"the options are {', '.join(options)}; config keys look like --section.key VALUE"


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


def _apply_overrides(values: dict, overrides: dict[str, Any]) -> dict:
    overrides = {k: v for key, value in overrides.items() for k, v in _section_keys(key, value).items()}
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node = values
        for part in path:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--{dotted}: {part!r} is not a section")
            node = child
        node[last] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply dotted overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not str(path).strip() or p.is_dir():
            raise ConfigError(f"--config {str(path)!r} is not a file: name a YAML config, e.g. configs/best.yaml")
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found (the shipped ones are in configs/)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not a UTF-8 text file ({e})") from None
        values = parse_yaml(text, str(p)) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
        values.setdefault("name", p.stem)
    return config_with_overrides(values, overrides)


def config_with_overrides(values: dict, overrides: list[str] | dict | None = None) -> Config:
    """A config from its values (a file's, or the ones a checkpoint saved) and dotted overrides."""
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        values = _apply_overrides(values, ov)
    return config_from_dict(values)


def save_config(cfg: Config, path: str | Path) -> None:
    write_text_atomic(path, dump_yaml(config_to_dict(cfg)))  # a run's resume command reads it back


# --------------------------------------------------------------------------------------------
# Range checks: each error names the key, the value and what is allowed
# --------------------------------------------------------------------------------------------
def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {_show(value)} is out of range: {allowed}")


def validate(cfg: Config) -> None:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        _require(value in allowed, dotted, value, "one of " + ", ".join(allowed))

    d, m, o, t = cfg.data, cfg.model, cfg.optim, cfg.train
    for key, value in (("name", cfg.name), ("data.dir", d.dir), ("output.dir", cfg.output.dir)):
        # each names a folder: the OS refuses a NUL in a path, which would be a traceback after start-up
        _require(value is None or "\0" not in value, key, value, "no NUL character (\\0): it names a folder")
    _validate_sizes(d)
    _require(0 <= d.crop_padding < 32, "data.crop_padding", d.crop_padding,
             "0 <= padding < 32 (the image is 32x32)")
    _require(0 <= d.cutout <= 32, "data.cutout", d.cutout, "0 <= side <= 32 pixels (0: off; the image is 32x32)")
    for key in ("mean", "std"):
        v = getattr(d, key)
        _require(len(v) == 3, f"data.{key}", v, "three values, one per RGB channel")
        _require(all(math.isfinite(x) for x in v), f"data.{key}", v, "finite values (no .inf or .nan)")
    # Pixels are x / 255 in 0..1, normalized to (x / 255 - mean) / std: a mean outside 0..1 (say on the 0..255
    # scale) or a std under one grey level scales them so far that fp16 overflows on the first step and BatchNorm's
    # float32 running variance after it (std 1e-10, mean 1e30), which reads like a divergence at the epoch's end
    _require(all(0 <= x <= 1 for x in d.mean), "data.mean", d.mean, "every mean in 0..1 (pixels are x / 255)")
    _require(all(s >= 1 / 255 for s in d.std), "data.std", d.std,
             "every std >= 1/255, one grey level (pixels are x / 255)")

    _require(m.layers >= 1, "model.layers", m.layers, "must be >= 1")
    for key in ("blocks", "conv_kernel", "shortcut_kernel"):
        v = getattr(m, key)
        _require(len(v) == m.layers, f"model.{key}", v, f"one entry per layer (model.layers = {_show(m.layers)})")
    _require(all(b >= 1 for b in m.blocks), "model.blocks", m.blocks, "every stage needs >= 1 block")
    _require(all(k >= 1 and k % 2 == 1 for k in m.conv_kernel), "model.conv_kernel", m.conv_kernel,
             "odd kernel sizes >= 1 (so padding keeps the spatial size)")
    _require(all(k >= 1 and k % 2 == 1 for k in m.shortcut_kernel), "model.shortcut_kernel",
             m.shortcut_kernel, "odd kernel sizes >= 1")
    _require(m.base_channels >= 1, "model.base_channels", m.base_channels, "must be >= 1")
    final_size = 32 // 2 ** (m.layers - 1)
    _require(final_size >= 1, "model.layers", m.layers, "at most 6 stages for 32x32 inputs")
    _require(1 <= m.pool_kernel <= final_size, "model.pool_kernel", m.pool_kernel,
             f"1..{final_size} (the last stage's feature map is {final_size}x{final_size})")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "0 <= dropout < 1")
    _require(m.se_reduction >= 1, "model.se_reduction", m.se_reduction, "must be >= 1")
    _require(m.num_classes >= 10, "model.num_classes", m.num_classes,
             "must be >= 10: CIFAR-10's labels are 0..9, and a label past the last output stops training")
    _require(m.max_params >= 1, "model.max_params", m.max_params, "must be >= 1")

    # NaN fails every comparison below; infinity passes a lower bound, hence the upper ones (math.inf, or
    # FLOAT32_MAX for what the step hands to float32 kernels)
    _require(0 < o.lr <= FLOAT32_MAX, "optim.lr", o.lr, f"must be > 0 and at most {F32_MAX_SHOWN}")
    _require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "0 <= momentum < 1")
    _require(not o.nesterov or o.momentum > 0, "optim.nesterov", o.nesterov, "Nesterov needs momentum > 0")
    _require(0 <= o.weight_decay <= FLOAT32_MAX, "optim.weight_decay", o.weight_decay,
             f"must be >= 0 and at most {F32_MAX_SHOWN}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas,
             "two values in [0, 1)")
    _require(0 < o.eps < math.inf, "optim.eps", o.eps, "must be > 0 and finite")
    # AdamW's first step is lr / (1 - beta1) (its bias correction), handed to a float32 kernel like lr itself
    _require(o.name != "adamw" or o.lr / (1 - o.betas[0]) <= FLOAT32_MAX, "optim.lr", o.lr,
             f"at most {F32_MAX_SHOWN} x (1 - betas[0] = {_show(o.betas[0])}) with adamw: its first step, lr / (1 - beta1), "
             "must fit a float32")
    _require(0 < o.clip_value <= FLOAT32_MAX, "optim.clip_value", o.clip_value,
             f"must be > 0 and at most {F32_MAX_SHOWN}; optim.clip none turns clipping off")
    _require(o.lookahead_k >= 0, "optim.lookahead_k", o.lookahead_k, "must be >= 0 (0: off)")
    _require(0 < o.lookahead_alpha <= 1, "optim.lookahead_alpha", o.lookahead_alpha, "0 < alpha <= 1")
    _require(0 <= o.warmup_epochs < math.inf, "optim.warmup_epochs", o.warmup_epochs, "must be >= 0 and finite")
    _require(0 <= o.final_lr_frac <= 1, "optim.final_lr_frac", o.final_lr_frac, "0..1")
    _require(0 <= o.label_smoothing < 1, "optim.label_smoothing", o.label_smoothing, "0 <= ls < 1")
    _require(o.impl == "torch" or o.name == "sgd", "optim.impl", o.impl,
             "the fused step implements SGD only: use optim.name sgd or optim.impl torch")
    _require(0 < o.muon_lr <= FLOAT32_MAX, "optim.muon_lr", o.muon_lr, f"must be > 0 and at most {F32_MAX_SHOWN}")
    _require(0 <= o.muon_momentum < 1, "optim.muon_momentum", o.muon_momentum, "0 <= momentum < 1")
    _require(1 <= o.muon_ns_steps <= MAX_NS_STEPS, "optim.muon_ns_steps", o.muon_ns_steps,
             f"must be 1..{MAX_NS_STEPS} (Muon's default: 5)")
    _require(o.name != "muon" or o.lookahead_k == 0, "optim.lookahead_k", o.lookahead_k,
             "must be 0 with optim.name muon (Lookahead's every-k-steps sync would sit on the host, outside a "
             "CUDA graph): pass --optim.lookahead_k 0")

    _require(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _validate_batch(d, t)
    # BatchNorm trains on each channel's values over the batch and the map: 6 stages leave a 1x1 map, so one
    # image per batch is one value per channel, which torch refuses in the first step (the EMA's BN recompute too)
    _require(t.batch_size >= 2 or final_size >= 2, "train.batch_size", t.batch_size,
             f"at least 2 with model.layers = {m.layers}: the last stage's map is 1x1, and BatchNorm needs more "
             "than one value per channel to train")
    _require(t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, "must be >= 1")
    _require(t.eval_every >= 1, "train.eval_every", t.eval_every, "must be >= 1")
    _require(t.eval_test or d.val_size > 0, "train.eval_test", t.eval_test,
             "true, unless data.val_size > 0 holds out a validation split to evaluate instead")
    _require(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "must be >= 1")
    _require(0 <= t.seed < 2**64, "train.seed", t.seed, "0 <= seed < 2**64 (torch.manual_seed takes 64 bits)")
    _require(0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay, "0 <= decay < 1 (0: off)")
    _require(t.ema_warmup_steps >= 0, "train.ema_warmup_steps", t.ema_warmup_steps, "must be >= 0 (0: none)")
    _require(t.ema_bn_batches >= 1, "train.ema_bn_batches", t.ema_bn_batches,
             "must be >= 1 (at most an epoch's batches are used)")


def _validate_sizes(d: DataConfig) -> None:
    """The split against CIFAR-10's sizes, so that --dry-run refuses what loading the data would
    (fasttrain/data/__init__.py, build_data): the validation images come off the end of the full
    training set first, then train_subset takes the first N of the rest."""
    _require(0 <= d.val_size < CIFAR10_TRAIN_IMAGES, "data.val_size", d.val_size,
             f"0..{CIFAR10_TRAIN_IMAGES - 1} (0: no validation split; CIFAR-10 has {CIFAR10_TRAIN_IMAGES:,} "
             "training images)")
    left = CIFAR10_TRAIN_IMAGES - d.val_size
    _require(0 <= d.train_subset <= left, "data.train_subset", d.train_subset,
             f"0..{left} (0: all; the {CIFAR10_TRAIN_IMAGES:,} training images less data.val_size = {d.val_size})")
    _require(0 <= d.test_subset <= CIFAR10_TEST_IMAGES, "data.test_subset", d.test_subset,
             f"0..{CIFAR10_TEST_IMAGES} (0: all; CIFAR-10 has {CIFAR10_TEST_IMAGES:,} test images)")


def _validate_batch(d: DataConfig, t: TrainConfig) -> None:
    """The last partial batch is dropped, so a batch larger than the training images leaves epochs of
    0 steps. This is the one-process bound: under torchrun the batch is per rank and each rank gets
    1/world_size of the images, which build_data checks once the world size is known."""
    if d.train_subset:
        images, source = d.train_subset, f"data.train_subset = {d.train_subset}"
    else:
        images, source = CIFAR10_TRAIN_IMAGES - d.val_size, f"{CIFAR10_TRAIN_IMAGES:,} less data.val_size"
    _require(1 <= t.batch_size <= images, "train.batch_size", t.batch_size,
             f"1..{images}, the training images ({source}), else an epoch has no full batch")
