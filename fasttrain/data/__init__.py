"""CIFAR-10 readers and the training/evaluation data paths; `build_data` picks the loader."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fasttrain.data.cifar import CifarArrays, DataError, load_cifar10, resolve_data_dir, split_validation
from fasttrain.data.loader_torch import TorchLoader

__all__ = ["CifarArrays", "DataBundle", "DataError", "TorchLoader", "build_data", "data_location", "load_cifar10",
           "resolve_data_dir", "split_validation"]


@dataclass
class DataBundle:
    train: Any  # a loader (protocol in docs/ARCHITECTURE.md); None with build_data(test_only=True)
    val: Any | None  # None when data.val_size == 0
    test: Any
    classes: list[str]
    source: str
    test_images: int = 0  # how many test images `test` scores (data.test_subset, else all)
    # uint8 [N, H, W, C]: the training split's images, the same on every rank (what model.stem_init: whiten
    # estimates its filters on)
    train_images: Any = None


def data_location(source: str) -> str:
    """Where a DataBundle.source (or a checkpoint's data_source) read its images from: the reader's part,
    without the split and the loader build_data appends after it ("; train ..., test ... images; loader ...")."""
    return source.rsplit("; ", 2)[0]


def _loader_class(name: str):
    # "auto" is the torch path: measured faster than DALI alone and no slower inside a training step
    # (H200, benchmarks/bench_loader.py; README, "Data paths"); a faster DALI measurement would change it.
    if name in ("auto", "torch"):
        return TorchLoader
    if name == "dali":
        from fasttrain.data.dali import DaliLoader  # lazy: DALI is optional; that module gives the install hint

        return DaliLoader
    raise DataError(f"data.loader must be auto, dali or torch, got {name!r}")


def _first(x, y, count: int, key: str):
    """The first `count` samples (0 = all), for smoke runs."""
    if not 0 <= count <= len(x):
        raise DataError(f"{key}={count} must be in 0..{len(x)} (0 = all {len(x)} images)")
    return (x[:count], y[:count]) if count else (x, y)


def build_data(data_cfg, *, batch_size: int, eval_batch_size: int, device: str | torch.device,
               dtype: torch.dtype, channels_last: bool, seed: int, rank: int = 0,
               world_size: int = 1, test_only: bool = False) -> DataBundle:
    """The loaders of one run. `test_only` (scoring a checkpoint): the test loader alone; no training
    set is uploaded (154-240 MB of a GPU's memory) and `train` and `val` are None."""
    arrays = load_cifar10(resolve_data_dir(data_cfg.dir), download=data_cfg.download)
    # the validation images come off the end of the full training set first, so train_subset never
    # changes which images are validated on
    train_x, train_y, val_x, val_y = split_validation(arrays, data_cfg.val_size)
    train_x, train_y = _first(train_x, train_y, data_cfg.train_subset, "data.train_subset")
    test_x, test_y = _first(arrays.test_x, arrays.test_y, data_cfg.test_subset, "data.test_subset")
    per_rank = len(train_x) // world_size
    if batch_size > per_rank and not test_only:
        raise DataError(f"batch_size={batch_size} is larger than the training images each rank gets "
                        f"({len(train_x)} images / {world_size} rank(s) = {per_rank}); lower the batch "
                        "size, or raise data.train_subset / lower data.val_size.")

    loader_class = _loader_class(data_cfg.loader)
    common = dict(device=device, dtype=dtype, mean=data_cfg.mean, std=data_cfg.std, channels_last=channels_last,
                  crop_padding=data_cfg.crop_padding, flip=data_cfg.flip, flip_mode=data_cfg.flip_mode, seed=seed,
                  rank=rank, world_size=world_size)
    loader_name = loader_class.__name__
    if loader_class is not TorchLoader:  # DALI's own switch (config: "data.loader dali only")
        common["graph"] = data_cfg.dali_graph
        loader_name += f" ({common['graph']} graph)"
    test = loader_class(test_x, test_y, batch_size=eval_batch_size, train=False, **common)
    if test_only:
        return DataBundle(train=None, val=None, test=test, classes=arrays.classes, test_images=len(test_x),
                          source=f"{arrays.source}; test {len(test_x)} images; loader {loader_name}")
    train = loader_class(train_x, train_y, batch_size=batch_size, train=True, cutout=data_cfg.cutout, **common)
    val = None if val_x is None else loader_class(val_x, val_y, batch_size=eval_batch_size, train=False, **common)
    source = (f"{arrays.source}; train {len(train_x)}, val {0 if val_x is None else len(val_x)}, "
              f"test {len(test_x)} images; loader {loader_name}")
    return DataBundle(train=train, val=val, test=test, classes=arrays.classes, source=source,
                      test_images=len(test_x), train_images=train_x)
