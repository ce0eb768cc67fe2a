"""Top-1 accuracy: of a model during training, and of a saved checkpoint (`python -m fasttrain eval`).

Test-time augmentation (`train.tta`, `python -m fasttrain eval --tta MODE`) averages the logits of
several views of each test image, with the weights of `tta_views`:

* ``none``: the image alone;
* ``flip``: the image and its horizontal mirror, 1/2 each (the flip augmentation's test-time twin);
* ``flip_shift`` (airbench-style): 1/4 each for the image and its mirror, and 1/8 each for four
  translated views: the image moved by one pixel down and right, and moved one pixel up and left,
  each also mirrored. A translated view is the image padded by one pixel on every side with the
  fill value and cropped 32x32 at offset (0, 0) (content moves +1 row, +1 column) or (2, 2)
  (content moves -1 row, -1 column); airbench pads by reflection instead. The fill is the
  normalized value of a zero (black) pixel, ``-mean/std`` per channel, the same pixel the training
  crop pads with, so the new border row and column look like the training augmentation's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fasttrain.checkpoint import check_architecture, load_checkpoint, saved_config, select_weights
from fasttrain.config import CHOICES, validate
from fasttrain.data import build_data
from fasttrain.data.cifar import ENV_VAR
from fasttrain.distributed import DistInfo, all_reduce_sum
from fasttrain.model import build_model, count_params
from fasttrain.runtime import Precision, device_name, resolve_device, use_channels_last

TTA_MODES = CHOICES["train.tta"]


def black_fill(mean: Sequence[float], std: Sequence[float]) -> list[float]:
    """The normalized value of a zero (black) pixel per channel: what the training crop pads with."""
    return [-m / s for m, s in zip(mean, std)]


def shift_image(images: torch.Tensor, dy: int, dx: int,
                fill: float | Sequence[float] | torch.Tensor = 0.0) -> torch.Tensor:
    """`images` [B, C, H, W] translated by (dy, dx) pixels (|dy|, |dx| <= 1 is all TTA uses): output
    pixel (y, x) is input pixel (y - dy, x - dx), and pixels with no source take `fill` (a number,
    one per channel, or those as a tensor on the images' device: `evaluate` builds it once, so
    no batch copies it to the GPU). Same shape, dtype and memory format as the input."""
    b, c, h, w = images.shape
    p = max(abs(dy), abs(dx))
    if p == 0:
        return images
    padded = F.pad(images, (p, p, p, p), value=0.0)
    fill_t = fill_tensor(fill, images)
    if fill_t is not None:  # paint the border
        inside = torch.zeros((1, 1, h + 2 * p, w + 2 * p), dtype=torch.bool, device=images.device)
        inside[..., p:p + h, p:p + w] = True
        padded = torch.where(inside, padded, fill_t.reshape(1, -1, 1, 1).expand(1, c, 1, 1))
    out = padded[:, :, p - dy:p - dy + h, p - dx:p - dx + w]
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def fill_tensor(fill: float | Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """`fill` as a tensor of `like`'s dtype and device, or None for an all-zero number or list (the
    zero padding already is that fill). A tensor is taken as it is, zeros included."""
    if isinstance(fill, torch.Tensor):
        return fill.to(dtype=like.dtype, device=like.device)
    values = [float(fill)] if isinstance(fill, (int, float)) else [float(v) for v in fill]
    if all(v == 0.0 for v in values):
        return None
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def tta_views(images: torch.Tensor, mode: str,
              fill: float | Sequence[float] | torch.Tensor = 0.0) -> list[tuple[torch.Tensor, float]]:
    """The (view, weight) pairs whose weighted logits `evaluate` sums; the weights sum to 1."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta mode {mode!r}: expected one of {', '.join(TTA_MODES)}")
    if mode == "none":
        return [(images, 1.0)]
    mirror = torch.flip(images, dims=(3,))
    if mode == "flip":
        return [(images, 0.5), (mirror, 0.5)]
    views = [(images, 0.25), (mirror, 0.25)]
    for dy, dx in ((1, 1), (-1, -1)):
        shifted = shift_image(images, dy, dx, fill)
        views += [(shifted, 0.125), (torch.flip(shifted, dims=(3,)), 0.125)]
    return views


