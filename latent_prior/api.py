"""The Python API: from a VAE and its images (or from cached latents) to a fitted prior, in one call.

    from latent_prior import fit
    from latent_prior.adapters import load_vae, wrap

    vae = load_vae("stabilityai/sd-vae-ft-mse")           # or wrap(my_vae, encode=..., decode=...)
    prior = fit(vae, images, steps=1000)                  # images: (N, 3, H, W) in [-1, 1], a DataLoader, or a folder
    x = vae.decode(prior.sample(16))                      # (16, 3, H, W) in [-1, 1]
    prior.save_pretrained("my-prior/")                    # loads in `latent-prior sample --prior my-prior/`

`fit(adapter, images)` encodes the images with the adapter and keeps each posterior's mean and
log-variance (not one frozen draw), the VAE's latent normalization and its provenance, then trains
on them exactly as `latent-prior fit --latents` would (`latent_prior.train.fit`). Images given as a
tensor or a DataLoader are encoded into memory (`EncodedLatents`); an image folder goes through
`latent_prior.encode.encode_images`, into a temporary cache or, with `cache=DIR`, into a resumable
on-disk cache that the command line can reuse. `fit(latents)` with a cache folder, a .safetensors
file, a `LatentSource` or a tensor of means behaves like `latent_prior.train.fit`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Union

import numpy as np
import torch

from latent_prior.cache import EncodedLatents
from latent_prior.errors import LatentPriorError
from latent_prior.vae import VAEAdapter

if TYPE_CHECKING:
    from latent_prior.cache import LatentSource
    from latent_prior.fit_config import FitConfig
    from latent_prior.prior import LatentPrior

__all__ = ["fit", "encode_latents", "EncodedLatents", "ImageInput"]

#: Pixel values beyond this are almost surely [0, 255] data or another normalization given by mistake;
#: a small overshoot of [-1, 1] is allowed because resampling filters ring past the range (the same
#: limit as `latent_prior.adapters.TorchVAEAdapter`).
PIXEL_LIMIT = 1.5
#: What `fit` / `encode_latents` accept as images: a tensor (N, C, H, W) in [-1, 1], an iterable (e.g. a
#: DataLoader) of such tensors, (tensor, label) pairs or dicts with an "image" key, or an image folder.
ImageInput = Union[torch.Tensor, Iterable[Any], str, os.PathLike]
#: Keys under which a dict batch from a DataLoader may carry its images.
IMAGE_KEYS = ("image", "images", "pixel_values")

# ----------------------------------------------------------------------------------------------
# images -> latents


def _image_batches(images: Any, batch_size: int) -> tuple[Iterator[torch.Tensor], int | None]:
    """A tensor or an iterable of batches -> (iterator of image tensors, number of images if known)."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            raise LatentPriorError(
                f"images has shape {tuple(images.shape)}; pass a batch (N, C, H, W), e.g. images.unsqueeze(0) for one image."
            )
        return (images[i : i + batch_size] for i in range(0, len(images), batch_size)), len(images)
    if isinstance(images, (bytes, dict)) or not isinstance(images, Iterable):
        raise LatentPriorError(
            f"images of type {type(images).__name__}: pass a tensor (N, C, H, W) in [-1, 1], a DataLoader (or any "
            "iterable) of such tensors or (tensor, label) pairs, or an image folder."
        )
    total = None
    dataset = getattr(images, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__") and getattr(images, "sampler", None) is not None:
        try:
            total = len(dataset)
        except TypeError:  # an IterableDataset without a length
            total = None

    def unpack() -> Iterator[torch.Tensor]:
        for position, batch in enumerate(images):
            if isinstance(batch, dict):
                key = next((k for k in IMAGE_KEYS if k in batch), None)
                if key is None:
                    raise LatentPriorError(
                        f"images: batch {position} is a dict without any of the keys {', '.join(IMAGE_KEYS)}; "
                        "yield image tensors, (tensor, label) pairs, or dicts with an 'image' key."
                    )
                batch = batch[key]
            elif isinstance(batch, (tuple, list)):  # (images, labels), or [images] from a TensorDataset
                if not batch:
                    raise LatentPriorError(f"images: batch {position} is an empty {type(batch).__name__}; yield image tensors.")
                batch = batch[0]
            elif hasattr(batch, "images") and isinstance(getattr(batch, "images"), torch.Tensor):  # latent_prior.data.ImageBatch
                batch = batch.images
            if not isinstance(batch, torch.Tensor):
                raise LatentPriorError(
                    f"images: batch {position} holds a {type(batch).__name__}, not a tensor; "
                    "yield tensors (N, C, H, W) in [-1, 1] (e.g. add torchvision's ToTensor and x * 2 - 1)."
                )
            yield batch

    return unpack(), total


def _check_batch(batch: torch.Tensor, adapter: VAEAdapter, first_index: int, expected: tuple[int, ...] | None) -> None:
    """Refuse images of the wrong dtype, shape or range, naming the `images` argument and the remedy."""
    channels = int(getattr(adapter, "image_channels", 3))
    if not batch.is_floating_point():
        raise LatentPriorError(
            f"images are {str(batch.dtype).removeprefix('torch.')}; pass floats in [-1, 1] (x.float() / 127.5 - 1 for uint8)."
        )
    if batch.dim() != 4 or batch.shape[1] != channels:
        raise LatentPriorError(
            f"images starting at item {first_index} have shape {tuple(batch.shape)}; this VAE encodes "
            f"(N, {channels}, H, W) batches in [-1, 1]."
        )
    if expected is not None and tuple(batch.shape[1:]) != expected:
        raise LatentPriorError(
            f"images starting at item {first_index} are {tuple(batch.shape[1:])} but earlier ones were {expected}; "
            "resize or crop every image to one size (one prior models one latent shape)."
        )
    if batch.numel():
        finite = torch.isfinite(batch)
        if not bool(finite.all()):
            bad = first_index + int(torch.nonzero(~finite.flatten(1).all(dim=1))[0, 0])
            raise LatentPriorError(f"images: item {bad} holds NaN or inf pixels; drop or fix it.")
        top = float(batch.detach().abs().amax())
        if top > PIXEL_LIMIT:
            raise LatentPriorError(
                f"images must be scaled to [-1, 1] (x / 127.5 - 1 for 0..255 values, x * 2 - 1 for 0..1); "
                f"images starting at item {first_index} reach {top:.3g}."
            )


def _world_size() -> int:
    """Processes started by `accelerate launch` / torchrun (their launchers set WORLD_SIZE), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _encoder_dtype_name(adapter: VAEAdapter) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(adapter.dtype, "fp32")


def _default_resolution(adapter: VAEAdapter) -> int:
    """The embedded default VAE's own resolution for it, else `latent-prior encode`'s default."""
    from latent_prior import defaults
    from latent_prior.encode import DEFAULT_USER_RESOLUTION

    try:
        source = adapter.provenance.source
    except Exception:  # noqa: BLE001 - an adapter without provenance is simply not the embedded one
        source = None
    if source and Path(source).resolve() == Path(defaults.DEFAULT_VAE_DIR).resolve():
        return int(defaults.DEFAULT_RESOLUTION)
    return DEFAULT_USER_RESOLUTION


def _encode_folder(
    adapter: VAEAdapter, folder: Path, cache: Path, *, resolution: int | None, batch_size: int, num_workers: int, quiet: bool
) -> LatentSource:
    """Encode an image folder into the cache folder `cache` (resumed when it holds the same run)."""
    from latent_prior.cache import open_latents
    from latent_prior.encode import EncodeConfig, encode_images

    provenance = adapter.provenance
    config = EncodeConfig(
        vae=provenance.source,
        data=str(folder),
        out=str(cache),
        resolution=int(resolution) if resolution is not None else _default_resolution(adapter),
        batch_size=batch_size,
        dtype=_encoder_dtype_name(adapter),
        num_workers=num_workers,
        quiet=quiet,
    )
    encode_images(adapter, config)
    return open_latents(cache)


def encode_latents(
    adapter: VAEAdapter,
    images: ImageInput,
    *,
    batch_size: int = 64,
    quiet: bool = False,
    resolution: int | None = None,
    cache: str | os.PathLike | None = None,
    num_workers: int = 0,
) -> EncodedLatents | LatentSource:
    """Encode images with a VAE adapter and keep their posterior moments (mean and logvar).

    adapter: a `VAEAdapter` (`latent_prior.adapters.load_vae(...)` or `wrap(my_vae, ...)`).
    images: one of
        * a tensor (N, C, H, W) in [-1, 1] (C = adapter.image_channels), encoded `batch_size` at a time;
        * a DataLoader or any iterable yielding such tensors, (tensor, label) pairs (a TensorDataset's
          [tensor] too) or dicts with an "image" / "images" / "pixel_values" key; all images must share
          one size;
        * a folder of .jpg/.jpeg/.png/.webp images (searched recursively), resized and center-cropped to
          `resolution` (default: 32 for the embedded default VAE, else 256) by `latent-prior encode`'s code.
    cache: only for a folder: the cache folder to write (resumed when rerun with the same VAE, folder and
        settings, refused when they differ); the result then streams from disk. Without it the folder is
        encoded into a temporary cache and read into memory.
    num_workers: only for a folder: background processes decoding image files.
    quiet: no progress bar.

    Returns an `EncodedLatents` (in memory) or, with `cache=`, the cache's `LatentSource`: either has
    `latent_shape`, `normalization`, `provenance` and can be passed to `fit`.
    Runs under `torch.no_grad()`; memory holds 2 · N · prod(latent_shape) float32 values (use `cache=`
    with a folder when that is too much).
    """
    if not isinstance(adapter, VAEAdapter):
        raise _not_an_adapter(adapter)
    if int(batch_size) < 1:
        raise LatentPriorError(f"batch_size={batch_size}: encode at least 1 image per call.")
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        if not folder.is_dir():
            raise LatentPriorError(
                f"images={str(folder)!r}: no such folder; pass a folder of .jpg/.jpeg/.png/.webp images, "
                "a tensor (N, C, H, W) in [-1, 1] or a DataLoader."
            )
        if cache is not None:
            return _encode_folder(
                adapter, folder, Path(cache), resolution=resolution, batch_size=batch_size, num_workers=num_workers, quiet=quiet
            )
        if _world_size() > 1:
            # Every process would make its own temporary folder, and the ranks would never meet.
            raise LatentPriorError(
                f"images={str(folder)!r} under {_world_size()} processes needs cache=DIR, a folder every process "
                "can reach, so that they share one cache."
            )
        with tempfile.TemporaryDirectory(prefix="latent-prior-encode-") as tmp:
            source = _encode_folder(
                adapter, folder, Path(tmp) / "cache", resolution=resolution, batch_size=batch_size, num_workers=num_workers, quiet=quiet
            )
            mean, logvar = source.read(np.arange(len(source)))
            manifest = dict(source.manifest or {})
            return EncodedLatents(
                mean,
                logvar,
                normalization=source.normalization,
                provenance=source.provenance,
                manifest={k: manifest[k] for k in ("count", "resolution", "image_channels", "data") if k in manifest},
                description=f"<{len(mean)} images of {folder} encoded in memory>",
            )
    if cache is not None:
        raise LatentPriorError(
            "cache= applies to an image folder (a resumable on-disk cache); for a tensor or DataLoader, keep the "
            "result of encode_latents(...) or write it with its .save('latents.safetensors')."
        )
    if resolution is not None:
        raise LatentPriorError("resolution= applies to an image folder; resize tensors or DataLoader images yourself.")

    from tqdm.auto import tqdm

    provenance = adapter.provenance.to_dict()
    batches, total = _image_batches(images, int(batch_size))
    means: list[torch.Tensor] = []
    logvars: list[torch.Tensor] = []
    count, image_shape = 0, None
    # Under `accelerate launch` every process encodes all the images (the trainer shards them later);
    # one progress bar is enough.
    bar = tqdm(total=total, unit="img", desc="encode", disable=quiet or _rank() != 0, dynamic_ncols=True)
    try:
        with torch.no_grad():
            for batch in batches:
                _check_batch(batch, adapter, count, image_shape)
                if not len(batch):
                    continue
                if image_shape is None:
                    image_shape = tuple(batch.shape[1:])
                    if float(batch.amin()) >= 0.0 and float(batch.amax()) <= 1.0:
                        warnings.warn("images lie in [0, 1]; VAEs expect [-1, 1] (use x * 2 - 1), so check the scaling.", stacklevel=3)
                posterior = adapter.encode(batch)
                rows = ~torch.isfinite(posterior.mean.flatten(1)).all(dim=1)
                if posterior.logvar is not None:
                    rows |= ~torch.isfinite(posterior.logvar.flatten(1)).all(dim=1)
                if bool(rows.any()):
                    bad = count + int(torch.nonzero(rows)[0, 0])
                    raise LatentPriorError(
                        f"the VAE gave NaN/inf latents for {int(rows.sum())} image(s), first item {bad}; check those images, "
                        "or encode in float32 (load_vae(..., dtype='fp32'))."
                    )
                means.append(posterior.mean.to("cpu", torch.float32))
                if posterior.logvar is not None:
                    logvars.append(posterior.logvar.to("cpu", torch.float32))
                count += len(batch)
                bar.update(len(batch))
    finally:
        bar.close()
    if count == 0:
        raise LatentPriorError(f"images: the {type(images).__name__} yielded no images; pass a non-empty tensor or DataLoader.")
    if logvars and len(logvars) != len(means):
        raise LatentPriorError("the VAE returned a log-variance for some batches but not others; return (mean, logvar) always.")
    channels, height, width = image_shape  # type: ignore[misc]
    manifest: dict[str, Any] = {"count": count, "image_channels": channels, "image_size": [height, width]}
    if height == width:
        manifest["resolution"] = height  # lets the trainer report the gain in bits per image dimension
    return EncodedLatents(
        torch.cat(means),
        torch.cat(logvars) if logvars else None,
        normalization=adapter.normalization,
        provenance=provenance,
        manifest=manifest,
        description=f"<{count} images {tuple(image_shape)} encoded in memory by {provenance.get('source')}>",
    )


# ----------------------------------------------------------------------------------------------
# fit


def _not_an_adapter(obj: Any) -> LatentPriorError:
    name = type(obj).__name__
    if isinstance(obj, torch.nn.Module):
        return LatentPriorError(
            f"got a torch module ({name}), not a VAEAdapter; wrap it first: adapter = latent_prior.adapters.wrap(my_vae, "
            "encode=lambda m, x: ..., decode=lambda m, z: ...) (or latent_prior.adapters.DiffusersKLAdapter(vae) for "
            "a diffusers AutoencoderKL)."
        )
    return LatentPriorError(f"got a {name}, not a VAEAdapter; load one with latent_prior.adapters.load_vae(...) or wrap(...).")


def fit(
    data: VAEAdapter | str | os.PathLike[str] | LatentSource | EncodedLatents | torch.Tensor,
    images: ImageInput | None = None,
    config: FitConfig | None = None,
    *,
    resolution: int | None = None,
    cache: str | os.PathLike | None = None,
    encode_batch_size: int = 64,
    encode_workers: int = 0,
    **overrides: Any,
) -> LatentPrior:
    """Fit an EVaLP prior, from a VAE and its images or from latents, and return the `LatentPrior`.

    data:
        * a `VAEAdapter` (`latent_prior.adapters.load_vae(...)`, `wrap(my_vae, ...)`) together with
          `images`: a tensor (N, C, H, W) in [-1, 1], a DataLoader / iterable of such tensors or of
          (tensor, label) pairs, or an image folder (see `encode_latents`). The images are encoded under
          `torch.no_grad()` keeping each posterior's mean and logvar, the VAE's normalization and
          provenance; then the prior is fitted on them;
        * or latents, with `images` left out: a cache folder (`latent-prior encode`), a .safetensors
          file with `mean` (N, *shape) and optional `logvar`, a `LatentSource` / `EncodedLatents`, or a
          tensor (N, *latent_shape) of posterior means (identity normalization, no provenance).
    config: a `latent_prior.FitConfig`; keyword `overrides` replace its fields (steps=500,
        batch_size=128, out="runs/my-fit", quiet=True, ...). Also accepted as the second positional argument
        when fitting on latents, as in `latent_prior.train.fit(latents, config)`.
    resolution, cache, encode_batch_size, encode_workers: how images are encoded (`encode_latents`'s
        resolution, cache, batch_size and num_workers); `quiet` hides the encode bar too. With an adapter and
        `log_with` trackers, the adapter decodes a sample grid for them at every checkpoint.

    Returns the prior on the CPU (or Accelerate's device). `prior.sample(n)` gives RAW latents
    (n, *latent_shape) for `adapter.decode`; with `out=DIR` it is also exported to DIR/prior, with its
    checkpoints and metrics in DIR/train, the same folders `latent-prior fit --latents ... --out DIR` writes.
    """
    from latent_prior.fit_config import FitConfig
    from latent_prior.train import fit as fit_latents

    if isinstance(images, FitConfig) and config is None:  # fit(latents, FitConfig(...)), train.fit's signature
        images, config = None, images
    if config is not None and not isinstance(config, FitConfig):
        raise LatentPriorError(f"config is a {type(config).__name__}; pass a latent_prior.FitConfig or keyword settings.")
    if isinstance(data, VAEAdapter):
        if images is None:
            raise LatentPriorError(
                "fit(adapter) needs the images to encode: fit(adapter, images) with a tensor (N, C, H, W) in [-1, 1], "
                "a DataLoader or an image folder (or pass cached latents instead of the adapter)."
            )
        quiet = bool(overrides.get("quiet", config.quiet if config is not None else False))
        _check_overrides(overrides)
        latents = encode_latents(
            data, images, batch_size=encode_batch_size, quiet=quiet, resolution=resolution, cache=cache, num_workers=encode_workers
        )
        return fit_latents(latents, config, decode=data.decode, **overrides)
    if isinstance(data, torch.nn.Module):
        raise _not_an_adapter(data)
    if images is not None:
        raise LatentPriorError(
            f"images= is only used with a VAEAdapter as the first argument, but got a {type(data).__name__}; "
            "pass fit(adapter, images), or fit(latents) without images."
        )
    for name, value in (("resolution", resolution), ("cache", cache)):
        if value is not None:
            raise LatentPriorError(f"{name}= applies when encoding images with a VAEAdapter; leave it out when fitting on latents.")
    return fit_latents(data, config, **overrides)


def _check_overrides(overrides: dict[str, Any]) -> None:
    """Refuse unknown settings before the (possibly long) encode, not after it."""
    from latent_prior.fit_config import FitConfig

    names = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise LatentPriorError(
            f"fit(): unknown setting(s) {', '.join(unknown)}; valid settings are {', '.join(sorted(names))}, "
            "plus resolution, cache, encode_batch_size and encode_workers."
        )
