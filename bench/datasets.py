"""Latent sets for the prior benchmark: synthetic latents with a known density, and real VAE latents.

Every set is a `LatentSet`: posterior moments (mean, logvar) of a *training* and a *held-out* split,
the VAE's `LatentNormalization`, and optionally the true aggregate-posterior density (synthetic sets)
and a decoder into 8×8 digit images (digits VAEs), which the classifier judges.

Synthetic sets. Each item i has a posterior N(μ_i, σ²I) with μ_i drawn from a Gaussian mixture and a
small fixed σ, so training goes through fresh reparameterised draws exactly as for a real VAE. The
aggregate posterior ∫ N(z; μ, σ²I) p(μ) dμ is then again a Gaussian mixture (σ² added to every
covariance), so its log-density is exact (`MixtureDensity.log_prob`):

* `mixture`: 8 well-separated modes in 8-D (centres on the axes of a random rotation, 3.5 apart,
  component std 0.35, i.e. 10 std between modes).
* `ring`: a 2-D ring of radius 1.5 and radial std ≈ 0.11, a mixture of 128 isotropic components so
  close together that the density is smooth along the ring.
* `spatial`: 4×8×8 latents, a mixture of 8 modes in a 4-D subspace mapped linearly onto smooth
  spatial patterns (cosines in H×W, mixed across channels), plus isotropic noise of std 0.25.

All three are laid out so that normalized latents have roughly unit scale, as a VAE's do.

Real sets (built by `load_set`, each cached under `cache_dir` where that saves time):
* `digits-b1`, `digits-b0.1`: `bench.digits` flat VAEs (d = 8, β = 1 and 0.1), 1500 / 297 split.
* `default-vae`: the embedded diffusers AutoencoderKL (4×8×8 latents at 32 px) on the bundled digits,
  encoded with `latent_prior.encode` into a temporary cache; the held-out items are the same 297
  digits as above (matched by file name), so all digits sets share one split.
* `photos`: a small diffusers AutoencoderKL (4×8×8 latents at 32 px) trained by
  `scripts/train_photo_vae.py` on `bench.photos` crops of the ten scikit-image / scikit-learn photos
  (3000 train / 500 held-out crops, held out by image region; --quick: 600 / 200 crops, 2 epochs);
  trained once into `cache_dir`, then reloaded. No decoder hook (the classifier judges digits only).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from latent_prior.errors import LatentPriorError
from latent_prior.vae import LatentNormalization

SYNTHETIC_SETS = ("mixture", "ring", "spatial")
DIGITS_SETS = {"digits-b1": 1.0, "digits-b0.1": 0.1}
REAL_SETS = (*DIGITS_SETS, "default-vae", "photos")
ALL_SETS = (*SYNTHETIC_SETS, *REAL_SETS)


# ---------------------------------------------------------------------------------------------------
# a latent set


@dataclass
class LatentSet:
    """Posterior moments of one VAE (or synthetic source), split into training and held-out items.

    train_mean, train_logvar:     (N_train, *latent_shape) raw latents, float32
    heldout_mean, heldout_logvar: (N_heldout, *latent_shape)
    normalization: maps raw -> normalized latents (where priors are fitted and metrics computed).
    true_log_prob: normalized z (N, *latent_shape) -> (N,) nats of the true aggregate posterior, or None.
    decode: raw z (N, *latent_shape) -> images (N, 64) in [0, 1] for the digit classifier, or None.
    """

    name: str
    description: str
    train_mean: torch.Tensor
    train_logvar: torch.Tensor
    heldout_mean: torch.Tensor
    heldout_logvar: torch.Tensor
    normalization: LatentNormalization = field(default_factory=LatentNormalization)
    true_log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.train_mean.shape[1:])

    @property
    def dims(self) -> int:
        return math.prod(self.latent_shape)

    def draws(self, split: str, n: int, generator: torch.Generator) -> torch.Tensor:
        """n fresh posterior draws z = μ + σ·ε in NORMALIZED space, cycling through the split's items
        in a random order (so every item is used ⌊n/N⌋ or ⌈n/N⌉ times). Returns (n, *latent_shape)."""
        mean, logvar = (self.train_mean, self.train_logvar) if split == "train" else (self.heldout_mean, self.heldout_logvar)
        reps = -(-n // len(mean))
        order = torch.cat([torch.randperm(len(mean), generator=generator) for _ in range(reps)])[:n]
        return self.draws_of(mean[order], logvar[order], generator)

    def draws_per_item(self, split: str, per_item: int, generator: torch.Generator) -> torch.Tensor:
        """`per_item` draws of every item, grouped by draw: rows [r·N, (r+1)·N) are draw r of items
        0..N-1. Normalized space, (per_item·N, *latent_shape)."""
        mean, logvar = (self.train_mean, self.train_logvar) if split == "train" else (self.heldout_mean, self.heldout_logvar)
        return torch.cat([self.draws_of(mean, logvar, generator) for _ in range(per_item)])

    def draws_of(self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        norm = self.normalization
        mu = norm.normalize(mean)
        std = torch.exp(0.5 * norm.normalize_logvar(logvar))
        return mu + std * torch.randn(mu.shape, generator=generator, dtype=mu.dtype)

    def save_train(self, path: str | Path) -> Path:
        """Write the training moments as one .safetensors file that `latent_prior.cache.open_latents`
        (and so `latent_prior.train.fit`) reads, with the normalization in its metadata."""
        import json

        from safetensors.torch import save_file

        path = Path(path)
        save_file({"mean": self.train_mean.contiguous().float(), "logvar": self.train_logvar.contiguous().float()}, str(path),
                  metadata={"normalization": json.dumps(self.normalization.to_dict())})
        return path


# ---------------------------------------------------------------------------------------------------
# an exact Gaussian-mixture density


class MixtureDensity:
    """A Gaussian mixture in D dims with exact sampling and log-density (float64 internally).

    weights (K,), means (K, D), covariances (K, D, D).
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor) -> None:
        self.weights = weights.double() / weights.double().sum()
        self.means = means.double()
        self.covariances = covariances.double()
        self.chol = torch.linalg.cholesky(self.covariances)

    @property
    def dims(self) -> int:
        return self.means.shape[1]

    def convolved(self, variance: float) -> "MixtureDensity":
        """The density of x + √variance·ε, ε ~ N(0, I): variance added to every covariance."""
        eye = torch.eye(self.dims, dtype=torch.float64)
        return MixtureDensity(self.weights, self.means, self.covariances + variance * eye)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, D) float64 draws."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dims, generator=generator, dtype=torch.float64)
        return self.means[comp] + torch.einsum("nij,nj->ni", self.chol[comp], eps)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, *shape) with prod(shape) = D -> (N,) log-density in nats (float64)."""
        x = x.reshape(len(x), -1).double()
        if x.shape[1] != self.dims:
            raise LatentPriorError(f"MixtureDensity.log_prob: got {x.shape[1]} dims per row, the density has {self.dims}.")
        log_det = 2.0 * torch.log(torch.diagonal(self.chol, dim1=-2, dim2=-1)).sum(-1)
        parts = []
        for k in range(len(self.weights)):
            white = torch.linalg.solve_triangular(self.chol[k], (x - self.means[k]).T, upper=False)
            parts.append(torch.log(self.weights[k]) - 0.5 * (white.pow(2).sum(0) + log_det[k] + self.dims * math.log(2 * math.pi)))
        return torch.logsumexp(torch.stack(parts, 1), dim=1)


def _random_rotation(d: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # uniform (Haar) rotation


def _mixture_means_density(seed: int) -> MixtureDensity:
    """8 modes in 8-D: centres 2.5·(rotated axes) minus their mean, isotropic std 0.35."""
    g = torch.Generator().manual_seed(seed)
    centres = 2.5 * _random_rotation(8, g)  # rows are orthogonal: every pair is 2.5·√2 ≈ 3.5 apart
    centres = centres - centres.mean(0)
    covs = torch.eye(8, dtype=torch.float64).expand(8, 8, 8) * 0.35**2
    return MixtureDensity(torch.ones(8), centres, covs.clone())


def _ring_means_density(seed: int, components: int = 128, radius: float = 1.5, width: float = 0.1) -> MixtureDensity:
    """A 2-D ring as many isotropic components on a circle: spacing 2πr/128 ≈ 0.074 < width, so smooth."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand((), generator=g, dtype=torch.float64) * 2 * math.pi
    angles = phase + torch.arange(components, dtype=torch.float64) * (2 * math.pi / components)
    centres = radius * torch.stack([angles.cos(), angles.sin()], 1)
    covs = torch.eye(2, dtype=torch.float64).expand(components, 2, 2) * width**2
    return MixtureDensity(torch.ones(components), centres, covs.clone())