@torch.no_grad()
def evaluate(model: nn.Module, loader, precision: Precision, device: torch.device,
             tta: str = "none", dist_info: DistInfo | None = None,
             fill: float | Sequence[float] = 0.0) -> float:
    """Top-1 accuracy in percent. Counts (not per-rank averages) are summed across ranks.

    `tta`: none | flip | flip_shift (see the module docstring); `fill`: the padding value of the
    shifted views (the trainer and `evaluate_checkpoint` pass `black_fill(mean, std)`)."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta mode {tta!r}: expected one of {', '.join(TTA_MODES)}")
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    fill_on_device = {}  # per dtype, the shifted views' fill copied to the device once, not per batch
    for images, labels in loader:
        if tta == "flip_shift" and images.dtype not in fill_on_device:
            fill_on_device[images.dtype] = fill_tensor(fill, images)
        view_fill = fill_on_device.get(images.dtype)
        with precision.autocast(device):
            logits = None
            for view, weight in tta_views(images, tta, 0.0 if view_fill is None else view_fill):
                out = model(view).float()
                logits = out if tta == "none" else (weight * out if logits is None else logits + weight * out)
        correct += (logits.argmax(1) == labels).sum()
        total += labels.numel()
    model.train(was_training)
    counts = torch.stack([correct, total])
    if dist_info is not None:
        all_reduce_sum(counts, dist_info)
    correct_n, total_n = counts.tolist()
    return 100.0 * correct_n / max(1, total_n)


def _network(ckpt: dict, cfg, weights: str, path: str | Path) -> tuple[str, torch.nn.Module]:
    """(which weights, the checkpoint's network holding them) on the CPU, in fp32."""
    used, state = select_weights(ckpt, weights, repr(str(path)))
    model = build_model(cfg.model, check=False)
    check_architecture(model, state, str(path))
    model.load_state_dict(state)  # a bf16 export's weights are cast to the fp32 parameters
    return used, model


def use_local_data(cfg, data_dir: str | None = None) -> None:
    """Point a checkpoint's config at this machine's CIFAR-10: `data_dir`, else $FASTTRAIN_DATA, else the
    run's own data.dir (its training machine's path), else ./data."""
    if data_dir is not None:
        cfg.data.dir = data_dir
    elif os.environ.get(ENV_VAR):  # this machine's copy, before the path the run was trained with
        cfg.data.dir = None


def load_model(path: str | Path, *, weights: str = "auto", device: str | torch.device = "cpu"):
    """A checkpoint's or exported weights file's network for your own code: (model, config), the model
    in eval mode, fp32, on `device`. Its input: RGB images as floats in [0, 1], N x 3 x 32 x 32, each
    channel normalized with config.data.mean and config.data.std; its output: model.num_classes logits
    (CIFAR-10's 10 in the order of its batches.meta). Read safely (weights_only, checksummed), like `eval` reads it."""
    ckpt = load_checkpoint(path, map_location="cpu")
    cfg = saved_config(ckpt, path)
    _, model = _network(ckpt, cfg, weights, path)
    return model.to(device).eval(), cfg


def evaluate_checkpoint(path: str | Path, *, tta: str = "none", device: str = "auto",
                        data_dir: str | None = None, weights: str = "auto", test_subset: int | None = None) -> dict:
    """`python -m fasttrain eval`: rebuild the checkpoint's model and measure its test accuracy.

    On the test images the run scored (its data.test_subset: the run's own figure is reproduced), or
    on the first `test_subset` of them (0: all); "test_images" says how many were scored.

    `tta`: a mode of TTA_MODES, or ``all``: every mode, as "test_acc_by_tta" {mode: accuracy}, with
    "test_acc" the accuracy without TTA (accuracy with and without TTA from one load).
    `weights`: auto (the EMA weights when the checkpoint holds them, else the model's) | ema | model.
    The result says which were evaluated under "weights". The data: `data_dir`, else $FASTTRAIN_DATA,
    else the run's own data.dir (its training machine's path), else ./data."""
    if tta != "all" and tta not in TTA_MODES:
        raise ValueError(f"tta mode {tta!r}: expected one of {', '.join(TTA_MODES)}, or all")
    dev = resolve_device(device)
    ckpt = load_checkpoint(path, map_location=dev)
    cfg = saved_config(ckpt, path)
    if test_subset is not None:  # validated with the rest (a ConfigError, exit 2, naming the range)
        cfg.data.test_subset = test_subset
        validate(cfg)
    # the test images are read in order alike by both loaders: the torch path scores weights trained with
    # DALI where DALI is not installed (a laptop, a CPU box) without a word of it
    cfg.data.loader = "torch"
    use_local_data(cfg, data_dir)
    used, model = _network(ckpt, cfg, weights, path)
    model = model.to(dev)
    channels_last = use_channels_last(cfg, dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision = Precision.resolve(cfg.train.precision, dev)
    data = build_data(cfg.data, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
                      device=dev, dtype=precision.data_dtype, channels_last=channels_last,
                      seed=cfg.train.seed, test_only=True)
    fill = black_fill(cfg.data.mean, cfg.data.std)
    by_tta = {mode: evaluate(model, data.test, precision, dev, tta=mode, fill=fill)
              for mode in (TTA_MODES if tta == "all" else (tta,))}
    result = {"checkpoint": str(path), "test_acc": by_tta["none" if tta == "all" else tta], "tta": tta,
              "test_images": data.test_images,
              "weights": used, "epoch": int(ckpt["epoch"]), "params": count_params(model),
              "trained_on": ckpt.get("data_source"), "device": device_name(dev),
              "note": (ckpt.get("export") or {}).get("note")}  # the label export --note gave the weights
    if tta == "all":
        result["test_acc_by_tta"] = by_tta
    return result
