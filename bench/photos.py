"""Real-photo patches: seeded random crops of the RGB photos that ship with scikit-image and scikit-learn.

The photo set of the prior benchmark (`bench.datasets`, set "photos") needs real natural-image
statistics, offline. Ten RGB photos ship inside the installed wheels (no download):

* `skimage.data`: astronaut, chelsea, coffee, rocket, immunohistochemistry, hubble_deep_field,
  retina, and the left image of stereo_motorcycle;
* `sklearn.datasets.load_sample_images()`: china, flower.

How the patches are made (all deterministic given `seed`):

1. Each photo is resized (PIL Lanczos, antialiased) so its shorter side is `photo_side` pixels
   (256 by default), so every crop holds objects and edges at a similar scale, whatever the
   original resolution (300 px for chelsea, 1411 px for retina).
2. **The held-out split is by source image region.** Each resized photo is cut into a grid of
   square tiles of `2 · crop_size` pixels (the right and bottom remainders are not used); a seeded
   draw marks `heldout_fraction` (20 %) of every photo's tiles as held out, the rest as training
   tiles. Every crop lies inside one tile, so a held-out crop shares no pixel with any training
   crop, while both splits cover every photo (no shift of content between the splits).
3. Crop i of a split comes from photo i mod 10 (so every photo contributes equally), from a
   uniformly drawn tile of that split, at a uniform offset inside the tile.

Pixels are float32 in [-1, 1], shape (N, 3, crop_size, crop_size), the pixel space of
docs/architecture.md.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from latent_prior.errors import LatentPriorError

#: (name, loader) of the photos, in the order crops cycle through them.
PHOTO_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "stereo_motorcycle_left",
    "china",
    "flower",
)
NUM_TRAIN = 3000
NUM_HELDOUT = 500
CROP_SIZE = 32
PHOTO_SIDE = 256
HELDOUT_FRACTION = 0.2


@functools.lru_cache(maxsize=2)  # decoding and resizing the ten photos takes seconds; the arrays are read-only
def load_photos(photo_side: int = PHOTO_SIDE) -> dict[str, np.ndarray]:
    """The ten photos as read-only uint8 (H, W, 3) arrays, resized so min(H, W) == photo_side, in
    PHOTO_NAMES order."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    raw: dict[str, np.ndarray] = {}
    for name in PHOTO_NAMES[:7]:
        raw[name] = getattr(data, name)()
    raw["stereo_motorcycle_left"] = data.stereo_motorcycle()[0]
    sample = load_sample_images()
    for path, image in zip(sample.filenames, sample.images):
        raw[path.rsplit("/", 1)[-1].split(".")[0]] = image  # china.jpg, flower.jpg
    photos = {}
    for name in PHOTO_NAMES:
        image = Image.fromarray(np.ascontiguousarray(raw[name][..., :3]))
        scale = photo_side / min(image.size)
        size = (max(photo_side, round(image.width * scale)), max(photo_side, round(image.height * scale)))
        photos[name] = np.array(image.resize(size, Image.Resampling.LANCZOS))
        photos[name].setflags(write=False)
    return photos


@dataclass
class PhotoPatches:
    """Seeded crops of the ten photos, split by image region.

    train: (N_train, 3, C, C) float32 in [-1, 1];  train_photo: (N_train,) int64 index into `photos`
    train_origin: (N_train, 2) int64 (top, left) pixel of each crop in its resized photo
    heldout, heldout_photo, heldout_origin: the same for the held-out crops
    photos: the photo names;  config: the arguments that made them (JSON-able)
    """

    train: torch.Tensor
    train_photo: torch.Tensor
    train_origin: torch.Tensor
    heldout: torch.Tensor
    heldout_photo: torch.Tensor
    heldout_origin: torch.Tensor
    photos: tuple[str, ...]
    config: dict


def _tiles(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    return [(r * tile, c * tile) for r in range(height // tile) for c in range(width // tile)]


def make_patches(
    num_train: int = NUM_TRAIN,
    num_heldout: int = NUM_HELDOUT,
    crop_size: int = CROP_SIZE,
    seed: int = 0,
    photo_side: int = PHOTO_SIDE,
    heldout_fraction: float = HELDOUT_FRACTION,
) -> PhotoPatches:
    """Random crops of the photos (see the module docstring); the same arguments give the same tensors."""
    config = dict(locals())  # the arguments, as PhotoPatches.config records them
    if num_train < 1 or num_heldout < 1:
        raise LatentPriorError(f"make_patches: num_train={num_train} and num_heldout={num_heldout} must both be at least 1.")
    if not 0.0 < heldout_fraction < 1.0:
        raise LatentPriorError(f"make_patches: heldout_fraction={heldout_fraction} must lie strictly between 0 and 1.")
    tile = 2 * crop_size
    if crop_size < 4 or photo_side < 2 * tile:
        raise LatentPriorError(
            f"make_patches: crop_size={crop_size} needs photo_side >= {2 * tile} (two tiles of 2·crop_size), got {photo_side}; "
            "use a smaller crop or a larger photo_side."
        )
    photos = load_photos(photo_side)
    rng = np.random.default_rng([seed, 0])
    tiles: dict[str, list[list[tuple[int, int]]]] = {"train": [], "heldout": []}
    for image in photos.values():
        grid = _tiles(image.shape[0], image.shape[1], tile)
        order = rng.permutation(len(grid))
        n_held = min(len(grid) - 1, max(1, round(heldout_fraction * len(grid))))  # both splits keep a tile
        tiles["heldout"].append([grid[i] for i in sorted(order[:n_held])])
        tiles["train"].append([grid[i] for i in sorted(order[n_held:])])

    images = list(photos.values())

    def crops(split: str, n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = np.random.default_rng([seed, stream])
        out = np.empty((n, crop_size, crop_size, 3), dtype=np.uint8)
        source = np.arange(n) % len(images)
        origin = np.empty((n, 2), dtype=np.int64)
        for i, p in enumerate(source):
            top, left = tiles[split][p][g.integers(len(tiles[split][p]))]
            dy, dx = g.integers(0, tile - crop_size + 1, size=2)
            origin[i] = top + dy, left + dx
            out[i] = images[p][origin[i, 0] : origin[i, 0] + crop_size, origin[i, 1] : origin[i, 1] + crop_size]
        x = torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x.contiguous(), torch.from_numpy(source).long(), torch.from_numpy(origin)

    train, train_photo, train_origin = crops("train", num_train, 1)
    heldout, heldout_photo, heldout_origin = crops("heldout", num_heldout, 2)
    return PhotoPatches(train, train_photo, train_origin, heldout, heldout_photo, heldout_origin, tuple(photos), config)


def import_repo_script(name: str) -> ModuleType:
    """Import `scripts/<name>.py` of this checkout by path, once per process (scripts/ is not a
    package). The photo VAE is trained by `scripts/train_photo_vae.py`, which both its command line
    and `bench.datasets` (on demand) run."""
    module_name = f"_latent_prior_scripts_{name}"
    if module_name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        if not path.is_file():
            raise LatentPriorError(f"{path} is missing; the photo benchmark needs the repository's scripts/ folder (run from a checkout).")
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the file executes
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return sys.modules[module_name]
