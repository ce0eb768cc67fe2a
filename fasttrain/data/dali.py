"""The DALI data path: the same loader protocol as `loader_torch.TorchLoader`, run by NVIDIA DALI.

See docs/ARCHITECTURE.md ("Loader protocol") for the contract. This module imports `nvidia.dali`
lazily, inside `DaliLoader`, so `import fasttrain.data.dali` works without DALI installed; only
constructing a loader needs it (install with ``pip install 'fasttrain-resnet[dali]'``).

Design
------
* **Where the randomness comes from.** The epoch's shuffle, crop offsets and flip bits are drawn
  on the host from one CPU generator seeded by ``(seed, epoch)`` -- the very draws of the torch
  path, so both loaders yield the same stream for a seed (see `epoch_plan`) -- and fed into the
  pipeline through `fn.external_source`; the pipeline itself has no random operators. The stream
  is thus a pure function of ``(seed, epoch, rank)``: independent of DALI's thread count,
  prefetch depth, CPU or GPU backend and DALI version, identical between the CPU pipeline the
  tests run and the GPU pipeline training runs, and checkable pixel by pixel. Drawing the
  augmentation per *position in the epoch* before sharding also makes the union of all ranks'
  streams independent of the world size. The alternative, DALI's own `fn.random.*` with a seed
  per (seed, epoch, rank), would need a pipeline rebuild per epoch and could be checked only
  statistically.
* **One operator for crop, flip and normalisation.** The ``samples`` graph keeps its uint8 training
  images zero-padded by p once, at construction (``(H + 2p) x (W + 2p)``: 240 MB for CIFAR-10's 50,000
  training images instead of 154 MB), so the random crop is an in-bounds window of the padded image
  and `fn.crop_mirror_normalize` does crop, flip and ``(x - 255 mean) / (255 std)``
  (= ``(x / 255 - mean) / std``) in one pass, with no intermediate batch. (An `fn.slice` with
  absolute starts and ``out_of_bounds_policy="pad"`` before it did the same in two operators;
  with one, the loader on DALI's CPU backend went from 53,475 to 61,852 images/s, batch 512, on a
  2-core CPU, DALI 2.4.0; its GPU gain is measured by benchmarks/bench_loader.py.)
* **Three graphs** (`graph`, the config's ``data.dali_graph``). ``samples``: each image
  is one DALI sample, cropped, flipped and normalised by the one operator above. ``sequence`` (the
  default, the fastest measured): the whole batch is ONE sample, a sequence of frames (layout ``FHWC``), so DALI's executor handles
  one sample a batch, not 512, and less of the operators' host work (argument inputs, set-up) is
  per image: `fn.warp_affine` with one matrix per frame (`fn.per_frame`), nearest-pixel,
  does the crop (a whole-pixel translation whose outside reads 0: the zero padding, so the images
  are stored unpadded) and the flip (x -> W - x at pixel centres), then `fn.crop_mirror_normalize`
  normalises the sequence and `fn.erase` takes every frame's cutout box as one region of it.
  ``slice``: a sample per image, stored unpadded, cropped by `fn.slice` with the window's integer
  start ``(dy, dx)`` in ``[-p, p]`` and ``out_of_bounds_policy="pad"`` (zeros outside: the zero
  padding), then flipped and normalised by `fn.crop_mirror_normalize`: two operators, but integer
  per-sample arguments. It is the first H200 session's pipeline (199,000 images/s alone there,
  before ``samples`` replaced it; ``samples`` gave 87,000 on a later H100 machine), kept to tell on
  one machine whether ``samples``' float crop positions or the machine made that difference.
  All three graphs yield the same batches to the bit (tests/test_dali.py). On the GPU
  (benchmarks/bench_loader.py's ``dali``, ``dali-seq`` and ``dali-slice`` rows, one H200 machine,
  benchmarks/results/2026-11-28-h200-muon, batch 512, alone): ``sequence`` 280,894 images/s,
  ``slice`` 152,044, ``samples`` 80,162: the executor's per-sample host work was the bottleneck,
  hence ``sequence`` as the default.
  On DALI's 2-core CPU backend ``samples`` and ``sequence`` are even on CIFAR's images (3.9 ms a
  batch of 512: the pixels dominate there; ``slice``'s two operators ran at 53,475 images/s against
  ``samples``' 61,852, above); on 4x4 images, where the per-image overhead is nearly all, the
  sequence graph takes 1.3 ms a batch of 512 against 2.5 (CPU timings by hand, 2026-11-27).
* **How the crop stays discrete.** The offsets ``(dy, dx)`` are drawn uniformly from the ``2p + 1``
  integers per axis, so all ``(2p + 1)^2`` positions are equally likely, and each is handed to
  the operator as the exact position ``(dy + p) / 2p``, which DALI turns back into the window's
  corner ``round(pos * 2p) = dy + p`` (float32 error is far below the 0.5 that rounding forgives).
  A continuous uniform ``crop_pos`` would instead give the two end offsets half the probability
  of the others. The window's top-left pixel is ``(dy, dx)`` relative to the unpadded image.
* **Layout.** The operator emits HWC, which torch views as NCHW with channels_last strides without
  a copy. DALI 2.4 has no bfloat16 type, so bf16 is produced as fp32 by DALI and cast by torch (the
  cast keeps channels_last).
* **Cutout** (``cutout`` > 0, training only): `fn.erase` sets each sample's box of the normalised
  output to 0, the box fed like the crop offsets (drawn by ``epoch_draws``, clipped to the image).
* **Residency (GPU).** By default the uint8 dataset lives in device memory (CIFAR-10's training
  set: 154 MB, 240 MB padded for the ``samples`` graph) and each batch is gathered there by one
  `index_select` on a side stream, which DALI's external source then copies from on the same stream.
  The training thread's work per batch is then one kernel launch, not a 2.5 MB random-row numpy gather (tenths of a ms at batch
  512) plus a host-to-device copy -- and at the 200k images/s target a whole batch-512 step has
  ~2.5 ms. ``residency="host"``
  keeps the data in host memory instead (numpy gather in the iterating thread into ordinary,
  pageable memory, which DALI then copies to the device); benchmarks/bench_loader.py measures both,
  so the default is checked on the H100 rather than assumed.
* **Epochs.** Each `iter()` runs one epoch: the callbacks raise `StopIteration` past the epoch's
  last batch, and the pipeline is reset after it drains, ready for the next `set_epoch`/`iter`.
  An epoch abandoned part way (``break``) is drained of its at most `prefetch` prefetched
  batches when the next one starts.
* **Overlap and CUDA graphs.** DALI runs its operators asynchronously (own threads, own CUDA
  stream) up to `prefetch` batches ahead; only the external-source callbacks and the output copy
  run in the iterating thread, before the training step, so the loader stays outside any
  CUDA-graph capture (the trainer copies batches into its static graph inputs) -- iterating
  under capture is refused.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from fasttrain.config import CHOICES
from fasttrain.data.loader_torch import check_flip_mode, epoch_draws, shard_bounds, shard_slice
from fasttrain.signals import deferred

__all__ = ["DaliLoader", "DaliUnavailableError", "dali_available", "epoch_plan"]

INSTALL_HINT = "pip install 'fasttrain-resnet[dali]'  (installs nvidia-dali-cuda130)"

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRAPHS = CHOICES["data.dali_graph"]  # samples | sequence | slice: the config's list (see the module docstring)


class DaliUnavailableError(ImportError):
    """NVIDIA DALI is not installed (or cannot be imported) but the DALI loader was asked for."""


def _import_dali():
    """Import DALI on first use; a missing or broken install becomes a `DaliUnavailableError`.

    A Ctrl-C is deferred until the import is done: one that landed inside DALI's C++ initialisation came out
    as an import error, and the run told the user to install DALI instead of stopping."""
    try:
        with deferred(signal.SIGINT):
            from nvidia.dali import fn, types
            from nvidia.dali.pipeline import Pipeline
            from nvidia.dali.plugin.pytorch import feed_ndarray
    except Exception as e:  # ImportError, or a broken install failing inside its own imports
        raise DaliUnavailableError(
            f"data.loader=dali needs NVIDIA DALI, which could not be imported ({e}). "
            f"Install it with: {INSTALL_HINT}, or use data.loader=torch."
        ) from e
    return fn, types, Pipeline, feed_ndarray


def dali_available() -> bool:
    """True when NVIDIA DALI and its PyTorch plugin can be imported."""
    try:
        _import_dali()
    except DaliUnavailableError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# The epoch plan: which images, in which order, with which crop and flip (pure numpy)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EpochPlan:
    """One rank's epoch: `indices[i]` is the i-th image it yields; `starts[i] = (dy, dx)` the crop
    window's top-left corner relative to the unpadded image (in ``[-p, p]``); `mirror[i]` 1 to
    flip; with cutout, the box `erase_anchor[i]`, `erase_shape[i]` of the output set to 0 (in
    ``fn.erase``'s float arguments). Batch k is rows ``[k * batch_size, (k + 1) * batch_size)``
    (the last may be shorter)."""

    indices: np.ndarray  # int64 [M]
    starts: np.ndarray   # int32 [M, 2]
    mirror: np.ndarray   # int32 [M]
    batch_size: int
    # cutout on: float32 [M, 2] (top, left) and [M, 2] (height, width) of each erased box, else None
    erase_anchor: Optional[np.ndarray] = None
    erase_shape: Optional[np.ndarray] = None

    @property
    def num_batches(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def rows(self, k: int) -> slice:
        return slice(k * self.batch_size, min((k + 1) * self.batch_size, len(self.indices)))


def epoch_plan(n: int, *, batch_size: int, train: bool, seed: int = 0, epoch: int = 0,
               rank: int = 0, world_size: int = 1, drop_last: Optional[bool] = None,
               crop_padding: int = 4, flip: bool = True, cutout: int = 0,
               image_hw: tuple[int, int] = (32, 32), flip_mode: str = "random") -> EpochPlan:
    """The pure function of ``(seed, epoch, rank)`` that the DALI loader executes.

    Training: a permutation of ``range(n)`` and, per position of that permutation, a crop offset
    pair uniform on ``{-p..p}^2`` and a flip bit, all drawn on the CPU by
    ``loader_torch.epoch_draws`` (the same on every rank); rank r takes positions
    ``r::world_size``, truncated to the same number of samples on every rank, and to whole
    batches with ``drop_last`` (the default in training).
    Evaluation: contiguous, disjoint, in-order shards covering ``range(n)`` once, no augmentation,
    the last batch kept unless ``drop_last``.
    """
    drop_last = train if drop_last is None else drop_last
    anchor = shape = None
    if train:
        # TorchLoader's draws, from the one function both loaders use (tests/test_dali.py also
        # checks the two streams batch by batch)
        draws = epoch_draws(seed, epoch, n, crop_padding, flip, cutout, image_hw, flip_mode)
        perm = draws.order.numpy()
        starts = (draws.offsets.numpy() - crop_padding).astype(np.int32)
        mirror = draws.flips.numpy().astype(np.int32)
        sel = shard_slice(n, batch_size=batch_size, train=True, drop_last=drop_last, rank=rank,
                          world_size=world_size)
        indices, starts, mirror = perm[sel], starts[sel], mirror[sel]
        if draws.cutout is not None:
            boxes = draws.cutout.numpy().astype(np.float32)[sel]
            anchor, shape = np.ascontiguousarray(boxes[:, :2]), np.ascontiguousarray(boxes[:, 2:])
    else:
        sel = shard_slice(n, batch_size=batch_size, train=False, drop_last=drop_last, rank=rank,
                          world_size=world_size)
        indices = np.arange(sel.start, sel.stop)
        m = len(indices)
        starts = np.zeros((m, 2), dtype=np.int32)
        mirror = np.zeros(m, dtype=np.int32)
    return EpochPlan(np.ascontiguousarray(indices, dtype=np.int64), np.ascontiguousarray(starts),
                     np.ascontiguousarray(mirror), batch_size, anchor, shape)


def _host_array(a) -> np.ndarray:
    """A numpy view of a numpy array or a torch tensor (a CUDA one is copied to the host)."""
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


# --------------------------------------------------------------------------------------------
# The external-source callbacks
# --------------------------------------------------------------------------------------------
class _Feeder:
    """What the pipeline's `external_source` callbacks read: the current epoch's plan.

    The callbacks are indexed by DALI's iteration counter (reset by `Pipeline.reset`), so each is
    a pure function of ``(plan, iteration)``, whatever the prefetch depth. Kept apart from the
    loader so the pipeline holds no reference back to it (no reference cycle through DALI).
    """

    def __init__(self, images, *, gather_stream: Optional[torch.cuda.Stream], crop_padding: int = 0,
                 sequence: bool = False):
        self.images = images              # numpy [N,H,W,C] uint8, or a CUDA tensor of the same
        self.gather_stream = gather_stream
        self.crop_padding = crop_padding  # p: the samples graph stores the images padded by it
        self.sequence = sequence          # the batch is one sample: every callback returns a batch of one
        self.plan: Optional[EpochPlan] = None
        self.crop_pos: Optional[np.ndarray] = None  # float32 [M, 2]: the plan's starts as (dy + p) / 2p
        self.warp: Optional[np.ndarray] = None  # sequence graph: float32 [M, 2, 3], each frame's affine map
        self.indices_dev: Optional[torch.Tensor] = None  # the plan's indices, on the GPU
        self.stop = False                 # set to make every callback end the epoch now

    def _rows(self, iteration: int) -> slice:
        plan = self.plan
        if self.stop or plan is None or iteration >= plan.num_batches:
            raise StopIteration
        return plan.rows(iteration)

    def images_batch(self, iteration: int):
        rows = self._rows(iteration)
        if self.indices_dev is None:
            batch = self.images[self.plan.indices[rows]]  # host gather: a fresh contiguous array
        else:
            # Device gather on the side stream DALI copies from (its `cuda_stream`); the result's
            # memory returns to that stream's pool only after DALI's copy, which is ordered on it.
            with torch.cuda.stream(self.gather_stream):
                batch = self.images.index_select(0, self.indices_dev[rows])
        return batch[None] if self.sequence else batch  # sequence: [1, B, H, W, C], one sample of B frames

    def set_plan(self, plan: EpochPlan) -> None:
        self.plan = plan
        p = self.crop_padding
        if self.sequence:
            self.warp = warp_matrices(plan, self.images.shape[2])
        else:
            self.crop_pos = ((plan.starts + p) / np.float32(2 * p)).astype(np.float32) if p else None

    def warp_batch(self, iteration: int) -> np.ndarray:
        """float32 [1, B, 2, 3]: the sequence's per-frame affine maps."""
        return self.warp[self._rows(iteration)][None]

    def crop_pos_batch(self, iteration: int) -> tuple[np.ndarray, np.ndarray]:
        """(crop_pos_y, crop_pos_x) of the batch: one callback, two of the operator's inputs."""
        pos = self.crop_pos[self._rows(iteration)]
        return np.ascontiguousarray(pos[:, 0]), np.ascontiguousarray(pos[:, 1])

    def starts_batch(self, iteration: int) -> np.ndarray:
        """int32 [B, 2]: the slice graph's crop windows, (dy, dx) relative to the unpadded image."""
        return self.plan.starts[self._rows(iteration)]

    def mirror_batch(self, iteration: int) -> np.ndarray:
        return self.plan.mirror[self._rows(iteration)]

    def erase_anchor_batch(self, iteration: int) -> np.ndarray:
        anchor = self.plan.erase_anchor[self._rows(iteration)]
        return _regions(anchor, frame_axis=np.arange(len(anchor))) if self.sequence else anchor

    def erase_shape_batch(self, iteration: int) -> np.ndarray:
        shape = self.plan.erase_shape[self._rows(iteration)]
        return _regions(shape, frame_axis=np.ones(len(shape))) if self.sequence else shape


def _regions(boxes: np.ndarray, frame_axis: np.ndarray) -> np.ndarray:
    """float32 [1, 3B]: B boxes' (top, left) or (height, width) as fn.erase's regions of one sequence
    (axes F, H, W), each box's frame coordinate (its index; or the extent 1) put in front."""
    return np.concatenate([frame_axis[:, None].astype(np.float32), boxes], axis=1).reshape(1, -1)


def warp_matrices(plan: EpochPlan, width: int) -> np.ndarray:
    """float32 [M, 2, 3]: each planned crop and flip as fn.warp_affine's map from an output pixel to its
    source, in (x, y) order and at pixel centres. Crop: the source of (x, y) is (x + dx, y + dy); a flip
    also mirrors x: x_centre -> W - x_centre + dx, i.e. pixel x -> W - 1 - x + dx. Whole-pixel moves are
    exact under nearest-pixel sampling; a source outside the image reads 0 (the zero padding)."""
    m = np.zeros((len(plan.mirror), 2, 3), dtype=np.float32)
    flipped = plan.mirror.astype(bool)
    m[:, 0, 0] = np.where(flipped, -1.0, 1.0)
    m[:, 0, 2] = np.where(flipped, float(width), 0.0) + plan.starts[:, 1]
    m[:, 1, 1] = 1.0
    m[:, 1, 2] = plan.starts[:, 0]
    return m


def _check_arguments(x: np.ndarray, y: np.ndarray, *, dtype: torch.dtype, mean: Sequence[float],
                     std: Sequence[float], batch_size: int, crop_padding: int, prefetch: int, cutout: int,
                     rank: int, world_size: int, seed: int, flip_mode: str, residency: str, graph: str) -> None:
    """DaliLoader's arguments, refused with the value and what is expected before anything is built."""
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3] (NHWC, RGB); got {x.dtype} {list(x.shape)}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers [N] with N = {len(x)}; got {y.dtype} {list(y.shape)}")
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {_SUPPORTED_DTYPES}; got {dtype}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
    if batch_size < 1 or crop_padding < 0 or prefetch < 1 or cutout < 0:
        raise ValueError("need batch_size >= 1, crop_padding >= 0, prefetch >= 1 and cutout >= 0; got "
                         f"{batch_size}, {crop_padding}, {prefetch}, {cutout}")
    if not 0 <= rank < world_size or seed < 0:
        raise ValueError(f"need 0 <= rank < world_size and seed >= 0; got rank {rank}, world_size {world_size}, "
                         f"seed {seed}")
    check_flip_mode(flip_mode)
    if residency not in ("device", "host"):
        raise ValueError(f"residency must be 'device' or 'host'; got {residency!r}")
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}; got {graph!r}")


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------
class DaliLoader:
    """CIFAR batches from a DALI pipeline: training (shuffle, pad-crop, flip, normalise) or
    evaluation (normalise, in order). Implements the loader protocol of docs/ARCHITECTURE.md.

    `device` picks the backend: a CUDA device runs the pipeline's operators on that GPU
    (``device_id`` = its index); ``cpu`` runs the same pipeline definition on DALI's CPU backend
    (``device_id=None``), which is how CI tests it. `residency` ("device" default, or "host")
    chooses where the uint8 dataset lives on the GPU path, `graph` ("sequence" default, "samples" or
    "slice") how the pipeline holds a batch (see the module docstring for the three).
    """

    def __init__(self, x_nhwc_uint8: np.ndarray, y: np.ndarray, *, batch_size: int, train: bool,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 mean: Sequence[float], std: Sequence[float], channels_last: bool = True,
                 crop_padding: int = 4, flip: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: Optional[bool] = None, prefetch: int = 2,
                 residency: str = "device", num_threads: Optional[int] = None, cutout: int = 0,
                 flip_mode: str = "random", graph: str = "sequence"):
        fn, types, Pipeline, self._feed_ndarray = _import_dali()

        x, y = _host_array(x_nhwc_uint8), _host_array(y)
        _check_arguments(x, y, dtype=dtype, mean=mean, std=std, batch_size=batch_size, crop_padding=crop_padding,
                         prefetch=prefetch, cutout=cutout, rank=rank, world_size=world_size, seed=seed,
                         flip_mode=flip_mode, residency=residency, graph=graph)

        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError(f"DaliLoader on {self.device} needs CUDA, which is unavailable")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        elif self.device.type != "cpu":
            raise ValueError(f"DaliLoader runs on 'cpu' or a CUDA device; got {self.device}")

        self.dtype = dtype
        self.train = bool(train)
        self.channels_last = bool(channels_last)
        self.crop_padding = int(crop_padding) if self.train else 0
        self.flip = bool(flip) and self.train
        self.cutout = int(cutout) if self.train else 0
        self.flip_mode = flip_mode
        self.graph = graph
        self._sequence = graph == "sequence"
        self._stored_padded = graph == "samples"  # the other graphs crop unpadded images, zeros outside
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self._batch_size = int(batch_size)
        self._n = len(x)
        self.epoch = 0  # the epoch the next iter() runs
        self.num_samples, self._num_batches = shard_bounds(
            self._n, batch_size=self._batch_size, train=self.train, drop_last=self.drop_last,
            rank=self.rank, world_size=self.world_size)
        if self.train and self.num_samples == 0:
            raise ValueError(f"a training shard of {self._n // self.world_size} images holds no "
                             f"full batch of {self._batch_size}")
        self.residency = residency if on_gpu else "host"
        self._image_hw = (int(x.shape[1]), int(x.shape[2]))

        # Labels never enter DALI: a batch's labels are a slice of the epoch's label vector, gathered
        # once per epoch on the host and copied to the device in one copy (the image batches arrive in
        # plan order).
        self._labels = torch.from_numpy(y.astype(np.int64))  # a private, writable copy
        p = self.crop_padding
        if p > 0 and self._stored_padded:  # the crop becomes an in-bounds window of
            x = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))  # crop_mirror_normalize
        if self.residency == "device":
            self._gather_stream = torch.cuda.Stream(self.device)
            images = torch.tensor(x, device=self.device)  # one host-to-device copy, at start
        else:
            self._gather_stream = None
            images = np.ascontiguousarray(x)
        self._feeder = _Feeder(images, gather_stream=self._gather_stream, crop_padding=p if self._stored_padded else 0,
                               sequence=self._sequence)

        # DALI emits fp32 or fp16; bf16 is cast by torch (DALI 2.4 has no bfloat16 type).
        self._dali_torch_dtype = torch.float16 if dtype == torch.float16 else torch.float32
        self._nhwc = self.channels_last
        self._pipe = self._build_pipeline(fn, types, Pipeline, mean=mean, std=std, prefetch=prefetch,
                                          num_threads=num_threads)
        self._generation = 0    # which iterator owns the pipeline
        self._pending = False   # the pipeline holds an unfinished epoch (needs drain + reset)

    def _build_pipeline(self, fn, types, Pipeline, *, mean: Sequence[float], std: Sequence[float], prefetch: int,
                        num_threads: Optional[int]):
        """The DALI graph, built: the feeder's batch, its augmentation's arguments (external sources, see the
        module docstring), the crop and flip, the normalisation and cutout's erase, per `graph`."""
        on_gpu = self.device.type == "cuda"
        # The pipeline draws no random numbers (the plan carries them), but a seed derived from
        # (seed, rank) keeps any future random operator reproducible and distinct per rank.
        pipe_seed = int(np.random.SeedSequence((self.seed, self.rank)).generate_state(1)[0] % (2**31 - 1))
        pipe = Pipeline(
            batch_size=1 if self._sequence else self._batch_size,  # sequence: a batch is one sample
            num_threads=num_threads or max(1, min(4, os.cpu_count() or 1)),
            device_id=self.device.index if on_gpu else None,
            seed=pipe_seed,
            prefetch_queue_depth=int(prefetch),
        )
        norm = dict(dtype=types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT,
                    mean=[255.0 * float(m) for m in mean], std=[255.0 * float(s) for s in std])
        with pipe:
            imgs = fn.external_source(
                source=self._feeder.images_batch, batch=True, dtype=types.UINT8, ndim=4 if self._sequence else 3,
                layout="FHWC" if self._sequence else "HWC",
                device="gpu" if self.residency == "device" else "cpu", cuda_stream=self._gather_stream)
            if on_gpu and self.residency == "host":
                imgs = imgs.gpu()
            graph = {"samples": self._samples_graph, "sequence": self._sequence_graph,
                     "slice": self._slice_graph}[self.graph]
            out = graph(fn, types, imgs, norm)
            if self.cutout > 0:  # after normalization, as in the torch path: the box becomes 0
                anchor = fn.external_source(source=self._feeder.erase_anchor_batch, batch=True,
                                            dtype=types.FLOAT, ndim=1)
                shape = fn.external_source(source=self._feeder.erase_shape_batch, batch=True,
                                           dtype=types.FLOAT, ndim=1)
                out = fn.erase(out, anchor=anchor, shape=shape, axis_names="FHW" if self._sequence else "HW",
                               fill_value=0.0)
            pipe.set_outputs(out)
        pipe.build()
        return pipe

    def _samples_graph(self, fn, types, imgs, norm: dict):
        """A sample per image, padded by p: crop (the window's exact position), flip and normalise in one
        crop_mirror_normalize; argument inputs stay on the CPU even for GPU operators."""
        feeder, p, (height, width) = self._feeder, self.crop_padding, self._image_hw
        crop = {}
        if p > 0:
            pos_y, pos_x = fn.external_source(source=feeder.crop_pos_batch, batch=True, num_outputs=2,
                                              dtype=[types.FLOAT, types.FLOAT], ndim=[0, 0])
            crop = dict(crop_h=height, crop_w=width, crop_pos_y=pos_y, crop_pos_x=pos_x)
        return self._flip_normalize(fn, types, imgs, norm, **crop)

    def _flip_normalize(self, fn, types, imgs, norm: dict, **crop):
        """crop_mirror_normalize over a sample per image: the plan's flips, the normalisation and `crop`'s window
        (none: the images are already cropped)."""
        mirror = (fn.external_source(source=self._feeder.mirror_batch, batch=True, dtype=types.INT32, ndim=0)
                  if self.flip else 0)
        return fn.crop_mirror_normalize(imgs, mirror=mirror, **crop, **norm,
                                        output_layout="HWC" if self._nhwc else "CHW")

    def _slice_graph(self, fn, types, imgs, norm: dict):
        """A sample per unpadded image: fn.slice takes the window at its integer start (zeros where it leaves
        the image), then crop_mirror_normalize flips and normalises."""
        if self.crop_padding > 0:
            starts = fn.external_source(source=self._feeder.starts_batch, batch=True, dtype=types.INT32, ndim=1)
            imgs = fn.slice(imgs, start=starts, shape=list(self._image_hw), axis_names="HW",
                            out_of_bounds_policy="pad", fill_values=0)
        return self._flip_normalize(fn, types, imgs, norm)

    def _sequence_graph(self, fn, types, imgs, norm: dict):
        """The batch as one sequence of unpadded frames: crop and flip as each frame's affine map (nearest
        pixel, 0 outside), then normalise the whole sequence."""
        if self.crop_padding > 0 or self.flip:
            matrix = fn.external_source(source=self._feeder.warp_batch, batch=True, dtype=types.FLOAT, ndim=3)
            imgs = fn.warp_affine(imgs, matrix=fn.per_frame(matrix), size=list(self._image_hw),
                                  interp_type=types.INTERP_NN, fill_value=0)
        return fn.crop_mirror_normalize(imgs, **norm, output_layout="FHWC" if self._nhwc else "FCHW")

    # ---------------------------------------------------------------- the protocol
    @property
    def batch_size(self) -> int:
        return self._batch_size

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        """Pin the epoch the next `iter()` runs (its shuffle and augmentation). Without it each
        `iter()` moves on to the next epoch, as `TorchLoader` does, so passes never repeat."""
        self.epoch = int(epoch)

    def plan(self, epoch: Optional[int] = None) -> EpochPlan:
        """This rank's plan for `epoch` (default: the one the next `iter()` runs)."""
        return epoch_plan(self._n, batch_size=self._batch_size, train=self.train, seed=self.seed,
                          epoch=self.epoch if epoch is None else epoch, rank=self.rank,
                          world_size=self.world_size, drop_last=self.drop_last,
                          crop_padding=self.crop_padding, flip=self.flip, cutout=self.cutout,
                          image_hw=self._image_hw, flip_mode=self.flip_mode)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Starting an epoch invalidates any iterator still open on this loader (one pipeline).
        if self._pipe is None:
            raise RuntimeError("this DaliLoader was closed")
        self._generation += 1
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self._epoch_iter(self._generation, epoch)

    # ---------------------------------------------------------------- internals
    def _drain(self) -> None:
        """End an unfinished epoch: make the callbacks stop, consume what was prefetched, reset."""
        self._feeder.stop = True
        try:
            while True:
                self._pipe.run()
        except StopIteration:
            pass
        finally:
            self._feeder.stop = False
        self._pipe.reset()
        self._pending = False

    def _start_epoch(self, epoch: int) -> torch.Tensor:
        if self._pending:
            self._drain()
        plan = self.plan(epoch)
        feeder = self._feeder
        feeder.set_plan(plan)
        if self.residency == "device":
            with torch.cuda.stream(self._gather_stream):
                feeder.indices_dev = torch.from_numpy(plan.indices).to(self.device)
        labels = self._labels[torch.from_numpy(plan.indices)]
        self._pending = True
        return labels.to(self.device, non_blocking=False)

    def _check_can_run(self, generation: int) -> None:
        if generation != self._generation:
            raise RuntimeError("this DaliLoader iterator was superseded by a newer iter() on the "
                               "same loader (it runs one epoch at a time)")
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("DaliLoader must run outside CUDA-graph capture: fetch the batch "
                               "first, then copy it into the graph's static inputs")

    def _epoch_iter(self, generation: int,
                    epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._check_can_run(generation)
        labels = self._start_epoch(epoch)
        on_gpu = self.device.type == "cuda"
        produced = 0
        while True:
            self._check_can_run(generation)
            stream = torch.cuda.current_stream(self.device) if on_gpu else None
            try:
                # GPU: outputs become ready on the consumer's stream (DALI's executor orders its
                # work before them), so neither the copy below nor the caller blocks the host.
                (out,) = self._pipe.run(stream) if on_gpu else self._pipe.run()
            except StopIteration:
                break
            batch = out.as_tensor()
            buf = torch.empty(batch.shape(), dtype=self._dali_torch_dtype, device=self.device)
            # A copy out of DALI's output buffers into memory torch owns (an asynchronous copy on
            # the consumer's stream on the GPU): a few microseconds for a batch that then stays
            # valid however long the caller keeps it and whatever DALI's executor does next.
            self._feed_ndarray(batch, buf, cuda_stream=stream)
            if self._sequence:
                buf = buf[0]  # the one sample: its frames are the batch
            images = buf.permute(0, 3, 1, 2) if self._nhwc else buf  # NHWC -> NCHW view
            if images.dtype != self.dtype:
                images = images.to(self.dtype)  # bf16; preserve_format keeps channels_last
            n = images.shape[0]
            yield images, labels[produced:produced + n]
            produced += n
        self._pipe.reset()
        self._pending = False
        if produced != self.num_samples:  # the plan and the pipeline disagree: a bug, not data
            raise RuntimeError(f"DALI produced {produced} samples, the plan has "
                               f"{self.num_samples}")

    def close(self) -> None:
        """Release the pipeline (its threads and buffers) now rather than at garbage collection."""
        self._generation += 1
        self._pipe = None  # nothing else references it: freed here
        self._feeder = None  # and the dataset it gathers from (154-240 MB of device memory on a GPU)

    def __repr__(self) -> str:
        kind = "train" if self.train else "eval"
        return (f"DaliLoader({kind}, n={self._n}, batch_size={self._batch_size}, "
                f"batches={len(self)}, device={self.device}, dtype={self.dtype}, "
                f"residency={self.residency}, graph={self.graph}, rank={self.rank}/{self.world_size})")