SPATIAL_SHAPE = (4, 8, 8)


def _spatial_means_density(seed: int, subspace: int = 4, modes: int = 8, noise_std: float = 0.25) -> MixtureDensity:
    """u ~ 8-mode mixture in 4-D, μ = A·u + noise_std·η, with A's columns smooth 4×8×8 patterns.

    Column j of A is a cosine wave over H×W (its own frequency and phase) weighted per channel by a
    random vector, so the structure is spatially correlated like real VAE latents. A is scaled so the
    structured part has about 0.85 variance per latent element; with the noise that is ≈ 0.9.
    """
    g = torch.Generator().manual_seed(seed)
    c, h, w = SPATIAL_SHAPE
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    columns = []
    for _ in range(subspace):
        fy, fx = torch.randint(0, 3, (2,), generator=g).tolist()
        phase = torch.rand((), generator=g, dtype=torch.float64) * 2 * math.pi
        wave = torch.cos(2 * math.pi * (fy * yy / h + fx * xx / w) + phase)
        mix = torch.randn(c, generator=g, dtype=torch.float64)
        columns.append((mix[:, None, None] * wave).reshape(-1))
    a = torch.stack(columns, 1)  # (D, subspace)
    centres_u = 1.5 * torch.randn(modes, subspace, generator=g, dtype=torch.float64)
    centres_u = centres_u - centres_u.mean(0)
    cov_u = torch.eye(subspace, dtype=torch.float64) * 0.3**2
    # Scale A so the structured part has mean per-element variance 0.85.
    second_moment = (centres_u.T @ centres_u) / modes + cov_u
    per_element = torch.einsum("di,ij,dj->d", a, second_moment, a).mean()
    a = a * math.sqrt(0.85 / per_element.item())
    d = a.shape[0]
    means = centres_u @ a.T
    covs = torch.stack([a @ cov_u @ a.T + noise_std**2 * torch.eye(d, dtype=torch.float64) for _ in range(modes)])
    return MixtureDensity(torch.ones(modes), means, covs)


