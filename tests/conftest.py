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
    """The folder holding real CIFAR-10 (official layout), from $FASTTRAIN_DATA.

    CI decodes the JPEG-75 stand-in there; a developer does the same once:
        python ../shared/data/cifar10-jpeg75/build.py DIR && export FASTTRAIN_DATA=DIR
    """
    root = os.environ.get("FASTTRAIN_DATA")
    if not root or not Path(root).is_dir():
        pytest.fail("FASTTRAIN_DATA must point at a folder holding CIFAR-10 (official layout): run "
                    "`python ../shared/data/cifar10-jpeg75/build.py DIR && export FASTTRAIN_DATA=DIR`")
    return Path(root)
