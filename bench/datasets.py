"""Latent sets for the prior benchmarks: synthetic latents with a known density, and real VAE latents.

Every set is a `LatentSet`: posterior moments (mean, logvar) of a *training* and a *held-out* split,
the VAE's `LatentNormalization`, and optionally the true aggregate-posterior density and mode structure
(synthetic sets) and a decoder into 8×8 digit images (digits VAEs), which the classifier judges. Every
set is built by code in this repository from data that ships offline (scikit-learn's digits, the photos
inside scikit-image and scikit-learn, random numbers); trained VAEs are cached under `cache_dir`.

Synthetic sets (`SYNTHETIC`). Each item i has a posterior N(μ_i, σ²I) with μ_i drawn from a Gaussian
mixture and a small fixed σ, so training goes through fresh reparameterised draws exactly as for a real
VAE. The aggregate posterior ∫ N(z; μ, σ²I) p(μ) dμ is then again a Gaussian mixture (σ² added to every
covariance), so its log-density is exact (`MixtureDensity.log_prob`, the set's `true_log_prob`), and so
is its mode structure: `true_mode_of(z)` gives each latent's most responsible mode, `true_mode_weights`
the modes' masses (a heavy-tailed mode is several nested components; a curve's "modes" are its arcs).

* `mixture`: 8 well-separated modes in 8-D (centres on the axes of a random rotation, 3.5 apart,
  component std 0.35, i.e. 10 std between modes).
* `ring`: a 2-D ring of radius 1.5 and radial std ≈ 0.11, a mixture of 128 isotropic components so
  close together that the density is smooth along the ring.
* `spatial`: 4×8×8 latents, a mixture of 8 modes in a 4-D subspace mapped linearly onto smooth
  spatial patterns (cosines in H×W, mixed across channels), plus isotropic noise of std 0.25.
* the wide suite's sets, 2000 train / 1000 held-out items, posterior std 0.05, mode centres on
  orthonormal directions scaled so the latents have about unit variance per dimension:
  `syn-mix8-d16` (8 equal isotropic modes, 16-D), `syn-aniso4-d8` (4 rotated anisotropic modes with
  per-axis stds 0.03-0.7, weights 0.4/0.3/0.2/0.1), `syn-lowrank12-d32` (12 rank-3 pancakes, weights
  6:1), `syn-mix20-d64` (20 modes of three covariance kinds, weights 1 → 0.25), `syn-heavy6-d16` (6 modes,
  each a Gaussian scale mixture: heavy tails with an exact density), `syn-spiral-d16` and `syn-knot-d32`
  (a 2-D spiral and a 3-D trefoil knot embedded by a random rotation, thin tubes made of 256 / 384 small
  components).

All are laid out so that normalized latents have roughly unit scale, as a VAE's do.

Real sets (built by `load_set`, each cached under `cache_dir` where that saves time):
* `digits-d{8,16,32,64}-b{1,0.1,0.01}`: `bench.digits` flat VAEs (latent size d, KL weight β, 300
  epochs each, ~20-30 s apiece on one core), 1500 / 297 split; `digits-b1` and `digits-b0.1` are the
  earlier names of the two d = 8 sets. Each decodes to 8×8 digits for the classifier.
* `default-vae`: the embedded diffusers AutoencoderKL (4×8×8 latents at 32 px) on the bundled digits,
  encoded with `latent_prior.encode` into a temporary cache; the held-out items are the same 297
  digits as above (matched by file name), so all digits sets share one split.
* `photos`: a small diffusers AutoencoderKL (4×8×8 latents at 32 px, KL weight 1e-5) trained by
  `scripts/train_photo_vae.py` on `bench.photos` crops of the ten scikit-image / scikit-learn photos
  (3000 train / 500 held-out crops, held out by image region; --quick: 600 / 200 crops, 2 epochs);
  trained once into `cache_dir`, then reloaded. No decoder hook (the classifier judges digits only).
* `photos-16`: the same architecture on 64-px crops of the photos resized to a 384-px short side:
  4×16×16 latents, KL weight 1e-6 (SD's order, so its posteriors are nearly deterministic), 6 epochs.
* `photos-c32`: photos-16's crops and KL weight, a VAE with a third downsampling and 32 latent channels: 32×8×8
  latents (2048 dims), the shape of a high-channel image autoencoder rather than SD's 4 channels.
* `photos-32`: the photos-16 VAE on 128-px crops of the photos resized to a 768-px short side: 4×32×32 latents,
  the shape `stabilityai/sd-vae-ft-mse` gives at 256 px, from a VAE used at twice the resolution it was trained at
  (as SD's VAE is at 512 px).
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

# ---------------------------------------------------------------------------------------------------
# a latent set


@dataclass
class LatentSet:
    """Posterior moments of one VAE (or synthetic source), split into training and held-out items.

    train_mean, train_logvar:     (N_train, *latent_shape) raw latents, float32
    heldout_mean, heldout_logvar: (N_heldout, *latent_shape)
    normalization: maps raw -> normalized latents (where priors are fitted and metrics computed).
    true_log_prob: normalized z (N, *latent_shape) -> (N,) nats of the true aggregate posterior, or None.
    true_mode_of: normalized z (N, *latent_shape) -> (N,) int64, the most responsible mode of the true
        aggregate posterior (synthetic sets with more than one mode or region), or None.
    true_mode_weights: (M,) the true modes' probability masses (sum 1), or None.
    true_density: the aggregate posterior as a `MixtureDensity` (synthetic sets), or None.
    multimodal: the set has separate modes (the issue's hole-share and mode-share goals apply to it).
    decode: raw z (N, *latent_shape) -> images (N, 64) in [0, 1] for the digit classifier, or None.
    kind: "synthetic", "digits" (flat digits VAE), "digits-spatial" (the embedded default), "photos".
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
    true_mode_of: Callable[[torch.Tensor], torch.Tensor] | None = None
    true_mode_weights: torch.Tensor | None = None
    true_density: "MixtureDensity | None" = None
    multimodal: bool = False
    kind: str = "synthetic"

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
        save_file(
            {"mean": self.train_mean.contiguous().float(), "logvar": self.train_logvar.contiguous().float()},
            str(path),
            metadata={"normalization": json.dumps(self.normalization.to_dict())},
        )
        return path


# ---------------------------------------------------------------------------------------------------
# an exact Gaussian-mixture density


class MixtureDensity:
    """A Gaussian mixture in D dims with exact sampling and log-density (float64 internally).

    weights (K,), means (K, D), covariances (K, D, D); modes (K,) int64, optional: which MODE each
    component belongs to (0..M-1). A mode is a group of components that together make one bump of the
    density (a heavy-tailed mode is several components with one centre and nested scales; an arc of a
    curve is a run of consecutive small components). Without `modes`, every component is its own mode.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor, modes: torch.Tensor | None = None) -> None:
        self.weights = weights.double() / weights.double().sum()
        self.means = means.double()
        self.covariances = covariances.double()
        self.chol = torch.linalg.cholesky(self.covariances)
        self.modes = torch.arange(len(self.weights)) if modes is None else torch.as_tensor(modes, dtype=torch.long)
        if self.modes.shape != self.weights.shape or int(self.modes.min()) != 0:
            raise LatentPriorError("MixtureDensity: modes must give one mode index (0..M-1) per component.")

    @property
    def dims(self) -> int:
        return self.means.shape[1]

    @property
    def num_modes(self) -> int:
        return int(self.modes.max()) + 1

    @property
    def mode_weights(self) -> torch.Tensor:
        """(M,) float64: the probability mass of each mode (the sum of its components' weights)."""
        return torch.zeros(self.num_modes, dtype=torch.float64).index_add_(0, self.modes, self.weights)

    def convolved(self, variance: float) -> "MixtureDensity":
        """The density of x + √variance·ε, ε ~ N(0, I): variance added to every covariance."""
        eye = torch.eye(self.dims, dtype=torch.float64)
        return MixtureDensity(self.weights, self.means, self.covariances + variance * eye, self.modes)

    def sample_with_components(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, D) float64 draws and the (n,) component each came from."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dims, generator=generator, dtype=torch.float64)
        return self.means[comp] + torch.einsum("nij,nj->ni", self.chol[comp], eps), comp

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, D) float64 draws."""
        return self.sample_with_components(n, generator)[0]

    def component_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, *shape) with prod(shape) = D -> (N, K): log(weight_k · N(x; μ_k, Σ_k)) in nats (float64)."""
        x = x.reshape(len(x), -1).double()
        if x.shape[1] != self.dims:
            raise LatentPriorError(f"MixtureDensity.log_prob: got {x.shape[1]} dims per row, the density has {self.dims}.")
        log_det = 2.0 * torch.log(torch.diagonal(self.chol, dim1=-2, dim2=-1)).sum(-1)
        const = self.dims * math.log(2 * math.pi)
        out = torch.empty(len(x), len(self.weights), dtype=torch.float64)
        for k in range(len(self.weights)):
            white = torch.linalg.solve_triangular(self.chol[k], (x - self.means[k]).T, upper=False)
            out[:, k] = torch.log(self.weights[k]) - 0.5 * (white.pow(2).sum(0) + log_det[k] + const)
        return out

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, *shape) with prod(shape) = D -> (N,) log-density in nats (float64)."""
        return torch.logsumexp(self.component_log_probs(x), dim=1)

    def mode_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, M): log of each mode's share of the density at x (its components' weighted densities summed)."""
        comp = self.component_log_probs(x)
        out = torch.full((len(comp), self.num_modes), -math.inf, dtype=torch.float64)
        for m in range(self.num_modes):
            out[:, m] = torch.logsumexp(comp[:, self.modes == m], dim=1)
        return out

    def mode_of(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) int64: the most responsible mode of each row of x."""
        return self.mode_log_probs(x).argmax(1)


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
    return MixtureDensity(torch.ones(components), centres, covs.clone(), modes=torch.zeros(components, dtype=torch.long))


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


# --- the wide suite's synthetic sets: each a MixtureDensity of the posterior means, with modes


def _centres(k: int, d: int, weights: torch.Tensor, g: torch.Generator, per_dim_var: float = 0.7) -> torch.Tensor:
    """k mode centres in d dims (k ≤ d) on orthonormal directions of a random rotation, all pairs equally
    far apart (c·√2), scaled so the centres' weighted spread is about `per_dim_var` per dimension, and
    shifted so their weighted mean is 0: the normalized latents then have roughly unit scale."""
    w = weights.double() / weights.double().sum()
    c = math.sqrt(per_dim_var * d / (1.0 - float((w**2).sum())))
    centres = c * _random_rotation(d, g)[:k]
    return centres - (w[:, None] * centres).sum(0)


def _covariance(
    kind: str, d: int, g: torch.Generator, *, std: float = 0.35, lo: float = 0.05, hi: float = 0.6, rank: int = 3, floor: float = 0.03
) -> torch.Tensor:
    """A (d, d) mode covariance: "iso" std²·I; "aniso" R·diag(λ)·Rᵀ with per-axis stds log-uniform in [lo, hi]
    and a random rotation R (condition number (hi/lo)²); "lowrank" a pancake of `rank` random orthonormal axes
    with stds uniform in [lo, hi], plus floor²·I across the other axes."""
    eye = torch.eye(d, dtype=torch.float64)
    if kind == "iso":
        return std**2 * eye
    rot = _random_rotation(d, g)
    if kind == "aniso":
        stds = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(d, generator=g, dtype=torch.float64))
        return rot @ torch.diag(stds**2) @ rot.T
    if kind == "lowrank":
        axes = rot[:, :rank]
        stds = lo + (hi - lo) * torch.rand(rank, generator=g, dtype=torch.float64)
        return axes @ torch.diag(stds**2) @ axes.T + floor**2 * eye
    raise ValueError(kind)


def _modes_density(seed: int, d: int, weights: list[float], kinds: list[str], **cov: Any) -> MixtureDensity:
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor(weights, dtype=torch.float64)
    centres = _centres(len(w), d, w, g)
    covs = torch.stack([_covariance(kinds[k % len(kinds)], d, g, **cov) for k in range(len(w))])
    return MixtureDensity(w, centres, covs)


def _mix8_d16(seed: int) -> MixtureDensity:
    """8 equal, well-separated isotropic modes (std 0.35) in 16-D, centres ≈ 5.0 apart."""
    return _modes_density(seed, 16, [1.0] * 8, ["iso"], std=0.35)


def _aniso4_d8(seed: int) -> MixtureDensity:
    """4 anisotropic modes in 8-D (per-axis stds 0.03-0.7, rotated), weights 0.4 / 0.3 / 0.2 / 0.1."""
    return _modes_density(seed, 8, [0.4, 0.3, 0.2, 0.1], ["aniso"], lo=0.03, hi=0.7)


def _lowrank12_d32(seed: int) -> MixtureDensity:
    """12 rank-3 pancakes in 32-D (stds 0.4-1.0 along 3 axes, 0.03 across), weights ∝ 0.85^k (6:1)."""
    return _modes_density(seed, 32, [0.85**k for k in range(12)], ["lowrank"], lo=0.4, hi=1.0, rank=3, floor=0.03)


def _mix20_d64(seed: int) -> MixtureDensity:
    """20 modes in 64-D cycling isotropic (std 0.35), anisotropic (0.05-0.6) and rank-4 (0.4-0.9, floor 0.04)
    covariances, weights linear from 1 to 0.25 (smallest mode 2 % of the mass)."""
    weights = torch.linspace(1.0, 0.25, 20).tolist()
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor(weights, dtype=torch.float64)
    centres = _centres(20, 64, w, g)
    specs = [("iso", {"std": 0.35}), ("aniso", {"lo": 0.05, "hi": 0.6}), ("lowrank", {"lo": 0.4, "hi": 0.9, "rank": 4, "floor": 0.04})]
    covs = torch.stack([_covariance(specs[k % 3][0], 64, g, **specs[k % 3][1]) for k in range(20)])
    return MixtureDensity(w, centres, covs)


#: the heavy-tailed set's scale mixture: each mode is Σ_j s_j-scaled copies of one covariance (a discretized
#: Gaussian scale mixture, like a Student-t's continuous one): 5 % of a mode's mass has 3.2× its core's std.
HEAVY_SCALES = (0.6, 1.0, 1.8, 3.2)
HEAVY_SCALE_WEIGHTS = (0.3, 0.45, 0.2, 0.05)


def _heavy6_d16(seed: int) -> MixtureDensity:
    """6 heavy-tailed modes in 16-D: each a Gaussian scale mixture (HEAVY_SCALES) of one anisotropic
    covariance (per-axis stds 0.15-0.4), mode weights 0.25 / 0.2 / 0.2 / 0.15 / 0.1 / 0.1."""
    g = torch.Generator().manual_seed(seed)
    mode_w = torch.tensor([0.25, 0.2, 0.2, 0.15, 0.1, 0.1], dtype=torch.float64)
    centres = _centres(6, 16, mode_w, g, per_dim_var=0.6)
    weights, means, covs, modes = [], [], [], []
    for m in range(6):
        base = _covariance("aniso", 16, g, lo=0.15, hi=0.4)
        for s, sw in zip(HEAVY_SCALES, HEAVY_SCALE_WEIGHTS):
            weights.append(mode_w[m] * sw)
            means.append(centres[m])
            covs.append(s**2 * base)
            modes.append(m)
    return MixtureDensity(torch.stack(weights), torch.stack(means), torch.stack(covs), torch.tensor(modes))


def _curve_density(points: torch.Tensor, d: int, components: int, regions: int, tube_std: float, g: torch.Generator) -> MixtureDensity:
    """A noisy curve in d dims: `components` isotropic Gaussians (std tube_std) at equal arc-length steps along
    the polyline `points` (P, q), embedded by q orthonormal columns of a random rotation, centred; the
    components are grouped into `regions` consecutive arcs of equal length (the set's "modes")."""
    seg = (points[1:] - points[:-1]).norm(dim=1)
    arc = torch.cat([torch.zeros(1, dtype=torch.float64), seg.cumsum(0)])
    targets = torch.linspace(0, float(arc[-1]), components, dtype=torch.float64)
    idx = torch.searchsorted(arc, targets).clamp(1, len(points) - 1)
    t = ((targets - arc[idx - 1]) / (arc[idx] - arc[idx - 1]).clamp_min(1e-12))[:, None]
    on_curve = points[idx - 1] + t * (points[idx] - points[idx - 1])
    frame = _random_rotation(d, g)[:, : points.shape[1]]  # (d, q) orthonormal columns
    centres = on_curve @ frame.T
    centres = centres - centres.mean(0)
    covs = (tube_std**2 * torch.eye(d, dtype=torch.float64)).expand(components, d, d).clone()
    modes = torch.arange(components) * regions // components
    return MixtureDensity(torch.ones(components), centres, covs, modes)


def _spiral_d16(seed: int) -> MixtureDensity:
    """A 2-D Archimedean spiral (1.5 turns, radius 0.4 → 2.2) embedded in 16-D, 256 components of std 0.07
    (spacing ≈ 0.05 along the arc, so the tube is smooth), 8 arcs as regions."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.linspace(0, 3 * math.pi, 4000, dtype=torch.float64)
    radius = 0.4 + 1.8 * theta / (3 * math.pi)
    points = torch.stack([radius * theta.cos(), radius * theta.sin()], 1)
    return _curve_density(points, 16, 256, 8, 0.07, g)


def _knot_d32(seed: int) -> MixtureDensity:
    """A trefoil knot (sin t + 2 sin 2t, cos t − 2 cos 2t, −sin 3t)·0.6 embedded in 32-D, 384 components of
    std 0.08, 6 arcs as regions."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 2 * math.pi, 6000, dtype=torch.float64)
    points = 0.6 * torch.stack([t.sin() + 2 * (2 * t).sin(), t.cos() - 2 * (2 * t).cos(), -(3 * t).sin()], 1)
    return _curve_density(points, 32, 384, 6, 0.08, g)


@dataclass(frozen=True)
class SyntheticSpec:
    """How a synthetic set is made: `build(seed)` is the density of the posterior MEANS (with its modes); every
    item's posterior is N(μ, posterior_std²·I), so the aggregate posterior is that density convolved."""

    build: Callable[[int], MixtureDensity]
    shape: tuple[int, ...]
    posterior_std: float
    description: str
    kind: str  # "mixture", "heavy-tailed", "manifold", "ring", "spatial"
    multimodal: bool  # separate modes (the hole-share and mode-share goals apply); else its regions are arcs
    n_train: int = 2000
    n_heldout: int = 1000


SYNTHETIC: dict[str, SyntheticSpec] = {
    "mixture": SyntheticSpec(
        _mixture_means_density,
        (8,),
        0.05,
        "8-D mixture of 8 well-separated Gaussians (modes 3.5 apart, std 0.35)",
        "mixture",
        True,
        3000,
        1000,
    ),
    "ring": SyntheticSpec(_ring_means_density, (2,), 0.05, "2-D ring, radius 1.5, radial std ≈ 0.11", "ring", False, 3000, 1000),
    "spatial": SyntheticSpec(
        _spatial_means_density,
        SPATIAL_SHAPE,
        0.1,
        "4×8×8: an 8-mode mixture in a 4-D subspace on smooth spatial patterns, + noise 0.25",
        "spatial",
        True,
        3000,
        1000,
    ),
    "syn-mix8-d16": SyntheticSpec(
        _mix8_d16, (16,), 0.05, "16-D: 8 equal, well-separated isotropic modes (std 0.35, ≈ 5 apart)", "mixture", True
    ),
    "syn-aniso4-d8": SyntheticSpec(
        _aniso4_d8, (8,), 0.05, "8-D: 4 anisotropic modes (per-axis stds 0.03-0.7, rotated), weights 0.4/0.3/0.2/0.1", "mixture", True
    ),
    "syn-lowrank12-d32": SyntheticSpec(
        _lowrank12_d32,
        (32,),
        0.05,
        "32-D: 12 rank-3 pancakes (stds 0.4-1.0 along 3 axes, 0.03 across), weights 6:1 geometric",
        "mixture",
        True,
    ),
    "syn-mix20-d64": SyntheticSpec(
        _mix20_d64,
        (64,),
        0.05,
        "64-D: 20 modes, isotropic / anisotropic / rank-4 in turn, weights 1 → 0.25 (smallest 2 %)",
        "mixture",
        True,
    ),
    "syn-heavy6-d16": SyntheticSpec(
        _heavy6_d16,
        (16,),
        0.05,
        "16-D: 6 heavy-tailed modes, each a Gaussian scale mixture (stds ×0.6/1/1.8/3.2, 5 % in the widest) "
        "of an anisotropic covariance; weights 0.25 … 0.1",
        "heavy-tailed",
        True,
    ),
    "syn-spiral-d16": SyntheticSpec(
        _spiral_d16,
        (16,),
        0.05,
        "16-D: a 1.5-turn 2-D spiral embedded by a random rotation, tube std 0.07 (256 components; 8 arcs as regions)",
        "manifold",
        False,
    ),
    "syn-knot-d32": SyntheticSpec(
        _knot_d32,
        (32,),
        0.05,
        "32-D: a trefoil knot embedded by a random rotation, tube std 0.08 (384 components; 6 arcs as regions)",
        "manifold",
        False,
    ),
}
SYNTHETIC_SETS = tuple(SYNTHETIC)
#: the synthetic sets of the wide suite: 8-64 dims, known density
WIDE_SYNTHETIC_SETS = tuple(n for n in SYNTHETIC if n.startswith("syn-"))
#: how many exact draws of the aggregate posterior define each mode's true share
MODE_SHARE_DRAWS = 20_000


def make_synthetic(name: str, n_train: int | None = None, n_heldout: int | None = None, seed: int = 0) -> LatentSet:
    """A synthetic `LatentSet` with exact aggregate-posterior density; identity normalization.

    The means come from the set's mixture, the posterior std σ is fixed per set (0.05 or 0.1), so the
    aggregate posterior is that mixture convolved with N(0, σ²I): `true_log_prob`. `true_mode_of` gives
    each latent's most responsible mode (region, for a curve), `true_mode_weights` the modes' masses.
    """
    if name not in SYNTHETIC:
        raise LatentPriorError(f"synthetic set {name!r}: choose one of {', '.join(SYNTHETIC)}.")
    spec = SYNTHETIC[name]
    n_train = spec.n_train if n_train is None else n_train
    n_heldout = spec.n_heldout if n_heldout is None else n_heldout
    sigma = spec.posterior_std
    density = spec.build(seed)
    g = torch.Generator().manual_seed(seed + 1)
    means = density.sample(n_train + n_heldout, g).float().reshape(-1, *spec.shape)
    logvar = torch.full_like(means, 2 * math.log(sigma))
    aggregate = density.convolved(sigma**2)
    has_modes = aggregate.num_modes > 1
    return LatentSet(
        name=name,
        description=f"{spec.description}; posterior std {sigma:g}; {n_train} train / {n_heldout} held-out items",
        train_mean=means[:n_train],
        train_logvar=logvar[:n_train],
        heldout_mean=means[n_train:],
        heldout_logvar=logvar[n_train:],
        true_log_prob=aggregate.log_prob,
        true_mode_of=aggregate.mode_of if has_modes else None,
        true_mode_weights=aggregate.mode_weights if has_modes else None,
        true_density=aggregate,
        multimodal=spec.multimodal,
        kind="synthetic",
        info={
            "posterior_std": sigma,
            "components": len(aggregate.weights),
            "modes": aggregate.num_modes,
            "synthetic_kind": spec.kind,
            "multimodal": spec.multimodal,
            "density_seed": seed,
        },
    )


# ---------------------------------------------------------------------------------------------------
# real VAE latents

#: the flat digits VAEs of the wide suite: latent size d × KL weight β, 300 epochs each
DIGITS_DIMS = (8, 16, 32, 64)
DIGITS_BETAS = (1.0, 0.1, 0.01)
DIGITS_EPOCHS = 300
#: set name -> (d, β); "digits-b1" and "digits-b0.1" are the earlier names of the two d = 8 sets (same VAE folder)
DIGITS_SETS: dict[str, tuple[int, float]] = {f"digits-d{d}-b{b:g}": (d, b) for d in DIGITS_DIMS for b in DIGITS_BETAS}
DIGITS_ALIASES = {"digits-b1": "digits-d8-b1", "digits-b0.1": "digits-d8-b0.1"}
DIGITS_SETS.update({alias: DIGITS_SETS[target] for alias, target in DIGITS_ALIASES.items()})
WIDE_DIGITS_SETS = tuple(n for n in DIGITS_SETS if n not in DIGITS_ALIASES)


def digits_vae_dir(cache_dir: Path, beta: float, epochs: int, latent_dim: int = 8) -> Path:
    """The folder of one trained digits VAE (d = 8 keeps its earlier name, so earlier caches stay valid)."""
    if latent_dim == 8:
        return Path(cache_dir) / f"digits_vae_beta{beta:g}_epochs{epochs}"
    return Path(cache_dir) / f"digits_vae_d{latent_dim}_beta{beta:g}_epochs{epochs}"


def build_digits_vae(latent_dim: int, beta: float, cache_dir: str | Path, epochs: int = DIGITS_EPOCHS, verbose: bool = True) -> Path:
    """Train the digits VAE (d, β) into `cache_dir` unless a complete folder is there; returns the folder."""
    from bench import digits

    directory = digits_vae_dir(Path(cache_dir), beta, epochs, latent_dim)
    if not (directory / "heldout_latents.safetensors").is_file():
        if verbose:
            print(
                f"[digits-d{latent_dim}-b{beta:g}] training the digits VAE (d={latent_dim}, beta={beta:g}, {epochs} epochs) "
                f"into {directory} ...",
                flush=True,
            )
        model, split = digits.train_digits_vae(beta, latent_dim=latent_dim, seed=0, epochs=epochs)
        digits.save_digits_vae(model, split, directory)
    return directory


def load_digits_set(name: str, cache_dir: str | Path, epochs: int = DIGITS_EPOCHS, verbose: bool = True) -> LatentSet:
    """A flat digits VAE (bench.digits; d and β from the name) and its 1500 / 297 latents; trained once (by
    `build_digits_vae`, what scripts/train_digits_vaes.py runs), then reloaded from `cache_dir`. `decode`
    gives the Bernoulli means (N, 64) in [0, 1]; `info` records the epochs and the held-out reconstruction."""
    from bench import digits

    if name not in DIGITS_SETS:
        raise LatentPriorError(f"digits set {name!r}: choose one of {', '.join(DIGITS_SETS)}.")
    latent_dim, beta = DIGITS_SETS[name]
    directory = build_digits_vae(latent_dim, beta, cache_dir, epochs, verbose)
    model, split, latents = digits.load_digits_vae(directory)

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        return model.decode(z.float())

    metrics = getattr(model, "metrics", None) or {}
    held = metrics.get("heldout") or {}
    return LatentSet(
        name=name,
        description=f"bench.digits flat VAE, d={latent_dim}, beta={beta:g} ({epochs} epochs); 1500 train / 297 held-out digits",
        train_mean=latents["train"]["mean"],
        train_logvar=latents["train"]["logvar"],
        heldout_mean=latents["heldout"]["mean"],
        heldout_logvar=latents["heldout"]["logvar"],
        decode=decode,
        kind="digits",
        info={
            "vae_dir": str(directory),
            "vae_metrics": metrics,
            "latent_dim": latent_dim,
            "beta": beta,
            "vae_epochs": epochs,
            "heldout_recon_nats": held.get("recon_nats"),
            "heldout_kl_nats": held.get("kl_nats"),
            "heldout_recon_mse": held.get("mse_of_mean_decode"),
            "vae_train_seconds": metrics.get("train_seconds"),
            "data_dims": 64,
        },
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
        description=(
            f"embedded default AutoencoderKL, latents {tuple(mean.shape[1:])} at {defaults.DEFAULT_RESOLUTION} px, "
            f"bundled digits; {int((~held).sum())} train / {int(held.sum())} held-out"
        ),
        train_mean=mean[~held],
        train_logvar=logvar[~held],
        heldout_mean=mean[held],
        heldout_logvar=logvar[held],
        normalization=normalization,
        decode=decode,
        kind="digits-spatial",
        info={"vae_dir": str(vae_dir), "normalization": normalization.to_dict(), "data_dims": 3 * defaults.DEFAULT_RESOLUTION**2},
    )


#: photos-c32's crops, KL weight and VAE shape, shared by its full and --quick settings
_C32_SHAPE = dict(crop_size=64, photo_side=384, kl_weight=1e-6, latent_channels=32, downsamplings=3)

#: scripts/train_photo_vae.py settings of the photo sets (the rest are the script's defaults), full and --quick;
#: seed 0 always, like the digits VAEs, so every benchmark seed sees the same VAE and crops.
#: "photos": 32-px crops, 4×8×8 latents, KL weight 1e-5. "photos-16": 64-px crops of the photos resized to a
#: 384-px short side (so a crop covers about the same share of a photo as a 32-px crop at 256 px, and there are
#: 12-15 tiles per photo to split), 4×16×16 latents, KL weight 1e-6 (SD's order: nearly deterministic posteriors).
#: "photos-c32": the same crops, 32×8×8 latents (three downsamplings, 32 channels).
PHOTO_SETS: dict[str, dict[bool, dict[str, Any]]] = {
    "photos": {False: dict(epochs=8, num_train=3000, num_heldout=500), True: dict(epochs=2, num_train=600, num_heldout=200)},
    "photos-16": {
        False: dict(epochs=6, num_train=3000, num_heldout=500, crop_size=64, photo_side=384, kl_weight=1e-6),
        True: dict(epochs=2, num_train=400, num_heldout=150, crop_size=64, photo_side=384, kl_weight=1e-6),
    },
    "photos-c32": {
        False: dict(epochs=6, num_train=3000, num_heldout=500, **_C32_SHAPE),
        True: dict(epochs=2, num_train=400, num_heldout=150, **_C32_SHAPE),
    },
}
PHOTOS_SETTINGS = PHOTO_SETS["photos"]  # the earlier name
#: Sets that encode larger crops with the VAE of a PHOTO_SETS entry: name -> (that entry, the crops' settings, full
#: and --quick). Each 128-px crop at a 768-px short side covers the share of a photo that a 64-px crop does at 384 px.
REENCODED_PHOTO_SETS: dict[str, tuple[str, dict[bool, dict[str, Any]]]] = {
    "photos-32": (
        "photos-16",
        {False: dict(crop_size=128, photo_side=768), True: dict(crop_size=128, photo_side=768, num_train=400, num_heldout=150)},
    ),
}


def photo_vae_dir(cache_dir: str | Path, quick: bool = False, name: str = "photos") -> Path:
    s = PHOTO_SETS[name][quick]
    if name == "photos":
        return Path(cache_dir) / f"photo_vae_n{s['num_train']}_h{s['num_heldout']}_e{s['epochs']}"
    shape = f"_ch{s['latent_channels']}_ds{s['downsamplings']}" if "latent_channels" in s else ""
    return Path(cache_dir) / (
        f"photo_vae_c{s['crop_size']}_side{s['photo_side']}_kl{s['kl_weight']:g}_n{s['num_train']}"
        f"_h{s['num_heldout']}_e{s['epochs']}{shape}"
    )


def _cached_photo_vae(
    directory: Path, wanted: dict[str, Any], defaults: dict[str, Any], architecture: dict[str, Any]
) -> dict[str, Any] | None:
    """The training summary of a complete folder trained with the `wanted` config, else None (a field the folder's
    summary lacks was added to the script later: the folder was trained with its default)."""
    try:
        summary = json.loads((directory / "training_summary.json").read_text())
    except (OSError, ValueError):
        return None
    trained = {**defaults, **summary.get("train_config", {})}
    same = all(trained.get(k) == v for k, v in wanted.items() if k not in ("output_dir", "quiet", "threads"))
    return summary if same and summary.get("architecture") == json.loads(json.dumps(architecture)) else None


def build_photo_vae(name: str, cache_dir: str | Path, quick: bool = False, verbose: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train the photo set's AutoencoderKL by `scripts/train_photo_vae.py` into `photo_vae_dir(...)` unless a
    folder trained with the same config is there; (folder, its training summary)."""
    from bench.photos import import_repo_script
    from latent_prior.config import to_dict

    if name not in PHOTO_SETS:
        raise LatentPriorError(f"photo set {name!r}: choose one of {', '.join(PHOTO_SETS)}.")
    script = import_repo_script("train_photo_vae")
    directory = photo_vae_dir(cache_dir, quick, name)
    cfg = script.TrainPhotoVAEConfig(output_dir=str(directory), quiet=not verbose, **PHOTO_SETS[name][quick])
    summary = _cached_photo_vae(directory, to_dict(cfg), to_dict(script.TrainPhotoVAEConfig()), script.architecture_of(cfg))
    if summary is None:
        if verbose:
            print(
                f"[{name}] training the photo AutoencoderKL ({cfg.epochs} epochs on {cfg.num_train} {cfg.crop_size}-px crops, "
                f"KL weight {cfg.kl_weight:g}) into {directory} ...",
                flush=True,
            )
        summary = script.train_photo_vae(cfg)
    return directory, summary


def load_photos_set(cache_dir: str | Path, quick: bool = False, verbose: bool = True, name: str = "photos") -> LatentSet:
    """A photo-patch AutoencoderKL and the posterior moments of its train / held-out crops.

    The VAE is trained on demand by `scripts/train_photo_vae.py` (`build_photo_vae`) and reused while its
    recorded config matches; the crops are rebuilt (deterministically) and encoded by
    `latent_prior.adapters.load_vae(folder)`, so the set carries the adapter's normalization (the fitted
    `scaling_factor`). Moments are raw, float32, (N, C, h, w) (photos: 4 × crop/4 × crop/4).
    """
    from bench.photos import make_patches
    from latent_prior.adapters import load_vae

    vae_set, crops = REENCODED_PHOTO_SETS.get(name, (name, {quick: {}}))
    directory, summary = build_photo_vae(vae_set, cache_dir, quick, verbose)
    summary = {**summary, "patches": {**summary["patches"], **crops[quick]}}
    adapter = load_vae(str(directory))
    patches = make_patches(**summary["patches"])
    with torch.no_grad():
        moments = {}
        for split, images in (("train", patches.train), ("heldout", patches.heldout)):
            parts = [adapter.encode(chunk) for chunk in images.split(250)]
            moments[split] = (torch.cat([p.mean for p in parts]), torch.cat([p.logvar for p in parts]))
    normalization = adapter.normalization
    n_train, n_held = len(patches.train), len(patches.heldout)
    crop = summary["patches"]["crop_size"]
    kl_weight = summary["train_config"]["kl_weight"]
    return LatentSet(
        name=name,
        description=(
            f"small AutoencoderKL (scripts/train_photo_vae.py, KL weight {kl_weight:g}, {summary['epochs']} epochs, "
            f"held-out recon MSE {summary['heldout_recon_mse']:.4f} vs {summary['heldout_mean_image_mse']:.4f} for the "
            f"mean crop), latents {tuple(moments['train'][0].shape[1:])} at {crop} px; crops of {len(patches.photos)} "
            f"scikit-image / scikit-learn photos (short side {summary['patches']['photo_side']} px), {n_train} train / "
            f"{n_held} held-out (by image region)"
        ),
        train_mean=moments["train"][0],
        train_logvar=moments["train"][1],
        heldout_mean=moments["heldout"][0],
        heldout_logvar=moments["heldout"][1],
        normalization=normalization,
        kind="photos",
        info={
            "vae_dir": str(directory),
            "normalization": normalization.to_dict(),
            "patches": summary["patches"],
            "kl_weight": kl_weight,
            "vae_train_seconds": summary["train_seconds"],
            "vae_epochs": summary["epochs"],
            "heldout_recon_mse": summary["heldout_recon_mse"],
            "heldout_mean_image_mse": summary["heldout_mean_image_mse"],
            "posterior_std_mean": summary["heldout"].get("posterior_std_mean"),
            "data_dims": 3 * crop * crop,
        },
    )


SPATIAL_VAE_SETS = ("default-vae", *PHOTO_SETS, *REENCODED_PHOTO_SETS)
REAL_SETS = (*DIGITS_SETS, *SPATIAL_VAE_SETS)
ALL_SETS = (*SYNTHETIC_SETS, *REAL_SETS)


def load_set(
    name: str, *, cache_dir: str | Path, quick: bool = False, seed: int = 0, vae_epochs: int | None = None, verbose: bool = True
) -> LatentSet:
    """Build the latent set `name` (one of ALL_SETS). quick: smaller synthetic sets and VAE training.
    `vae_epochs` applies to the flat digits VAEs only (the photo VAEs' epochs are PHOTO_SETS).
    `seed` seeds a synthetic set's density and items; the VAE sets do not depend on it."""
    if name in SYNTHETIC:
        n_train, n_heldout = (800, 300) if quick else (None, None)
        return make_synthetic(name, n_train, n_heldout, seed)
    if name in DIGITS_SETS:
        return load_digits_set(name, cache_dir, epochs=vae_epochs or (40 if quick else DIGITS_EPOCHS), verbose=verbose)
    if name == "default-vae":
        return load_default_vae_set(verbose=verbose)
    if name in PHOTO_SETS or name in REENCODED_PHOTO_SETS:
        return load_photos_set(cache_dir, quick=quick, verbose=verbose, name=name)
    raise LatentPriorError(f"--sets: unknown latent set {name!r}; choose from {', '.join(ALL_SETS)}.")
