"""Normalizing flows: the sampler q_φ of the EVaLP prior, with an exact log-density.

A flow is an invertible map z = f(ε) from base noise ε ~ N(0, T²·I) (flattened, (N, D)) to latents
z (N, *latent_shape) in normalized latent space. log q(z) is exact by the change of variables,

    log q(z) = log N(ε; 0, T²·I) + log |det ∂ε/∂z|,    ε = f⁻¹(z),

in nats per latent (summed over all D dimensions). Three families:

* `RealNVP`: flat latents (D,) (any shape is flattened). Each block is ActNorm -> invertible
  linear map (LU-parameterized, mixes all dimensions) -> coupling; couplings alternate which half
  they transform. The coupling is affine (RealNVP/Glow) or a rational-quadratic spline (NSF,
  Durkan et al. 2019) with `coupling="spline"`.
* `MultiScaleFlow`: spatial latents (C, H, W), RealNVP/Glow multi-scale: at each scale,
  checkerboard affine couplings, squeeze (space-to-depth), ActNorm + invertible 1×1 conv +
  channel-wise affine couplings, then half the channels are factored out to the base.
* `SubspaceFlow`: many latent dims (4×16×16 to 4×64×64): a fixed rotation onto the latents' principal axes
  (`PrincipalBasis`), a `RealNVP` with its mixture base on the leading whitened axes, and a diagonal Gaussian per
  mixture component on the rest.

ActNorm, never BatchNorm: log q(z) of a sample must not depend on the rest of its batch. ActNorm's
data-dependent init runs once, through `Flow.initialize(z)`, and is recorded in the `initialized`
buffer so a reloaded flow is not re-initialized. Every coupling's last layer starts at zero, so a
fresh flow is the identity after its ActNorms.

Every layer maps data -> base in `forward(x) -> (y, log|det ∂y/∂x|)` and base -> data in
`inverse(y) -> (x, log|det ∂x/∂y|)`; log-determinants are per sample, shape (N,).
Each flow keeps its constructor arguments in `self.config` (JSON-able) and `build_flow(**flow.config)`
rebuilds it.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from latent_prior.errors import LatentPriorError, checked_kind
from latent_prior.sampling import log_standard_normal

__all__ = [
    "Flow",
    "RealNVP",
    "MultiScaleFlow",
    "SubspaceFlow",
    "PrincipalBasis",
    "build_flow",
    "FLOW_KINDS",
    "ActNorm",
    "InvertibleLinear",
    "optimizer_groups",
]

FLOW_KINDS = ("auto", "realnvp", "spline", "multiscale", "subspace")
#: Covariances of a mixture base's components, and how the mixture is initialized from the `initialize`
#: batch: "kmeans" (centroids, per-cluster std, diagonal only) or "em" (the GMM that EM fits, as
#: `latent_prior.baselines.GMMPrior` does for the baseline that the prior must beat).
BASE_COVARIANCES = ("diag", "full")
BASE_INITS = ("kmeans", "em")

_LOG_2PI = math.log(2 * math.pi)
# K·D² values of a full-covariance base (40 MB of float32): beyond that, diagonal components.
_MAX_FULL_BASE_VALUES = 10 * 1024**2
# Affine couplings bound their log-scale softly to (−2, 2) per layer: enough range when stacked,
# and no exp() overflow when a badly trained conditioner outputs huge values.
_AFFINE_LOG_SCALE_BOUND = 2.0
# Floor on the std ActNorm divides by at init, so a collapsed (constant) latent dimension cannot
# produce an astronomically large log-density.
_ACTNORM_MIN_STD = 1e-3
# Rational-quadratic spline: minimum bin width / height / knot derivative (as in NSF), for stability.
_RQ_MIN_BIN = 1e-3
_RQ_MIN_DERIVATIVE = 1e-3


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    try:
        as_int = operator.index(value)  # accepts numpy integers, rejects floats and strings
    except TypeError:
        as_int = None
    if isinstance(value, bool) or as_int is None or as_int < minimum:
        raise LatentPriorError(f"{name}={value!r} must be an integer >= {minimum}.")
    return as_int


def _latent_shape(latent_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in latent_shape)
    except (TypeError, ValueError):
        raise LatentPriorError(f"latent_shape={latent_shape!r} is not a sequence of integers; pass e.g. (8,) or (4, 32, 32).") from None
    if not shape or any(s < 1 for s in shape) or any(int(s) != s for s in latent_shape):
        raise LatentPriorError(
            f"latent_shape={latent_shape!r} must be a non-empty sequence of positive integers, e.g. (8,) or (4, 32, 32)."
        )
    return shape


def _sum_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


# ---------------------------------------------------------------------------------------------
# Elementwise transforms used by the couplings: params (..., P) -> y, log|dy/dx| (same shape as x)
# ---------------------------------------------------------------------------------------------


class AffineTransform:
    """y = x·exp(s) + t with s = B·tanh(raw / B) (soft-bounded log-scale). 2 params per element."""

    num_params = 2

    @staticmethod
    def _split(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = _AFFINE_LOG_SCALE_BOUND
        return b * torch.tanh(params[..., 0] / b), params[..., 1]

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_s, t = self._split(params)
        return x * torch.exp(log_s) + t, log_s

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_s, t = self._split(params)
        return (y - t) * torch.exp(-log_s), -log_s


class RationalQuadraticSplineTransform:
    """Monotone rational-quadratic spline on [−B, B], identity outside (linear tails).

    Durkan et al. 2019, "Neural Spline Flows", with the knot derivatives at ±B pinned to 1 so the
    map is C¹ at the tails. 3K − 1 params per element: K widths, K heights, K − 1 inner derivatives.
    All-zero params give the identity (uniform bins, unit derivatives).
    """

    def __init__(self, num_bins: int, tail_bound: float) -> None:
        self.num_bins = num_bins
        self.tail_bound = float(tail_bound)
        self.num_params = 3 * num_bins - 1
        # softplus(raw + shift) + min = 1 at raw = 0, so zero params give unit derivatives.
        self._derivative_shift = math.log(math.expm1(1.0 - _RQ_MIN_DERIVATIVE))

    def _knots(self, raw: torch.Tensor) -> torch.Tensor:
        """Unnormalized bin sizes (..., K) -> knot positions (..., K + 1) from −B to B."""
        k, b = self.num_bins, self.tail_bound
        sizes = _RQ_MIN_BIN + (1 - _RQ_MIN_BIN * k) * torch.softmax(raw, dim=-1)
        inner = -b + 2 * b * torch.cumsum(sizes, dim=-1)[..., :-1]
        ends = torch.full_like(raw[..., :1], b)
        return torch.cat([-ends, inner, ends], dim=-1)

    def _spline(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.num_bins
        xk = self._knots(params[..., :k])
        yk = self._knots(params[..., k : 2 * k])
        inner = _RQ_MIN_DERIVATIVE + F.softplus(params[..., 2 * k :] + self._derivative_shift)
        ones = torch.ones_like(inner[..., :1])
        return xk, yk, torch.cat([ones, inner, ones], dim=-1)

    @staticmethod
    def _bin(knots: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        idx = torch.searchsorted(knots.contiguous(), v.unsqueeze(-1).contiguous(), right=True) - 1
        return idx.clamp(0, knots.shape[-1] - 2)

    @staticmethod
    def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return t.gather(-1, idx).squeeze(-1)

    def _bin_quantities(self, params: torch.Tensor, v: torch.Tensor, by_output: bool):
        xk, yk, d = self._spline(params)
        idx = self._bin(yk if by_output else xk, v)
        x0, x1 = self._gather(xk, idx), self._gather(xk, idx + 1)
        y0, y1 = self._gather(yk, idx), self._gather(yk, idx + 1)
        d0, d1 = self._gather(d, idx), self._gather(d, idx + 1)
        w, h = x1 - x0, y1 - y0
        return x0, y0, w, h, h / w, d0, d1

    @staticmethod
    def _log_derivative(xi, s, d0, d1):
        one_minus = 1 - xi
        denom = s + (d0 + d1 - 2 * s) * xi * one_minus
        numer = s.pow(2) * (d1 * xi.pow(2) + 2 * s * xi * one_minus + d0 * one_minus.pow(2))
        return torch.log(numer) - 2 * torch.log(denom)

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.tail_bound
        inside = (x > -b) & (x < b)
        xc = x.clamp(-b, b)  # evaluate the spline everywhere on clamped inputs, keep it where inside
        x0, y0, w, h, s, d0, d1 = self._bin_quantities(params, xc, by_output=False)
        xi = ((xc - x0) / w).clamp(0, 1)
        one_minus = 1 - xi
        y = y0 + h * (s * xi.pow(2) + d0 * xi * one_minus) / (s + (d0 + d1 - 2 * s) * xi * one_minus)
        log_det = self._log_derivative(xi, s, d0, d1)
        return torch.where(inside, y, x), torch.where(inside, log_det, torch.zeros_like(log_det))

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.tail_bound
        inside = (y > -b) & (y < b)
        yc = y.clamp(-b, b)
        x0, y0, w, h, s, d0, d1 = self._bin_quantities(params, yc, by_output=True)
        # Solve the rational-quadratic for ξ: a ξ² + b ξ + c = 0, the root in [0, 1].
        dy = yc - y0
        slope_sum = d0 + d1 - 2 * s
        qa = h * (s - d0) + dy * slope_sum
        qb = h * d0 - dy * slope_sum
        qc = -s * dy
        disc = (qb.pow(2) - 4 * qa * qc).clamp_min(0)
        xi = ((2 * qc) / (-qb - torch.sqrt(disc))).clamp(0, 1)
        x = x0 + xi * w
        log_det = -self._log_derivative(xi, s, d0, d1)
        return torch.where(inside, x, y), torch.where(inside, log_det, torch.zeros_like(log_det))


# ---------------------------------------------------------------------------------------------
# Layers: forward(x) -> (y, log|det ∂y/∂x|), inverse(y) -> (x, log|det ∂x/∂y|), data -> base
# ---------------------------------------------------------------------------------------------


class ActNorm(nn.Module):
    """Per-feature affine y = (x + bias)·exp(log_scale) on dim 1 of (N, F) or (N, F, H, W).

    Data-dependent init (Kingma & Dhariwal 2018): when the owning flow runs `initialize`, the
    first forward pass sets bias and log_scale so that the outputs of that batch have zero mean and
    unit variance per feature. Afterwards it is an ordinary per-feature affine map: no batch statistics.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.pending_init = False  # set by Flow.initialize for exactly one pass

    @staticmethod
    def _view(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p.view(1, -1, *([1] * (x.dim() - 2)))

    def _log_det(self, x: torch.Tensor) -> torch.Tensor:
        pixels = math.prod(x.shape[2:])
        return (self.log_scale.sum() * pixels).expand(x.shape[0])

    @torch.no_grad()
    def _data_init(self, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims)
        std = x.std(dim=dims, correction=0).clamp_min(_ACTNORM_MIN_STD)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std))
        self.pending_init = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending_init:
            self._data_init(x)
        y = (x + self._view(self.bias, x)) * torch.exp(self._view(self.log_scale, x))
        return y, self._log_det(x)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = y * torch.exp(-self._view(self.log_scale, y)) - self._view(self.bias, y)
        return x, -self._log_det(y)


