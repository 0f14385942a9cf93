"""Latent-space metrics: how close a prior's samples are to held-out posterior latents.

Inputs are torch tensors or numpy arrays of shape (N, *shape), flattened to (N, D) and computed in
float64; every function returns Python floats. They compare distributions in the normalized latent
space, so they are cheap and need no decoder or Inception network.

* `frechet_distance`: FD between Gaussians fitted to both sets (the FID formula on latents).
* `excess_frechet_distance`: FD(samples, heldout) − FD(reference, heldout), where reference are
  draws from the *training* posteriors. The second term is the floor a perfect copy of the training
  aggregate posterior would reach (finite samples, train/held-out gap), so 0 means "as good as the
  training latents themselves" and it can go slightly negative by chance.
* `mmd_rbf`: unbiased RBF-kernel MMD², median-heuristic bandwidth, chunked.
* `precision_recall_knn`: k-NN manifold precision (fidelity) and recall (coverage), Kynkäänniemi
  et al. 2019.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from latent_prior.errors import LatentPriorError

#: Rows per block of pairwise distances; a block is CHUNK × N float64 values.
CHUNK = 1024
#: Points used to pick the median-heuristic bandwidth (the median of ~N²/2 distances needs no more).
MEDIAN_SUBSAMPLE = 1000


def _rows(x: Any, name: str) -> torch.Tensor:
    """(N, *shape) tensor or array -> (N, D) float64 CPU tensor, refusing NaN/inf and N < 2."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() < 2:
        raise LatentPriorError(f"{name} has shape {tuple(t.shape)}: pass samples as (N, *latent_shape).")
    t = t.detach().reshape(t.shape[0], -1).to("cpu", torch.float64)
    if t.shape[0] < 2:
        raise LatentPriorError(f"{name} has {t.shape[0]} sample(s); these metrics need at least 2.")
    if not torch.isfinite(t).all():
        raise LatentPriorError(f"{name} holds NaN or inf values; drop or fix those samples first.")
    return t


def _pair(x: Any, y: Any, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _rows(x, names[0]), _rows(y, names[1])
    if a.shape[1] != b.shape[1]:
        raise LatentPriorError(f"{names[0]} has {a.shape[1]} dims per sample but {names[1]} has {b.shape[1]}; compare latents of one shape.")
    return a, b


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ‖a‖² + ‖b‖² − 2ab can dip below 0 by rounding; distances are never negative.
    d = a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_min_(0.0)


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def _cov_factor(a: np.ndarray) -> np.ndarray:
    """A matrix F with F Fᵀ = cov(a): the centred data itself when N − 1 ≤ D (exact, and smaller),
    else the symmetric square root of the D × D covariance."""
    centred = a - a.mean(0)
    if len(a) - 1 <= a.shape[1]:
        return centred.T / np.sqrt(len(a) - 1)
    return _psd_sqrt(np.atleast_2d(np.cov(a, rowvar=False)))


def frechet_distance(x: Any, y: Any) -> float:
    """‖μx − μy‖² + Tr(Σx + Σy − 2 (Σx Σy)^½) between Gaussians fitted to x and y, float64.

    With factors Σx = Fx Fxᵀ and Σy = Fy Fyᵀ, the eigenvalues of Σx Σy are the squared singular
    values of Fxᵀ Fy, so Tr (Σx Σy)^½ is the sum of those singular values. Unlike
    scipy.linalg.sqrtm on the non-symmetric product Σx Σy, this has no imaginary parts to discard
    and stays accurate for singular covariances (N ≤ D or collapsed dims), where sqrtm needs an
    ε offset and square roots of rounding noise would add about √eps per null direction.
    """
    a, b = _pair(x, y, ("x", "y"))
    a, b = a.numpy(), b.numpy()
    mean_term = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    trace_x = float(np.trace(np.atleast_2d(np.cov(a, rowvar=False))))
    trace_y = float(np.trace(np.atleast_2d(np.cov(b, rowvar=False))))
    trace_sqrt = float(np.linalg.svd(_cov_factor(a).T @ _cov_factor(b), compute_uv=False).sum())
    return max(mean_term + trace_x + trace_y - 2.0 * trace_sqrt, 0.0)  # a true distance; < 0 is rounding


def excess_frechet_distance(samples: Any, heldout: Any, reference: Any) -> float:
    """FD(samples, heldout) − FD(reference, heldout).

    samples: the prior's draws; heldout: posterior draws of held-out images; reference: posterior
    draws of training images, ideally as many as `samples` so both terms share the finite-sample bias.
    0 means the prior is as close to held-out latents as the training latents are.
    """
    return frechet_distance(samples, heldout) - frechet_distance(reference, heldout)


# ----------------------------------------------------------------------------------------------
# MMD


def median_bandwidth(x: Any, y: Any, *, seed: int = 0) -> float:
    """Median pairwise Euclidean distance over the pooled sample (a random subset of at most
    MEDIAN_SUBSAMPLE points, seeded, so memory stays bounded)."""
    a, b = _pair(x, y, ("x", "y"))
    pooled = torch.cat([a, b])
    if len(pooled) > MEDIAN_SUBSAMPLE:
        pick = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(seed))[:MEDIAN_SUBSAMPLE]
        pooled = pooled[pick]
    d2 = _sq_dists(pooled, pooled)
    upper = torch.triu_indices(len(pooled), len(pooled), offset=1)
    median = d2[upper[0], upper[1]].median().sqrt().item()
    return median if median > 0 else 1.0  # all points equal: any bandwidth gives MMD² = 0


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, gamma: float) -> float:
    """Σ_ij exp(−γ‖a_i − b_j‖²), CHUNK rows at a time."""
    return float(sum(torch.exp(-gamma * _sq_dists(block, b)).sum().item() for block in a.split(CHUNK)))


