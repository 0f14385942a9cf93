"""Decoded images to files: PNGs and labelled grids.

Images here are float tensors (N, C, H, W) in [−1, 1], as VAE decoders return them (C = 1 or 3).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from latent_prior.errors import LatentPriorError


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) floats in [−1, 1] -> (N, H, W, C) uint8 on the CPU (values outside are clipped)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise LatentPriorError(f"images must have shape (N, 1 or 3, H, W); got {tuple(images.shape)}.")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """One PIL image per item of (N, C, H, W) in [−1, 1] (mode "L" for one channel, "RGB" for three)."""
    arrays = to_uint8(images).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


def save_pngs(images: torch.Tensor, folder: str | os.PathLike, prefix: str = "sample", start: int = 0) -> list[Path]:
    """Write each image as `folder/{prefix}_{index:06d}.png` (index from `start`); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(to_pil(images), start=start):
        path = folder / f"{prefix}_{i:06d}.png"
        image.save(path)
        paths.append(path)
    return paths


def make_grid(images: torch.Tensor, ncol: int | None = None, padding: int = 2, scale: int = 1) -> Image.Image:
    """Tile (N, C, H, W) images row by row into one RGB image, `ncol` per row (about √N when left out),
    each enlarged `scale` times with nearest-neighbour (small latents decode to small images)."""
    tiles = [im.convert("RGB") for im in to_pil(images)]
    if not tiles:
        raise LatentPriorError("make_grid needs at least one image.")
    ncol = ncol or math.ceil(math.sqrt(len(tiles)))
    w, h = tiles[0].width * scale, tiles[0].height * scale
    nrow = math.ceil(len(tiles) / ncol)
    grid = Image.new("RGB", (ncol * (w + padding) + padding, nrow * (h + padding) + padding), "white")
    for i, tile in enumerate(tiles):
        if scale != 1:
            tile = tile.resize((w, h), Image.NEAREST)
        grid.paste(tile, (padding + (i % ncol) * (w + padding), padding + (i // ncol) * (h + padding)))
    return grid


def labelled_panels(panels: Sequence[tuple[str, torch.Tensor]], ncol: int | None = None, scale: int = 1, gap: int = 16) -> Image.Image:
    """Grids side by side, each with its label above it, e.g. [("N(0, I) prior", x0), ("EVaLP prior", x1)]."""
    grids = [make_grid(images, ncol=ncol, scale=scale) for _, images in panels]
    font = ImageFont.load_default()
    label_height = 8 + max(ImageDraw.Draw(g).textbbox((0, 0), label, font=font)[3] for (label, _), g in zip(panels, grids))
    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, label_height + max(g.height for g in grids)), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for (label, _), g in zip(panels, grids):
        draw.text((x + 2, 4), label, fill="black", font=font)
        canvas.paste(g, (x, label_height))
        x += g.width + gap
    return canvas