class InvertibleLinear(nn.Module):
    """Learned invertible linear map on dim 1 (features, or channels as a 1×1 conv; Glow).

    LU-parameterized, W = P·L·(U + diag(sign·exp(log_s))), so log|det W| = Σ log_s is cheap and W
    stays invertible. Initialized to a random rotation (log|det| = 0), which mixes all features.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        n = num_features
        q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
        perm, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("perm", perm.float())
        self.register_buffer("sign_s", torch.sign(diag).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(n, n), -1), persistent=False)
        self.register_buffer("eye", torch.eye(n), persistent=False)
        self.lower = nn.Parameter(torch.tril(lower, -1).float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(diag.abs()).float())

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    @staticmethod
    def _mix(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        w = w.to(x.dtype)
        if x.dim() == 2:
            return x @ w.T
        return F.conv2d(x, w.view(*w.shape, 1, 1))

    def _log_det(self, x: torch.Tensor) -> torch.Tensor:
        return (self.log_s.sum() * math.prod(x.shape[2:])).expand(x.shape[0])

    def _perm_index(self) -> torch.Tensor:
        # P·M = M[index] and M·Pᵀ = M[:, index]: a gather instead of a product with a 0/1 matrix (the same values).
        return self.perm.argmax(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lower, upper = self._factors()
        return self._mix(x, (lower @ upper)[self._perm_index()]), self._log_det(x)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # W⁻¹ = U⁻¹ L⁻¹ Pᵀ by triangular solves, in float32 at least (solves do not run in half).
        dtype = torch.promote_types(self.log_s.dtype, torch.float32)
        lower, upper = (f.to(dtype) for f in self._factors())
        eye = self.eye.to(dtype)
        lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        upper_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        return self._mix(y, (upper_inv @ lower_inv)[:, self._perm_index()]), -self._log_det(y)


def _mlp(in_features: int, out_features: int, hidden: int, num_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(num_layers):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    last = nn.Linear(width, out_features)
    nn.init.zeros_(last.weight)  # the coupling starts as the identity
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


def _convnet(in_channels: int, out_channels: int, hidden: int) -> nn.Sequential:
    """3×3 -> 1×1 -> 3×3 conv conditioner (Glow's), SiLU, no normalization, zero-initialized output."""
    last = nn.Conv2d(hidden, out_channels, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, hidden, 1), nn.SiLU(), last)


