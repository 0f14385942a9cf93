"""diffusers `AutoencoderKL` (SD 1.x / 2.x / XL / 3, FLUX VAEs) behind the `VAEAdapter` interface.

`AutoencoderKL.encode(x)` takes NCHW images in [-1, 1] and returns a diagonal Gaussian
`latent_dist` whose `mean` and `logvar` (clamped by diffusers to [-30, 20]) we keep, in raw latent
space. The latent normalization comes from the config: `scaling_factor` (diffusers' default 0.18215
when the key is missing, as in `stabilityai/sd-vae-ft-mse`), `shift_factor` (None -> 0) and the
optional per-channel `latents_mean` / `latents_std`.
"""

from __future__ import annotations

from typing import Any

import torch

from latent_prior.errors import LatentPriorError
from latent_prior.vae import LatentNormalization, parse_dtype

from .torch_vae import TorchVAEAdapter

# `AutoencoderKL.__init__`'s default, which `from_config` / `from_pretrained` fill in when a
# config.json has no `scaling_factor` key (SD 1.x's value).
DEFAULT_SCALING_FACTOR = 0.18215


def diffusers_normalization(config: Any, default_scaling: float) -> LatentNormalization:
    """`LatentNormalization` from a diffusers config (a dict or FrozenDict)."""

    def as_tuple(values: Any) -> tuple[float, ...] | None:
        return None if values is None else tuple(float(v) for v in values)

    scaling = config.get("scaling_factor")
    return LatentNormalization(
        scaling_factor=float(default_scaling if scaling is None else scaling),
        shift_factor=float(config.get("shift_factor") or 0.0),
        latents_mean=as_tuple(config.get("latents_mean")),
        latents_std=as_tuple(config.get("latents_std")),
    )


def square_latent_shape(channels: int, factor: int, resolution: int, source: str) -> tuple[int, int, int]:
    """(channels, resolution / factor, resolution / factor); refuses resolutions the VAE cannot tile."""
    if resolution <= 0 or resolution % factor:
        raise LatentPriorError(
            f"resolution {resolution} does not suit {source}, which downsamples by {factor}; "
            f"use a multiple of {factor} (e.g. {max(factor, resolution // factor * factor)})."
        )
    return (channels, resolution // factor, resolution // factor)


class DiffusersAdapter(TorchVAEAdapter):
    """What the diffusers adapters share: the latent normalization, provenance and channels from the model's config,
    and diffusers' slicing / tiling switches. Subclasses set `deterministic` and `default_scaling_factor`.

    Args:
        vae: the loaded model.
        dtype, device: the precision encode/decode run in, and where.
        enable_slicing: encode/decode one image at a time (lower peak memory).
        enable_tiling: encode/decode large images in overlapping tiles (diffusers' tiled VAE; the
            result differs slightly from untiled encoding).
        source, revision, subfolder: recorded in the provenance (source defaults to the config's
            `_name_or_path`, else the class name).
    """

    deterministic: bool
    default_scaling_factor: float

    def __init__(
        self,
        vae: torch.nn.Module,
        *,
        dtype: str | torch.dtype = "fp32",
        device: torch.device | str = "cpu",
        enable_slicing: bool = False,
        enable_tiling: bool = False,
        source: str | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
    ) -> None:
        config = vae.config
        self.latent_channels = int(config.get("latent_channels"))
        super().__init__(
            vae,
            normalization=diffusers_normalization(config, self.default_scaling_factor),
            source=source or config.get("_name_or_path") or type(vae).__name__,
            deterministic=self.deterministic,
            image_channels=int(config.get("in_channels", 3)),
            config=dict(config),
            device=device,
            dtype=dtype,
            revision=revision,
            subfolder=subfolder,
        )
        if enable_slicing:
            vae.enable_slicing()
        if enable_tiling:
            vae.enable_tiling()

    def run_decoder(self, latents: torch.Tensor) -> torch.Tensor:
        return self.module.decode(latents).sample

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """(latent_channels, r / f, r / f) with f the subclass's `downsample_factor`, e.g. 4x32x32 at 256 px for SD's VAE."""
        return square_latent_shape(self.latent_channels, self.downsample_factor, resolution, self._source)


class DiffusersKLAdapter(DiffusersAdapter):
    """A diffusers `AutoencoderKL`.

    Args:
        vae: the loaded model (weights in float32 preferably; see `fingerprint` below).
        dtype: "fp32" | "fp16" | "bf16" (or a torch.dtype): the precision encode/decode run in.
        force_upcast: None follows `vae.config.force_upcast`. When it is set and `dtype` is fp16, the
            whole VAE (encoder and decoder) runs in **fp32**, as diffusers pipelines do, because VAEs
            such as SD-XL's overflow to NaN in fp16; `self.dtype` then reports float32 and
            `self.requested_dtype` float16. Pass False to really run in fp16 (fp16-fixed VAEs).
            bf16 has fp32's range, so it is never upcast.
        device, enable_slicing, enable_tiling, source, revision, subfolder: as in `DiffusersAdapter`.

    The provenance fingerprint is taken from the weights as passed, before the dtype cast, so
    `load_vae` (which loads float32) gives the same fingerprint for every `dtype`.
    """

    deterministic = False
    default_scaling_factor = DEFAULT_SCALING_FACTOR

    def __init__(
        self, vae: torch.nn.Module, *, dtype: str | torch.dtype = "fp32", force_upcast: bool | None = None, **options: Any
    ) -> None:
        self.requested_dtype = parse_dtype(dtype)
        upcast = vae.config.get("force_upcast", True) if force_upcast is None else force_upcast
        self.upcast = bool(upcast) and self.requested_dtype == torch.float16
        blocks = vae.config.get("block_out_channels")
        # diffusers pipelines use the same rule: one 2x downsampling between consecutive blocks.
        self.downsample_factor = 2 ** (len(blocks) - 1)
        super().__init__(vae, dtype=torch.float32 if self.upcast else self.requested_dtype, **options)

    def run_encoder(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.module.encode(images).latent_dist
        return dist.mean, dist.logvar

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["requested_dtype"] = str(self.requested_dtype).removeprefix("torch.")
        info["upcast"] = self.upcast
        return info
