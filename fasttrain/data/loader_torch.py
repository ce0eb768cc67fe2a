"""GPU-resident torch data path: the uint8 images live on the device, augmentation is batched tensor ops.

Per training epoch, a CPU generator seeded from (seed, epoch) draws the shuffle, the crop offsets, the
flip bits and the optional cutout boxes in one go (so CPU and GPU runs see the same stream, and a
resumed run continues it); they reach the device in one copy. Each batch is then one gather from the
zero-padded uint8 images (crop and flip folded into per-sample row/column index grids) plus the
normalization (and cutout, a masked fill from broadcast compares): no host sync per step.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from fasttrain.config import CHOICES


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for one epoch. SeedSequence mixes (seed, epoch) so that, unlike seed + epoch,
    run seed=1 epoch=0 does not replay run seed=0 epoch=1."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(state))
    return generator


FLIP_MODES = CHOICES["data.flip_mode"]  # the config's list: one place says which modes exist


def check_flip_mode(flip_mode: str) -> None:
    """Both loaders refuse an unknown flip_mode when built, before any epoch is drawn."""
    if flip_mode not in FLIP_MODES:
        raise ValueError(f"flip_mode must be one of {', '.join(FLIP_MODES)}, got {flip_mode!r}")


class EpochDraws(NamedTuple):
    """One training epoch's randomness for the whole data set (see `epoch_draws`)."""

    order: torch.Tensor     # int64 [n]: the shuffle
    offsets: torch.Tensor   # int64 [n, 2]: (row, col) of the crop window in the padded image, 0..2p
    flips: torch.Tensor     # int64 [n]: 1 to mirror
    cutout: torch.Tensor | None  # int64 [n, 4]: (top, left, height, width) of the erased box, or None


def alternating_flip_bits(seed: int, n: int) -> torch.Tensor:
    """int64 [n]: each image's flip in even epochs under flip_mode alternating (odd epochs invert it).
    Drawn once per run from its own stream (SeedSequence spawn key 1), apart from the epochs'."""
    state = np.random.SeedSequence(seed, spawn_key=(1,)).generate_state(1, np.uint64)[0]
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(state))
    return torch.randint(0, 2, (n,), generator=generator)


def epoch_draws(seed: int, epoch: int, n: int, padding: int, flip: bool, cutout: int = 0,
                image_hw: tuple[int, int] = (32, 32), flip_mode: str = "random") -> EpochDraws:
    """One training epoch's randomness for the whole data set, on the CPU: the shuffle, the crop
    offsets (uniform on 0..2*padding per axis: every offset equally likely), the flip bits and, with
    `cutout` > 0, the cutout boxes, drawn in that order from epoch_generator(seed, epoch) (the boxes
    last, so switching cutout on changes nothing else). Both loaders take their stream from here, so
    switching data.loader does not change what a run trains on.

    flip_mode "alternating" (airbench): image j is flipped in epoch e iff its run-long coin
    (`alternating_flip_bits`) XOR (e odd), so every image is seen both ways in every two epochs. The
    random flips are drawn all the same, so the cutout boxes after them do not depend on the mode.

    Cutout (DeVries and Taylor 2017): a `cutout` x `cutout` square centred on a pixel drawn uniformly
    from the output image, clipped at its edges, is set to 0 after normalization (the mean colour).
    A box is (top, left, height, width) in output-image pixels, never empty."""
    check_flip_mode(flip_mode)
    generator = epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=generator)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.randint(0, 2, (n,), generator=generator) * int(flip)
    if flip and flip_mode == "alternating":
        flips = alternating_flip_bits(seed, n)[order] ^ (epoch % 2)
    boxes = None
    if cutout > 0:
        size = torch.tensor(image_hw)
        centers = torch.stack([torch.randint(0, image_hw[0], (n,), generator=generator),
                               torch.randint(0, image_hw[1], (n,), generator=generator)], dim=1)
        start = centers - cutout // 2
        top_left = start.clamp(min=0)
        boxes = torch.cat([top_left, torch.minimum(start + cutout, size) - top_left], dim=1)
    return EpochDraws(order, offsets, flips, boxes)