_SYNTHETIC = {
    "mixture": (_mixture_means_density, (8,), 0.05, "8-D mixture of 8 well-separated Gaussians (modes 3.5 apart, std 0.35)"),
    "ring": (_ring_means_density, (2,), 0.05, "2-D ring, radius 1.5, radial std ≈ 0.11"),
    "spatial": (_spatial_means_density, SPATIAL_SHAPE, 0.1, "4×8×8: an 8-mode mixture in a 4-D subspace on smooth spatial patterns, + noise 0.25"),
}


def make_synthetic(name: str, n_train: int = 3000, n_heldout: int = 1000, seed: int = 0) -> LatentSet:
    """A synthetic `LatentSet` with exact aggregate-posterior density; identity normalization.

    The means come from the set's mixture, the posterior std σ is fixed per set (0.05 or 0.1), so the
    aggregate posterior is that mixture convolved with N(0, σ²I).
    """
    if name not in _SYNTHETIC:
        raise LatentPriorError(f"synthetic set {name!r}: choose one of {', '.join(_SYNTHETIC)}.")
    build, shape, sigma, description = _SYNTHETIC[name]
    density = build(seed)
    g = torch.Generator().manual_seed(seed + 1)
    means = density.sample(n_train + n_heldout, g).float().reshape(-1, *shape)
    logvar = torch.full_like(means, 2 * math.log(sigma))
    aggregate = density.convolved(sigma**2)
    return LatentSet(
        name=name,
        description=f"{description}; posterior std {sigma:g}; {n_train} train / {n_heldout} held-out items",
        train_mean=means[:n_train], train_logvar=logvar[:n_train],
        heldout_mean=means[n_train:], heldout_logvar=logvar[n_train:],
        true_log_prob=aggregate.log_prob,
        info={"posterior_std": sigma, "components": len(aggregate.weights)},
    )


# ---------------------------------------------------------------------------------------------------
# real VAE latents


def digits_vae_dir(cache_dir: Path, beta: float, epochs: int) -> Path:
    return Path(cache_dir) / f"digits_vae_beta{beta:g}_epochs{epochs}"


def load_digits_set(name: str, cache_dir: str | Path, epochs: int = 300, verbose: bool = True) -> LatentSet:
    """A flat digits VAE (bench.digits; d = 8) and its 1500 / 297 latents; trained once, then reloaded
    from `cache_dir`. `decode` gives the Bernoulli means (N, 64) in [0, 1]."""
    from bench import digits

    beta = DIGITS_SETS[name]
    directory = digits_vae_dir(Path(cache_dir), beta, epochs)
    if (directory / "heldout_latents.safetensors").is_file():
        model, split, latents = digits.load_digits_vae(directory)
    else:
        if verbose:
            print(f"[{name}] training the digits VAE (beta={beta:g}, {epochs} epochs) into {directory} ...", flush=True)
        model, split = digits.train_digits_vae(beta, latent_dim=8, seed=0, epochs=epochs)
        digits.save_digits_vae(model, split, directory)
        model, split, latents = digits.load_digits_vae(directory)

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        return model.decode(z.float())

    return LatentSet(
        name=name,
        description=f"bench.digits flat VAE, d=8, beta={beta:g} ({epochs} epochs); 1500 train / 297 held-out digits",
        train_mean=latents["train"]["mean"], train_logvar=latents["train"]["logvar"],
        heldout_mean=latents["heldout"]["mean"], heldout_logvar=latents["heldout"]["logvar"],
        decode=decode,
        info={"vae_dir": str(directory), "vae_metrics": getattr(model, "metrics", None)},
    )


