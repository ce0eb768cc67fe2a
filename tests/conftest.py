"""Shared test set-up.

Triton kernels run on the CPU under the interpreter: TRITON_INTERPRET must be set before any kernel
module is imported, so it is set here, at collection time, when there is no CUDA device. On the GPU
machine it stays unset and the `gpu`-marked tests compile the real kernels.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The folder holding real CIFAR-10, found the way the trainer finds it: $FASTTRAIN_DATA, else ./data.

    If neither holds it, the official tarball is downloaded into ./data once (md5-checked); offline,
    the tests fail with the loader's message saying where to put which files. CI decodes the JPEG-75
    stand-in instead (`python ../shared/data/cifar10-jpeg75/build.py DIR; export FASTTRAIN_DATA=DIR`).
    """
    from fasttrain.data.cifar import DataError, find_cifar10, load_cifar10, resolve_data_dir

    root = resolve_data_dir(None)
    if find_cifar10(root) is None:
        try:
            load_cifar10(root, download=True)
        except DataError as e:
            pytest.fail(f"no CIFAR-10 for the tests: {e}")
    return root
