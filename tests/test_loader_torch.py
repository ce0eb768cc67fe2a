"""TorchLoader on CPU: every augmented image is an exact crop/flip of its source, offsets and flips have
the right statistics, epochs/seeds/shards behave, and the output has the promised dtype and layout.

Labels are set to the image index, so every output sample names its source image."""
import numpy as np
import pytest
import torch

from augment_check import random_images, recover_crops

from fasttrain.data.loader_torch import TorchLoader, epoch_draws, shard_bounds, shard_slice

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def make_loader(images, *, train=True, batch_size=64, **overrides):
    # mean 0, std 1: the output is x/255, so the source pixels come back exactly
    options = dict(batch_size=batch_size, train=train, device="cpu", dtype=torch.float32, mean=[0.0] * 3,
                   std=[1.0] * 3)
    return TorchLoader(images, np.arange(len(images)), **{**options, **overrides})


def epoch(loader, number=None):
    """All batches of one epoch, concatenated: (images, labels)."""
    if number is not None:
        loader.set_epoch(number)
    batches = list(loader)
    return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalized [B, 3, 32, 32] output with mean 0, std 1 -> the uint8 NHWC pixels."""
    return torch.round(images.float() * 255).to(torch.uint8).permute(0, 2, 3, 1)


def recover_augmentation(images: torch.Tensor, labels: torch.Tensor, sources: np.ndarray, padding=4):
    """(row offsets, col offsets, flips) of the outputs, recovered from their pixels (label = source index)."""
    return recover_crops(to_pixels(images).permute(0, 3, 1, 2), sources[labels.numpy()], padding).unbind(1)


def chi_square_uniform(values: torch.Tensor, bins: int) -> float:
    counts = torch.bincount(values, minlength=bins).double()
    expected = len(values) / bins
    return float(((counts - expected) ** 2 / expected).sum())


def test_augmentation_is_exact_crop_and_flip_with_uniform_statistics():
    sources = random_images(512)
    loader = make_loader(sources)
    images, labels = zip(*(epoch(loader, e) for e in range(4)))
    rows, cols, flips = recover_augmentation(torch.cat(images), torch.cat(labels), sources)
    assert len(rows) == 4 * 512
    assert set(rows.tolist()) == set(range(9)) and set(cols.tolist()) == set(range(9))
    # chi-square, 8 degrees of freedom: 26.1 is the 0.1% tail (the draws are seeded, so no flakiness)
    assert chi_square_uniform(rows, 9) < 26.1 and chi_square_uniform(cols, 9) < 26.1
    assert abs(flips.double().mean().item() - 0.5) < 0.04  # 2,048 draws: 3.6 standard deviations


@pytest.mark.parametrize("flip_mode", ["random", "alternating"])
def test_no_crop_no_flip_yields_the_source_images(flip_mode):
    """flip false switches flips off in either flip mode: alternating never mirrors an image, in an even
    epoch or an odd one."""
    sources = random_images(128)
    loader = make_loader(sources, crop_padding=0, flip=False, flip_mode=flip_mode)
    for number in (0, 1):
        images, labels = epoch(loader, number)
        assert torch.equal(to_pixels(images), torch.from_numpy(sources[labels.numpy()])), number


def test_eval_is_exact_normalization_every_image_once_in_order():
    sources = random_images(101)
    loader = make_loader(sources, train=False, batch_size=32, mean=CIFAR_MEAN, std=CIFAR_STD)
    assert len(loader) == 4 and loader.num_samples == 101
    assert [len(labels) for _, labels in loader] == [32, 32, 32, 5]  # last batch kept
    images, labels = epoch(loader)
    assert torch.equal(labels, torch.arange(101))
    mean, std = np.float32(CIFAR_MEAN), np.float32(CIFAR_STD)
    expected = (sources.astype(np.float32) / np.float32(255) - mean) / std  # fp32, same order of operations
    assert torch.equal(images.permute(0, 2, 3, 1), torch.from_numpy(expected))
    assert torch.equal(epoch(loader)[0], images)  # eval ignores the epoch


def test_epoch_yields_each_index_once_and_drops_the_remainder():
    loader = make_loader(random_images(500), batch_size=64)
    assert len(loader) == 7 and loader.num_samples == 448
    sizes = [len(labels) for _, labels in loader]
    assert sizes == [64] * 7
    _, labels = epoch(loader, 0)
    assert len(labels) == 448 and len(set(labels.tolist())) == 448 and labels.max() < 500


def test_epochs_differ_and_replay_exactly():
    loader = make_loader(random_images(256))
    images0, labels0 = epoch(loader, 0)
    images1, labels1 = epoch(loader, 1)
    assert not torch.equal(labels0, labels1)
    assert sorted(labels0.tolist()) != labels0.tolist()  # shuffled
    replay_images, replay_labels = epoch(loader, 0)  # set_epoch pins the stream: a resumed run continues it
    assert torch.equal(replay_labels, labels0) and torch.equal(replay_images, images0)
    _, next_labels = epoch(loader)  # no set_epoch: iterating moves on to epoch 1
    assert torch.equal(next_labels, labels1)


def test_same_seed_same_batches_other_seed_other_batches():
    sources = random_images(256)
    first, second, other = (make_loader(sources, seed=s) for s in (7, 7, 8))
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(epoch(first, 3)[1], epoch(other, 3)[1])
    # seed 7's epoch 1 is not seed 8's epoch 0 (a seed + epoch mix would make every run replay its neighbour's)
    assert not torch.equal(epoch(first, 1)[1], epoch(other, 0)[1])


@pytest.mark.parametrize("count", [512, 515])
def test_two_rank_training_shards_are_disjoint_slices_of_the_epoch(count):
    sources = random_images(count)
    whole = make_loader(sources, drop_last=False)
    ranks = [make_loader(sources, rank=r, world_size=2, seed=0) for r in range(2)]
    assert [len(r) for r in ranks] == [4, 4] and [r.num_samples for r in ranks] == [256, 256]
    (images0, labels0), (images1, labels1) = (epoch(r, 5) for r in ranks)
    assert not set(labels0.tolist()) & set(labels1.tolist())
    whole_images, whole_labels = epoch(whole, 5)
    assert torch.equal(labels0, whole_labels[0::2][:256]) and torch.equal(labels1, whole_labels[1::2][:256])
    assert torch.equal(images1, whole_images[1::2][:256])  # same draws as the single-process run
    if count == 512:
        assert sorted(labels0.tolist() + labels1.tolist()) == list(range(512))


@pytest.mark.parametrize("world_size", [2, 3])
def test_eval_shards_are_contiguous_and_cover_the_set_once(world_size):
    sources = random_images(101)
    labels = [epoch(make_loader(sources, train=False, batch_size=16, rank=r, world_size=world_size))[1]
              for r in range(world_size)]
    assert torch.equal(torch.cat(labels), torch.arange(101))
    assert max(map(len, labels)) - min(map(len, labels)) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_dtype_and_memory_layout(dtype, channels_last, train):
    sources = random_images(64)
    loader = make_loader(sources, train=train, batch_size=32, dtype=dtype, channels_last=channels_last,
                         mean=CIFAR_MEAN, std=CIFAR_STD)
    images, labels = next(iter(loader))
    assert images.shape == (32, 3, 32, 32) and images.dtype == dtype
    assert labels.dtype == torch.int64 and labels.shape == (32,)
    if channels_last:
        assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    else:
        assert images.is_contiguous()
    if dtype == torch.bfloat16:  # normalized in fp32, then cast once
        reference = make_loader(sources, train=train, batch_size=32, mean=CIFAR_MEAN, std=CIFAR_STD)
        assert torch.equal(images, next(iter(reference))[0].to(torch.bfloat16))


def test_training_without_drop_last_keeps_the_partial_batch():
    loader = make_loader(random_images(100), batch_size=64, drop_last=False)
    assert len(loader) == 2 and [len(y) for _, y in loader] == [64, 36]


def clipped_box_distribution(size: int, side: int) -> dict[tuple[int, int], float]:
    """Exact probabilities of (start, length) along one axis: centre uniform on 0..size-1, the box
    [centre - side // 2, + side) clipped to the image."""
    probs: dict[tuple[int, int], float] = {}
    for centre in range(size):
        start = centre - side // 2
        lo, hi = max(start, 0), min(start + side, size)
        probs[lo, hi - lo] = probs.get((lo, hi - lo), 0.0) + 1 / size
    return probs


@pytest.mark.parametrize("side", [1, 8, 15, 32])
def test_cutout_zeroes_one_clipped_square_per_image_and_changes_nothing_else(side):
    # mean 0.5: padding comes out as -0.5 and a source pixel as p/255 - 0.5, never 0, so an output
    # value of exactly 0 in all three channels is cutout's and nothing else's
    sources = random_images(1024, seed=3)
    kw = dict(batch_size=128, mean=[0.5] * 3)
    base_x, base_y = epoch(make_loader(sources, **kw), 2)
    cut_x, cut_y = epoch(make_loader(sources, cutout=side, **kw), 2)
    assert torch.equal(base_y, cut_y)  # same images in the same order: the boxes are drawn last
    erased = (cut_x == 0).all(1)  # [B, H, W]
    keep = ~erased[:, None].expand_as(cut_x)
    assert torch.equal(cut_x[keep], base_x[keep])  # crops and flips unchanged outside the boxes
    rows, cols = erased.any(2), erased.any(1)  # [B, H], [B, W]
    assert torch.equal(erased, rows[:, :, None] & cols[:, None, :])  # each erased set is one rectangle
    boxes = {"rows": [], "cols": []}
    for axis, hits in (("rows", rows), ("cols", cols)):
        length = hits.sum(1)
        assert (length >= 1).all() and (length <= side).all()
        start = hits.int().argmax(1)
        assert torch.equal(hits, (torch.arange(32) >= start[:, None]) & (torch.arange(32) < (start + length)[:, None]))
        boxes[axis] = list(zip(start.tolist(), length.tolist()))
    expected = clipped_box_distribution(32, side)
    for axis, observed in boxes.items():  # (start, length) pairs follow the exact clipped-uniform law
        # every (start, length) the law allows occurs, and no other: each has probability >= 1/32, so
        # 1,024 boxes miss one with probability < 32 e^-32 (a centre row never drawn shows here)
        assert set(observed) == set(expected), axis
        counts = torch.tensor([observed.count(k) for k in expected], dtype=torch.float64)
        probs = torch.tensor(list(expected.values()), dtype=torch.float64)
        chi2 = float(((counts - probs * len(observed)) ** 2 / (probs * len(observed))).sum())
        assert chi2 < len(expected) + 6 * len(expected) ** 0.5 + 10, (axis, chi2)
    # evaluation never erases, whatever the setting
    evaluation = make_loader(sources, train=False, cutout=side, **kw)
    assert not (epoch(evaluation)[0] == 0).all(1).any()


def test_cutout_boxes_are_clipped_to_the_image_and_never_empty():
    """epoch_draws' boxes are (top, left, height, width) inside the output image, as its docstring says: the
    DALI path hands them to fn.erase as they are, so a box hanging over an edge (negative top, or top +
    height past 32) would rely on DALI clipping it, on every backend and version."""
    boxes = epoch_draws(0, 0, 4096, 4, True, cutout=15).cutout
    top_left, size = boxes[:, :2], boxes[:, 2:]
    assert (top_left >= 0).all() and (size >= 1).all() and (top_left + size <= 32).all()
    assert (size < 15).any() and (size == 15).any()  # some boxes were clipped, some are whole
    wide = epoch_draws(0, 0, 4096, 4, True, cutout=15, image_hw=(32, 24)).cutout  # rows and columns apart
    assert (wide[:, 0] + wide[:, 2]).max() == 32 and (wide[:, 1] + wide[:, 3]).max() == 24


def flips_by_image(loader, epoch_number: int, sources: np.ndarray) -> torch.Tensor:
    """Each source image's flip in that epoch, recovered from its pixels (-1: not in the epoch)."""
    images, labels = epoch(loader, epoch_number)
    out = torch.full((len(sources),), -1, dtype=torch.long)
    out[labels] = recover_augmentation(images, labels, sources)[2]
    return out


def test_alternating_flip_shows_every_image_both_ways_every_two_epochs():
    count = 512
    sources = random_images(count, seed=5)
    alternating = make_loader(sources, batch_size=64, flip_mode="alternating")
    random_mode = make_loader(sources, batch_size=64)
    flips = torch.stack([flips_by_image(alternating, e, sources) for e in range(4)])  # [epoch, image]
    assert (flips >= 0).all()  # batch 64 divides 512: every image in every epoch
    assert torch.equal(flips[1], 1 - flips[0]) and torch.equal(flips[2], flips[0]) and torch.equal(flips[3], flips[1])
    assert 0.4 < flips[0].float().mean() < 0.6  # the run's coins are fair
    # the default draws a fresh coin per epoch: some images keep their side from one epoch to the next
    fresh = torch.stack([flips_by_image(random_mode, e, sources) for e in range(2)])
    assert 0.35 < (fresh[0] == fresh[1]).float().mean() < 0.65
    # the crops and the order do not depend on the flip mode
    assert torch.equal(epoch(alternating, 1)[1], epoch(random_mode, 1)[1])


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="no full batch"):
        make_loader(random_images(100), batch_size=101)
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        make_loader(random_images(10).astype(np.float32))
    with pytest.raises(ValueError, match=r"10 images but labels of shape \[9\]"):
        TorchLoader(random_images(10), np.arange(9), batch_size=5, train=True, device="cpu", dtype=torch.float32,
                    mean=[0.0] * 3, std=[1.0] * 3)
    with pytest.raises(ValueError, match="labels must be integers, got torch.float64"):  # not truncated to ints
        TorchLoader(random_images(4), np.array([1.5, 2.7, -0.5, 9.9]), batch_size=2, train=True, device="cpu",
                    dtype=torch.float32, mean=[0.0] * 3, std=[1.0] * 3)
    with pytest.raises(ValueError, match="rank=2/world_size=2"):
        make_loader(random_images(10), rank=2, world_size=2)
    with pytest.raises(ValueError, match="cutout=-1"):
        make_loader(random_images(100), cutout=-1)
    with pytest.raises(ValueError, match="flip_mode must be one of random, alternating, got 'sometimes'"):
        make_loader(random_images(100), flip_mode="sometimes")
    # images of another shape: one channel (the mean/std of 3 would broadcast over it silently), no batch axis
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\], got torch.uint8 \[10, 32, 32, 1\]"):
        make_loader(random_images(10)[..., :1])
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\], got torch.uint8 \[32, 32, 3\]"):
        make_loader(random_images(1)[0])
    # each bad number is named, at construction, before it can fail later as something else
    for bad, named in ((dict(rank=-1, world_size=2), "rank=-1/world_size=2"), (dict(batch_size=0), "batch_size=0"),
                       (dict(crop_padding=-1), "crop_padding=-1"), (dict(seed=-1), "seed=-1")):
        with pytest.raises(ValueError, match=named):
            make_loader(random_images(100), **bad)


