"""The DALI data path (fasttrain.data.dali) on DALI's CPU backend: the same pipeline definition the
GPU runs, with device_id=None. Checks pixels, not just shapes: the evaluation output against the
reference normalization and TorchLoader, the training crops/flips recovered from the pixels, the
epoch stream (coverage, order, seeds, shards), dtypes and layouts, a short training run on real
CIFAR-10 that must learn, and the benchmark's CPU smoke mode.
"""
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from augment_check import random_images, recover_crops
from torch import nn

import fasttrain.data
from fasttrain.data import dali as dali_mod
from fasttrain.data.dali import GRAPHS, DaliLoader, DaliUnavailableError, dali_available, epoch_plan
from fasttrain.data.loader_torch import TorchLoader

# The README's test command installs the dali extra: without it these tests fail (never skip),
# and test_dali_is_installed says why.
needs_dali = pytest.mark.dali

def test_dali_is_installed():
    assert dali_available(), "nvidia-dali is missing: pip install 'fasttrain-resnet[dali]'"


MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: beside DALI's threads


def loader(x, y, **kw) -> DaliLoader:
    args = dict(batch_size=32, train=True, device="cpu", mean=MEAN, std=STD)
    args.update(kw)
    return DaliLoader(x, y, **args)


def loader_of(graph: str, x, y, **kw) -> DaliLoader:
    """`loader` with one of DALI's graphs: the protocol's tests run through each."""
    return loader(x, y, graph=graph, **kw)


