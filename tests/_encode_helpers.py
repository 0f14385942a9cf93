"""Test helpers for the encode / cache tests: a real tiny diffusers VAE and real images on disk.

The images are crops of scikit-image's sample photos (astronaut, chelsea, coffee, rocket, camera)
and scikit-learn's 8x8 digits, written in several formats into nested folders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: A real AutoencoderKL config at its smallest: two blocks (2x downsampling), 4 latent channels.
TINY_KL_CONFIG = dict(
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    norm_num_groups=4,
    latent_channels=4,
)


def make_tiny_vae(folder: Path, seed: int = 0, edit=None, **config) -> Path:
    """Save a real diffusers AutoencoderKL with a tiny config (2x downsampling) to `folder`.

    `edit(vae)`, when given, may change the weights in place before saving."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**TINY_KL_CONFIG, "sample_size": 32, **config})
    if edit is not None:
        with torch.no_grad():
            edit(vae)
    vae.save_pretrained(folder)
    return Path(folder)


def sample_photos() -> list[np.ndarray]:
    """Real photos as uint8 arrays: RGB (H, W, 3) and greyscale (H, W)."""
    from skimage import data

    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.camera()]


def write_images(
    folder: Path, count: int, *, size: tuple[int, int] = (48, 40), seed: int = 0, formats: tuple[str, ...] = ("png", "jpg", "webp")
) -> list[str]:
    """Write `count` real image crops (photos and upscaled digits) under `folder`, spread over nested
    subfolders and formats. Returns their relative paths, sorted."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    photos = sample_photos()
    digits = load_digits().images  # (1797, 8, 8) in 0..16
    paths = []
    for i in range(count):
        if i % 4 == 3:
            digit = (digits[i % len(digits)] * (255 / 16)).astype(np.uint8)
            image = Image.fromarray(digit, mode="L").resize(size, Image.NEAREST)
        else:
            photo = photos[i % len(photos)]
            h, w = size[1], size[0]
            top = int(rng.integers(0, photo.shape[0] - h * 3))
            left = int(rng.integers(0, photo.shape[1] - w * 3))
            crop = photo[top : top + h * 3, left : left + w * 3]
            image = Image.fromarray(crop).resize(size, Image.BILINEAR)
        ext = formats[i % len(formats)]
        rel = Path(f"group{i % 3}") / (f"deeper/img{i:03d}.{ext}" if i % 5 == 0 else f"img{i:03d}.{ext}")
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / rel)
        paths.append(rel.as_posix())
    return sorted(paths)
