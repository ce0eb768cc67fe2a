"""Patch-whitening initialisation of the stem convolution (`model.stem_init: whiten`).

The stem's 3x3 filters (3x3 whatever F_1 is, as in the paper) start as the eigenvectors of the
covariance of the training images' 3x3 patches (normalised as the loaders normalise them), each
divided by sqrt(eigenvalue + eps) and kept beside its negative. Convolved with an image, the filters
give decorrelated projections of its patches with about unit variance, and after the stem's ReLU one
channel carries each sign: from the first step the network sees the input with its strong, smooth
directions no louder than its fine detail. This is airbench's frozen whitening layer (Jordan 2024,
after hlb-CIFAR10), adapted to the paper's 3x3 stem with BatchNorm after it; `model.stem_frozen`
keeps the filters as they start.

A 3x3 patch of 3 channels has 27 values, so 54 filters; a stem of more channels (the paper's 64) keeps
its Kaiming initialisation in the rest, and a stem of fewer takes the eigenvectors of the largest
eigenvalues first. The covariance is estimated from the first `WHITEN_IMAGES` training images in
float64 on the stem's device (2.5 s on a 2-core CPU; on a GPU a few dozen small kernels, not timed
yet: either way it counts in the training clock), its 27 x 27 eigendecomposition on the CPU; DDP then
hands every rank rank 0's filters.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

WHITEN_IMAGES = 5000  # training images whose patches estimate the covariance (airbench: 5,000)
WHITEN_EPS = 5e-4     # added to each eigenvalue: keeps near-null directions (variance ~1e-4) from blowing up
_CHUNK = 250          # images per step of the estimate: 250 x 900 patches x 27 values = 49 MB in float64


def patch_covariance(images: np.ndarray, mean, std, kernel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[d, d] float64 covariance (on the CPU) of every (valid, unpadded) kernel x kernel patch of
    `images` (uint8 [N, H, W, C]) after (x / 255 - mean) / std, computed on `device`; d = C x kernel x
    kernel, flattened in the order of a convolution weight's (in_channels, kh, kw)."""
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"need uint8 images [N, H, W, C] with N >= 1; got {images.dtype} {list(images.shape)}")
    c = images.shape[-1]
    f64 = dict(dtype=torch.float64, device=device)
    mean, std = torch.tensor(mean, **f64).view(1, c, 1, 1), torch.tensor(std, **f64).view(1, c, 1, 1)
    d = c * kernel * kernel
    second, total, count = torch.zeros(d, d, **f64), torch.zeros(d, **f64), 0
    for start in range(0, len(images), _CHUNK):
        x = torch.from_numpy(images[start:start + _CHUNK]).to(device).permute(0, 3, 1, 2).double()
        x = (x / 255 - mean) / std
        patches = x.unfold(2, kernel, 1).unfold(3, kernel, 1)        # [n, C, H', W', k, k]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, d)  # one row per patch: (C, kh, kw)
        second += patches.T @ patches
        total += patches.sum(0)
        count += len(patches)
    centre = total / count
    return (second / count - torch.outer(centre, centre)).cpu()


def whitening_filters(images: np.ndarray, mean, std, kernel: int, eps: float = WHITEN_EPS,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """[d, C, kernel, kernel] float32 on the CPU: the patch covariance's eigenvectors, largest
    eigenvalue first, each divided by sqrt(eigenvalue + eps)."""
    values, vectors = torch.linalg.eigh(patch_covariance(images, mean, std, kernel, device))  # ascending
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    # an eigenvector's sign is arbitrary (LAPACK builds may differ): make each one's largest entry positive,
    # so the same covariance gives the same filter in the same channel everywhere
    largest = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
    vectors = vectors * torch.where(largest < 0, -1.0, 1.0)
    filters = (vectors / torch.sqrt(values + eps)).T                                  # one row per filter
    return filters.reshape(-1, images.shape[-1], kernel, kernel).float()


@torch.no_grad()
def whiten_stem(conv: nn.Conv2d, images: np.ndarray, mean, std, eps: float = WHITEN_EPS) -> int:
    """Set the leading output channels of `conv` to +- the whitening filters of `images` (the first
    `WHITEN_IMAGES` are used); the rest keep their values. Returns how many channels were set."""
    k = conv.kernel_size[0]
    if conv.kernel_size != (k, k) or conv.groups != 1 or conv.in_channels != images.shape[-1]:
        raise ValueError(f"whitening needs a square, ungrouped convolution of the images' {images.shape[-1]} "
                         f"channels; got {conv}")
    filters = whitening_filters(images[:WHITEN_IMAGES], mean, std, k, eps, device=conv.weight.device)
    pairs = min(len(filters), conv.out_channels // 2)
    conv.weight[:2 * pairs].copy_(torch.cat([filters[:pairs], -filters[:pairs]]).to(conv.weight))
    return 2 * pairs
