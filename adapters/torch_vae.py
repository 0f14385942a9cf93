"""Any torch VAE behind the `VAEAdapter` interface: `wrap(...)` for callables, `TorchVAEAdapter` to subclass.

`TorchVAEAdapter` does the plumbing every adapter needs (no_grad, eval mode, device and dtype, turning
whatever the encoder returns into a float32 CPU `Posterior`); the diffusers adapters are subclasses.
A user's own VAE needs two small functions, e.g. for an MLP VAE on flat 8-dim latents:

    adapter = wrap(
        my_vae,
        encode=lambda m, x: m.encoder(x.flatten(1)).chunk(2, dim=1),   # -> (mean, logvar), each (N, 8)
        decode=lambda m, z: m.decoder(z).view(-1, 1, 8, 8),           # -> images in [-1, 1]
        latent_shape=(8,),
        source="digits-mlp-vae",
    )

or a subclass that overrides `run_encoder` / `run_decoder` (and `latent_shape` if a dry run is too slow):

    class MyAdapter(TorchVAEAdapter):
        def run_encoder(self, images):
            return self.module.encoder(images.flatten(1)).chunk(2, dim=1)

        def run_decoder(self, latents):
            return self.module.decoder(latents).view(-1, 1, 8, 8)

What `encode` / `run_encoder` may return (all in raw latent space, shape (N, *latent_shape)):
* a `(mean, logvar)` tuple (logvar may be None for a deterministic encoder);
* a `latent_prior.vae.Posterior`;
* a plain tensor: the latents of a deterministic encoder (needs `deterministic=True`);
* an object with `.mean` and `.logvar` (diffusers' `DiagonalGaussianDistribution`, also inside an
  `AutoencoderKLOutput`);
* an object with `.loc` and `.scale` (`torch.distributions.Normal`, also inside `Independent`):
  logvar = 2 log(scale).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from latent_prior.errors import LatentPriorError
from latent_prior.vae import (
    LatentNormalization,
    Posterior,
    VAEAdapter,
    VAEProvenance,
    fingerprint_module,
    hash_config,
    parse_dtype,
)

EncodeFn = Callable[[torch.nn.Module, torch.Tensor], Any]
DecodeFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
LatentShape = Sequence[int] | Callable[[int], Sequence[int]]

# Images outside this range are almost surely [0, 1] or [0, 255] data given by mistake; a small
# overshoot is allowed because resampling filters ring slightly past [-1, 1].
_PIXEL_LIMIT = 1.5


def as_posterior(output: Any) -> Posterior:
    """Turn whatever an encoder returned into a `Posterior` (see the module docstring for the forms)."""
    if isinstance(output, Posterior):
        return output
    if isinstance(output, torch.Tensor):
        return Posterior(mean=output, logvar=None)
    if isinstance(output, (tuple, list)):
        if len(output) != 2:
            raise LatentPriorError(f"the VAE's encode returned a sequence of {len(output)} items; return (mean, logvar).")
        return Posterior(mean=output[0], logvar=output[1])
    if hasattr(output, "latent_dist"):  # a diffusers AutoencoderKLOutput from a default module.encode
        output = output.latent_dist
    if isinstance(output, torch.distributions.Independent):
        output = output.base_dist
    if hasattr(output, "mean") and hasattr(output, "logvar"):
        return Posterior(mean=output.mean, logvar=output.logvar)
    if hasattr(output, "loc") and hasattr(output, "scale"):
        return Posterior(mean=output.loc, logvar=2.0 * torch.log(output.scale))
    raise LatentPriorError(
        f"the VAE's encode returned a {type(output).__name__}; return (mean, logvar), a Posterior, a tensor or a Normal."
    )


def _module_placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in module.parameters():
        return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


class TorchVAEAdapter(VAEAdapter):
    """A torch module behind the `VAEAdapter` interface; pass callables or subclass.

    Args:
        module: the VAE (any `torch.nn.Module`). It is put in eval mode, so BatchNorm statistics and
            dropout stay frozen while encoding.
        encode: `encode(module, images) -> one of the forms in the module docstring`; default
            `module.encode(images)`. Images arrive on the module's device and dtype, (N, C, H, W) in [-1, 1].
        decode: `decode(module, latents) -> images (N, C, H, W) in [-1, 1]`; default `module.decode(latents)`.
        latent_shape: a fixed tuple (e.g. `(8,)` for flat latents, returned for every resolution), a
            callable `resolution -> tuple`, or None to find it by encoding one blank image (cached).
        normalization: the latent normalization (default identity).
        source: a name recorded in the provenance (default: the module's class name).
        deterministic: True when the encoder has no variance (then a returned logvar is an error).
        image_channels: channels the encoder expects (3 for RGB, 1 for grey).
        config: a JSON-able description of the architecture for `config_hash`; default the class
            name plus every parameter's name and shape.
        device, dtype: where and in what precision to run (default: where the module already is).

    `provenance.fingerprint` hashes the weights before any dtype cast (so one checkpoint has one
    fingerprint at every dtype) and is computed once, on first use; wrap a module after training it.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        encode: EncodeFn | None = None,
        decode: DecodeFn | None = None,
        latent_shape: LatentShape | None = None,
        normalization: LatentNormalization | None = None,
        source: str | None = None,
        deterministic: bool = False,
        image_channels: int = 3,
        config: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise LatentPriorError(f"wrap() needs a torch.nn.Module, got a {type(module).__name__}.")
        self.module = module.eval()
        self._encode_fn = encode
        self._decode_fn = decode
        self._latent_shape_spec = latent_shape
        self._shape_cache: dict[int, tuple[int, ...]] = {}
        self._normalization = normalization or LatentNormalization()
        self.deterministic = bool(deterministic)
        self.image_channels = int(image_channels)

        if config is None:
            config = {
                "class": f"{type(module).__module__}.{type(module).__qualname__}",
                "parameters": {name: list(p.shape) for name, p in module.named_parameters()},
            }
        self._source = source or type(module).__name__
        self._provenance_fields = dict(
            source=self._source,
            class_name=type(module).__name__,
            config_hash=hash_config(config),
            revision=revision,
            subfolder=subfolder,
        )
        self._provenance: VAEProvenance | None = None

        current_device, current_dtype = _module_placement(module)
        self._device = torch.device(device) if device is not None else current_device
        self._dtype = parse_dtype(dtype) if dtype is not None else current_dtype
        if self._dtype != current_dtype:
            # Fingerprint before casting, so that one checkpoint has one fingerprint at every --dtype.
            # Otherwise wait until asked: hashing an 84M-parameter VAE takes seconds on a CPU.
            _ = self.provenance
        # torch.nn.Module.to, not the module's own `to`: diffusers' ModelMixin.to warns on every dtype cast.
        torch.nn.Module.to(self.module, device=self._device, dtype=self._dtype)

    # ---- hooks a subclass overrides -------------------------------------------------------------
    def run_encoder(self, images: torch.Tensor) -> Any:
        """images (N, C, H, W) in [-1, 1] on `self.device` / `self.dtype` -> any form `as_posterior` accepts."""
        if self._encode_fn is not None:
            return self._encode_fn(self.module, images)
        if hasattr(self.module, "encode"):
            return self.module.encode(images)
        raise LatentPriorError(f"{type(self.module).__name__} has no encode method; pass encode=... to wrap().")

    def run_decoder(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents (N, *latent_shape) on `self.device` / `self.dtype` -> images (N, C, H, W)."""
        if self._decode_fn is not None:
            return self._decode_fn(self.module, latents)
        if hasattr(self.module, "decode"):
            return self.module.decode(latents)
        raise LatentPriorError(f"{type(self.module).__name__} has no decode method; pass decode=... to wrap().")

    # ---- the VAEAdapter interface ---------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> Posterior:
        """images (N, C, H, W) in [-1, 1], any device/dtype -> Posterior (raw space, float32, CPU)."""
        self._check_images(images)
        with torch.no_grad():
            posterior = as_posterior(self.run_encoder(images.to(self._device, self._dtype)))
        if posterior.logvar is None and not self.deterministic:
            raise LatentPriorError(
                f"the encoder of {self._source} returned no log-variance; pass deterministic=True if it has none, or return (mean, logvar)."
            )
        if posterior.logvar is not None and self.deterministic:
            raise LatentPriorError(
                f"the encoder of {self._source} returned a log-variance although deterministic=True; "
                "return only the latents or set deterministic=False."
            )
        mean = posterior.mean.detach().to("cpu", torch.float32)
        logvar = None if posterior.logvar is None else posterior.logvar.detach().to("cpu", torch.float32)
        if logvar is not None and logvar.shape != mean.shape:
            raise LatentPriorError(
                f"the encoder of {self._source} returned mean {tuple(mean.shape)} and logvar "
                f"{tuple(logvar.shape)}; both must have the same shape."
            )
        return Posterior(mean=mean, logvar=logvar)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents (N, *latent_shape) -> images (N, C, H, W), float32 CPU, clamped to [-1, 1]."""
        with torch.no_grad():
            images = self.run_decoder(latents.to(self._device, self._dtype))
        if hasattr(images, "sample"):  # a diffusers DecoderOutput returned by a default module.decode
            images = images.sample
        return images.detach().to("cpu", torch.float32).clamp_(-1.0, 1.0)

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """Shape of one latent (no batch axis) for `resolution`-pixel square images."""
        spec = self._latent_shape_spec
        if spec is None:
            if resolution not in self._shape_cache:
                blank = torch.zeros(1, self.image_channels, resolution, resolution)
                self._shape_cache[resolution] = tuple(self.encode(blank).mean.shape[1:])
            return self._shape_cache[resolution]
        shape = spec(resolution) if callable(spec) else spec
        return tuple(int(s) for s in shape)

    @property
    def normalization(self) -> LatentNormalization:
        return self._normalization

    @property
    def provenance(self) -> VAEProvenance:
        if self._provenance is None:
            fields = self._provenance_fields
            fingerprint = fingerprint_module(self.module, fields["config_hash"])
            self._provenance = VAEProvenance(fingerprint=fingerprint, **fields)
        return self._provenance

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def to(self, device: torch.device | str) -> "TorchVAEAdapter":
        """Move the module to `device` (dtype unchanged); returns self."""
        self._device = torch.device(device)
        torch.nn.Module.to(self.module, device=self._device)
        return self

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.image_channels:
            raise LatentPriorError(f"{self._source} encodes images of shape (N, {self.image_channels}, H, W); got {tuple(images.shape)}.")
        if images.numel() and images.detach().abs().amax().item() > _PIXEL_LIMIT:
            raise LatentPriorError(
                f"images for {self._source} must be scaled to [-1, 1] (x / 127.5 - 1 for uint8); "
                f"got values up to {images.detach().abs().amax().item():.3g}."
            )


def wrap(module: torch.nn.Module, **options: Any) -> TorchVAEAdapter:
    """Adapt a user's own torch VAE: `TorchVAEAdapter(module, **options)`, whose docstring lists the keywords
    (encode, decode, latent_shape, normalization, source, deterministic, image_channels, device, dtype); the
    module docstring says what `encode(module, images)` may return."""
    return TorchVAEAdapter(module, **options)
