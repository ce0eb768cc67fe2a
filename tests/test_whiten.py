"""model.stem_init: whiten -- the patch-whitening filters, checked by what they do to patches."""
import json
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fasttrain.whiten as whiten
from fasttrain.whiten import WHITEN_EPS, patch_covariance, whiten_stem, whitening_filters

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def smooth_images(n: int, seed: int = 0, hw: int = 16) -> np.ndarray:
    """uint8 [n, hw, hw, 3] with correlated neighbours and channels, like photographs: white noise
    would already be white, and its filters could be anything."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, hw + 4, hw + 4, generator=g)
    x = F.avg_pool2d(x, 5, stride=1)                          # spatial correlation
    x = 0.6 * x + 0.4 * x.mean(1, keepdim=True)                # channel correlation
    x = (x - x.amin()) / (x.amax() - x.amin())
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def normalized(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
    return (x - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float64).view(1, 3, 1, 1)


@pytest.mark.parametrize("kernel", [1, 2, 3, 5])
def test_the_filters_whiten_the_patches_they_were_estimated_on(kernel):
    """Convolved with the images (valid positions), filter i outputs decorrelated values of variance
    lambda_i / (lambda_i + eps): the covariance of the outputs is that diagonal."""
    images = smooth_images(60, seed=kernel)
    filters = whitening_filters(images, MEAN, STD, kernel).double()
    d = 3 * kernel * kernel
    assert filters.shape == (d, 3, kernel, kernel)
    out = F.conv2d(normalized(images), filters)                   # [n, d, H', W']
    out = out.permute(0, 2, 3, 1).reshape(-1, d)
    cov = torch.cov(out.T, correction=0)
    values = torch.linalg.eigvalsh(patch_covariance(images, MEAN, STD, kernel)).flip(0).clamp_min(0)
    torch.testing.assert_close(cov, torch.diag(values / (values + WHITEN_EPS)), atol=2e-6, rtol=1e-4)
    # the data is far from white (1x1 patches: only the channels correlate): the test has something to undo
    assert values[0] > (2 if kernel == 1 else 100) * values[-1]
    assert (cov.diagonal()[values > 100 * WHITEN_EPS] > 0.95).all()


def test_each_filter_has_a_sign_of_its_own_not_lapacks():
    """eigh may return v or -v; the filters do not: each one's largest entry is positive."""
    filters = whitening_filters(smooth_images(40, seed=12), MEAN, STD, 3).flatten(1)
    largest = filters.gather(1, filters.abs().argmax(1, keepdim=True))
    assert (largest > 0).all()


def test_patch_covariance_is_the_covariance_of_every_valid_patch():
    images = smooth_images(3, seed=5, hw=6)
    x = normalized(images)
    rows = [x[i, :, r:r + 3, c:c + 3].reshape(-1) for i in range(3) for r in range(4) for c in range(4)]
    expected = torch.cov(torch.stack(rows).T, correction=0)
    torch.testing.assert_close(patch_covariance(images, MEAN, STD, 3), expected)