class ChannelCoupling(nn.Module):
    """Coupling along dim 1: one part conditions, the other is transformed elementwise.

    Dim 1 is split at F // 2; `flip=False` transforms the second part, `flip=True` the first, so
    consecutive couplings with alternating `flip` transform every feature. Works on (N, F) with an
    MLP conditioner and on (N, F, H, W) with a conv conditioner (`make_net(in, out)` builds it).
    """

    def __init__(self, num_features: int, flip: bool, transform, make_net: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        self.split = num_features // 2
        self.flip = flip
        self.transform = transform
        n_cond = num_features - self.split if flip else self.split
        self.n_trans = num_features - n_cond
        self.net = make_net(n_cond, self.n_trans * transform.num_params)

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = x[:, : self.split], x[:, self.split :]
        return (second, first) if self.flip else (first, second)  # (conditioning, transformed)

    def _join(self, cond: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        return torch.cat([trans, cond] if self.flip else [cond, trans], dim=1)

    def _params(self, cond: torch.Tensor) -> torch.Tensor:
        out = self.net(cond)  # (N, n_trans·P, ...) -> (N, n_trans, ..., P)
        return out.view(out.shape[0], self.n_trans, self.transform.num_params, *out.shape[2:]).movedim(2, -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond, trans = self._parts(x)
        y, log_det = self.transform.forward(trans, self._params(cond))
        return self._join(cond, y), _sum_per_sample(log_det)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond, trans = self._parts(y)
        x, log_det = self.transform.inverse(trans, self._params(cond))
        return self._join(cond, x), _sum_per_sample(log_det)


class CheckerboardCoupling(nn.Module):
    """Affine coupling on (N, C, H, W) with a spatial checkerboard mask (RealNVP).

    Pixels with (i + j) % 2 == parity condition; the others are transformed. The conditioner sees
    the masked input plus the mask itself, so it knows which pixels it may read.
    """

    def __init__(self, channels: int, hidden: int, parity: int) -> None:
        super().__init__()
        self.parity = parity
        self.transform = AffineTransform()
        self.net = _convnet(channels + 1, channels * self.transform.num_params, hidden)

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        i = torch.arange(h, device=x.device).view(h, 1)
        j = torch.arange(w, device=x.device).view(1, w)
        return ((i + j) % 2 == self.parity).view(1, 1, h, w)  # True where conditioning

    def _params(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(x.dtype).expand(x.shape[0], 1, *x.shape[2:])
        out = self.net(torch.cat([x * m, m], dim=1))
        return out.view(x.shape[0], x.shape[1], self.transform.num_params, *x.shape[2:]).movedim(2, -1)

    def _couple(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self._mask(x)
        params = self._params(x, mask)  # the conditioning pixels are the same on both sides
        step = self.transform.inverse if inverse else self.transform.forward
        y, log_det = step(x, params)
        y = torch.where(mask, x, y)
        return y, _sum_per_sample(torch.where(mask, torch.zeros_like(log_det), log_det))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._couple(x, inverse=False)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._couple(y, inverse=True)


def squeeze2x2(x: torch.Tensor) -> torch.Tensor:
    """Space-to-depth: (N, C, H, W) -> (N, 4C, H/2, W/2); volume preserving (log-det 0)."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze2x2(x: torch.Tensor) -> torch.Tensor:
    """Depth-to-space, the inverse of `squeeze2x2`: (N, 4C, H, W) -> (N, C, 2H, 2W)."""
    n, c4, h, w = x.shape
    c = c4 // 4
    x = x.view(n, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c, 2 * h, 2 * w)


def _run(layers: Sequence[nn.Module], x: torch.Tensor, log_det: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for layer in layers:
        x, ld = layer(x)
        log_det = log_det + ld
    return x, log_det


def _run_inverse(layers: Sequence[nn.Module], y: torch.Tensor, log_det: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for layer in reversed(layers):
        y, ld = layer.inverse(y)
        log_det = log_det + ld
    return y, log_det


# ---------------------------------------------------------------------------------------------
# Flows
# ---------------------------------------------------------------------------------------------


class Flow(nn.Module):
    """Base class: a bijection between latents (N, *latent_shape) and base noise ε (N, D).

    Subclasses implement `to_base(z) -> (ε, log|det ∂ε/∂z|)` and `from_base(ε) -> (z, log|det ∂z/∂ε|)`.
    The base distribution is N(0, I) (`base_components=1`) or a learned mixture of K Gaussians
    (`base_components=K`) with diagonal or full covariances (`base_covariance`), initialized on the codes
    of the `initialize` batch by k-means or by EM (`base_init`).
    A mixture base lets the flow keep separate modes apart: from one Gaussian, a continuous bijection
    must join them by thin bridges whose samples decode to blends of two digits. With full covariances and
    EM, a fresh flow (affine: ActNorms, rotations and identity couplings) IS the GMM fitted to that batch,
    so training starts from the baseline the prior must beat.
    Each component is an affine map of standard noise, u = μ_k + L_k·ξ (L_k = diag σ_k, or lower
    triangular with a positive diagonal): `from_standard` / `to_standard`.
    Sampling draws ε from the base with its noise scaled by `temperature` T (component means stay put;
    with K = 1 that is ε ~ N(0, T²·I)). Device and dtype follow the module's parameters.
    """

    config: dict[str, Any]

    def __init__(
        self, latent_shape: Sequence[int], base_components: int = 1, base_covariance: str = "diag", base_init: str = "kmeans"
    ) -> None:
        super().__init__()
        self.latent_shape = _latent_shape(latent_shape)
        self.dim = math.prod(self.latent_shape)
        self.base_components = _positive_int("base_components", base_components)
        if base_covariance not in BASE_COVARIANCES:
            raise LatentPriorError(f"base_covariance={base_covariance!r} is unknown; choose one of {', '.join(BASE_COVARIANCES)}.")
        if base_init not in BASE_INITS:
            raise LatentPriorError(f"base_init={base_init!r} is unknown; choose one of {', '.join(BASE_INITS)}.")
        if base_covariance == "full" and base_init == "kmeans":
            raise LatentPriorError("base_covariance='full' needs base_init='em' (k-means gives no covariances).")
        if base_covariance == "full" and self.base_components > 1 and self.base_components * self.dim**2 > _MAX_FULL_BASE_VALUES:
            raise LatentPriorError(
                f"a full-covariance base of {self.base_components} components in {self.dim} dims needs "
                f"{self.base_components * self.dim**2:,} parameters; use base_covariance='diag' or fewer components."
            )
        self.base_covariance, self.base_init = base_covariance, base_init
        if self.base_components > 1:
            k = self.base_components
            self.base_means = nn.Parameter(torch.zeros(k, self.dim))
            self.base_log_scales = nn.Parameter(torch.zeros(k, self.dim))  # diag: log σ_k; full: s_k (below)
            self.base_logits = nn.Parameter(torch.zeros(k))
            if base_covariance == "full":
                # L_k = G_k·(I + A_k)·diag(exp(s_k)): G_k, the EM fit's Cholesky factor, is fixed, and training moves
                # the unit-lower-triangular A_k and s_k in G_k's whitened coordinates. Adam steps each entry by
                # about the learning rate whatever its gradient, so steps taken on L_k itself overwhelm its
                # smallest singular values (1e-3 along nearly deterministic directions) and L_k⁻¹ overflows
                # within a few steps; in whitened coordinates a step is a relative change.
                self.base_tril = nn.Parameter(torch.zeros(k, self.dim, self.dim))  # A_k below its diagonal
                self.register_buffer("base_tril_fit", torch.eye(self.dim).repeat(k, 1, 1))  # G_k
                self.register_buffer("base_tril_mask", torch.tril(torch.ones(self.dim, self.dim), -1), persistent=False)
        # uint8, not bool: gloo (Accelerate on CPU) can broadcast it, and .to(dtype) leaves it alone.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))

    # -- to be implemented ------------------------------------------------------------------
    def to_base(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def from_base(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- shared API ---------------------------------------------------------------------------
    @property
    def is_initialized(self) -> bool:
        return bool(self.initialized.item())

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.parameters())
        return p.device, p.dtype

    def _check_latents(self, z: torch.Tensor, what: str) -> None:
        if not isinstance(z, torch.Tensor) or z.dim() < 1 or tuple(z.shape[1:]) != self.latent_shape:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise LatentPriorError(
                f"{what} got latents of shape {got}, expected (N, {', '.join(map(str, self.latent_shape))}); "
                "check that the latents come from the VAE this flow was built for."
            )

    @staticmethod
    def _check_temperature(temperature: float) -> float:
        try:
            t = float(temperature)
        except (TypeError, ValueError):
            t = float("nan")
        if isinstance(temperature, bool) or not (math.isfinite(t) and t > 0):
            raise LatentPriorError(f"temperature={temperature!r} must be a positive finite number (1.0 samples the flow as trained).")
        return t

    def base_log_prob(self, eps: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log-density of the base at ε (N, D) -> (N,) nats: N(ε; 0, T²·I), or the mixture
        Σ_k π_k N(ε; μ_k, T²·L_k L_kᵀ)."""
        t = float(temperature)
        if self.base_components == 1:
            return log_standard_normal(eps / t) - self.dim * math.log(t)
        return torch.logsumexp(self.component_log_probs(eps, t), dim=1)

    def base_scale_tril(self) -> torch.Tensor:
        """The full-covariance base's factors L_k = G_k·(I + A_k)·diag(exp(s_k)) (K, D, D), lower triangular."""
        relative = self.base_tril * self.base_tril_mask + torch.diag_embed(torch.exp(self.base_log_scales))
        return self.base_tril_fit.to(relative.dtype) @ relative

    def component_log_probs(self, eps: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log π_k + log N(ε; μ_k, T²·L_k L_kᵀ) for each component of a mixture base: ε (N, D) -> (N, K) nats."""
        t = float(temperature)
        log_scales = self.base_log_scales + math.log(t)  # (K, D)
        if self.base_covariance == "full":
            dtype = torch.promote_types(eps.dtype, torch.float32)  # triangular solves do not run in half
            diff = (eps.to(dtype)[None] - self.base_means.to(dtype)[:, None]).transpose(1, 2)  # (K, D, N)
            white = torch.linalg.solve_triangular(self.base_scale_tril().to(dtype), diff, upper=False)
            maha = white.pow(2).sum(1).T.to(eps.dtype) / t**2  # (N, K)
            log_det = log_scales.sum(1) + torch.diagonal(self.base_tril_fit, dim1=-2, dim2=-1).log().sum(1).to(log_scales.dtype)
        else:
            d = (eps[:, None, :] - self.base_means[None]) * torch.exp(-log_scales)[None]  # (N, K, D)
            maha = d.pow(2).sum(2)
            log_det = log_scales.sum(1)
        per_component = -0.5 * maha - log_det[None] - 0.5 * self.dim * _LOG_2PI
        return torch.log_softmax(self.base_logits, 0)[None] + per_component

    def from_standard(self, xi: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
        """u = μ_k + L_k·ξ per row: standard noise ξ (N, D) of components k (N,) -> base codes (N, D), in ξ's
        dtype and differentiable in ξ; ξ itself for an N(0, I) base or k None."""
        if self.base_components == 1 or k is None:
            return xi
        means = self.base_means.to(xi.dtype)[k]
        if self.base_covariance == "diag":
            return means + xi * torch.exp(self.base_log_scales.to(xi.dtype))[k]
        tril = self.base_scale_tril().to(xi.dtype)
        out = torch.zeros_like(xi)
        # Per component, not per row: gathering a D×D factor for every row would cost N·D² memory.
        for j in k.unique().tolist():
            rows = (k == j).nonzero().squeeze(1)
            out = out.index_put((rows,), xi[rows] @ tril[j].T)
        return means + out

    def to_standard(self, u: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
        """ξ = L_k⁻¹·(u − μ_k) per row, the inverse of `from_standard`."""
        if self.base_components == 1 or k is None:
            return u
        centered = u - self.base_means.to(u.dtype)[k]
        if self.base_covariance == "diag":
            return centered * torch.exp(-self.base_log_scales.to(u.dtype))[k]
        tril = self.base_scale_tril().to(u.dtype)
        out = torch.zeros_like(u)
        for j in k.unique().tolist():
            rows = (k == j).nonzero().squeeze(1)
            out = out.index_put((rows,), torch.linalg.solve_triangular(tril[j], centered[rows].T, upper=False).T)
        return out

    def sample_components(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n component indices (n,) of a mixture base, drawn from its weights on the generator's device (like
        the base noise, so a seed gives the same draws wherever the flow lives), then moved to the flow's."""
        device, _ = self._device_dtype()
        where = generator.device if generator is not None else device
        probs = torch.softmax(self.base_logits.detach().float(), 0).to(where)
        return torch.multinomial(probs, n, replacement=True, generator=generator).to(device)

    def sample_base(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """n draws ε (n, D) of the base distribution, its noise scaled by `temperature` (see the class)."""
        noise = self._base_noise(n, generator) * float(temperature)
        if self.base_components == 1 or n == 0:
            return noise
        return self.from_standard(noise, self.sample_components(n, generator))

    def log_prob(self, z: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        """Exact log q(z) in nats, (N, *latent_shape) -> (N,); `temperature` T gives the density of
        the flow driven by ε ~ N(0, T²·I), the distribution `sample(..., temperature=T)` draws from."""
        self._check_latents(z, "Flow.log_prob")
        t = self._check_temperature(temperature)
        eps, log_det = self.to_base(z)
        return self.base_log_prob(eps, t) + log_det

    def _base_noise(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        device, dtype = self._device_dtype()
        # Draw in float32 on the generator's own device (a CPU generator may drive a CUDA flow),
        # then move: the same seed gives the same samples wherever the flow lives.
        where = generator.device if generator is not None else device
        eps = torch.randn(n, self.dim, generator=generator, device=where, dtype=torch.float32)
        return eps.to(device=device, dtype=dtype)

    def sample_and_log_prob(
        self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n latents and their exact log-density in one pass.

        Returns z (n, *latent_shape) and log_q (n,), the log-density (nats) of the distribution
        actually sampled (base N(0, T²·I)). Differentiable with respect to the flow's parameters
        (reparameterized), for the reverse-KL sampler loss.
        """
        n = _positive_int("n", n, minimum=0)
        t = self._check_temperature(temperature)
        eps = self.sample_base(n, generator=generator, temperature=t)
        z, log_det = self.from_base(eps)
        return z, self.base_log_prob(eps, t) - log_det

    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Draw n latents (n, *latent_shape) in normalized latent space."""
        return self.sample_and_log_prob(n, generator=generator, temperature=temperature)[0]

    @torch.no_grad()
    def initialize(self, z: torch.Tensor, *, force: bool = False, mixture: Any = None) -> bool:
        """Data-dependent ActNorm init from a batch of normalized posterior samples (N, *latent_shape), then
        a mixture base's k-means or EM on the batch's base codes (`base_init`).

        `mixture`: instead of that EM, a full-covariance `GMMPrior` already fitted in latent space (to these
        latents or any others) for a full base of as many components. The base becomes its image under the
        fresh flow, which is affine, so the initialized flow is exactly that GMM: a caller that chose a GMM
        on held-out data starts training from the very model it scored.

        Runs once: the `initialized` buffer is saved with the weights, so a reloaded flow is left
        alone (returns False). `force=True` re-initializes. Returns True when it initialized.
        In a distributed run, initialize before wrapping the model (DDP then broadcasts rank 0's values).
        """
        if self.is_initialized and not force:
            return False
        self._check_latents(z, "Flow.initialize")
        if z.shape[0] < 2:
            raise LatentPriorError(f"Flow.initialize needs a batch of at least 2 latents, got {z.shape[0]}; pass a larger batch.")
        if not torch.isfinite(z).all():
            raise LatentPriorError("Flow.initialize got non-finite latents; check the cache for NaN/inf values.")
        device, dtype = self._device_dtype()
        actnorms = [m for m in self.modules() if isinstance(m, ActNorm)]
        for m in actnorms:
            m.pending_init = True
        try:
            eps, _ = self.to_base(z.to(device=device, dtype=dtype))
        finally:
            for m in actnorms:
                m.pending_init = False
        if mixture is not None:
            self._set_mixture(mixture)
        elif self.base_components > 1:
            (self._initialize_mixture_em if self.base_init == "em" else self._initialize_mixture)(eps.float())
        self.initialized.fill_(1)
        return True

    @torch.no_grad()
    def _set_mixture(self, gmm: Any) -> None:
        """Full base = the image of a latent-space GMM under this (affine, freshly initialized) flow: each mean
        μ_k maps to T(μ_k), and each factor L_k to the Cholesky factor of (J L_k)(J L_k)ᵀ, where the columns
        J L_k = T(μ_k + L_k e_i) − T(μ_k) come from one float64 pass of a copy of the flow."""
        if self.base_covariance != "full" or getattr(gmm, "covariance", None) != "full" or gmm.means is None:
            raise LatentPriorError(
                "Flow.initialize(mixture=...) needs a fitted full-covariance GMMPrior and a flow with base_covariance='full'."
            )
        k, dim = gmm.means.shape
        if dim != self.dim or k > self.base_components:
            raise LatentPriorError(
                f"Flow.initialize(mixture=...) got a GMM of {k} components in {dim} dims for a base of "
                f"{self.base_components} components in {self.dim}; fit the GMM on this flow's latents with at most as many components."
            )
        device, _ = self._device_dtype()
        exact = copy.deepcopy(self).to(device="cpu", dtype=torch.float64)
        means, chol = gmm.means.double().cpu(), gmm._chol.double().cpu()  # (k, D), (k, D, D) lower triangular
        points = torch.cat([means[:, None], means[:, None] + chol.transpose(1, 2)], 1)  # (k, D+1, D)
        codes, _ = exact.to_base(points.reshape(-1, *self.latent_shape))
        codes = codes.reshape(k, dim + 1, dim)
        columns = (codes[:, 1:] - codes[:, :1]).transpose(1, 2)  # (k, D, D): J·L_k
        weights = torch.full((self.base_components,), 1e-8, dtype=torch.float64)
        weights[:k] = gmm.weights.double().cpu().clamp_min(1e-8)
        self.base_means.zero_()
        self.base_means[:k] = codes[:, 0].to(self.base_means)
        self.base_log_scales.zero_()
        self.base_logits.copy_(weights.log().to(self.base_logits))
        self.base_tril.zero_()
        self.base_tril_fit.copy_(torch.eye(self.dim).repeat(self.base_components, 1, 1))
        self.base_tril_fit[:k] = torch.linalg.cholesky(columns @ columns.transpose(1, 2)).to(self.base_tril_fit)

    @torch.no_grad()
    def _initialize_mixture(self, eps: torch.Tensor, iterations: int = 30) -> None:
        """Mixture base from k-means (k-means++ seeding, a fixed seed) on the standardized base codes ε (N, D):
        means = centroids, scales = per-cluster standard deviations, weights = cluster fractions."""
        k = min(self.base_components, len(eps))
        gen = torch.Generator(device=eps.device).manual_seed(0)
        centers = eps[torch.randint(len(eps), (1,), generator=gen, device=eps.device)]
        while len(centers) < k:
            d2 = torch.cdist(eps, centers).pow(2).min(1).values
            centers = torch.cat([centers, eps[torch.multinomial(d2 + 1e-12, 1, generator=gen)]])
        for _ in range(iterations):
            assign = torch.cdist(eps, centers).argmin(1)
            centers = torch.stack([eps[assign == j].mean(0) if (assign == j).any() else centers[j] for j in range(k)])
        assign = torch.cdist(eps, centers).argmin(1)
        means = torch.zeros_like(self.base_means)
        log_scales, counts = torch.zeros_like(self.base_log_scales), torch.zeros(self.base_components, device=eps.device)
        means[:k] = centers.to(means.dtype)
        for j in range(k):
            members = eps[assign == j]
            counts[j] = len(members)
            if len(members) > 1:
                log_scales[j] = members.std(0).clamp_min(1e-2).log().to(log_scales.dtype)
        self.base_means.copy_(means)
        self.base_log_scales.copy_(log_scales)
        self.base_logits.copy_(torch.log((counts + 1.0) / (counts.sum() + self.base_components)).to(self.base_logits.dtype))

    def _fit_em_base(self, items: int, fit: Callable[[Any], Any]) -> Any:
        """The EM base's estimator, `GMMPrior` with its settings (float64, the best of 5 k-means starts, covariance
        regularization 1e-6) and min(base_components, items) components, fitted by `fit(gmm)`."""
        from latent_prior.baselines import GMMPrior

        gmm = GMMPrior(n_components=min(self.base_components, items), covariance=self.base_covariance, seed=0, n_init=5)
        with warnings.catch_warnings():
            # Its warnings (collapsed dims, few points per component) concern a GMM used as a prior on its own;
            # here training and the trainer's held-out selection judge the result.
            warnings.simplefilter("ignore", RuntimeWarning)
            return fit(gmm)

    @torch.no_grad()
    def _initialize_mixture_em(self, eps: torch.Tensor) -> None:
        """Mixture base = the GMM that EM fits to the base codes ε (N, D) (`_fit_em_base`): the baseline's own
        estimator, so an affine flow on this base is that GMM. Components beyond N keep weight ~0."""
        gmm = self._fit_em_base(len(eps), lambda g: g.fit(eps.double()))
        k = gmm.n_components
        chol = gmm._chol  # (k, D, D) lower triangular, float64
        diag = torch.diagonal(chol, dim1=-2, dim2=-1)
        weights = torch.full((self.base_components,), 1e-8, dtype=torch.float64)
        weights[:k] = gmm.weights.clamp_min(1e-8)
        self.base_means.zero_()
        self.base_means[:k] = gmm.means.to(self.base_means.dtype)
        self.base_log_scales.zero_()
        self.base_logits.copy_(weights.log().to(self.base_logits.dtype))
        if self.base_covariance == "full":
            self.base_tril.zero_()
            self.base_tril_fit.copy_(torch.eye(self.dim, dtype=self.base_tril_fit.dtype).repeat(self.base_components, 1, 1))
            self.base_tril_fit[:k] = chol.to(self.base_tril_fit.dtype)
        else:
            self.base_log_scales[:k] = diag.log().to(self.base_log_scales.dtype)

    @torch.no_grad()
    def refit_mixture_weights(self, z: torch.Tensor, *, chunk: int = 256) -> torch.Tensor:
        """Set a mixture base's weights to the mean responsibilities of latents z (N, *latent_shape): the EM
        update of the weights alone, their maximum-likelihood value for the current flow and components.

        Why: gradient steps move the weights slowly. On the photo latents a warmed-up flow had mapped every
        latent into one component while the nine others kept 39 % of the weight, and their samples, where
        no latent maps, had norms up to 10× the latents' (bench/results/prior_sweep7_length.md). A weight
        is floored at 1e-8 to keep its logit finite. Returns the new weights (K,); an N(0, I) base is left
        alone (returns a one-element tensor).
        """
        if self.base_components == 1:
            return torch.ones(1)
        self._check_latents(z, "Flow.refit_mixture_weights")
        if len(z) == 0 or not torch.isfinite(z).all():
            raise LatentPriorError("Flow.refit_mixture_weights needs a non-empty batch of finite latents.")
        device, dtype = self._device_dtype()
        total = torch.zeros(self.base_components, device=device, dtype=torch.float64)
        for part in z.split(chunk):  # (chunk, K, D) at a time: 4×64×64 latents would need GBs at once
            eps, _ = self.to_base(part.to(device=device, dtype=dtype))
            total += torch.softmax(self.component_log_probs(eps).double(), dim=1).sum(0)
        weights = (total / len(z)).clamp_min(1e-8)
        self.base_logits.copy_(weights.log().to(self.base_logits.dtype))
        return weights.float()

    def _base_config(self) -> dict[str, Any]:
        return {"base_components": self.base_components, "base_covariance": self.base_covariance, "base_init": self.base_init}

    def extra_repr(self) -> str:
        return f"latent_shape={self.latent_shape}, initialized={self.is_initialized}"


class RealNVP(Flow):
    """Flow for flat latents: `num_blocks` × [ActNorm, invertible linear, coupling], then ActNorm.

    Args:
        latent_shape: (D,); other shapes are flattened (D = prod(shape) >= 2).
        num_blocks: number of couplings; they alternate which half of the features they transform.
        hidden: width of each coupling's MLP conditioner.
        num_layers: hidden layers per conditioner.
        coupling: "affine" (soft-bounded log-scale) or "spline" (rational-quadratic, NSF).
        num_bins, tail_bound: spline bins on [−tail_bound, tail_bound] (identity outside); spline only.

    The final ActNorm makes the base codes of the `initialize` batch exactly standardized per
    dimension, so an initialized flow starts as a Gaussian matched to that batch's scales.
    """

    def __init__(
        self,
        latent_shape: Sequence[int] = (8,),
        num_blocks: int = 8,
        hidden: int = 256,
        num_layers: int = 2,
        coupling: str = "affine",
        num_bins: int = 8,
        tail_bound: float = 3.0,
        base_components: int = 1,
        base_covariance: str = "diag",
        base_init: str = "kmeans",
    ) -> None:
        super().__init__(latent_shape, base_components, base_covariance, base_init)
        num_blocks = _positive_int("num_blocks", num_blocks)
        hidden = _positive_int("hidden", hidden)
        num_layers = _positive_int("num_layers", num_layers)
        if coupling not in ("affine", "spline"):
            raise LatentPriorError(f"coupling={coupling!r} is unknown; choose 'affine' or 'spline'.")
        num_bins = _positive_int("num_bins", num_bins, minimum=2)
        if not (isinstance(tail_bound, (int, float)) and math.isfinite(tail_bound) and tail_bound > 0):
            raise LatentPriorError(f"tail_bound={tail_bound!r} must be a positive number.")
        if self.dim < 2:
            raise LatentPriorError(f"RealNVP needs at least 2 latent dimensions, latent_shape={self.latent_shape} has {self.dim}.")
        self.config = {
            "kind": "realnvp",
            "latent_shape": list(self.latent_shape),
            "num_blocks": num_blocks,
            "hidden": hidden,
            "num_layers": num_layers,
            "coupling": coupling,
            "num_bins": num_bins,
            "tail_bound": float(tail_bound),
            **self._base_config(),
        }
        transform = AffineTransform() if coupling == "affine" else RationalQuadraticSplineTransform(num_bins, tail_bound)

        def make_net(n_in: int, n_out: int) -> nn.Module:
            return _mlp(n_in, n_out, hidden, num_layers)

        layers: list[nn.Module] = []
        for k in range(num_blocks):
            layers += [ActNorm(self.dim), InvertibleLinear(self.dim), ChannelCoupling(self.dim, k % 2 == 1, transform, make_net)]
        layers.append(ActNorm(self.dim))
        self.layers = nn.ModuleList(layers)

    def to_base(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = z.flatten(1)
        return _run(self.layers, x, x.new_zeros(x.shape[0]))

    def from_base(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det = _run_inverse(self.layers, eps, eps.new_zeros(eps.shape[0]))
        return z.view(-1, *self.latent_shape), log_det


def auto_num_scales(height: int, width: int, max_scales: int = 4) -> int:
    """Scales for a (C, H, W) latent: squeeze while the map stays >= 4×4 (at least once, at most 4).

    4×8×8 -> 1 (16×4×4), 4×32×32 -> 3 (64×4×4 at the end), 4×64×64 -> 4.
    """
    if height % 2 or width % 2:
        raise LatentPriorError(
            f"MultiScaleFlow needs even latent height and width, got {height}×{width}; "
            "use a resolution that gives even latent sizes, or kind='realnvp' on the flattened latent."
        )
    scales, h, w = 1, height // 2, width // 2
    while scales < max_scales and h % 2 == 0 and w % 2 == 0 and h // 2 >= 4 and w // 2 >= 4:
        scales, h, w = scales + 1, h // 2, w // 2
    return scales


class MultiScaleFlow(Flow):
    """RealNVP/Glow multi-scale flow for spatial latents (C, H, W).

    Each scale: `checkerboard_blocks` × [ActNorm, checkerboard affine coupling] at the current
    resolution; squeeze to (4c, h/2, w/2); `blocks_per_scale` × [ActNorm, invertible 1×1 conv,
    channel-wise affine coupling]; then, except at the last scale, half the channels are factored
    out straight to the base distribution and the rest go on to the next scale.

    Args:
        latent_shape: (C, H, W); H and W must be divisible by 2**num_scales.
        num_scales: None chooses it from H, W (`auto_num_scales`).
        blocks_per_scale: channel-wise steps per scale.
        checkerboard_blocks: checkerboard couplings per scale, before the squeeze (0 for pure Glow).
        hidden_channels: width of the conv conditioners.
    """

    def __init__(
        self,
        latent_shape: Sequence[int] = (4, 8, 8),
        num_scales: int | None = None,
        blocks_per_scale: int = 4,
        checkerboard_blocks: int = 2,
        hidden_channels: int = 64,
        base_components: int = 1,
        base_covariance: str = "diag",
        base_init: str = "kmeans",
    ) -> None:
        super().__init__(latent_shape, base_components, base_covariance, base_init)
        if len(self.latent_shape) != 3:
            raise LatentPriorError(
                f"MultiScaleFlow needs latent_shape=(C, H, W), got {self.latent_shape}; use kind='realnvp' for flat latents."
            )
        c, h, w = self.latent_shape
        if num_scales is None:
            num_scales = auto_num_scales(h, w)
        num_scales = _positive_int("num_scales", num_scales)
        if h % 2**num_scales or w % 2**num_scales:
            raise LatentPriorError(
                f"num_scales={num_scales} needs latent height and width divisible by {2**num_scales}, got {h}×{w}; "
                "lower num_scales or leave it unset to choose automatically."
            )
        blocks_per_scale = _positive_int("blocks_per_scale", blocks_per_scale)
        checkerboard_blocks = _positive_int("checkerboard_blocks", checkerboard_blocks, minimum=0)
        hidden_channels = _positive_int("hidden_channels", hidden_channels)
        self.config = {
            "kind": "multiscale",
            "latent_shape": list(self.latent_shape),
            "num_scales": num_scales,
            "blocks_per_scale": blocks_per_scale,
            "checkerboard_blocks": checkerboard_blocks,
            "hidden_channels": hidden_channels,
            **self._base_config(),
        }

        def make_net(n_in: int, n_out: int) -> nn.Module:
            return _convnet(n_in, n_out, hidden_channels)

        affine = AffineTransform()
        self.pre_squeeze = nn.ModuleList()
        self.post_squeeze = nn.ModuleList()
        self.keep_channels: list[int] = []  # channels passed on to the next scale
        self.piece_shapes: list[tuple[int, int, int]] = []  # shapes factored out, in base order
        for s in range(num_scales):
            pre: list[nn.Module] = []
            for k in range(checkerboard_blocks):
                pre += [ActNorm(c), CheckerboardCoupling(c, hidden_channels, parity=k % 2)]
            c, h, w = 4 * c, h // 2, w // 2
            post: list[nn.Module] = []
            for k in range(blocks_per_scale):
                post += [ActNorm(c), InvertibleLinear(c), ChannelCoupling(c, k % 2 == 1, affine, make_net)]
            self.pre_squeeze.append(nn.ModuleList(pre))
            self.post_squeeze.append(nn.ModuleList(post))
            keep = c // 2 if s < num_scales - 1 else c
            self.keep_channels.append(keep)
            if keep < c:
                self.piece_shapes.append((c - keep, h, w))
            c = keep
        self.piece_shapes.append((c, h, w))

    def to_base(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_det = z, z.new_zeros(z.shape[0])
        pieces = []
        for pre, post, keep in zip(self.pre_squeeze, self.post_squeeze, self.keep_channels):
            x, log_det = _run(pre, x, log_det)
            x, log_det = _run(post, squeeze2x2(x), log_det)
            if keep < x.shape[1]:
                pieces.append(x[:, keep:].flatten(1))
                x = x[:, :keep]
        pieces.append(x.flatten(1))
        return torch.cat(pieces, dim=1), log_det

    def from_base(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = [math.prod(s) for s in self.piece_shapes]
        flat = list(torch.split(eps, sizes, dim=1))
        n = eps.shape[0]
        x = flat.pop().view(n, *self.piece_shapes[-1])
        log_det = eps.new_zeros(n)
        for s in reversed(range(len(self.post_squeeze))):
            if s < len(self.post_squeeze) - 1:  # this scale factored out piece s: put it back
                x = torch.cat([x, flat.pop().view(n, *self.piece_shapes[s])], dim=1)
            x, log_det = _run_inverse(self.post_squeeze[s], x, log_det)
            x, log_det = _run_inverse(self.pre_squeeze[s], unsqueeze2x2(x), log_det)
        return x, log_det


class PrincipalBasis:
    """The principal axes of latents (N, D): mean m (D,), an orthonormal basis Q of R^D whose columns run by
    decreasing variance, and the standard deviations s (D,) along them. `whiten(z) = ((z − m)·Q) / s` maps the
    latents to coordinates with identity covariance, the leading ones carrying the most variance; `unwhiten`
    inverts it.

    Up to `DENSE_MAX_DIMS` dims Q is stored whole (`directions`, D × D). Above, a D × D matrix is too large to keep
    or to apply at every step (1 GB at 4×64×64): the basis keeps its `LOW_RANK_AXES` leading axes, completed to an
    orthonormal basis of R^D by their Householder reflectors (Q = I − V T Vᵀ: `directions` holds V, D × q, and
    `reflector_t` T, q × q). Its trailing D − q axes are not principal axes but the latent pixels orthogonalized
    against the leading axes, each with the variance the latents have along it (and a share of the tail below).

    With fewer latents than dims (a deterministic cache of 2,700 items at 4×32×32) the trailing directions have no
    variance in the sample, but held-out latents do: they get the smallest variance the sample does measure (a flat
    tail, rather than the 0 that would give held-out latents a log-density of −∞ there). Every variance is also
    floored at `VARIANCE_FLOOR` × their mean (collapsed latent dims)."""

    VARIANCE_FLOOR = 1e-3
    DENSE_MAX_DIMS = 4096
    LOW_RANK_AXES = 512

    def __init__(
        self, mean: torch.Tensor, directions: torch.Tensor, log_std: torch.Tensor, reflector_t: torch.Tensor | None = None
    ) -> None:
        self.mean, self.directions, self.log_std, self.reflector_t = mean, directions, log_std, reflector_t

    @classmethod
    def axes_for(cls, dims: int) -> int | None:
        """The leading axes that a basis of `dims` dims keeps explicitly: None for a dense basis."""
        return None if dims <= cls.DENSE_MAX_DIMS else min(cls.LOW_RANK_AXES, dims - 1)

    @classmethod
    def fit(cls, z: torch.Tensor, axes: int | None | str = "auto") -> "PrincipalBasis":
        """From latents z (N, *shape), N >= 2, in float64 (the float32 tensors returned follow z's device); `axes`: the
        leading axes of a low-rank basis, None for a dense one, "auto" by the dims (`axes_for`)."""
        x = z.flatten(1).double()
        mean = x.mean(0)
        centered = x - mean
        dims = x.shape[1]
        axes = cls.axes_for(dims) if axes == "auto" else axes
        rank = min(len(x) - 1, dims)
        if axes is None:
            variances, directions = torch.linalg.eigh(centered.T @ centered / max(1, len(x) - 1))
            variances, directions = variances.flip(0), directions.flip(1)
        else:
            variances, directions = _leading_axes(centered, axes)
        # A fixed sign per direction (its largest entry positive), so the same latents give the same basis.
        signs = torch.sign(directions.gather(0, directions.abs().argmax(0, keepdim=True)))
        directions = directions * torch.where(signs == 0, torch.ones_like(signs), signs)
        reflector_t = None
        variances[rank:] = variances[rank - 1]
        if axes is not None:
            directions, reflector_t = _householder_completion(directions)
            # Each trailing axis (close to a latent pixel, orthogonalized against the leading axes) gets the variance
            # that the latents have along it, plus an even share of what the dense basis gives the directions that
            # the sample does not span: the same total variance on the trailing axes as the dense basis.
            trailing = cls(mean, directions, torch.zeros(dims, dtype=x.dtype), reflector_t)._rotate(centered)[:, axes:]
            unspanned = (dims - max(rank, axes)) * variances[rank - 1] / (dims - axes)
            variances = torch.cat([variances[:axes], trailing.pow(2).sum(0) / max(1, len(x) - 1) + unspanned])
        variances = variances.clamp_min(cls.VARIANCE_FLOOR * float(variances.clamp_min(0).mean()) + 1e-12)
        return cls(mean.float(), directions.float(), 0.5 * variances.log().float(), None if reflector_t is None else reflector_t.float())

    def _rotate(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """Rows x (N, D) times Q (or Qᵀ with `transpose`)."""
        q = self.directions.to(x.dtype)
        if self.reflector_t is None:
            return x @ (q.T if transpose else q)
        t = self.reflector_t.to(x.dtype)
        return x - ((x @ q) @ (t.T if transpose else t)) @ q.T

    def whiten(self, z: torch.Tensor, dims: int | None = None) -> torch.Tensor:
        """The first `dims` (all by default) whitened coordinates of latents z (N, *shape) -> (N, dims)."""
        x = z.flatten(1) - self.mean.to(z.dtype)
        if self.reflector_t is None and dims is not None:  # the leading columns alone suffice
            return (x @ self.directions[:, :dims].to(z.dtype)) * torch.exp(-self.log_std[:dims].to(z.dtype))
        y = self._rotate(x) * torch.exp(-self.log_std.to(z.dtype))
        return y if dims is None else y[:, :dims]

    def unwhiten(self, y: torch.Tensor) -> torch.Tensor:
        """Latents (N, D) from all D whitened coordinates y (N, D): the inverse of `whiten`."""
        return self._rotate(y * torch.exp(self.log_std.to(y.dtype)), transpose=True) + self.mean.to(y.dtype)

    def fit_mixture(self, gmm: Any, z: torch.Tensor, dims: int) -> Any:
        """Fit `gmm`, an unfitted `GMMPrior`, to the first `dims` whitened coordinates of latents z (N, *shape), and
        return it fitted there.

        Why EM runs on the principal coordinates (z − m)·Q (the latents' own scale, as a GMM on the latents sees them)
        and the fit is then rescaled: in the whitened ones every leading axis counts alike in the k-means distances, so
        the low-variance axes decide the clusters, and with a few hundred draws per component in 256 dims EM keeps its
        k-means start (every responsibility is 0 or 1). On the 32×8×8 photo latents the start built from whitened
        k-means decoded to FID 341 against 330 from principal k-means (docs/prior-development.md)."""
        scale = torch.exp(self.log_std[:dims].double()).cpu()
        principal = self.whiten(z, dims).double().cpu() * scale
        return gmm.fit(principal).scaled(1 / scale)

    def lift(self, leading: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents (N, D) whose first r whitened coordinates are `leading` (N, r) and whose others are drawn from
        N(0, I): how a model of the leading coordinates samples latents."""
        rest = torch.randn(
            len(leading),
            self.mean.numel() - leading.shape[1],
            generator=generator,
            device=generator.device if generator is not None else leading.device,
        ).to(leading)
        return self.unwhiten(torch.cat([leading, rest], dim=1))


def _leading_axes(centered: torch.Tensor, axes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal variances (min(N, D),) of centred rows (N, D) by decreasing size, and the orthonormal directions
    (D, axes) of the `axes` leading ones, from the N × N Gram matrix (N is a few thousand draws at most; the D × D
    covariance is never formed). Past the sample's rank the directions are completed by a fixed pseudo-random
    orthonormal set (their variance is then the smallest measured one, as in the dense basis)."""
    n, dims = centered.shape
    gram_values, gram_vectors = torch.linalg.eigh(centered @ centered.T)
    gram_values, gram_vectors = gram_values.flip(0)[:dims], gram_vectors.flip(1)[:, :dims]
    kept = min(axes, int((gram_values > gram_values[0] * 1e-12).sum()))
    directions = centered.T @ gram_vectors[:, :kept] / gram_values[:kept].sqrt()
    if kept < axes:
        fill = torch.randn(dims, axes - kept, generator=torch.Generator().manual_seed(0), dtype=centered.dtype).to(centered.device)
        fill = torch.linalg.qr(fill - directions @ (directions.T @ fill))[0]
        directions = torch.cat([directions, fill], dim=1)
    variances = torch.zeros(max(axes, len(gram_values)), dtype=centered.dtype, device=centered.device)
    variances[: len(gram_values)] = gram_values.clamp_min(0) / max(1, n - 1)
    return variances, directions


def _householder_completion(directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For orthonormal columns U (D, q): the Householder vectors V (D, q) and the upper-triangular T (q, q) of
    Q = I − V T Vᵀ, an orthogonal D × D matrix whose first q columns are U up to their signs (U = Q·R with
    R = diag(±1)). D·q + q² values instead of D²."""
    q = directions.shape[1]
    packed, tau = torch.geqrf(directions)
    vectors = packed.tril(-1)
    vectors.diagonal().fill_(1.0)
    gram = vectors.T @ vectors
    t = torch.zeros(q, q, dtype=directions.dtype, device=directions.device)
    for i in range(q):  # LAPACK's larft (forward, columnwise): Q = H_1 ⋯ H_q with H_i = I − τ_i v_i v_iᵀ
        t[i, i] = tau[i]
        if i:
            t[:i, i] = -tau[i] * (t[:i, :i] @ gram[:i, i])
    return vectors, t


class SubspaceFlow(Flow):
    """Flow for many latent dims (D above `SUBSPACE_MIN_DIMS`, e.g. 4×16×16 or 4×32×32): a fixed rotation onto the
    latents' principal axes, a `RealNVP` on the `subspace_dims` leading whitened coordinates, the others passed on.

        z (N, *shape) --whiten--> y (N, D);   ε[:, :r] = RealNVP.to_base(y[:, :r]),   ε[:, r:] = y[:, r:]

    The base is the RealNVP's on ε[:, :r] times a Gaussian on ε[:, r:]. With a mixture base of K components, each
    component k also has its own diagonal Gaussian N(m_k, diag σ_k²) on the trailing axes (`rest_means`,
    `rest_log_scales`), set at `initialize` from the responsibilities of the latents: a component that holds flat
    patches keeps little high-frequency variance, one of textures much (on 4×16×16 photo latents, one Gaussian shared
    by all components blended every texture into every sample). With K = 1 the trailing axes are N(0, I), i.e. a
    Gaussian with the latents' own covariance there.

    Why: a full-covariance mixture base costs K·D² values and as many operations per latent (4096² at 4×32×32), and
    a diagonal one loses every correlation between latent pixels; on the leading 256 axes the full-covariance GMM
    start and the flat networks are those that fit the 4×8×8 latents. The basis is fitted by `initialize` (or given
    to it) and saved with the weights (the buffers `basis_mean`, `basis_directions`, `basis_log_std`: D² values, or
    D·q + q² above `PrincipalBasis.DENSE_MAX_DIMS` with `basis_reflector_t`; `basis_axes` q).

    Args: latent_shape (any shape, D = prod >= 2); subspace_dims r (capped at D); basis_axes: the leading axes a
    low-rank basis keeps (r <= q < D), None for a dense one, "auto" by D (`PrincipalBasis.axes_for`); the rest as
    `RealNVP`.
    """

    #: floor of a component's variance on a trailing whitened axis (whose overall variance is 1)
    REST_MIN_VARIANCE = 1e-4

    def __init__(
        self,
        latent_shape: Sequence[int] = (4, 16, 16),
        subspace_dims: int = 256,
        num_blocks: int = 8,
        hidden: int = 256,
        num_layers: int = 2,
        coupling: str = "affine",
        num_bins: int = 8,
        tail_bound: float = 3.0,
        base_components: int = 1,
        base_covariance: str = "diag",
        base_init: str = "kmeans",
        basis_axes: int | None | str = "auto",
    ) -> None:
        super().__init__(latent_shape)
        if self.dim < 2:
            raise LatentPriorError(f"SubspaceFlow needs at least 2 latent dimensions, latent_shape={self.latent_shape} has {self.dim}.")
        self.subspace_dims = min(_positive_int("subspace_dims", subspace_dims, minimum=2), self.dim)
        # The flow on the leading axes: a RealNVP with this flow's couplings and mixture base.
        couplings = dict(num_blocks=num_blocks, hidden=hidden, num_layers=num_layers, coupling=coupling, num_bins=num_bins)
        base = dict(base_components=base_components, base_covariance=base_covariance, base_init=base_init)
        self.inner = RealNVP((self.subspace_dims,), **couplings, tail_bound=tail_bound, **base)
        # The mixture base is the inner flow's, extended to the trailing axes: what the trainer and Langevin read of a
        # base (components, weights, per-component standard coordinates) reads it here.
        self.base_components, self.base_covariance, self.base_init = base_components, base_covariance, base_init
        inner = {k: v for k, v in self.inner.config.items() if k not in ("kind", "latent_shape")}
        self.basis_axes = PrincipalBasis.axes_for(self.dim) if basis_axes == "auto" else basis_axes
        if self.basis_axes is not None:
            self.basis_axes = _positive_int("basis_axes", self.basis_axes, minimum=self.subspace_dims)
            if self.basis_axes >= self.dim:
                raise LatentPriorError(
                    f"basis_axes={self.basis_axes}: a low-rank basis keeps fewer axes than the "
                    f"{self.dim} latent dims; pass None for a dense one."
                )
        self.config = {
            "kind": "subspace",
            "latent_shape": list(self.latent_shape),
            "subspace_dims": self.subspace_dims,
            "basis_axes": self.basis_axes,
            **inner,
        }
        self.register_buffer("basis_mean", torch.zeros(self.dim))
        if self.basis_axes is None:
            self.register_buffer("basis_directions", torch.eye(self.dim))
            self.basis_reflector_t = None
        else:  # the identity as Householder reflectors: V = 0 (with T = 0, Q = I − V T Vᵀ = I)
            self.register_buffer("basis_directions", torch.zeros(self.dim, self.basis_axes))
            self.register_buffer("basis_reflector_t", torch.zeros(self.basis_axes, self.basis_axes))
        self.register_buffer("basis_log_std", torch.zeros(self.dim))
        rest = self.dim - self.subspace_dims
        if self.base_components > 1:
            self.rest_means = nn.Parameter(torch.zeros(self.base_components, rest))
            self.rest_log_scales = nn.Parameter(torch.zeros(self.base_components, rest))

    @property
    def basis(self) -> PrincipalBasis:
        return PrincipalBasis(self.basis_mean, self.basis_directions, self.basis_log_std, self.basis_reflector_t)

    @property
    def base_logits(self) -> torch.Tensor:
        return self.inner.base_logits

    def to_base(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.whitened_to_base(self.basis.whiten(z))

    def from_base(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, log_det = self.base_to_whitened(eps)
        return self.basis.unwhiten(y).view(-1, *self.latent_shape), log_det

    # The whitened coordinates y = basis.whiten(z) (N, D) are the flow's own coordinates: the two methods below are
    # `to_base` / `from_base` without the D × D rotation, for a caller that already holds y (`whitened_log_prob`).
    def whitened_to_base(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε (N, D), log|det ∂ε/∂z|) from the whitened coordinates y of latents z."""
        r = self.subspace_dims
        eps, log_det = self.inner.to_base(y[:, :r])
        return torch.cat([eps, y[:, r:]], dim=1), log_det - self.basis_log_std.sum().to(log_det.dtype)

    def base_to_whitened(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y (N, D), log|det ∂z/∂ε|): the whitened coordinates of the latents z that base noise ε maps to."""
        r = self.subspace_dims
        leading, log_det = self.inner.from_base(eps[:, :r])
        return torch.cat([leading.flatten(1), eps[:, r:]], dim=1), log_det + self.basis_log_std.sum().to(log_det.dtype)

    def whitened_log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """log q(z) (N,) nats of the latents z whose whitened coordinates are y (N, D): `log_prob` without the
        rotation."""
        eps, log_det = self.whitened_to_base(y)
        return self.base_log_prob(eps) + log_det

    def sample_whitened_and_log_prob(
        self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`sample_and_log_prob` in whitened coordinates: (y (n, D), log q (n,) nats of z = basis.unwhiten(y))."""
        n = _positive_int("n", n, minimum=0)
        t = self._check_temperature(temperature)
        eps = self.sample_base(n, generator=generator, temperature=t)
        y, log_det = self.base_to_whitened(eps)
        return y, self.base_log_prob(eps, t) - log_det

    def shares_basis(self, other: nn.Module) -> bool:
        """Whether `other` is a SubspaceFlow on the same principal basis (its whitened coordinates are ours)."""
        if not isinstance(other, SubspaceFlow) or other.basis_directions.shape != self.basis_directions.shape:
            return False
        pairs = [
            (self.basis_mean, other.basis_mean),
            (self.basis_log_std, other.basis_log_std),
            (self.basis_directions, other.basis_directions),
        ]
        if self.basis_reflector_t is not None:
            pairs.append((self.basis_reflector_t, other.basis_reflector_t))
        return all(a.device == b.device and torch.equal(a, b) for a, b in pairs)

    def base_log_prob(self, eps: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        t = float(temperature)
        if self.base_components == 1:
            rest = eps[:, self.subspace_dims :]
            return self.inner.base_log_prob(eps[:, : self.subspace_dims], t) + log_standard_normal(rest / t) - rest.shape[1] * math.log(t)
        return torch.logsumexp(self.component_log_probs(eps, t), dim=1)

    def component_log_probs(self, eps: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log π_k + log q_k(ε) (N, K): the inner mixture's component on the leading axes times the component's
        diagonal Gaussian on the trailing ones."""
        t = float(temperature)
        r = self.subspace_dims
        log_scales = self.rest_log_scales + math.log(t)  # (K, D − r)
        # Σ_j (ε_j − m_kj)² / σ_kj² expanded into three products, in float64 against cancellation (Apple's MPS has
        # none: float32 there): no (N, K, D − r) tensor, which at 4×32×32 was a quarter of an alternating step's time.
        wide = torch.float32 if eps.device.type == "mps" else torch.float64
        e, means, precision = eps[:, r:].to(wide), self.rest_means.to(wide), torch.exp(-2 * log_scales.to(wide))
        maha = (e * e) @ precision.T - 2 * e @ (means * precision).T + (means * means * precision).sum(1)[None]
        rest = -0.5 * maha.clamp_min(0).to(eps.dtype) - log_scales.sum(1)[None] - 0.5 * (self.dim - r) * _LOG_2PI
        return self.inner.component_log_probs(eps[:, :r], t) + rest

    def from_standard(self, xi: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
        r = self.subspace_dims
        if self.base_components == 1 or k is None:
            return xi
        rest = self.rest_means.to(xi.dtype)[k] + xi[:, r:] * torch.exp(self.rest_log_scales.to(xi.dtype))[k]
        return torch.cat([self.inner.from_standard(xi[:, :r], k), rest], dim=1)

    def to_standard(self, u: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
        r = self.subspace_dims
        if self.base_components == 1 or k is None:
            return u
        rest = (u[:, r:] - self.rest_means.to(u.dtype)[k]) * torch.exp(-self.rest_log_scales.to(u.dtype))[k]
        return torch.cat([self.inner.to_standard(u[:, :r], k), rest], dim=1)

    def sample_components(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.inner.sample_components(n, generator)

    @torch.no_grad()
    def initialize(self, z: torch.Tensor, *, force: bool = False, mixture: Any = None, basis: PrincipalBasis | None = None) -> bool:
        """Fit the principal basis to z (N, *latent_shape), or take `basis` (a `PrincipalBasis` of these latents),
        initialize the inner flow on the leading whitened coordinates (`mixture`: a full-covariance GMM fitted in
        them, `basis.whiten(z, subspace_dims)`, see `Flow.initialize`; without one a full EM base fits its own there
        by `PrincipalBasis.fit_mixture`), then give each mixture component the mean and variance of the trailing
        coordinates weighted by its responsibilities for z."""
        if self.is_initialized and not force:
            return False
        self._check_latents(z, "SubspaceFlow.initialize")
        if z.shape[0] < 2 or not torch.isfinite(z).all():
            raise LatentPriorError("SubspaceFlow.initialize needs at least 2 finite latents; check the cache for NaN/inf values.")
        device, dtype = self._device_dtype()
        basis = basis or PrincipalBasis.fit(z, axes=self.basis_axes)
        if basis.directions.shape != self.basis_directions.shape:
            raise LatentPriorError(
                f"SubspaceFlow.initialize: a basis with directions {tuple(basis.directions.shape)} does not "
                f"fit a flow whose basis has {tuple(self.basis_directions.shape)}; fit it with PrincipalBasis.fit."
            )
        self.basis_mean.copy_(basis.mean)
        self.basis_directions.copy_(basis.directions)
        if self.basis_reflector_t is not None:
            self.basis_reflector_t.copy_(basis.reflector_t)
        self.basis_log_std.copy_(basis.log_std)
        y = self.basis.whiten(z.to(device=device, dtype=dtype))
        r = self.subspace_dims
        if mixture is None and self.base_components > 1 and self.base_init == "em" and self.base_covariance == "full":
            mixture = self._fit_em_base(len(z), lambda g: basis.fit_mixture(g, z, self.subspace_dims))
        self.inner.initialize(y[:, :r], force=True, mixture=mixture)
        if self.base_components > 1:
            eps, _ = self.inner.to_base(y[:, :r])
            resp = torch.softmax(self.inner.component_log_probs(eps).double(), dim=1)  # (N, K)
            mass = resp.sum(0).clamp_min(1e-12)[:, None]
            rest = y[:, r:].double()
            means = resp.T @ rest / mass
            variances = (resp.T @ rest.pow(2) / mass - means.pow(2)).clamp_min(self.REST_MIN_VARIANCE)
            self.rest_means.copy_(means.to(self.rest_means.dtype))
            self.rest_log_scales.copy_((0.5 * variances.log()).to(self.rest_log_scales.dtype))
        self.initialized.fill_(1)
        return True

    def _base_config(self) -> dict[str, Any]:
        return self.inner._base_config()


_FLOW_CLASSES: dict[str, type[Flow]] = {"realnvp": RealNVP, "multiscale": MultiScaleFlow, "subspace": SubspaceFlow}


def optimizer_groups(flow: nn.Module, linear_power: float) -> list[dict[str, Any]]:
    """The flow's parameters as Adam parameter groups, each with an `lr_scale` that multiplies the learning rate.

    The D×D factors (the invertible linear maps' LU factors, the full-covariance base's A_k) get
    D^(−linear_power), the rest 1. Adam moves each entry by about the learning rate per step whatever its
    gradient, so a D×D factor moves by about lr·√D in norm per step, enough to wreck a 256-dim flow that starts
    as a fitted GMM within a few steps (docs/prior-development.md). `linear_power=0` gives one group.
    """
    if linear_power == 0:
        return [{"params": list(flow.parameters()), "lr_scale": 1.0}]
    factors: dict[int, list[nn.Parameter]] = {}
    for module in flow.modules():
        if isinstance(module, InvertibleLinear):
            factors.setdefault(module.lower.shape[-1], []).extend([module.lower, module.upper])
        elif isinstance(module, Flow) and isinstance(getattr(module, "base_tril", None), nn.Parameter):
            factors.setdefault(module.base_tril.shape[-1], []).append(module.base_tril)
    chosen = {id(p) for ps in factors.values() for p in ps}
    groups = [{"params": [p for p in flow.parameters() if id(p) not in chosen], "lr_scale": 1.0}]
    groups += [{"params": ps, "lr_scale": float(dim) ** -linear_power} for dim, ps in sorted(factors.items())]
    return groups


def build_flow(latent_shape: Sequence[int], *, kind: str = "auto", **kwargs: Any) -> Flow:
    """Build a flow for latents of `latent_shape`; `build_flow(**flow.config)` rebuilds `flow`.

    kind: "auto" (RealNVP for flat (D,) latents, MultiScaleFlow for (C, H, W)), "realnvp",
    "spline" (RealNVP with rational-quadratic spline couplings), "multiscale" or "subspace" (`SubspaceFlow`; the
    trainer's flow_kind=auto takes it above 512 latent dims).
    Other keyword arguments go to the class (see `RealNVP`, `MultiScaleFlow`, `SubspaceFlow`).
    """
    shape = _latent_shape(latent_shape)
    kind = checked_kind(kind, FLOW_KINDS, shape, what="flow", flat="realnvp", spatial="multiscale", supported_by="flows support")
    if kind == "spline":
        if kwargs.get("coupling", "spline") != "spline":
            raise LatentPriorError(
                f"kind='spline' conflicts with coupling={kwargs['coupling']!r}; use kind='realnvp' for affine couplings."
            )
        kind, kwargs = "realnvp", {**kwargs, "coupling": "spline"}
    cls = _FLOW_CLASSES[kind]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "latent_shape"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise LatentPriorError(
            f"flow option(s) {', '.join(unknown)} do not apply to kind={kind!r}; it accepts {', '.join(sorted(accepted))}."
        )
    return cls(shape, **kwargs)
