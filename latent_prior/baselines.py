"""Priors to beat, behind one small interface: the VAE's own N(0, I), and a full-covariance GMM.

Both work in normalized latent space, like the learned prior:

    prior.fit(z)                    z (N, *latent_shape) -> self
    prior.sample(n, generator=None, temperature=1.0) -> (n, *latent_shape) float32
    prior.log_prob(z)               (N, *latent_shape) -> (N,) nats
    prior.save_pretrained(dir) / load_baseline(dir)     safetensors + JSON, no pickle

`temperature` scales the sampling noise's standard deviation (as for the flow): N(0, T²I) for the
Gaussian, N(μ_k, T²Σ_k) per component for the GMM. `log_prob` is always the untempered density.

The prior is meant to match the aggregate posterior (1/N) Σ_i N(μ_i, diag σ_i²), not the means μ_i alone:
means of a nearly deterministic encoder collapse some dimensions, which makes the components singular. So
fit the GMM on the posterior moments, `GMMPrior().fit(means, variances=σ²)`, or, where they are not at hand,
on posterior samples z = μ + σ·ε, several per item: with few items for the dimension, EM on one draw per
item overfits the sample (docs/prior-development.md, "The GMM on posterior moments").
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from latent_prior.errors import LatentPriorError
from latent_prior.sampling import log_standard_normal

CONFIG_NAME = "baseline.json"
WEIGHTS_NAME = "baseline.safetensors"

#: The GMM that the EVaLP prior must beat, and which its flow's base starts from: K components, fitted by EM
#: on the posterior moments of the training items (`GMMPrior.fit`'s `variances`).
GMM_COMPONENTS = 10
#: k-means starts of that GMM's EM (the lowest within-cluster sum of squares is kept; `GMMPrior`'s `n_init`)
GMM_KMEANS_STARTS = 5
#: At most this many training items (or draws) go into the GMM's EM (its cost is linear in them), and at most
#: GMM_MAX_VALUES latent values in all (the EM holds them in float64: 160 MB).
GMM_MAX_DRAWS = 20_000
GMM_MAX_VALUES = 20_000_000
#: Full covariances up to this many latent dims (10 × D² float64 values), diagonal ones above.
GMM_FULL_COV_MAX_DIMS = 512


def gmm_fit_items(dims: int) -> int:
    """How many training items (at most) a GMM of `dims`-dim latents is fitted on: GMM_MAX_DRAWS, fewer where their
    float64 values would pass GMM_MAX_VALUES."""
    return max(2, min(GMM_MAX_DRAWS, GMM_MAX_VALUES // max(1, dims)))


def gmm_covariance(dims: int) -> str:
    """ "full" up to GMM_FULL_COV_MAX_DIMS latent dims, "diag" above (K·D² values would not fit)."""
    return "full" if dims <= GMM_FULL_COV_MAX_DIMS else "diag"


def gmm_fit_draws(num_items: int, dims: int, deterministic: bool, components: int = GMM_COMPONENTS) -> tuple[int, int]:
    """(draws per item, draws in all) for a GMM fitted on posterior draws of `num_items` items of `dims` dims.

    Several draws per item when the items are few for the dimension (N/K ≥ 2·D per component), so that no
    component is singular; one for a deterministic cache, whose draws would all be the same mean.
    """
    per_item = 1 if deterministic else min(16, max(1, math.ceil(2 * components * dims / max(1, num_items))))
    count = max(2, min(GMM_MAX_DRAWS, GMM_MAX_VALUES // max(1, dims), per_item * num_items))
    return per_item, count


def _as_rows(z: torch.Tensor, name: str = "z") -> torch.Tensor:
    """(N, *shape) -> (N, D) float64 on the CPU, refusing non-finite values."""
    z = torch.as_tensor(z)
    if z.dim() < 2 or z.shape[0] == 0:
        raise LatentPriorError(f"{name} has shape {tuple(z.shape)}: pass latents as (N, *latent_shape) with N ≥ 1.")
    flat = z.detach().reshape(z.shape[0], -1).to("cpu", torch.float64)
    if not torch.isfinite(flat).all():
        raise LatentPriorError(f"{name} holds NaN or inf values; clean the latents (or the cache) before fitting.")
    return flat


class BaselinePrior:
    """Common interface of the baseline priors (see the module docstring)."""

    latent_shape: tuple[int, ...] | None = None

    # -- interface ---------------------------------------------------------------------------
    def fit(self, z: torch.Tensor) -> "BaselinePrior":
        raise NotImplementedError

    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments."""
        raise NotImplementedError

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The fitted state as named tensors (safetensors-compatible)."""
        raise NotImplementedError

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    # -- shared helpers ----------------------------------------------------------------------
    @property
    def dims(self) -> int:
        return int(math.prod(self._fitted_shape()))

    def _fitted_shape(self) -> tuple[int, ...]:
        if self.latent_shape is None:
            raise LatentPriorError(f"{type(self).__name__} is not fitted yet; call .fit(latents) or load_baseline(dir) first.")
        return self.latent_shape

    def _rows_for(self, z: torch.Tensor) -> torch.Tensor:
        shape = self._fitted_shape()
        if tuple(z.shape[1:]) != shape:
            raise LatentPriorError(
                f"z has latent shape {tuple(z.shape[1:])} but this {type(self).__name__} was fitted on {shape}; "
                "pass latents of the fitted shape."
            )
        return _as_rows(z)

    @staticmethod
    def _check_sample_args(n: int, temperature: float) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise LatentPriorError(f"n={n!r}: the number of samples must be a positive integer.")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise LatentPriorError(f"temperature={temperature!r}: pass a finite number ≥ 0 (1.0 samples the prior itself).")

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `baseline.json` (class, config, latent shape) and `baseline.safetensors`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"class": type(self).__name__, "config": self.config(), "latent_shape": list(self._fitted_shape())}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        save_file({k: v.contiguous() for k, v in self.to_tensors().items()}, str(directory / WEIGHTS_NAME))


def load_baseline(directory: str | Path) -> BaselinePrior:
    """Rebuild a baseline saved by `save_pretrained` (JSON + safetensors only)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise LatentPriorError(f"{directory}: expected {CONFIG_NAME} and {WEIGHTS_NAME}; pass a folder written by save_pretrained.")
    meta = json.loads(config_path.read_text())
    cls = BASELINES.get(meta.get("class"))
    if cls is None:
        raise LatentPriorError(f"{config_path}: unknown baseline class {meta.get('class')!r}; expected one of {', '.join(BASELINES)}.")
    prior = cls(**meta.get("config", {}))
    prior.latent_shape = tuple(int(s) for s in meta["latent_shape"])
    prior.load_tensors(load_file(str(weights_path)))
    return prior


