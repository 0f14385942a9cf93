"""Image folders -> pixel tensors (N, 3, R, R) in [-1, 1], ready for a VAE encoder.

`ImageFolder` lists every .jpg/.jpeg/.png/.webp file under a folder (recursively, in sorted order of
relative POSIX paths, so the order is stable across machines and runs), and turns each file into a
square RGB tensor: shorter side resized to `resolution` (bicubic, antialiased), then center-cropped.

A file that cannot be decoded must not stop a long encode. `ImageFolder.__getitem__` therefore never
raises on a bad file: it returns a "skipped" record with the reason, and `collate_images` separates the
good items from the skipped ones, so a DataLoader worker never crashes on a corrupt file and the
encoder sees plain batches plus a list of what was skipped.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from latent_prior.errors import LatentPriorError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def list_images(root: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of all images under `root`, recursively, sorted.

    Hidden files and folders (names starting with ".") are ignored. Raises LatentPriorError when
    `root` is missing, not a folder, or holds no image.
    """
    root = Path(root)
    if not root.exists():
        raise LatentPriorError(f"--data {root}: no such folder; point it at a folder of .jpg/.jpeg/.png/.webp images.")
    if not root.is_dir():
        raise LatentPriorError(f"--data {root}: not a folder; point it at a folder of .jpg/.jpeg/.png/.webp images.")
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Symlinked folders are followed (datasets are often assembled from links), but each real
        # folder only once, so a link cycle cannot loop forever.
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    if not found:
        raise LatentPriorError(
            f"--data {root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files in it and its "
            "subfolders); point it at a folder that holds images."
        )
    return sorted(found)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    Alpha (RGBA, LA, palette with transparency) is composited onto white, because dropping it would
    expose whatever colour the transparent pixels happen to store. 16-bit and 32-bit integer grey
    images are rescaled to 8 bits instead of clipped (PIL's plain convert clips them to white).
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        else:
            top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0.0) > 255 else 255.0
        values = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(values, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike, resolution: int, channels: int = 3) -> torch.Tensor:
    """One image file -> float tensor (channels, resolution, resolution) in [-1, 1].

    channels: 3 for RGB (the usual VAE input), 1 for a greyscale VAE (luma of the RGB image).

    Raises whatever PIL raises for an unreadable file (OSError, UnidentifiedImageError, ...);
    `ImageFolder` turns that into a skipped record.
    """
    with Image.open(path) as image:
        # JPEG can decode at 1/2, 1/4 or 1/8 scale directly; the result stays >= resolution on both
        # sides, so the resize below still downsamples, but a 4000 px photo decodes ~10x faster.
        if image.format == "JPEG":
            image.draft("RGB", (resolution, resolution))
        image.load()  # decode now, so truncated files fail here and not later
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
    width, height = image.size
    if min(width, height) < 1:
        raise ValueError(f"image has an empty side ({width}x{height})")
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, resample=Image.BICUBIC, reducing_gap=None)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if channels == 1:
        image = image.convert("L")
    array = np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, -1)  # (R, R, channels)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float()
    return tensor / 127.5 - 1.0


def not_an_image_file(root: str | os.PathLike, relative: str) -> str | None:
    """Why file `relative` under `root` must be skipped before it is even opened, or None: its name is not
    valid UTF-8 (it could not be recorded in a cache's JSON), or it is not a regular file (opening a named
    pipe called x.png would wait forever, a device would be read without end)."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return "its file name is not valid UTF-8; rename it"
    try:
        mode = os.stat(Path(root) / relative).st_mode
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    if not stat.S_ISREG(mode):
        kind = (
            "a named pipe"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a folder"
            if stat.S_ISDIR(mode)
            else "not a file"
        )
        return f"not a regular file ({kind}); only image files are read"
    return None


class ImageFolder(torch.utils.data.Dataset):
    """A folder of images as a map-style dataset.

    Item i is a dict: {"index": i, "path": relative path, "image": (C, R, R) float32 in [-1, 1]}, or,
    when the file cannot be read, {"index": i, "path": ..., "error": "ExceptionName: message"}.
    Use `collate_images` as the DataLoader's collate_fn to split those apart.

    Args:
        root: folder to search recursively.
        resolution: side of the square output, in pixels.
        files: relative paths to use instead of listing `root` (e.g. a saved plan); default: all images.
        channels: 3 (RGB, default) or 1 (greyscale), as the VAE expects.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, files: Sequence[str] | None = None, channels: int = 3):
        if int(resolution) < 1:
            raise LatentPriorError(f"--resolution {resolution}: must be a positive number of pixels.")
        if channels not in (1, 3):
            raise LatentPriorError(f"the VAE expects {channels}-channel images; ImageFolder makes RGB (3) or grey (1) images only.")
        self.root = Path(root)
        self.resolution = int(resolution)
        self.channels = int(channels)
        self.files = list(files) if files is not None else list_images(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        reason = not_an_image_file(self.root, path)
        if reason is not None:
            return {"index": index, "path": path, "error": reason}
        try:
            image = load_image(self.root / path, self.resolution, self.channels)
        except Exception as exc:  # noqa: BLE001 - any decoding failure skips this file, never the run
            reason = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
            return {"index": index, "path": path, "error": reason}
        return {"index": index, "path": path, "image": image}


@dataclass
class ImageBatch:
    """What `collate_images` yields.

    indices: dataset indices of the decoded images, in batch order (list of int, length n)
    paths:   their relative paths (length n)
    images:  (n, C, R, R) float32 in [-1, 1]; n may be 0 when every file of the batch was bad
    skipped: [(index, path, reason)] for the files that could not be decoded
    """

    indices: list[int]
    paths: list[str]
    images: torch.Tensor
    skipped: list[tuple[int, str, str]] = field(default_factory=list)

    def pin_memory(self) -> "ImageBatch":
        # Called by DataLoader(pin_memory=True) on custom batch types.
        self.images = self.images.pin_memory()
        return self


def collate_images(items: Iterable[dict[str, Any]]) -> ImageBatch:
    """DataLoader collate_fn for `ImageFolder`: stack the good images, list the skipped ones."""
    items = list(items)
    good = [item for item in items if "image" in item]
    bad = [(item["index"], item["path"], item["error"]) for item in items if "error" in item]
    if good:
        images = torch.stack([item["image"] for item in good])
    else:
        images = torch.empty(0, 3, 0, 0)
    return ImageBatch([item["index"] for item in good], [item["path"] for item in good], images, bad)


def image_loader(
    dataset: ImageFolder,
    batches: Sequence[Sequence[int]],
    num_workers: int = 2,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader that yields `ImageBatch`es for exactly the given index batches, in order.

    Decoding runs in `num_workers` background processes (0 = in the calling process), so the encoder
    does not wait on JPEG/PNG decoding.
    """
    if num_workers < 0:
        raise LatentPriorError(f"--num-workers {num_workers}: must be 0 or more.")
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[list(b) for b in batches],
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