def test_the_estimate_does_not_depend_on_how_it_is_chunked(monkeypatch):
    images = smooth_images(23, seed=6, hw=8)
    whole = patch_covariance(images, MEAN, STD, 3)
    monkeypatch.setattr(whiten, "_CHUNK", 4)  # 6 chunks, the last of 3 images
    torch.testing.assert_close(patch_covariance(images, MEAN, STD, 3), whole, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("channels, pairs", [(64, 27), (54, 27), (16, 8), (5, 2)])
def test_whiten_stem_sets_leading_filters_and_their_negatives_and_keeps_the_rest(channels, pairs):
    images = smooth_images(40, seed=7)
    conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
    before = conv.weight.detach().clone()
    assert whiten_stem(conv, images, MEAN, STD) == 2 * pairs
    filters = whitening_filters(images, MEAN, STD, 3)
    w = conv.weight.detach()
    torch.testing.assert_close(w[:pairs], filters[:pairs])             # largest eigenvalues first
    torch.testing.assert_close(w[pairs:2 * pairs], -filters[:pairs])
    assert torch.equal(w[2 * pairs:], before[2 * pairs:])              # Kaiming where no filter is left
    assert conv.weight.requires_grad                                   # freezing is model.stem_frozen's job


def test_whiten_stem_uses_the_first_whiten_images_only(monkeypatch):
    images = smooth_images(30, seed=8)
    monkeypatch.setattr(whiten, "WHITEN_IMAGES", 10)
    a, b = nn.Conv2d(3, 8, 3, bias=False), nn.Conv2d(3, 8, 3, bias=False)
    whiten_stem(a, images, MEAN, STD)
    whiten_stem(b, np.concatenate([images[:10], smooth_images(20, seed=9)]), MEAN, STD)
    assert torch.equal(a.weight, b.weight)


def test_whiten_stem_uses_the_eps_it_is_given():
    """A caller's eps reaches the filters (a larger one damps the weak directions more), not WHITEN_EPS."""
    images = smooth_images(20, seed=13)
    conv = nn.Conv2d(3, 8, 3, bias=False)
    whiten_stem(conv, images, MEAN, STD, eps=0.1)
    torch.testing.assert_close(conv.weight[:4].detach(), whitening_filters(images, MEAN, STD, 3, eps=0.1)[:4])


def test_whiten_stem_writes_a_channels_last_weight_in_place():
    images = smooth_images(20, seed=10)
    conv = nn.Conv2d(3, 64, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    param = conv.weight
    whiten_stem(conv, images, MEAN, STD)
    assert conv.weight is param and param.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(param[:27], whitening_filters(images, MEAN, STD, 3))


@pytest.mark.gpu
def test_the_estimate_on_the_gpu_is_the_cpus():
    """The trainer whitens on the stem's device: float64 there gives the CPU's covariance to rounding."""
    images = smooth_images(300, seed=11, hw=32)
    cpu = patch_covariance(images, MEAN, STD, 3)
    gpu = patch_covariance(images, MEAN, STD, 3, device="cuda")
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, atol=1e-12, rtol=1e-10)
    conv = nn.Conv2d(3, 64, 3, padding=1, bias=False).cuda()
    whiten_stem(conv, images, MEAN, STD)
    torch.testing.assert_close(conv.weight[:27].cpu(), whitening_filters(images, MEAN, STD, 3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv, images, match", [
    (nn.Conv2d(3, 8, (3, 1)), smooth_images(2), "square, ungrouped convolution"),
    (nn.Conv2d(1, 8, 3), smooth_images(2), "square, ungrouped convolution of the images' 3 channels"),
    (nn.Conv2d(3, 6, 3, groups=3), smooth_images(2), "square, ungrouped convolution"),
    (nn.Conv2d(3, 8, 3), smooth_images(2)[0], r"need uint8 images \[N, H, W, C\]"),  # one image, no N
    (nn.Conv2d(3, 8, 3), smooth_images(2).astype(np.float32), "need uint8 images"),
    (nn.Conv2d(3, 8, 3), smooth_images(2)[:0], "N >= 1"),
])
def test_bad_input_is_refused_with_what_was_expected(conv, images, match):
    with pytest.raises(ValueError, match=match):
        whiten_stem(conv, images, MEAN, STD)


# ---------------------------------------------------------------------------------------------------
# In the trainer: model.stem_init and model.stem_frozen


def test_a_whitened_run_starts_from_the_training_images_filters(cifar_dir, tmp_path):
    """Set before the optimizer copies the weights (Lookahead's slow weights hold the whitened filters
    too), estimated on the run's training split, and its seconds are on the training clock."""
    from test_train import quiet, tiny_config

    from fasttrain.trainer import Trainer

    cfg = tiny_config(cifar_dir, tmp_path, model__stem_init="whiten", train__epochs="1")
    trainer = Trainer(cfg, device="cpu", console=quiet())
    images = trainer.data.train_images
    assert len(images) == 640  # data.train_subset: the training split, not the validation or test images
    filters = whitening_filters(images, cfg.data.mean, cfg.data.std, 3)
    stem = trainer.model.stem[0].weight.detach()
    torch.testing.assert_close(stem[:4], filters[:4])       # base_channels 8: 4 pairs
    torch.testing.assert_close(stem[4:], -filters[:4])
    torch.testing.assert_close(trainer.optimizer.slow[0], stem)
    assert trainer.stem_init_seconds > 0
    summary = trainer.fit()
    assert summary["stem_init"] == "whiten" and summary["stem_init_seconds"] == trainer.stem_init_seconds
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["train_seconds"] == pytest.approx(summary["stem_init_seconds"] + sum(e["epoch_seconds"] for e in epochs))
    plain = Trainer(tiny_config(cifar_dir, tmp_path / "plain", train__epochs="1"), device="cpu", console=quiet())
    assert plain.stem_init_seconds is None and not torch.allclose(plain.model.stem[0].weight[:4], filters[:4])


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_a_frozen_stem_is_not_trained_nor_counted(cifar_dir, tmp_path, impl):
    from test_train import quiet, tiny_config

    from fasttrain.trainer import Trainer

    cfg = tiny_config(cifar_dir, tmp_path, model__stem_init="whiten", model__stem_frozen="true",
                      optim__impl=impl, train__epochs="1")
    trainer = Trainer(cfg, device="cpu", console=quiet())
    unfrozen = Trainer(tiny_config(cifar_dir, tmp_path / "u", optim__impl=impl, train__epochs="1"), device="cpu",
                       console=quiet())
    assert trainer.params == unfrozen.params - 8 * 3 * 3 * 3
    stem0, fc0 = trainer.model.stem[0].weight.detach().clone(), trainer.model.fc.weight.detach().clone()
    trainer.fit()
    assert torch.equal(trainer.model.stem[0].weight, stem0)  # frozen: weight decay and momentum too
    assert not torch.equal(trainer.model.fc.weight, fc0)      # the rest trains


def test_the_budget_counts_a_frozen_stem_out():
    from fasttrain.config import load_config
    from fasttrain.model import build_model, count_params

    cfg = load_config("configs/seed.yaml").model
    assert count_params(build_model(cfg)) == 4_697_742
    cfg.stem_frozen = True
    assert count_params(build_model(cfg)) == 4_697_742 - 64 * 3 * 3 * 3