_INDEX = re.compile(r"(\d+)\.png$")


def load_default_vae_set(verbose: bool = True) -> LatentSet:
    """Encode the bundled digits with the embedded default VAE (via `latent_prior.encode`, into a
    temporary cache) and split them like `bench.digits`: a file `<label>/<index>.png` is held out
    when `index` is one of the 297 held-out rows of `load_digits()`.

    `decode` maps raw latents to 32-px RGB in [-1, 1], then to the classifier's 8×8 grey in [0, 1]
    (channel mean, 4×4 average pooling): the inverse of how the PNGs were upscaled, up to blur.
    """
    from bench.digits import load_digits_split
    from latent_prior import defaults
    from latent_prior.adapters import load_vae
    from latent_prior.cache import open_latents
    from latent_prior.encode import EncodeConfig, encode_images

    vae_dir, _ = defaults.require_embedded_default()
    adapter = load_vae(str(vae_dir))
    with tempfile.TemporaryDirectory(prefix="bench-prior-cache-") as tmp:
        out = Path(tmp) / "cache"
        if verbose:
            print(f"[default-vae] encoding the bundled digits with {vae_dir} ...", flush=True)
        encode_images(adapter, EncodeConfig(out=str(out), quiet=True, num_workers=0, batch_size=64))
        source = open_latents(out)
        paths = source.sources()
        if paths is None:
            raise LatentPriorError(f"{out}: the cache records no source file names, so the digits split cannot be matched.")
        mean, logvar = source.read(range(len(source)))
        normalization = source.normalization
    if logvar is None:
        raise LatentPriorError(f"{vae_dir}: the default VAE gave no logvar; the benchmark needs posterior moments.")
    heldout_rows = set(load_digits_split().heldout_index.tolist())
    indices = []
    for p in paths:
        match = _INDEX.search(p)
        if match is None:
            raise LatentPriorError(f"bundled digit {p!r} is not named <label>/<index>.png; regenerate the assets.")
        indices.append(int(match.group(1)))
    held = torch.tensor([i in heldout_rows for i in indices])
    if int(held.sum()) != len(heldout_rows):
        raise LatentPriorError(
            f"only {int(held.sum())} of the {len(heldout_rows)} held-out digits were found in {defaults.DEFAULT_DATA_DIR}; "
            "regenerate the bundled digits with scripts/train_default_vae.py."
        )

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        images = torch.cat([adapter.decode(chunk.float()) for chunk in z.split(512)])  # (N, 3, 32, 32) in [-1, 1]
        grey = images.mean(1, keepdim=True)
        small = torch.nn.functional.avg_pool2d(grey, kernel_size=grey.shape[-1] // 8)
        return ((small + 1.0) / 2.0).clamp(0.0, 1.0).reshape(len(z), 64)

    return LatentSet(
        name="default-vae",
        description=(f"embedded default AutoencoderKL, latents {tuple(mean.shape[1:])} at {defaults.DEFAULT_RESOLUTION} px, "
                     f"bundled digits; {int((~held).sum())} train / {int(held.sum())} held-out"),
        train_mean=mean[~held], train_logvar=logvar[~held],
        heldout_mean=mean[held], heldout_logvar=logvar[held],
        normalization=normalization,
        decode=decode,
        info={"vae_dir": str(vae_dir), "normalization": normalization.to_dict()},
    )


#: scripts/train_photo_vae.py settings of the "photos" set (the rest are the script's defaults); seed 0
#: always, like the digits VAEs, so every benchmark seed sees the same VAE and crops.
PHOTOS_SETTINGS = {False: dict(epochs=8, num_train=3000, num_heldout=500), True: dict(epochs=2, num_train=600, num_heldout=200)}


def photo_vae_dir(cache_dir: str | Path, quick: bool = False) -> Path:
    s = PHOTOS_SETTINGS[quick]
    return Path(cache_dir) / f"photo_vae_n{s['num_train']}_h{s['num_heldout']}_e{s['epochs']}"


def _cached_photo_vae(directory: Path, wanted: dict[str, Any], architecture: dict[str, Any]) -> dict[str, Any] | None:
    """The training summary of a complete folder trained with the `wanted` config, else None."""
    try:
        summary = json.loads((directory / "training_summary.json").read_text())
    except (OSError, ValueError):
        return None
    same = all(summary.get("train_config", {}).get(k) == v for k, v in wanted.items() if k not in ("output_dir", "quiet", "threads"))
    return summary if same and summary.get("architecture") == json.loads(json.dumps(architecture)) else None


def load_photos_set(cache_dir: str | Path, quick: bool = False, verbose: bool = True) -> LatentSet:
    """The photo-patch AutoencoderKL and the posterior moments of its train / held-out crops.

    The VAE is trained on demand by `scripts/train_photo_vae.py` (`train_photo_vae`) into
    `photo_vae_dir(cache_dir, quick)` and reused while its recorded config matches; the crops are
    rebuilt (deterministically) and encoded by `latent_prior.adapters.load_vae(folder)`, so the set
    carries the adapter's normalization (the fitted `scaling_factor`). Moments are raw, float32,
    (N, 4, 8, 8).
    """
    from bench.photos import import_repo_script, make_patches
    from latent_prior.adapters import load_vae
    from latent_prior.config import to_dict

    script = import_repo_script("train_photo_vae")
    directory = photo_vae_dir(cache_dir, quick)
    cfg = script.TrainPhotoVAEConfig(output_dir=str(directory), quiet=not verbose, **PHOTOS_SETTINGS[quick])
    summary = _cached_photo_vae(directory, to_dict(cfg), script.photo_vae_architecture(cfg.crop_size))
    if summary is None:
        if verbose:
            print(f"[photos] training the photo AutoencoderKL ({cfg.epochs} epochs on {cfg.num_train} crops) into {directory} ...",
                  flush=True)
        summary = script.train_photo_vae(cfg)
    adapter = load_vae(str(directory))
    patches = make_patches(**summary["patches"])
    with torch.no_grad():
        moments = {}
        for split, images in (("train", patches.train), ("heldout", patches.heldout)):
            parts = [adapter.encode(chunk) for chunk in images.split(250)]
            moments[split] = (torch.cat([p.mean for p in parts]), torch.cat([p.logvar for p in parts]))
    normalization = adapter.normalization
    n_train, n_held = len(patches.train), len(patches.heldout)
    return LatentSet(
        name="photos",
        description=(f"small AutoencoderKL (scripts/train_photo_vae.py, {summary['epochs']} epochs, held-out recon MSE "
                     f"{summary['heldout_recon_mse']:.4f} vs {summary['heldout_mean_image_mse']:.4f} for the mean crop), "
                     f"latents {tuple(moments['train'][0].shape[1:])} at {cfg.crop_size} px; crops of {len(patches.photos)} "
                     f"scikit-image / scikit-learn photos, {n_train} train / {n_held} held-out (by image region)"),
        train_mean=moments["train"][0], train_logvar=moments["train"][1],
        heldout_mean=moments["heldout"][0], heldout_logvar=moments["heldout"][1],
        normalization=normalization,
        info={"vae_dir": str(directory), "normalization": normalization.to_dict(), "patches": summary["patches"],
              "vae_train_seconds": summary["train_seconds"], "vae_epochs": summary["epochs"],
              "heldout_recon_mse": summary["heldout_recon_mse"], "heldout_mean_image_mse": summary["heldout_mean_image_mse"]},
    )


def load_set(name: str, *, cache_dir: str | Path, quick: bool = False, seed: int = 0, vae_epochs: int | None = None,
             verbose: bool = True) -> LatentSet:
    """Build the latent set `name` (one of ALL_SETS). quick: smaller synthetic sets and VAE training.
    `vae_epochs` applies to the flat digits VAEs only (the photo VAE's epochs are PHOTOS_SETTINGS)."""
    if name in SYNTHETIC_SETS:
        n_train, n_heldout = (800, 300) if quick else (3000, 1000)
        return make_synthetic(name, n_train, n_heldout, seed)
    if name in DIGITS_SETS:
        return load_digits_set(name, cache_dir, epochs=vae_epochs or (40 if quick else 300), verbose=verbose)
    if name == "default-vae":
        return load_default_vae_set(verbose=verbose)
    if name == "photos":
        return load_photos_set(cache_dir, quick=quick, verbose=verbose)
    raise LatentPriorError(f"--sets: unknown latent set {name!r}; choose from {', '.join(ALL_SETS)}.")
