"""The VAE interface the core relies on.

Every VAE family in `latent_prior.adapters` implements `VAEAdapter`. The core (cache, trainer, prior)
only ever talks to this interface, so it never imports an adapter.

Three spaces appear throughout the package:

* **pixel space**: images, float tensors (N, 3, H, W) in [-1, 1];
* **raw latent space**: what the VAE's encoder emits and its decoder accepts, e.g. (N, 4, 32, 32)
  for `stabilityai/sd-vae-ft-mse` at 256 px. Caches store posterior moments here;
* **normalized latent space**: raw latents after the VAE's own latent normalization
  (`LatentNormalization`), the space a diffusion model would see and the space the prior is fitted in.
  `LatentPrior.sample` maps back to raw space before returning.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class LatentNormalization:
    """Maps raw latents to the normalized space and back, following diffusers' conventions.

    normalized = (raw - shift_factor - latents_mean[c]) * scaling_factor / latents_std[c]

    `latents_mean` / `latents_std` are per-channel (length C) and optional; when absent they act as
    0 and 1. SD 1.x: scaling 0.18215, no shift. SD3: scaling 1.5305, shift 0.0609.
    """

    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @staticmethod
    def _per_channel(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        # Channel axis is dim 1 for (N, C, H, W) and for flat (N, C) latents alike.
        view = [1, len(values)] + [1] * (like.dim() - 2)
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(view)

    def _mean(self, like: torch.Tensor) -> torch.Tensor | float:
        return 0.0 if self.latents_mean is None else self._per_channel(self.latents_mean, like)

    def _std(self, like: torch.Tensor) -> torch.Tensor | float:
        return 1.0 if self.latents_std is None else self._per_channel(self.latents_std, like)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents (N, C, ...) -> normalized latents, same shape."""
        return (raw - self.shift_factor - self._mean(raw)) * self.scaling_factor / self._std(raw)

    def denormalize(self, normalized: torch.Tensor) -> torch.Tensor:
        """Normalized latents (N, C, ...) -> raw latents ready for `decode`, same shape."""
        return normalized * self._std(normalized) / self.scaling_factor + self.shift_factor + self._mean(normalized)

    def normalize_logvar(self, raw_logvar: torch.Tensor) -> torch.Tensor:
        """Posterior log-variance in raw space -> log-variance in normalized space (an affine map
        multiplies the variance by (scaling / std)^2)."""
        log_scale = torch.as_tensor(math.log(abs(self.scaling_factor)), dtype=raw_logvar.dtype, device=raw_logvar.device)
        std = self._std(raw_logvar)
        log_std = torch.log(std) if isinstance(std, torch.Tensor) else 0.0
        return raw_logvar + 2.0 * (log_scale - log_std)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatentNormalization":
        def as_tuple(v: Sequence[float] | None) -> tuple[float, ...] | None:
            return None if v is None else tuple(float(x) for x in v)

        return cls(
            scaling_factor=float(data.get("scaling_factor", 1.0)),
            shift_factor=float(data.get("shift_factor", 0.0) or 0.0),
            latents_mean=as_tuple(data.get("latents_mean")),
            latents_std=as_tuple(data.get("latents_std")),
        )

    @classmethod
    def from_recorded(cls, data: Any, where: str, channels: int | None = None) -> "LatentNormalization":
        """A normalization recorded in a file (cache manifest, prior config, file metadata), checked: finite
        numbers, a non-zero scaling, positive per-channel stds, one entry per latent channel when `channels`
        is given. None or {} is the identity. Raises LatentPriorError naming `where`."""
        from latent_prior.errors import LatentPriorError

        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise LatentPriorError(
                f"{where}: `normalization` is {data!r}, not an object of scaling_factor, shift_factor, "
                "latents_mean and latents_std; restore the file from the run that wrote it."
            )
        known = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise LatentPriorError(
                f"{where}: `normalization` has unknown key(s) {', '.join(unknown)}; it may hold only {', '.join(known)}."
            )

        def finite(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def bad(key: str, what: str) -> LatentPriorError:
            return LatentPriorError(
                f"{where}: `normalization.{key}` is {data[key]!r}, but it must be {what}; restore the file from the run that wrote it."
            )

        scaling = data.get("scaling_factor", 1.0)
        if not finite(scaling) or scaling == 0:
            raise bad("scaling_factor", "a finite non-zero number")
        shift = data.get("shift_factor", 0.0)
        if shift is not None and not finite(shift):
            raise bad("shift_factor", "a finite number or null")
        for key in ("latents_mean", "latents_std"):
            values = data.get(key)
            if values is None:
                continue
            if not isinstance(values, list) or not values or not all(finite(x) for x in values):
                raise bad(key, "null or a list of finite numbers, one per latent channel")
            if key == "latents_std" and any(x <= 0 for x in values):
                raise bad(key, "a list of positive numbers")
            if channels is not None and len(values) != channels:
                raise bad(key, f"a list of {channels} numbers (one per latent channel)")
        return cls.from_dict(data)

    def matches(self, other: "LatentNormalization", rtol: float = 1e-6) -> bool:
        """True when both map latents identically (up to float noise)."""
        a, b = self.to_dict(), other.to_dict()
        for key in a:
            x, y = a[key], b[key]
            if (x is None) != (y is None):
                return False
            if x is None:
                continue
            xs, ys = (list(x), list(y)) if isinstance(x, tuple) else ([x], [y])
            if len(xs) != len(ys) or any(not math.isclose(p, q, rel_tol=rtol, abs_tol=1e-9) for p, q in zip(xs, ys)):
                return False
        return True


@dataclass(frozen=True)
class VAEProvenance:
    """Where a VAE came from, recorded in caches and priors so that mismatches are caught.

    `fingerprint` identifies the weights (a hash over the config and per-tensor statistics), so two
    checkpoints that share a config but not their weights still differ.
    """

    source: str
    class_name: str
    config_hash: str
    fingerprint: str
    revision: str | None = None
    subfolder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VAEProvenance":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def hash_config(config: dict[str, Any]) -> str:
    """A stable short sha256 of a JSON-able config (keys sorted, private `_` keys dropped)."""
    public = {k: v for k, v in config.items() if not str(k).startswith("_")}
    blob = json.dumps(public, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint_module(module: torch.nn.Module, config_hash: str = "") -> str:
    """A short hash of a module's weights: per-tensor name, shape and float64 sum / abs-sum.

    Cheap (one pass over the weights, no copy to bytes) and stable across devices and dtypes up to
    the rounding of those sums, which is far below what distinguishes two trained checkpoints.
    """
    h = hashlib.sha256(config_hash.encode())
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach()
            if not t.is_floating_point():
                t = t.to(torch.float32)
            # Reductions accumulate in float64 without materialising a float64 copy of the weights.
            total, l1 = t.sum(dtype=torch.float64).item(), t.norm(1, dtype=torch.float64).item()
            h.update(f"{name}:{tuple(t.shape)}:{total:.6e}:{l1:.6e}".encode())
    return h.hexdigest()[:16]


def posterior_draw(
    mean: torch.Tensor,
    logvar: torch.Tensor | None,
    generator: torch.Generator | None = None,
    *,
    normalization: LatentNormalization | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One reparameterised draw z = μ + exp(logvar / 2)·ε, ε ~ N(0, I), shape of `mean`; the means themselves
    when logvar is None (a deterministic encoder). normalization: raw moments in, a draw in normalized space
    out; device: where the moments go first (and ε is drawn, with `generator`)."""
    if device is not None:
        mean, logvar = mean.to(device), None if logvar is None else logvar.to(device)
    if normalization is not None:
        mean, logvar = normalization.normalize(mean), None if logvar is None else normalization.normalize_logvar(logvar)
    if logvar is None:
        return mean
    return mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


def posterior_moments(
    mean: torch.Tensor, logvar: torch.Tensor | None, *, normalization: LatentNormalization | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(μ, σ²) of the posteriors, shape of `mean` (σ² None for a deterministic encoder); normalization: raw moments
    in, normalized ones out, as `posterior_draw`'s."""
    if normalization is not None:
        mean, logvar = normalization.normalize(mean), None if logvar is None else normalization.normalize_logvar(logvar)
    return mean, None if logvar is None else torch.exp(logvar)


@dataclass
class Posterior:
    """Posterior moments from an encoder, in raw latent space.

    mean:   (N, *latent_shape) float32
    logvar: (N, *latent_shape) float32, or None for a deterministic encoder (e.g. TAESD); we never
            invent a variance for those.
    """

    mean: torch.Tensor
    logvar: torch.Tensor | None = None

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One reparameterised draw z = mean + exp(logvar / 2) * eps, shape of `mean` (`posterior_draw`)."""
        return posterior_draw(self.mean, self.logvar, generator)


class VAEAdapter(abc.ABC):
    """What every VAE family provides to the core.

    Subclasses wrap a torch module; `encode` and `decode` run under `torch.no_grad()` and take care
    of device and dtype themselves (inputs may come in float32 on the CPU).
    """

    #: True when the encoder has no posterior variance (Posterior.logvar is always None).
    deterministic: bool = False
    #: Number of image channels the encoder expects (3 for RGB VAEs).
    image_channels: int = 3

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> Posterior:
        """images (N, image_channels, H, W) in [-1, 1] -> Posterior in raw latent space, float32, CPU."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents (N, *latent_shape) -> images (N, image_channels, H, W) in [-1, 1], float32, CPU."""

    @abc.abstractmethod
    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """Shape of one latent (without the batch axis) for square images of `resolution` pixels."""

    @property
    @abc.abstractmethod
    def normalization(self) -> LatentNormalization:
        """The VAE's latent normalization (raw <-> normalized space)."""

    @property
    @abc.abstractmethod
    def provenance(self) -> VAEProvenance:
        """Where this VAE came from; used to refuse mismatched caches and priors."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def to(self, device: torch.device | str) -> "VAEAdapter":
        """Move the wrapped module; returns self."""
        return self

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary: provenance, normalization, determinism, dtype."""
        return {
            "provenance": self.provenance.to_dict(),
            "normalization": self.normalization.to_dict(),
            "deterministic": self.deterministic,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' | 'float32' | 'fp16' | 'float16' | 'bf16' | 'bfloat16' (or a torch.dtype) -> torch.dtype."""
    from latent_prior.errors import LatentPriorError

    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise LatentPriorError(f"--dtype {name!r} is not supported; use one of fp32, fp16, bf16.") from None