def reference_normalize(x_nhwc: np.ndarray) -> torch.Tensor:
    """(x/255 - mean)/std in torch, NCHW fp32: what both loaders must produce."""
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).float()
    return (x / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Undo the normalization: exact uint8 values (the float error is ~1e-4 of a level)."""
    x = images.float() * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    return torch.round(x * 255).to(torch.int16)


def epoch_pairs(a, b, epoch: int) -> list:
    """One epoch of two loaders side by side; they must yield the same number of batches."""
    a.set_epoch(epoch)
    b.set_epoch(epoch)
    pairs = list(zip(a, b))
    assert len(pairs) == len(a) == len(b)
    return pairs


def collect(dl) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*list(dl))
    return torch.cat(images), torch.cat(labels)


# ---------------------------------------------------------------------------------------------------
# Installation


def test_without_dali_the_module_imports_and_the_loader_names_the_install(monkeypatch):
    # A None entry in sys.modules makes `import nvidia.dali` raise ImportError; the module is
    # imported afresh under that condition (monkeypatch restores the real one afterwards).
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.delitem(sys.modules, "fasttrain.data.dali")
    monkeypatch.setattr(fasttrain.data, "dali", dali_mod, raising=False)
    fresh = importlib.import_module("fasttrain.data.dali")
    assert fresh is not dali_mod and not fresh.dali_available()
    with pytest.raises(ImportError, match=r"pip install 'fasttrain-resnet\[dali\]'") as info:
        fresh.DaliLoader(random_images(64), np.zeros(64, np.int64), batch_size=32, train=True,
                         device="cpu", mean=MEAN, std=STD)
    assert isinstance(info.value, fresh.DaliUnavailableError)
    assert issubclass(DaliUnavailableError, ImportError)


# A Ctrl-C inside a C extension's initialisation can come out as an ImportError, not a KeyboardInterrupt; the
# finder below plays such a module: it sends the SIGINT and turns the interrupt into the import error.
CTRL_C_IN_DALI_INIT = """
import os, signal, sys

# a terminal's Ctrl-C meets Python's own handler; a suite started in the background (`cmd &` in a script) hands
# its children SIGINT ignored, which the deferral then rightly keeps: the script printed nothing and exited 0
signal.signal(signal.SIGINT, signal.default_int_handler)


class InterruptedInit:
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali.pipeline":
            sys.meta_path.remove(self)
            try:
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(10 ** 6):  # a deferred signal never arrives here
                    pass
            except KeyboardInterrupt:
                raise ImportError("initialization of backend_impl raised unreported exception")
        return None


sys.meta_path.insert(0, InterruptedInit())
from fasttrain.data.dali import _import_dali
try:
    _import_dali()
except KeyboardInterrupt:
    print("interrupted, imported:", "nvidia.dali.plugin.pytorch" in sys.modules)
"""


@needs_dali
def test_a_ctrl_c_while_dali_imports_stops_the_run_and_is_not_taken_for_a_missing_dali():
    """A Ctrl-C during DALI's import once printed 'data.loader=dali needs NVIDIA DALI ... install it': DALI's
    initialisation turned the interrupt into an import error. It is deferred until the import is done, then
    arrives as the interrupt it was (torch's threads exist by then, so blocking it in this thread would not do)."""
    proc = subprocess.run([sys.executable, "-c", CTRL_C_IN_DALI_INIT], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (0, "interrupted, imported: True\n"), proc.stderr


@needs_dali
def test_bad_arguments_are_refused():
    x, y = random_images(64), np.zeros(64, np.int64)
    with pytest.raises(ValueError, match="uint8"):
        loader(x.astype(np.float32), y)
    with pytest.raises(ValueError, match="labels"):
        loader(x, y[:10])
    with pytest.raises(ValueError, match="dtype"):
        loader(x, y, dtype=torch.float64)
    with pytest.raises(ValueError, match="no full batch"):
        loader(x, y, batch_size=40, world_size=2)
    with pytest.raises(ValueError, match="std > 0"):
        loader(x, y, std=(0.0, 0.25, 0.25))
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        loader(x, y, rank=2, world_size=2)
    # every other argument that would otherwise fail later, or not at all, is refused by name when built
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        loader(x[..., :1], y)  # one channel: the three means and stds would not fit it
    with pytest.raises(ValueError, match=r"labels must be integers \[N\] with N = 64; got float32 \[64\]"):
        loader(x, y.astype(np.float32))  # not truncated to whole classes
    with pytest.raises(ValueError, match=r"labels must be integers \[N\] with N = 64; got int64 \[64, 1\]"):
        loader(x, y[:, None])
    with pytest.raises(ValueError, match="mean and std need 3 values each"):
        loader(x, y, mean=MEAN[:2])
    for bad, got in ((dict(batch_size=0), "got 0, 4, 2, 0"), (dict(crop_padding=-1), "got 32, -1, 2, 0"),
                     (dict(prefetch=0), "got 32, 4, 0, 0"), (dict(cutout=-1), "got 32, 4, 2, -1")):
        with pytest.raises(ValueError, match=rf"need batch_size >= 1, .* and cutout >= 0; {got}"):
            loader(x, y, **bad)
    with pytest.raises(ValueError, match="seed >= 0; got rank 0, world_size 1, seed -1"):
        loader(x, y, seed=-1)
    # a misspelt residency is refused on the CPU too (where the data always stays on the host), so a config
    # tested there does not fail only on the GPU machine
    with pytest.raises(ValueError, match="residency must be 'device' or 'host'; got 'gpu'"):
        loader(x, y, residency="gpu")
    with pytest.raises(ValueError, match="graph must be one of samples, sequence, slice; got 'frames'"):
        loader(x, y, graph="frames")
    with pytest.raises(ValueError, match="runs on 'cpu' or a CUDA device; got meta"):
        loader(x, y, device="meta")


@needs_dali
def test_a_pipeline_that_disagrees_with_its_plan_is_an_error_not_a_short_epoch(monkeypatch):
    """The loader checks that DALI yielded exactly the planned samples: a plan and pipeline out of step
    (a bug) would otherwise train on a silently shorter or longer epoch."""
    x, y = random_images(96), np.zeros(96, np.int64)
    dl = loader(x, y, train=False)
    assert sum(len(labels) for _, labels in dl) == dl.num_samples == 96
    dl.num_samples += 1
    with pytest.raises(RuntimeError, match="DALI produced 96 samples, the plan has 97"):
        list(dl)
    dl.num_samples -= 2  # and a longer epoch than planned
    with pytest.raises(RuntimeError, match="DALI produced 96 samples, the plan has 95"):
        list(dl)


@needs_dali
def test_an_evaluation_loader_never_erases(monkeypatch):
    """cutout is training augmentation: an eval loader given it (the API allows it) still yields the
    plain normalized images, every one, in order; and an eval plan keeps its last partial batch."""
    n = 70
    x, y = random_images(n), np.arange(n) % 10
    images, labels = collect(loader(x, y, train=False, cutout=8))
    assert torch.equal(labels, torch.from_numpy(y))
    torch.testing.assert_close(images, reference_normalize(x), atol=1e-5, rtol=1e-5)
    plan = epoch_plan(100, batch_size=32, train=False)
    assert plan.indices.tolist() == list(range(100)) and plan.erase_anchor is None


# ---------------------------------------------------------------------------------------------------
# Evaluation


@needs_dali
def test_eval_is_the_reference_normalization_in_order_once():
    n, batch = 250, 64
    x, y = random_images(n), np.random.default_rng(1).integers(0, 10, n)
    dl = loader(x, y, batch_size=batch, train=False)
    assert (len(dl), dl.num_samples, dl.batch_size) == (4, n, batch)
    batches = list(dl)
    assert [len(labels) for _, labels in batches] == [64, 64, 64, 58]  # the last batch is kept
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal(labels, torch.from_numpy(y))  # every image once, in order
    torch.testing.assert_close(images, reference_normalize(x), atol=1e-5, rtol=1e-5)
    # and the torch path's evaluation output
    t_images, t_labels = collect(TorchLoader(x, y, batch_size=batch, train=False, device="cpu",
                                             dtype=torch.float32, mean=MEAN, std=STD))
    assert torch.equal(labels, t_labels)
    torch.testing.assert_close(images, t_images, atol=1e-5, rtol=1e-5)
    # a second pass is the same again
    torch.testing.assert_close(collect(dl)[0], images, atol=0, rtol=0)


@needs_dali
def test_eval_shards_are_contiguous_and_cover_the_set():
    n = 103
    x, y = random_images(n), np.arange(n)
    shards = [collect(loader(x, y, batch_size=16, train=False, rank=r, world_size=3))[1]
              for r in range(3)]
    assert torch.equal(torch.cat(shards), torch.arange(n))
    assert [len(s) for s in shards] == [34, 34, 35]


# ---------------------------------------------------------------------------------------------------
# Training augmentation


@needs_dali
def test_crops_and_flips_recovered_from_pixels_are_uniform_and_follow_the_plan():
    n, p, epochs = 1000, 4, 2
    x = random_images(n, seed=2)
    dl = loader(x, np.arange(n), batch_size=100, seed=7, crop_padding=p)
    recovered, planned = [], []
    for epoch in range(epochs):
        dl.set_epoch(epoch)
        plan = dl.plan()
        images, labels = collect(dl)
        found = recover_crops(to_pixels(images), x[labels.numpy()], p)  # label = source index
        recovered.append(found)
        planned.append(torch.from_numpy(np.concatenate(
            [plan.starts + p, plan.mirror[:, None]], axis=1)).long())
        assert torch.equal(labels, torch.from_numpy(plan.indices))
    recovered, planned = torch.cat(recovered), torch.cat(planned)
    assert torch.equal(recovered, planned)  # the pixels are exactly the plan's crops and flips

    samples = len(recovered)  # 2000
    for axis in (0, 1):  # every offset 0..2p on each axis, about equally often
        counts = torch.bincount(recovered[:, axis], minlength=2 * p + 1).double()
        assert len(counts) == 2 * p + 1 and counts.min() > 0
        expected = samples / (2 * p + 1)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 26.1, (axis, counts.tolist())  # 8 dof: p = 0.001
    joint = torch.bincount(recovered[:, 0] * (2 * p + 1) + recovered[:, 1],
                           minlength=(2 * p + 1) ** 2).double()
    assert joint.min() > 0  # all 81 positions occur, corners included
    expected = samples / (2 * p + 1) ** 2
    assert float(((joint - expected) ** 2 / expected).sum()) < 124.8  # 80 dof: p = 0.001
    flip_rate = recovered[:, 2].double().mean().item()
    assert abs(flip_rate - 0.5) < 4 * (0.25 / samples) ** 0.5


@needs_dali
@pytest.mark.parametrize("p", [1, 2, 3, 5, 7])
def test_every_padding_crops_exactly_the_planned_window(p):
    """The crop is crop_mirror_normalize's window at position (dy + p) / 2p of the padded image:
    for paddings whose 2p is no power of two too, DALI's rounding lands on exactly the planned
    offset, end offsets included, and the output keeps the image's size."""
    n = 200
    x = random_images(n, seed=20 + p)
    dl = loader(x, np.arange(n), batch_size=50, seed=p, crop_padding=p)
    plan = dl.plan()
    images, labels = collect(dl)
    assert images.shape == (n, 3, 32, 32)
    found = recover_crops(to_pixels(images), x[labels.numpy()], p)
    assert torch.equal(found, torch.from_numpy(np.concatenate([plan.starts + p, plan.mirror[:, None]], 1)).long())
    assert set(found[:, 0].tolist()) | set(found[:, 1].tolist()) >= {0, 2 * p}  # both ends are reached


@needs_dali
def test_no_augmentation_when_switched_off():
    x = random_images(128, seed=3)
    images, labels = collect(loader(x, np.arange(128), crop_padding=0, flip=False))
    torch.testing.assert_close(images, reference_normalize(x[labels.numpy()]), atol=1e-5,
                               rtol=1e-5)
    # flip only: the crop is the identity, the flips are there
    found = recover_crops(to_pixels(collect(loader(x, np.arange(128), crop_padding=0))[0]),
                          x[labels.numpy()], 0)
    assert 0 < found[:, 2].sum() < 128
    # flip false with flip_mode alternating: no flip either, in the plan or the pixels, in an even or odd epoch
    off = loader(x, np.arange(128), crop_padding=0, flip=False, flip_mode="alternating")
    for epoch in (0, 1):
        off.set_epoch(epoch)
        assert not off.plan().mirror.any(), epoch
        images, labels = collect(off)
        torch.testing.assert_close(images, reference_normalize(x[labels.numpy()]), atol=1e-5, rtol=1e-5)


@needs_dali
@pytest.mark.parametrize("cutout, flip_mode", [(0, "random"), (12, "random"), (0, "alternating")])
def test_training_stream_is_the_torch_paths_stream(cutout, flip_mode):
    """Same seed, epoch and rank: DaliLoader and TorchLoader yield the same batches, cutout and
    alternating flips included."""
    n = 300
    x, y = random_images(n, seed=4), np.random.default_rng(4).integers(0, 10, n)
    kw = dict(batch_size=32, train=True, device="cpu", dtype=torch.float32, mean=MEAN, std=STD,
              seed=11, rank=1, world_size=2, cutout=cutout, flip_mode=flip_mode)
    d, t = DaliLoader(x, y, **kw), TorchLoader(x, y, **kw)
    assert (len(d), d.num_samples) == (len(t), t.num_samples)
    for epoch in (0, 5):
        erased = 0
        for (di, dl_), (ti, tl) in epoch_pairs(d, t, epoch):
            assert torch.equal(dl_, tl)
            torch.testing.assert_close(di, ti, atol=1e-5, rtol=1e-5)
            erased += int((di == 0).all(1).sum())  # normalised pixels of exactly 0 in every channel
        assert (erased > 0) == (cutout > 0)  # the boxes were there, and only with cutout on


@needs_dali
@pytest.mark.parametrize("settings", [
    dict(cutout=12), dict(crop_padding=1), dict(crop_padding=3, flip_mode="alternating"), dict(crop_padding=7),
    dict(crop_padding=0), dict(flip=False), dict(train=False), dict(channels_last=False, cutout=8, dtype=torch.float16),
], ids=["cutout", "pad-1", "pad-3-alternating", "pad-7", "flip-only", "crop-only", "eval", "fp16-nchw-cutout"])
@pytest.mark.parametrize("graph", [g for g in GRAPHS if g != "samples"])
def test_every_graph_yields_the_samples_graphs_batches_to_the_bit(settings, graph):
    """graph="sequence" (the batch as one sample: warp_affine per frame, then normalise) and graph="slice"
    (fn.slice at the integer start, zeros outside, then flip and normalise) against the default graph,
    already checked against the torch path and the pixels above: the same images, bit for bit, in the same
    dtype and strides, both ends of every padding (whose warp or slice moves by whole pixels) and the last
    partial evaluation batch (a shorter sequence) included; two epochs of rank 1 of 2."""
    n = 300
    x, y = random_images(n, seed=13), np.random.default_rng(13).integers(0, 10, n)
    kw = dict(batch_size=64, seed=3, rank=1, world_size=2, **settings)
    samples, sequence = loader(x, y, graph="samples", **kw), loader(x, y, graph=graph, **kw)
    assert sequence.graph == graph and (len(sequence), sequence.num_samples) == (len(samples), samples.num_samples)
    batches = 0
    for epoch in (0, 1):
        for (si, sl), (qi, ql) in epoch_pairs(samples, sequence, epoch):
            assert torch.equal(sl, ql)
            assert (qi.shape, qi.stride(), qi.dtype) == (si.shape, si.stride(), si.dtype)
            assert torch.equal(qi, si)
            batches += 1
    assert batches == 2 * len(samples) > 0
    if settings.get("train", True) and not settings.get("cutout"):  # and they are the plan's crops and flips
        p, plan = sequence.crop_padding, sequence.plan(0)
        sequence.set_epoch(0)
        found = recover_crops(to_pixels(collect(sequence)[0]), x[plan.indices], p)
        assert torch.equal(found, torch.from_numpy(np.concatenate([plan.starts + p, plan.mirror[:, None]], 1)).long())


# ---------------------------------------------------------------------------------------------------
# The epoch stream


@needs_dali
def test_epoch_covers_each_image_once_and_reshuffles():
    n, batch = 203, 16
    x = random_images(n, seed=5)
    dl = loader(x, np.arange(n), batch_size=batch, seed=3)
    assert (len(dl), dl.num_samples) == (12, 192)  # the last partial batch (11) is dropped
    orders = []
    for epoch in range(2):
        dl.set_epoch(epoch)
        batches = list(dl)
        assert [len(b[1]) for b in batches] == [batch] * 12
        labels = torch.cat([b[1] for b in batches])
        assert len(set(labels.tolist())) == 192  # no repeats
        # and each image is its label's source image
        recover_crops(to_pixels(torch.cat([b[0] for b in batches])), x[labels.numpy()], 4)
        orders.append(labels)
    assert not torch.equal(orders[0], orders[1])


@needs_dali
@pytest.mark.parametrize("graph", GRAPHS)
def test_same_seed_same_batches_and_resume(graph):
    x, y = random_images(160, seed=6), np.arange(160)
    a, b = loader_of(graph, x, y, seed=9), loader_of(graph, x, y, seed=9)
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        pairs = list(zip(a, b))
        assert len(pairs) == len(a) > 0
        for (ai, al), (bi, bl) in pairs:
            assert torch.equal(al, bl) and torch.equal(ai, bi)
    other = collect(loader_of(graph, x, y, seed=10))[1]
    first = collect(loader_of(graph, x, y, seed=9))[1]
    assert not torch.equal(first, other)
    # without set_epoch each pass moves on; set_epoch(e) replays epoch e exactly (resume)
    c = loader_of(graph, x, y, seed=9)
    e0, e1 = collect(c), collect(c)
    assert not torch.equal(e0[1], e1[1])
    c.set_epoch(1)
    replay = collect(c)
    assert torch.equal(replay[1], e1[1]) and torch.equal(replay[0], e1[0])


@needs_dali
def test_two_ranks_get_disjoint_shards_that_cover_the_epoch():
    n, batch = 203, 16
    x = random_images(n, seed=7)
    ranks = [loader(x, np.arange(n), batch_size=batch, seed=2, rank=r, world_size=2)
             for r in range(2)]
    assert [len(r) for r in ranks] == [6, 6]  # 101 each -> 6 full batches
    for epoch in (0, 3):
        shards = []
        for r in ranks:
            r.set_epoch(epoch)
            shards.append(set(collect(r)[1].tolist()))
        assert not shards[0] & shards[1]
        # together: the epoch's permutation, position by position, minus each rank's remainder
        perm = epoch_plan(n, batch_size=1, train=True, seed=2, epoch=epoch).indices
        expected = set(perm[0::2][:96].tolist()) | set(perm[1::2][:96].tolist())
        assert shards[0] | shards[1] == expected


@needs_dali
@pytest.mark.parametrize("graph", GRAPHS)
def test_an_abandoned_epoch_does_not_leak_into_the_next(graph):
    x, y = random_images(256, seed=8), np.arange(256)
    dl = loader_of(graph, x, y, seed=1, prefetch=3)
    it = iter(dl)
    next(it), next(it)  # break off after two batches of epoch 0
    dl.set_epoch(4)
    fresh = loader_of(graph, x, y, seed=1)
    fresh.set_epoch(4)
    got, want = collect(dl), collect(fresh)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    with pytest.raises(RuntimeError, match="superseded"):
        next(it)


@needs_dali
@pytest.mark.parametrize("graph", GRAPHS)
def test_an_abandoned_epoch_is_drained_of_its_prefetched_batches_only(graph, monkeypatch):
    """Breaking off an epoch costs at most the `prefetch` batches DALI already started: the next epoch's
    drain stops the callbacks instead of running the rest of the old epoch (97 batches of 512 for
    CIFAR-10's training set) through the pipeline. Counted at the image callback, by epoch."""
    gathered = []
    real = dali_mod._Feeder.images_batch

    def counting(feeder, iteration):
        batch = real(feeder, iteration)  # raises StopIteration past the epoch, or once stopped
        gathered.append(feeder.plan)
        return batch

    monkeypatch.setattr(dali_mod._Feeder, "images_batch", counting)
    x, y = random_images(512, seed=8), np.arange(512)
    dl = loader_of(graph, x, y, seed=1, prefetch=3)
    assert len(dl) == 16
    it = iter(dl)
    next(it), next(it)
    abandoned = dl._feeder.plan
    dl.set_epoch(4)
    assert len(list(dl)) == 16
    assert sum(plan is abandoned for plan in gathered) <= 2 + 3  # the two taken and at most 3 prefetched
    assert len(gathered) - sum(plan is abandoned for plan in gathered) == 16  # the new epoch, whole


@needs_dali
@pytest.mark.parametrize("graph", GRAPHS)
def test_an_evaluation_rank_without_images_yields_no_batches(graph):
    """More ranks than evaluation images: the empty shard's loader is built and yields nothing (evaluate
    sums the counts across ranks), the others yield their image each, as TorchLoader does."""
    x = random_images(3)
    shards = [loader_of(graph, x, np.arange(3), batch_size=2, train=False, rank=r, world_size=4) for r in range(4)]
    assert [(s.num_samples, len(s)) for s in shards] == [(0, 0), (1, 1), (1, 1), (1, 1)]
    assert [[labels.tolist() for _, labels in s] for s in shards] == [[], [[0]], [[1]], [[2]]]


# ---------------------------------------------------------------------------------------------------
# Output dtype and memory layout


@needs_dali
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_dtype_and_layout(dtype, channels_last, graph):
    x = random_images(64, seed=9)
    for train in (True, False):
        images, labels = next(iter(loader(x, np.arange(64), dtype=dtype, train=train,
                                          channels_last=channels_last, graph=graph)))
        assert images.shape == (32, 3, 32, 32) and images.dtype == dtype
        assert labels.dtype == torch.int64 and labels.shape == (32,)
        assert images.device.type == labels.device.type == "cpu"
        if channels_last:
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert images.stride() == (3072, 1, 96, 3)
            # DALI's HWC output, permuted without a copy; bf16 (which DALI lacks) is one cast from fp32
            assert (images._base is not None) == (dtype != torch.bfloat16)
        else:
            assert images.is_contiguous()
        if not train:  # the values, to the output type's precision
            tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
            torch.testing.assert_close(images.float(), reference_normalize(x[:32]), atol=tol,
                                       rtol=tol)


# ---------------------------------------------------------------------------------------------------
# A short training run through the DALI loader learns (real CIFAR-10)


def read_cifar_subset(root: Path, n_train: int, n_test: int):
    """The first images of the official binary files, read directly; any other official form
    through the project's reader."""
    folder = next((d for d in (root / "cifar-10-batches-bin", root) if (d / "test_batch.bin").is_file()),
                  None)
    if folder is None:
        from fasttrain.data.cifar import load_cifar10

        arrays = load_cifar10(root, download=False)
        return (arrays.train_x[:n_train], arrays.train_y[:n_train], arrays.test_x[:n_test],
                arrays.test_y[:n_test])

    def records(name: str, n: int):
        raw = np.fromfile(folder / name, dtype=np.uint8, count=n * 3073).reshape(n, 3073)
        images = raw[:, 1:].reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> HWC
        return np.ascontiguousarray(images), raw[:, 0].astype(np.int64)

    return (*records("data_batch_1.bin", n_train), *records("test_batch.bin", n_test))


def tiny_net() -> nn.Module:
    """~9,500 parameters: three conv-BN-ReLU stages, global average pool, a linear head."""
    def stage(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU()]
    return nn.Sequential(*stage(3, 16, 1), nn.MaxPool2d(2), *stage(16, 24, 2), nn.MaxPool2d(2),
                         *stage(24, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))


@needs_dali
def test_short_training_run_through_dali_learns(cifar_dir):
    train_x, train_y, test_x, test_y = read_cifar_subset(cifar_dir, 2000, 1000)
    torch.manual_seed(0)
    net = tiny_net().to(memory_format=torch.channels_last)
    assert sum(p.numel() for p in net.parameters()) < 10_000
    train = loader(train_x, train_y, batch_size=64, seed=0)
    test = loader(test_x, test_y, batch_size=500, train=False)
    epochs = 3
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.2, total_steps=epochs * len(train),
                                                   pct_start=0.25)
    for epoch in range(epochs):
        net.train()
        train.set_epoch(epoch)
        for images, labels in train:
            loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in test:
            correct += int((net(images).argmax(1) == labels).sum())
    accuracy = correct / len(test_y)
    print(f"held-out accuracy after {epochs} epochs on 2000 images: {accuracy:.3f}")
    assert accuracy > 0.25, f"held-out accuracy {accuracy:.3f} after {epochs} epochs (chance: 0.10)"


# ---------------------------------------------------------------------------------------------------
# The benchmark script


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_loader", REPO / "benchmarks" / "bench_loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_dali
def test_benchmark_cpu_smoke(tmp_path, capsys):
    bench = _bench_module()
    out = tmp_path / "loader.json"
    assert bench.main(["--cpu-smoke", "--images", "256", "--batch-size", "32", "--steps", "2", "--epochs", "2",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["cpu_smoke"] and report["device"].startswith("CPU")
    assert {"torch", "dali", "git_sha", "command", "results"} <= report.keys()
    measured = {(r["loader"], r["mode"]) for r in report["results"] if r.get("images_per_s")}
    for name in ("dali", "dali-seq", "dali-slice", "torch", "torchvision"):
        assert {(name, "alone"), (name, "train-step")} <= measured
    assert ("none", "train-step") in measured
    # every rate is the images over the seconds they took: 2 timed epochs of 256 alone, 2 steps of 32 training
    for r in report["results"]:
        assert r["images"] == (2 * 256 if r["mode"] == "alone" else 2 * 32), r
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"]), r
    # the target's figure is DALI's own, alone (not the train-step's), of the fastest of its graphs
    alone = {r["loader"]: r["images_per_s"] for r in report["results"] if r["mode"] == "alone"}
    faster = max(("dali", "dali-seq", "dali-slice"), key=alone.get)
    assert (report["target"]["measured"], report["target"]["loader"]) == (alone[faster], faster)
    assert report["target"]["met"] is None
    lines = capsys.readouterr().out.rstrip().splitlines()  # the table last, after where it was written
    header = max(i for i, line in enumerate(lines) if "images/s" in line)
    assert lines.index(f"wrote {out}") < header and "torchvision" in "".join(lines[header:]), lines


@needs_dali
def test_benchmark_a_loader_that_fails_loses_no_other_row(tmp_path, capsys, monkeypatch):
    """A graph that this machine's DALI cannot run (here: made to fail) is a row saying so; the others are
    measured and the target is theirs."""
    def unsupported(*args, **kwargs):
        raise RuntimeError("warp_affine: per-frame matrices are not supported here\nmore detail")

    monkeypatch.setattr(DaliLoader, "_sequence_graph", unsupported)
    out = tmp_path / "loader.json"
    assert _bench_module().main(["--cpu-smoke", "--images", "128", "--batch-size", "32", "--epochs", "1",
                                 "--no-train", "--loaders", "dali,dali-seq,torch", "--out", str(out)]) == 0
    rows = {r["loader"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["dali-seq"] == {"loader": "dali-seq", "mode": "alone", "note": "failed: RuntimeError: warp_affine: "
                                "per-frame matrices are not supported here"}
    assert rows["dali"]["images_per_s"] > 0 and rows["torch"]["images_per_s"] > 0
    target = json.loads(out.read_text())["target"]
    assert (target["loader"], target["measured"]) == ("dali", rows["dali"]["images_per_s"])
    assert "dali-seq     alone  failed: RuntimeError" in capsys.readouterr().err


def test_benchmark_refuses_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _bench_module().main([]) != 0
    assert "no CUDA device" in capsys.readouterr().err


@needs_dali
def test_close_releases_the_pipeline_and_the_dataset():
    import gc
    import weakref

    dl = loader(random_images(64), np.arange(64))
    next(iter(dl))
    still_open = iter(dl)  # an iterator taken before close() ends with a clear error, not in the freed pipeline
    feeder = weakref.ref(dl._feeder)
    dl.close()
    with pytest.raises(RuntimeError, match="superseded"):
        next(still_open)
    gc.collect()
    assert feeder() is None  # nothing keeps the (on a GPU: device-resident) images alive
    with pytest.raises(RuntimeError, match="closed"):
        iter(dl)


# ---------------------------------------------------------------------------------------------------
# The GPU pipeline (run on the GPU machine: pytest -m gpu)


@needs_dali
@pytest.mark.gpu
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("residency", ["device", "host"])
def test_gpu_pipeline_yields_the_cpu_pipelines_batches(residency, graph):
    n = 300
    x, y = random_images(n, seed=10), np.arange(n)
    for train in (True, False):
        kw = dict(batch_size=64, seed=3, train=train, dtype=torch.bfloat16, cutout=10, graph=graph)
        gpu = loader(x, y, device="cuda", residency=residency, **kw)
        cpu = loader(x, y, **kw)
        assert gpu.device.index is not None and (len(gpu), gpu.num_samples) == (len(cpu),
                                                                                cpu.num_samples)
        for epoch in (0, 1):
            for (gi, gl), (ci, cl) in epoch_pairs(gpu, cpu, epoch):
                assert gi.is_cuda and gl.is_cuda and gi.dtype == torch.bfloat16
                assert gi.is_contiguous(memory_format=torch.channels_last)
                assert torch.equal(gl.cpu(), cl)
                torch.testing.assert_close(gi.float().cpu(), ci.float(), atol=1e-2, rtol=1e-2)
        # an epoch broken off on the GPU leaves nothing behind either
        it = iter(gpu)
        next(it)
        gpu.set_epoch(0)
        cpu.set_epoch(0)
        torch.testing.assert_close(collect(gpu)[0].float().cpu(), collect(cpu)[0].float(),
                                   atol=1e-2, rtol=1e-2)


@needs_dali
@pytest.mark.gpu
def test_gpu_loader_refuses_to_run_under_graph_capture(monkeypatch):
    dl = loader(random_images(64), np.arange(64), device="cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA-graph capture"):
        next(iter(dl))


@needs_dali
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("residency", ["device", "host"])
@pytest.mark.parametrize("graph", GRAPHS)
def test_gpu_pipeline_exact_dtypes_and_layouts(graph, residency, channels_last, dtype, tol):
    """fp32 to float rounding (bf16 above hides small errors), fp16, and both memory layouts, through every
    graph (the sequence graph's warp_affine and the slice graph's fn.slice run on the GPU here)."""
    n = 200
    x, y = random_images(n, seed=11), np.arange(n)
    kw = dict(batch_size=50, seed=5, train=True, dtype=dtype, channels_last=channels_last, graph=graph)
    gpu = loader(x, y, device="cuda", residency=residency, **kw)
    cpu = loader(x, y, **kw)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for (gi, gl), (ci, cl) in epoch_pairs(gpu, cpu, 0):
        assert gi.dtype == dtype and gi.shape == ci.shape and gi.is_contiguous(memory_format=fmt)
        assert torch.equal(gl.cpu(), cl)
        torch.testing.assert_close(gi.cpu(), ci, atol=tol, rtol=tol)


@needs_dali
@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [1, 3])
def test_gpu_batches_are_right_on_a_side_stream_with_a_slow_consumer(prefetch):
    """The batch is ordered on the consumer's current stream: reading it on a side stream, after
    a long kernel queued there, must still see the finished batch and never a later one."""
    n = 256
    x, y = random_images(n, seed=12), np.arange(n)
    kw = dict(batch_size=32, seed=6, train=True, dtype=torch.float32)
    gpu = loader(x, y, device="cuda", prefetch=prefetch, **kw)
    cpu = loader(x, y, **kw)
    side = torch.cuda.Stream()
    got = []
    with torch.cuda.stream(side):
        gpu.set_epoch(0)
        for images, labels in gpu:
            torch.cuda._sleep(2_000_000)  # ~1 ms of GPU time before the batch is read
            got.append((images * 1.0, labels.clone()))  # computed on the side stream
    side.synchronize()
    cpu.set_epoch(0)
    want = list(cpu)
    assert len(got) == len(want) == n // 32
    for (gi, gl), (ci, cl) in zip(got, want):
        assert torch.equal(gl.cpu(), cl)
        torch.testing.assert_close(gi.cpu(), ci, atol=1e-5, rtol=1e-5)
