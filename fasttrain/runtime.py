"""Where and how a run executes: device, precision, memory format, and provenance (git sha, device name)."""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from fasttrain.config import Config, ConfigError
from fasttrain.distributed import DistInfo


def resolve_device(name: str = "auto", dist_info: DistInfo | None = None) -> torch.device:
    if name not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"--device {name!r}: use auto, cuda or cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to PyTorch (use --device cpu)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", dist_info.local_rank if dist_info else 0)


@dataclass(frozen=True)
class Precision:
    name: str                        # bf16 | fp16 | fp32
    autocast_dtype: torch.dtype | None
    data_dtype: torch.dtype          # dtype the loaders hand to the model

    @staticmethod
    def resolve(precision: str, device: torch.device) -> "Precision":
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        return {
            "bf16": Precision("bf16", torch.bfloat16, torch.bfloat16),
            "fp16": Precision("fp16", torch.float16, torch.float16),
            "fp32": Precision("fp32", None, torch.float32),
        }[precision]

    def autocast(self, device: torch.device, cache: bool = True):
        """`cache=False` under CUDA-graph capture: autocast's cast cache must not outlive the capture."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype, cache_enabled=cache)


def use_channels_last(cfg: Config, device: torch.device, warn=None) -> bool:
    """train.channels_last, except where a known PyTorch bug makes it unsafe.

    torch 2.14's CPU (oneDNN) backward of a strided 1x1 convolution with channels_last input and
    fewer than 8 channels corrupts memory or hangs; such tiny nets run NCHW on the CPU, compiled or
    not (no effect on GPUs, where channels_last is what makes the convolutions fast).
    """
    tiny_on_cpu = device.type == "cpu" and cfg.model.base_channels < 8
    if tiny_on_cpu and cfg.train.compile:
        # inductor picks channels_last for convolutions by itself ("layout optimisation"), whatever this
        # function returns: seen to segfault, or hang in oneDNN's 1x1 weight backward, for such nets
        import torch._inductor.config as inductor_config

        inductor_config.layout_optimization = False
    if not cfg.train.channels_last:
        return False
    if tiny_on_cpu:
        if warn is not None:
            warn("train.channels_last is off for this run: on the CPU, channels_last with fewer than 8 "
                 "channels (model.base_channels) hits a PyTorch oneDNN bug")
        return False
    return True


def git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        # this very file tracked, or the repository is not fasttrain's: an installed copy inside a user's own
        # repository (a .venv in a project, a $HOME kept in git) would report that repository's commit
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", Path(__file__).name], cwd=here,
                                 capture_output=True, text=True, timeout=5)
        if tracked.returncode != 0:
            return "unknown"
        head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5)
        sha = head.stdout.strip() if head.returncode == 0 else ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
