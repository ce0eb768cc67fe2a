"""Top-1 accuracy: of a model during training, and of a saved checkpoint (`python -m fasttrain eval`)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fasttrain.checkpoint import check_architecture, load_checkpoint
from fasttrain.config import config_from_dict
from fasttrain.data import build_data
from fasttrain.distributed import DistInfo, all_reduce_sum
from fasttrain.model import build_model, count_params
from fasttrain.runtime import Precision, device_name, resolve_device, use_channels_last


@torch.no_grad()
def evaluate(model: nn.Module, loader, precision: Precision, device: torch.device,
             tta: bool = False, dist_info: DistInfo | None = None) -> float:
    """Top-1 accuracy in percent. Counts (not per-rank averages) are summed across ranks."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    for images, labels in loader:
        with precision.autocast(device):
            logits = model(images).float()
            if tta:  # average with the mirror image: the flip augmentation's test-time twin
                logits = logits + model(torch.flip(images, dims=(3,))).float()
        correct += (logits.argmax(1) == labels).sum()
        total += labels.numel()
    model.train(was_training)
    counts = torch.stack([correct, total])
    if dist_info is not None:
        all_reduce_sum(counts, dist_info)
    correct_n, total_n = counts.tolist()
    return 100.0 * correct_n / max(1, total_n)


def evaluate_checkpoint(path: str | Path, *, tta: bool = False, device: str = "auto",
                        data_dir: str | None = None) -> dict:
    """`python -m fasttrain eval`: rebuild the checkpoint's model and measure its test accuracy."""
    dev = resolve_device(device)
    ckpt = load_checkpoint(path, map_location=dev)
    cfg = config_from_dict(ckpt["config"])
    if data_dir is not None:
        cfg.data.dir = data_dir
    model = build_model(cfg.model, check=False)
    check_architecture(model, ckpt["model"], str(path))
    model.load_state_dict(ckpt["model"])
    model = model.to(dev)
    channels_last = use_channels_last(cfg, dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision = Precision.resolve(cfg.train.precision, dev)
    data = build_data(cfg.data, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
                      device=dev, dtype=precision.data_dtype, channels_last=channels_last,
                      seed=cfg.train.seed)
    acc = evaluate(model, data.test, precision, dev, tta=tta)
    return {"checkpoint": str(path), "test_acc": acc, "tta": tta, "epoch": int(ckpt["epoch"]),
            "params": count_params(model), "trained_on": ckpt.get("data_source"), "device": device_name(dev)}