# ----------------------------------------------------------------------------------------------


class GaussianPrior(BaselinePrior):
    """The VAE's own prior N(0, I) in normalized latent space; `fit` only records the latent shape."""

    def fit(self, z: torch.Tensor) -> "GaussianPrior":
        _as_rows(z)
        self.latent_shape = tuple(int(s) for s in z.shape[1:])
        return self

    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        self._check_sample_args(n, temperature)
        device = generator.device if generator is not None else torch.device("cpu")
        return temperature * torch.randn((n, *self._fitted_shape()), generator=generator, device=device)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        x = self._rows_for(z)
        out = log_standard_normal(x)
        return out.to(z.dtype if z.is_floating_point() else torch.float64)

    def config(self) -> dict[str, Any]:
        return {}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        # safetensors needs at least one tensor; the shape doubles as a check on load.
        return {"latent_shape": torch.tensor(self._fitted_shape(), dtype=torch.int64)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.latent_shape = tuple(int(s) for s in tensors["latent_shape"].tolist())


# ----------------------------------------------------------------------------------------------


class GMMPrior(BaselinePrior):
    """Gaussian mixture fitted by EM in float64 (the RAE "ex-post" density estimator).

    K components with full (or diagonal) covariances Σ_k + reg_covar·I, initialised by the best of
    `n_init` k-means runs (k-means++ seeding, then Lloyd steps), stopped when the mean log-likelihood
    per sample improves by less than `tol` nats. Densities go through Cholesky factors, so a few
    hundred dimensions (e.g. 4×8×8 = 256) are fine. Degenerate data (collapsed dimensions, fewer
    points than dimensions in a component) is regularized, with a warning, rather than crashing:
    the density is then set by reg_covar along the missing directions, which is why it should be
    fitted on posterior samples (several per image when N/K < D).

    After `fit`: `weights` (K,), `means` (K, D), `covariances` (K, D, D) float64, `log_likelihood_`
    (mean nats per sample, per EM iteration), `n_iter_`, `converged_`, `fit_seconds_`.
    """

    def __init__(
        self,
        n_components: int = 10,
        covariance: str = "full",
        max_iter: int = 200,
        tol: float = 1e-4,
        reg_covar: float = 1e-6,
        seed: int = 0,
        n_init: int = 5,
    ) -> None:
        if not isinstance(n_components, int) or n_components <= 0:
            raise LatentPriorError(f"n_components={n_components!r}: pass a positive integer.")
        if covariance not in ("full", "diag"):
            raise LatentPriorError(f"covariance={covariance!r}: choose 'full' or 'diag'.")
        if not isinstance(max_iter, int) or max_iter <= 0:
            raise LatentPriorError(f"max_iter={max_iter!r}: pass a positive integer.")
        if not isinstance(n_init, int) or n_init <= 0:
            raise LatentPriorError(f"n_init={n_init!r}: pass a positive number of k-means restarts.")
        if not reg_covar > 0:
            raise LatentPriorError(f"reg_covar={reg_covar!r}: pass a positive number (e.g. 1e-6) so covariances stay invertible.")
        self.n_components, self.covariance, self.max_iter = n_components, covariance, max_iter
        self.tol, self.reg_covar, self.seed, self.n_init = float(tol), float(reg_covar), int(seed), n_init
        self.weights: torch.Tensor | None = None
        self.means: torch.Tensor | None = None
        self.covariances: torch.Tensor | None = None
        self._chol: torch.Tensor | None = None
        self.log_likelihood_: list[float] = []
        self.n_iter_, self.converged_, self.fit_seconds_ = 0, False, 0.0

    def config(self) -> dict[str, Any]:
        return {
            "n_components": self.n_components,
            "covariance": self.covariance,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "reg_covar": self.reg_covar,
            "seed": self.seed,
            "n_init": self.n_init,
        }

    # -- fitting -----------------------------------------------------------------------------
    def fit(self, z: torch.Tensor, variances: torch.Tensor | None = None) -> "GMMPrior":
        """EM on z (N, *latent_shape). Returns self.

        With `variances` (N, *latent_shape), z are posterior means μ_i and `variances` the posterior variances σ_i²
        of the same items, and EM fits their aggregate posterior (1/N) Σ_i N(μ_i, diag σ_i²): every M-step adds the
        responsibility-weighted mean of diag σ_i² to a component's covariance. That is EM on infinitely many
        posterior draws per item, for components wide enough that an item's responsibilities are the same for all
        its draws; it costs what EM on the means costs. Without `variances`, pass posterior samples, not means."""
        start = time.perf_counter()
        x = _as_rows(z)
        n, d = x.shape
        k = self.n_components
        if n < k:
            raise LatentPriorError(f"GMMPrior(n_components={k}) got only {n} latents; pass at least {k} or use fewer components.")
        if variances is not None:
            variances = _as_rows(variances, "variances")
            if variances.shape != x.shape or bool((variances < 0).any()):
                raise LatentPriorError(
                    f"variances has shape {tuple(variances.shape)} (or negative values): pass the posterior "
                    f"variances of the same {n} items as z, shape {tuple(z.shape)}, all ≥ 0."
                )
        self.latent_shape = tuple(int(s) for s in z.shape[1:])
        generator = torch.Generator().manual_seed(self.seed)
        resp = self._kmeans_responsibilities(x, generator)
        self._m_step(x, resp, variances)
        if n > 1:
            spread = x.var(0) + (0 if variances is None else variances.mean(0))
            collapsed = int((spread < self.reg_covar).sum())
        else:
            collapsed = d
        if collapsed:
            warnings.warn(
                f"GMMPrior: {collapsed} of {d} latent dims have (near-)zero variance; their density is set by "
                f"reg_covar={self.reg_covar:g}. Fit on posterior samples rather than means if you can.",
                RuntimeWarning,
                stacklevel=2,
            )
        if n / k < d and variances is None:
            warnings.warn(
                f"GMMPrior: {n} latents for {k} components of {d} dims leaves fewer points than dimensions "
                f"per component; covariances are regularized by reg_covar={self.reg_covar:g} along the missing "
                "directions, so held-out log-likelihoods will be poor. Use several posterior draws per image, "
                "fewer components, covariance='diag' or a larger reg_covar (e.g. 1e-2).",
                RuntimeWarning,
                stacklevel=2,
            )
        self.log_likelihood_, self.converged_ = [], False
        for iteration in range(1, self.max_iter + 1):
            log_norm, resp = self._e_step(x)
            self.log_likelihood_.append(log_norm.mean().item())
            self.n_iter_ = iteration
            if iteration > 1 and abs(self.log_likelihood_[-1] - self.log_likelihood_[-2]) < self.tol:
                self.converged_ = True
                break
            self._m_step(x, resp, variances)
        if not self.converged_:
            warnings.warn(
                f"GMMPrior: EM did not converge in max_iter={self.max_iter} iterations (last change "
                f"{abs(self.log_likelihood_[-1] - self.log_likelihood_[-2]) if len(self.log_likelihood_) > 1 else float('nan'):.2e} nats); "
                "raise max_iter or tol.",
                RuntimeWarning,
                stacklevel=2,
            )
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def _kmeans_responsibilities(self, x: torch.Tensor, generator: torch.Generator, max_lloyd: int = 100) -> torch.Tensor:
        """Hard responsibilities (N, K) from the best of `n_init` k-means runs (k-means++ seeding,
        then Lloyd steps until the labels stop changing); best = lowest within-cluster sum of squares."""
        n, k = x.shape[0], self.n_components
        best_labels, best_inertia = None, math.inf
        for _ in range(self.n_init):
            centers = [x[torch.randint(n, (1,), generator=generator).item()]]
            closest = (x - centers[0]).pow(2).sum(1)
            for _ in range(1, k):
                total = closest.sum()
                # All points already sit on a centre (duplicated data): any point will do.
                probs = closest / total if total > 0 else torch.full_like(closest, 1.0 / n)
                index = torch.multinomial(probs, 1, generator=generator).item()
                centers.append(x[index])
                closest = torch.minimum(closest, (x - x[index]).pow(2).sum(1))
            c = torch.stack(centers)
            labels = torch.cdist(x, c).argmin(1)
            for _ in range(max_lloyd):
                counts = torch.bincount(labels, minlength=k).to(x.dtype)
                sums = torch.zeros_like(c).index_add_(0, labels, x)
                filled = counts > 0  # an empty cluster keeps its centre
                c[filled] = sums[filled] / counts[filled, None]
                new_labels = torch.cdist(x, c).argmin(1)
                if torch.equal(new_labels, labels):
                    break
                labels = new_labels
            inertia = (x - c[labels]).pow(2).sum().item()
            if inertia < best_inertia:
                best_labels, best_inertia = labels, inertia
        return torch.nn.functional.one_hot(best_labels, k).to(x.dtype)

    def _m_step(self, x: torch.Tensor, resp: torch.Tensor, variances: torch.Tensor | None = None) -> None:
        n, d = x.shape
        counts = resp.sum(0) + 10 * torch.finfo(x.dtype).eps  # an empty component keeps weight ~0
        self.weights = counts / n
        self.means = (resp.T @ x) / counts[:, None]
        eye = torch.eye(d, dtype=x.dtype)
        covs = []
        for j in range(self.n_components):
            centered = x - self.means[j]
            if self.covariance == "full":
                cov = (resp[:, j, None] * centered).T @ centered / counts[j]
            else:
                cov = torch.diag((resp[:, j, None] * centered.pow(2)).sum(0) / counts[j])
            covs.append(cov + self.reg_covar * eye)
        self.covariances = torch.stack(covs)
        if variances is not None:
            self.covariances += torch.diag_embed((resp.T @ variances) / counts[:, None])
        self._chol = self._cholesky(self.covariances)

    def _cholesky(self, covs: torch.Tensor) -> torch.Tensor:
        """Cholesky factors, adding jitter (×10 each try) where float64 rounding breaks definiteness."""
        chol, info = torch.linalg.cholesky_ex(covs)
        jitter = self.reg_covar
        eye = torch.eye(covs.shape[-1], dtype=covs.dtype)
        for _ in range(12):
            if not (info > 0).any():
                return chol
            bad = info > 0
            jitter *= 10
            covs[bad] = covs[bad] + jitter * eye
            chol, info = torch.linalg.cholesky_ex(covs)
            warnings.warn(f"GMMPrior: added jitter {jitter:g} to {int(bad.sum())} singular covariance(s).", RuntimeWarning, stacklevel=3)
        raise LatentPriorError("GMMPrior: covariances stayed singular after regularization; raise reg_covar (e.g. 1e-3).")

    def _component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log π_k + log N(x; μ_k, Σ_k) for every row and component: (N, D) -> (N, K) float64."""
        d = x.shape[1]
        out = torch.empty(x.shape[0], self.n_components, dtype=torch.float64)
        log_det = 2.0 * torch.log(torch.diagonal(self._chol, dim1=-2, dim2=-1)).sum(-1)
        for j in range(self.n_components):
            centered = (x - self.means[j]).T  # (D, N)
            white = torch.linalg.solve_triangular(self._chol[j], centered, upper=False)
            maha = white.pow(2).sum(0)
            out[:, j] = torch.log(self.weights[j]) - 0.5 * (maha + log_det[j] + d * math.log(2 * math.pi))
        return out

    def _e_step(self, x: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        log_norms, resps = [], []
        for rows in x.split(chunk):
            joint = self._component_log_prob(rows)
            log_norm = torch.logsumexp(joint, dim=1)
            log_norms.append(log_norm)
            resps.append(torch.exp(joint - log_norm[:, None]))
        return torch.cat(log_norms), torch.cat(resps)

    # -- using the fit -----------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.means is None:
            raise LatentPriorError("GMMPrior is not fitted yet; call .fit(latents) or load_baseline(dir) first.")

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """(N, *latent_shape) -> (N,) log-density in nats (computed in float64, returned in z's dtype)."""
        self._check_fitted()
        x = self._rows_for(z)
        out = torch.cat([torch.logsumexp(self._component_log_prob(rows), dim=1) for rows in x.split(8192)])
        return out.to(z.dtype if z.is_floating_point() else torch.float64)

    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """(n, *latent_shape) float32: a component k ~ π, then μ_k + T·L_k ε."""
        self._check_fitted()
        self._check_sample_args(n, temperature)
        if generator is not None and generator.device.type != "cpu":
            raise LatentPriorError(
                "GMMPrior.sample: pass a CPU torch.Generator (the mixture lives on the CPU); move the samples afterwards."
            )
        components = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        z = torch.empty_like(eps)
        # Per component, not per sample: gathering a D×D factor for every sample would cost n·D² memory.
        for j in components.unique().tolist():
            rows = components == j
            z[rows] = self.means[j] + temperature * eps[rows] @ self._chol[j].T
        return z.float().reshape(n, *self._fitted_shape())

    def scaled(self, scale: torch.Tensor) -> "GMMPrior":
        """This GMM's image under x ↦ scale ⊙ x (scale (D,) > 0): the same components in rescaled coordinates (a copy).
        Its densities, and the `log_likelihood_` history, shift by −Σ log scale nats."""
        self._check_fitted()
        c = torch.as_tensor(scale).detach().double().cpu().flatten()
        if c.shape != (self.dims,) or not bool((c > 0).all()):
            raise LatentPriorError(f"GMMPrior.scaled: pass {self.dims} positive scales, one per dim; got shape {tuple(c.shape)}.")
        out = copy.copy(self)
        out.means = self.means * c
        out.covariances = self.covariances * c[:, None] * c[None, :]
        out._chol = self._chol * c[:, None]  # diag(c)·L stays lower triangular
        shift = float(c.log().sum())
        out.log_likelihood_ = [v - shift for v in self.log_likelihood_]
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {"weights": self.weights, "means": self.means, "covariances": self.covariances}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.weights = tensors["weights"].double()
        self.means = tensors["means"].double()
        self.covariances = tensors["covariances"].double()
        if self.means.shape != (self.n_components, self.dims) or self.covariances.shape[1:] != (self.dims, self.dims):
            raise LatentPriorError(
                f"{WEIGHTS_NAME}: tensor shapes {tuple(self.means.shape)} / {tuple(self.covariances.shape)} do not match "
                f"{self.n_components} components of {self.dims} dims; the file does not belong to its {CONFIG_NAME}."
            )
        self._chol = self._cholesky(self.covariances.clone())


BASELINES: dict[str, type[BaselinePrior]] = {"GaussianPrior": GaussianPrior, "GMMPrior": GMMPrior}

# The flow-matching baseline subclasses BaselinePrior, so its module imports this one and registers itself in
# BASELINES; importing it here, after BASELINES exists, is what lets load_baseline rebuild it.
import latent_prior.flow_matching  # noqa: E402,F401