@pytest.mark.parametrize("train", [True, False])
def test_labels_come_out_int64_whatever_integer_type_they_came_in(train):
    """cross_entropy needs int64 targets: labels given as uint8 or int32 (a decoder's natural types) come out
    as int64, with their values."""
    sources = random_images(64)
    for dtype in (np.uint8, np.int32):
        y = (np.arange(64) % 10).astype(dtype)
        loader = TorchLoader(sources, y, batch_size=32, train=train, device="cpu", dtype=torch.float32,
                             mean=[0.0] * 3, std=[1.0] * 3, crop_padding=0, flip=False)
        labels = epoch(loader, 0)[1]
        assert labels.dtype == torch.int64 and sorted(labels.tolist()) == sorted(y.tolist()), dtype


def test_an_evaluation_rank_without_images_yields_no_batches():
    """More ranks than evaluation images (a tiny test_subset on many GPUs): the rank whose shard is empty
    yields nothing (evaluate sums counts across ranks) instead of refusing, and the others cover the set."""
    shards = [make_loader(random_images(3), train=False, batch_size=2, rank=r, world_size=4) for r in range(4)]
    assert [(s.num_samples, len(s)) for s in shards] == [(0, 0), (1, 1), (1, 1), (1, 1)]
    assert [[labels.tolist() for _, labels in s] for s in shards] == [[], [[0]], [[1]], [[2]]]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_shard_slices_hold_shard_bounds_samples_and_never_overlap(train, drop_last):
    for n in range(1, 41):
        for world in range(1, 5):
            for batch in (1, 3, 7):
                kw = dict(batch_size=batch, train=train, drop_last=drop_last, world_size=world)
                shards = [list(range(n))[shard_slice(n, rank=r, **kw)] for r in range(world)]
                for r, shard in enumerate(shards):
                    assert len(shard) == shard_bounds(n, rank=r, **kw)[0]
                taken = [i for shard in shards for i in shard]
                assert len(taken) == len(set(taken))  # disjoint
                if train:  # rank r holds positions r, r + world, ...: step k of all ranks is one block
                    assert sorted(taken) == list(range(len(taken)))
                    assert all(s == list(range(r, n, world))[:len(s)] for r, s in enumerate(shards))
                elif not drop_last:  # evaluation: contiguous shards, in rank order, covering the set once
                    assert taken == list(range(n))