def mmd_rbf(x: Any, y: Any, bandwidth: float | None = None) -> float:
    """Unbiased MMD² with k(a, b) = exp(−‖a − b‖² / (2σ²)), σ = bandwidth (median heuristic if None).

    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1)) − 2 Σ_ij k(x_i, y_j) / (mn).
    Its expectation is 0 when x and y share a distribution, so small negative values happen.
    Memory is O(CHUNK · N): fine for N around 10k.
    """
    a, b = _pair(x, y, ("x", "y"))
    sigma = median_bandwidth(a, b) if bandwidth is None else float(bandwidth)
    if not sigma > 0:
        raise LatentPriorError(f"bandwidth={bandwidth!r}: pass a positive kernel width, or None for the median heuristic.")
    gamma = 1.0 / (2.0 * sigma**2)
    m, n = len(a), len(b)
    # The diagonal of each self-kernel is exactly exp(0) = 1, so subtract m (resp. n) for i ≠ j.
    kxx = (_kernel_sum(a, a, gamma) - m) / (m * (m - 1))
    kyy = (_kernel_sum(b, b, gamma) - n) / (n * (n - 1))
    kxy = _kernel_sum(a, b, gamma) / (m * n)
    return float(kxx + kyy - 2.0 * kxy)


# ----------------------------------------------------------------------------------------------
# k-NN precision and recall


class PrecisionRecall(NamedTuple):
    precision: float  # fraction of fake samples inside the real k-NN manifold (fidelity)
    recall: float  # fraction of real samples inside the fake k-NN manifold (coverage)


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (itself excluded by index, so
    duplicates count as neighbours at distance 0)."""
    radii = []
    for start in range(0, len(x), CHUNK):
        d2 = _sq_dists(x[start : start + CHUNK], x)
        rows = torch.arange(len(d2))
        d2[rows, rows + start] = float("inf")
        radii.append(d2.topk(k, dim=1, largest=False).values[:, -1].sqrt())
    return torch.cat(radii)


def _inside_fraction(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    inside = []
    for block in points.split(CHUNK):
        d = _sq_dists(block, centres).sqrt()
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside).double().mean().item()


def precision_recall_knn(real: Any, fake: Any, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls.

    Each real sample gets a ball of radius = distance to its k-th nearest real neighbour; precision
    is the fraction of fake samples inside at least one real ball. Recall swaps the roles.
    Returns PrecisionRecall(precision, recall), each in [0, 1].
    """
    r, f = _pair(real, fake, ("real", "fake"))
    if not isinstance(k, int) or k <= 0 or k >= min(len(r), len(f)):
        raise LatentPriorError(f"k={k!r}: pass a positive integer smaller than both sample counts ({len(r)}, {len(f)}).")
    precision = _inside_fraction(f, r, _knn_radii(r, k))
    recall = _inside_fraction(r, f, _knn_radii(f, k))
    return PrecisionRecall(precision, recall)