def shard_bounds(n: int, *, batch_size: int, train: bool, drop_last: bool, rank: int,
                 world_size: int) -> tuple[int, int]:
    """``(samples, batches)`` that rank `rank` yields per epoch, the rule of both loaders.

    Training: every rank takes ``n // world_size`` positions of the shuffled epoch (the same count
    everywhere, so distributed ranks step in lockstep). Evaluation: rank r holds the contiguous
    shard ``[n r / world_size, n (r + 1) / world_size)``, so the shards cover the set once.
    `drop_last` then truncates to whole batches."""
    if train:
        m = n // world_size  # every rank the same, so all ranks step in lockstep
    else:
        m = n * (rank + 1) // world_size - n * rank // world_size
    if drop_last:
        m = (m // batch_size) * batch_size
    return m, -(-m // batch_size)


def shard_slice(n: int, *, batch_size: int, train: bool, drop_last: bool, rank: int, world_size: int) -> slice:
    """The positions rank `rank` takes, as a slice of the epoch's order (training: the shuffled
    permutation; evaluation: ``range(n)``), holding exactly `shard_bounds`' sample count. Training:
    every `world_size`-th position from `rank`; evaluation: its contiguous shard. Both loaders cut
    their epochs with it, so they shard alike."""
    m, _ = shard_bounds(n, batch_size=batch_size, train=train, drop_last=drop_last, rank=rank,
                        world_size=world_size)
    if train:  # m <= n // world_size, so the m-th stride still lands inside range(n)
        return slice(rank, rank + m * world_size, world_size)
    start = n * rank // world_size
    return slice(start, start + m)


def _as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        array = array.copy()  # torch.from_numpy warns on read-only buffers (np.frombuffer views)
    return torch.as_tensor(array)


class TorchLoader:
    """The loader protocol (docs/ARCHITECTURE.md) over an in-memory NHWC uint8 array.

    `num_samples` is what this rank yields per epoch (after sharding and dropping the remainder).
    Iterating without `set_epoch` moves on to the next epoch, so repeated passes never repeat the
    stream silently; `set_epoch(e)` pins it (resume, distributed).
    """

    def __init__(
        self,
        x_nhwc_uint8: np.ndarray | torch.Tensor,
        y: np.ndarray | torch.Tensor,
        *,
        batch_size: int,
        train: bool,
        device: str | torch.device,
        dtype: torch.dtype,
        mean: Sequence[float],
        std: Sequence[float],
        channels_last: bool = True,
        crop_padding: int = 4,
        flip: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        cutout: int = 0,
        flip_mode: str = "random",
    ):
        images, labels = _as_tensor(x_nhwc_uint8), _as_tensor(y)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            # .long() would truncate 1.5 to 1 without a word (DaliLoader refuses them alike)
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        labels = labels.long()
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(images)} images but labels of shape {list(labels.shape)}")
        if not 0 <= rank < world_size or batch_size < 1 or crop_padding < 0 or seed < 0 or cutout < 0:
            raise ValueError(f"bad rank={rank}/world_size={world_size}, batch_size={batch_size}, "
                             f"crop_padding={crop_padding}, seed={seed} or cutout={cutout}")
        check_flip_mode(flip_mode)
        self.batch_size, self.train, self.dtype, self.channels_last = batch_size, train, dtype, channels_last
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.drop_last = train if drop_last is None else drop_last
        self.padding = crop_padding if train else 0
        self.flip = flip and train
        self.cutout = cutout if train else 0
        self.flip_mode = flip_mode
        self.image_hw = tuple(images.shape[1:3])
        self._dataset_size = n = len(images)
        if not train:  # only this rank's contiguous evaluation shard is kept (see shard_bounds)
            shard = shard_slice(n, batch_size=batch_size, train=False, drop_last=False, rank=rank,
                                world_size=world_size)
            images, labels = images[shard], labels[shard]
        self.num_samples, _ = shard_bounds(n, batch_size=batch_size, train=train, drop_last=self.drop_last,
                                           rank=rank, world_size=world_size)
        # training: this rank's positions in every epoch's draws (the epochs differ, the positions do not)
        self._train_shard = shard_slice(n, batch_size=batch_size, train=True, drop_last=self.drop_last, rank=rank,
                                        world_size=world_size) if train else None
        if self.drop_last and self.num_samples == 0:
            raise ValueError(f"batch_size={batch_size} leaves no full batch of the {self._dataset_size} images "
                             f"on each of {world_size} rank(s)")

        # the one host-to-device copy of the data set; the padded copy is built once, on the device
        images, self._labels = images.to(self.device), labels.to(self.device)
        if self.padding:
            p, (h, w) = self.padding, self.image_hw
            padded = images.new_zeros((len(images), h + 2 * p, w + 2 * p, 3))
            padded[:, p:p + h, p:p + w] = images
            images = padded
        self._images = images
        # normalization constants broadcast over NHWC batches, kept in fp32
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 1, 1, 3)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 1, 1, 3)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self._train_batches(epoch) if self.train else self._eval_batches()

    def _epoch_draws(self, epoch: int) -> torch.Tensor:
        """This rank's [num_samples, 4] (index, row offset, col offset, flip) for `epoch`, on the device,
        with 4 more columns (the cutout box: top, left, height, width) when cutout is on.

        Everything is drawn for the whole data set before sharding, so a sample's augmentation does not
        depend on world_size and the ranks' slices of one permutation are disjoint.
        """
        d = epoch_draws(self.seed, epoch, self._dataset_size, self.padding, self.flip, self.cutout, self.image_hw,
                        self.flip_mode)
        draws = torch.cat([d.order[:, None], d.offsets, d.flips[:, None], *([d.cutout] if self.cutout else [])],
                          dim=1)
        draws = draws[self._train_shard]
        if self.device.type == "cuda":  # from pinned memory: the copy does not stall the host
            return draws.pin_memory().to(self.device, non_blocking=True)
        return draws

    def _train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        draws = self._epoch_draws(epoch)
        index, row_offset, col_offset, flip = draws[:, :4].unbind(1)
        (h, w), device = self.image_hw, self.device
        rows = row_offset[:, None] + torch.arange(h, device=device)  # [M, h] rows of the padded image
        forward, backward = torch.arange(w, device=device), torch.arange(w - 1, -1, -1, device=device)
        cols = col_offset[:, None] + torch.where(flip[:, None].bool(), backward, forward)  # [M, w]
        for start in range(0, self.num_samples, self.batch_size):
            batch = slice(start, start + self.batch_size)
            # one gather does crop and flip: [B,1,1] x [B,h,1] x [B,1,w] indices -> [B, h, w, 3] uint8
            pixels = self._images[index[batch, None, None], rows[batch, :, None], cols[batch, None, :]]
            erase = self._cutout_mask(draws[batch, 4:]) if self.cutout else None
            yield self._normalize(pixels, erase), self._labels[index[batch]]

    def _eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_samples, self.batch_size):
            batch = slice(start, start + self.batch_size)
            yield self._normalize(self._images[batch]), self._labels[batch]

    def _cutout_mask(self, boxes: torch.Tensor) -> torch.Tensor:
        """[B, h, w, 1] bool, True inside each sample's box (top, left, height, width): broadcast compares."""
        (h, w), device = self.image_hw, self.device
        top, left, height, width = boxes[:, :, None].unbind(1)  # each [B, 1]
        r, c = torch.arange(h, device=device), torch.arange(w, device=device)
        inside_rows = (r >= top) & (r < top + height)    # [B, h]
        inside_cols = (c >= left) & (c < left + width)   # [B, w]
        return (inside_rows[:, :, None] & inside_cols[:, None, :])[..., None]

    def _normalize(self, pixels: torch.Tensor, erase: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 NHWC -> (x/255 - mean)/std in fp32, cutout's box (`erase`) set to 0, cast to the output
        dtype, viewed as [B, 3, H, W]."""
        x = pixels.float().div_(255).sub_(self._mean).div_(self._std)
        if erase is not None:
            x.masked_fill_(erase, 0.0)
        x = x.to(self.dtype)
        x = x.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW is exactly channels_last: no copy
        return x if self.channels_last else x.contiguous()
