"""Test helpers both loaders' tests share: random source images, and recovering from an output image's
pixels which crop and flip of its source produced it (the check is on pixels, not on the loader's plan)."""
import numpy as np
import torch


def random_images(count: int, seed: int = 0, hw: int = 32) -> np.ndarray:
    """Distinct random uint8 NHWC pixels: a crop/flip of one image matches no other candidate."""
    return np.random.default_rng(seed).integers(0, 256, size=(count, hw, hw, 3), dtype=np.uint8)


def recover_crops(pixels: torch.Tensor, sources: np.ndarray, padding: int) -> torch.Tensor:
    """[B, 3] (row offset, col offset, flip) per output image: the crop of its zero-padded source
    (offsets in 0..2*padding) that reproduces every pixel, mirrored if flip. Fails unless exactly one
    candidate matches.

    pixels: [B, 3, H, W] integer pixel values of the outputs (the normalization undone);
    sources: [B, H, W, 3] uint8, the image each output came from.
    """
    src = torch.from_numpy(np.ascontiguousarray(sources)).permute(0, 3, 1, 2).to(torch.int16)
    padded = torch.nn.functional.pad(src, (padding,) * 4)
    pixels = pixels.to(torch.int16)
    h, w = pixels.shape[-2:]
    side = 2 * padding + 1
    matches = torch.zeros(len(pixels), side, side, 2, dtype=torch.bool)
    center = pixels[:, :, h // 2, w // 2]  # 24 random bits: a cheap key that rules out almost every candidate
    for dy in range(side):
        for dx in range(side):
            for flip in (0, 1):
                col = dx + (w - 1 - w // 2 if flip else w // 2)  # where the crop's center pixel comes from
                hits = (padded[:, :, dy + h // 2, col] == center).all(1).nonzero()[:, 0]
                crop = padded[hits, :, dy:dy + h, dx:dx + w]
                crop = crop.flip(-1) if flip else crop
                matches[hits, dy, dx, flip] = (crop == pixels[hits]).flatten(1).all(1)  # every pixel
    counts = matches.flatten(1).sum(1)
    assert (counts == 1).all(), f"{int((counts != 1).sum())} outputs are not exactly one crop/flip of their source"
    found = matches.flatten(1).nonzero()[:, 1]  # per output, the flat index of its (row, col, flip) match
    return torch.stack([found // 2 // side, found // 2 % side, found % 2], dim=1)
