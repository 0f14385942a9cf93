"""diffusers `AutoencoderTiny` (TAESD and friends) behind the `VAEAdapter` interface.

Conventions, checked in diffusers' `EncoderTiny` / `DecoderTiny`:
* `encode(x)` takes images in **[-1, 1]** (the encoder maps them to TAESD's native [0, 1] itself)
  and returns `.latents`: deterministic, no distribution. We return `Posterior(mean=latents,
  logvar=None)` and never invent a variance.
* `decode(z)` returns images in [-1, 1] (the decoder maps its [0, 1] output back); we clamp.
* TAESD is distilled to emit latents already on the scale a diffusion model sees, hence its config's
  `scaling_factor` of 1.0 and `shift_factor` of 0; we take both from the config.
* Each encoder stage after the first halves the resolution (a stride-2 conv), so TAESD's four stages
  give 8x. diffusers' own `spatial_scale_factor` attribute is `2 ** out_channels`, which equals 8 only
  by coincidence, so we measure the factor with one dry run on a blank image instead.
"""

from __future__ import annotations

import torch

from latent_prior.errors import LatentPriorError

from .diffusers_kl import DiffusersAdapter

# `AutoencoderTiny.__init__`'s default scaling factor.
DEFAULT_TINY_SCALING_FACTOR = 1.0


class DiffusersTinyAdapter(DiffusersAdapter):
    """A diffusers `AutoencoderTiny`; deterministic (`Posterior.logvar` is None).

    Args are `DiffusersAdapter`'s (dtype, device, enable_slicing, enable_tiling, source, revision, subfolder).
    AutoencoderTiny's config always has `force_upcast=False`, so fp16 runs in fp16. `latent_shape` is
    (latent_channels, r / f, r / f); f = 8 for TAESD.
    """

    deterministic = True
    default_scaling_factor = DEFAULT_TINY_SCALING_FACTOR
    _factor: int | None = None  # downsample_factor, once measured

    def run_encoder(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.encode(images).latents

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side, measured once by encoding a blank 64 x 64 image."""
        if self._factor is None:
            probe = 64
            with torch.no_grad():
                blank = torch.zeros(1, self.image_channels, probe, probe, device=self.device, dtype=self.dtype)
                # The bare encoder, so that tiling / slicing cannot affect the measurement.
                side = self.module.encoder(blank).shape[-1]
            if side < 1 or probe % side:
                raise LatentPriorError(
                    f"{self._source} maps 64 px to {side} latents per side, not an integer downsampling; "
                    "wrap it with latent_prior.adapters.wrap and give latent_shape explicitly."
                )
            self._factor = probe // side
        return self._factor
