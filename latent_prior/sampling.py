"""Ways to draw from the energy-based prior, and the importance-sampling estimate of its log Z.

The model lives in normalized latent space (see `latent_prior.vae`):

    p_θ(z) = p0(z) · exp(−E(z)) / Z,      p0 = N(0, I),      Z = E_{p0}[exp(−E(z))]

`energy` is any callable z (N, *shape) -> (N,) energies in nats; it must treat the rows of a batch
independently (no BatchNorm in train mode), because Langevin takes per-sample gradients through the
batch sum. `flow` is the sampler q_φ: any object with `latent_shape`, `sample(n, *, generator,
temperature)`, `log_prob(z) -> (N,)` and `sample_and_log_prob(n, *, generator, temperature)`
(`latent_prior.flows` provides them; tests use exact analytic Gaussians).

Every sampler shares one signature (as in k-diffusion), so `LatentPrior.sample(method=...)` is a
table lookup:

    sample_<method>(energy, flow, n, *, generator=None, temperature=1.0, batch_size=None, **options)
        -> Tensor (n, *latent_shape), normalized latent space

Temperature means different things per method, and `TEMPERATURE_MEANING` records which:
* "sampler": the flow's own temperature, i.e. the scale of its base noise ε;
* "sir", "langevin": the target is tempered, p_T(z) ∝ (p0(z)·exp(−E(z)))^(1/T), so both the energy
  and the Gaussian base are divided by T. For E = 0 this is N(0, T·I); T < 1 sharpens, T > 1 widens.
  The proposals (SIR) and the flow initialisation (Langevin) are drawn from q_φ at temperature 1,
  whose log-density is exact, so the importance weights stay exact at any T. Langevin in the base
  flow's coordinates (`space="base"`, the default for a flow-based energy) tempers the density of
  those coordinates u instead, p_T(u) ∝ (m(u)·exp(−E_res(f(u))))^(1/T), m the base flow's base density
  (N(0, I) or its mixture); at T = 1 both are p_θ.
"""

from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Protocol

import torch

from latent_prior.errors import LatentPriorError
from latent_prior.vae import posterior_draw

Energy = Callable[[torch.Tensor], torch.Tensor]

#: Upper bound on the number of latents pushed through the energy at once when batch_size is None.
MAX_ROWS_PER_CHUNK = 16384
#: ... and on the number of latent scalars (rows × D), so large spatial latents stay bounded too.
MAX_ELEMENTS_PER_CHUNK = 2**22

TEMPERATURE_MEANING = {
    "sampler": "scales the flow's base noise ε (standard deviation)",
    "sir": "tempers the target: p_T ∝ (p0·exp(−E))^(1/T); proposals from the flow at temperature 1",
    "langevin": "tempers the chain's target, drift divided by T, noise unchanged: in space='latent' p_T(z) ∝ "
    "(p0·exp(−E))^(1/T); in space='base' the u-density, p_T(u) ∝ (m(u)·exp(−E_res(f(u))))^(1/T), m the base flow's base",
}


class Sampler(Protocol):
    """What the samplers need from q_φ (a `latent_prior.flows` flow or any exact density)."""

    latent_shape: tuple[int, ...]

    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor: ...

    def log_prob(self, z: torch.Tensor) -> torch.Tensor: ...

    def sample_and_log_prob(
        self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


# ----------------------------------------------------------------------------------------------
# densities and weights


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) in nats, summed over every non-batch dim: (N, *shape) -> (N,)."""
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * (flat.pow(2).sum(dim=1) + flat.shape[1] * math.log(2 * math.pi))


def log_importance_weights(energies: torch.Tensor, z: torch.Tensor, log_q: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Unnormalized log-weights of proposals z ~ q (N, *shape) with energies E(z) (N,) and log q(z) (N,) for the
    (tempered) target, float64 (N,).

    log w = (log p0(z) − E(z)) / T − log q(z). At T = 1 this targets p_θ itself; weighting by
    exp(−E) alone (as the authors' code does) would target q·exp(−E) instead.
    """
    log_target = log_standard_normal(z).double() - energies.double().reshape(-1)
    return log_target / temperature - log_q.double().reshape(-1)


def shares_basis(energy: Energy, flow: Any) -> bool:
    """Whether the energy's flow base reads `flow`'s whitened coordinates (`FlowBasedEnergy.shares_basis`)."""
    return bool(getattr(energy, "shares_basis", lambda flow: False)(flow))


def propose(
    energy: Energy,
    flow: Sampler,
    n: int,
    *,
    generator: torch.Generator | None = None,
    shared_basis: bool | None = None,
    autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n proposals of the flow at temperature 1 with their log-densities and energies: z (n, *latent_shape),
    log q(z) (n,) and E(z) (n,, under `autocast`) in nats, differentiable in the flow's parameters.

    Where the energy's flow base and the flow are subspace flows on one principal basis (`shared_basis`; None asks
    `shares_basis`, which compares the two bases), the base reads the flow's whitened coordinates instead of rotating
    z back into them: the same values up to rounding, one D × D product fewer per proposal (at 4×32×32, two of the
    five in a training step, the backward pass included).
    """
    if shared_basis is None:
        shared_basis = shares_basis(energy, flow)
    if not shared_basis:
        z, log_q = flow.sample_and_log_prob(n, generator=generator, temperature=1.0)
        with autocast():
            return z, log_q, energy(z)
    y, log_q = flow.sample_whitened_and_log_prob(n, generator=generator)
    z = flow.basis.unwhiten(y).view(-1, *flow.latent_shape)
    with autocast():
        return z, log_q, energy(z, whitened=y)


# ----------------------------------------------------------------------------------------------
# helpers shared by the samplers


def _as_count(value: Any, name: str, minimum: int = 1) -> int:
    """An integer ≥ minimum (Python, numpy or 0-d torch ints), else a LatentPriorError naming `name`."""
    try:
        if isinstance(value, bool):
            raise TypeError
        count = operator.index(value)
    except TypeError:
        count = None
    if count is None or count < minimum:
        raise LatentPriorError(f"{name}={value!r}: pass an integer ≥ {minimum}.")
    return count


def _check_common(n: Any, temperature: float, batch_size: Any) -> tuple[int, int | None]:
    """Validated (n, batch_size); batch_size None means "pick a memory-bounded size"."""
    n = _as_count(n, "n")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise LatentPriorError(f"temperature={temperature!r}: pass a finite number > 0 (1.0 samples the prior itself).")
    return n, None if batch_size is None else _as_count(batch_size, "batch_size")


def _latent_numel(flow: Sampler) -> int:
    return int(math.prod(flow.latent_shape))


def _default_batch(flow: Sampler, rows_per_item: int = 1) -> int:
    """Items per chunk so that rows_per_item · items stays within the memory bounds above."""
    rows = min(MAX_ROWS_PER_CHUNK, max(1, MAX_ELEMENTS_PER_CHUNK // max(1, _latent_numel(flow))))
    return max(1, rows // rows_per_item)


def _chunks(n: int, batch_size: int) -> list[int]:
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def _device_of(flow: Any, generator: torch.Generator | None) -> torch.device:
    # The generator must live where the random numbers are drawn, so it decides when given.
    if generator is not None:
        return generator.device
    if isinstance(flow, torch.nn.Module):
        for tensor in (*flow.parameters(), *flow.buffers()):
            return tensor.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# the samplers


@torch.no_grad()
def sample_flow(
    energy: Energy | None,
    flow: Sampler,
    n: int,
    *,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Draw from the sampler q_φ alone, one pass per chunk; `energy` is ignored.

    temperature is the flow's own: it scales the base noise ε. Returns (n, *latent_shape).
    """
    n, batch_size = _check_common(n, temperature, batch_size)
    batch_size = batch_size or _default_batch(flow)
    parts = [flow.sample(m, generator=generator, temperature=temperature) for m in _chunks(n, batch_size)]
    return torch.cat(parts)


@torch.no_grad()
def sample_sir(
    energy: Energy,
    flow: Sampler,
    n: int,
    *,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    batch_size: int | None = None,
    proposals: int = 100,
) -> torch.Tensor:
    """Sampling-importance-resampling: per output, draw `proposals` (M) latents from q_φ and keep one.

    The kept one is drawn from the categorical distribution softmax(log w) over its group of M, with
    log w = (log p0(z) − E(z)) / T − log q_φ(z) (see `log_importance_weights`). As M grows the output
    converges in distribution to the tempered target p_T ∝ (p0·exp(−E))^(1/T); at T = 1 that is p_θ.
    batch_size counts outputs per chunk (each costs M energy and flow evaluations).
    Returns (n, *latent_shape).
    """
    n, batch_size = _check_common(n, temperature, batch_size)
    proposals = _as_count(proposals, "proposals")
    batch_size = batch_size or _default_batch(flow, rows_per_item=proposals)
    parts = []
    shared = shares_basis(energy, flow)
    for m in _chunks(n, batch_size):
        z, log_q, e = propose(energy, flow, m * proposals, generator=generator, shared_basis=shared)
        log_w = log_importance_weights(e, z, log_q, temperature).view(m, proposals)
        # A NaN weight would make multinomial raise an obscure error; -inf (zero weight) is fine
        # as long as each group keeps at least one finite weight.
        log_w = torch.nan_to_num(log_w, nan=-math.inf, posinf=math.inf)
        if not torch.isfinite(log_w.max(dim=1).values).all():
            raise LatentPriorError(
                "sample_sir: every proposal of a group had a non-finite weight (the energy or the flow "
                "returned inf/NaN); check the prior's checkpoint or use method='sampler'."
            )
        probs = torch.softmax(log_w, dim=1)
        pick = torch.multinomial(probs.to(torch.float64), 1, generator=generator).squeeze(1)
        z = z.view(m, proposals, *z.shape[1:])
        parts.append(z[torch.arange(m, device=z.device), pick.to(z.device)])
    return torch.cat(parts)


#: Where `sample_langevin` runs its chain; "auto" picks "base" for a flow-based energy, else "latent".
LANGEVIN_SPACES = ("auto", "latent", "base")
# Attributes under which wrappers keep the module they wrap: DDP / Accelerate (`module`), torch.compile (`_orig_mod`).
_WRAPPED_ATTRS = ("module", "_orig_mod")


def flow_based_energy(energy: Any) -> Any:
    """The `FlowBasedEnergy` inside `energy` (looking through DDP and torch.compile wrappers), else None."""
    from latent_prior.energy import FlowBasedEnergy

    for _ in range(8):  # a wrapper chain is a few levels deep at most; the bound guards against cycles
        if isinstance(energy, FlowBasedEnergy):
            return energy
        energy = next((getattr(energy, a) for a in _WRAPPED_ATTRS if isinstance(getattr(energy, a, None), torch.nn.Module)), None)
        if energy is None:
            return None
    return None


def _resolve_space(space: Any, energy: Any) -> tuple[str, Any]:
    """(space, flow-based energy or None): "auto" becomes "base" exactly when the energy has a flow base."""
    if space not in LANGEVIN_SPACES:
        raise LatentPriorError(f"space={space!r}: Langevin runs in 'latent' (z itself), 'base' (the base flow's coordinates) or 'auto'.")
    flow_based = flow_based_energy(energy)
    if space == "base" and flow_based is None:
        raise LatentPriorError(
            f"space='base' needs a FlowBasedEnergy (E = log p0 − log q_base + E_res), but the energy is "
            f"{type(energy).__name__}; pass space='latent' or 'auto'."
        )
    if space == "auto":
        space = "base" if flow_based is not None else "latent"
    return space, flow_based


def _from_base(base: torch.nn.Module, u: torch.Tensor) -> torch.Tensor:
    """z = f(u) through the frozen base flow, in the flow's own dtype with autocast off (as
    `FlowBasedEnergy.forward` runs it); (N, D) -> (N, *latent_shape) in u's dtype, differentiable in u."""
    dtype = next(base.parameters()).dtype
    with torch.autocast(device_type=u.device.type, enabled=False):
        z, _ = base.from_base(u.to(dtype))
    return z.to(u.dtype)


def _to_base(base: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """u = f⁻¹(z), the inverse of `_from_base`: (N, *latent_shape) -> (N, D) float32."""
    dtype = next(base.parameters()).dtype
    with torch.autocast(device_type=z.device.type, enabled=False):
        u, _ = base.to_base(z.to(dtype))
    return u.float()


def _grad_wrt(energies: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """∇_x Σ energies, zeros when x does not reach the energy (e.g. a freshly zero-initialised head)."""
    (grad,) = torch.autograd.grad(energies.sum(), x, allow_unused=True) if energies.requires_grad else (None,)
    return torch.zeros_like(x) if grad is None else grad


def sample_langevin(
    energy: Energy,
    flow: Sampler,
    n: int,
    *,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    batch_size: int | None = None,
    steps: int = 60,
    step_size: float = 0.4,
    init: str = "normal",
    space: str = "auto",
) -> torch.Tensor:
    """Short-run Langevin dynamics on p_θ (the LEBM sampler, Pang et al. 2020).

    space="latent": the chain runs in the latent z itself,

        z ← z − ½ s² (∇E(z) + z) / T + s ξ,    ξ ~ N(0, I),    s = step_size

    started from N(0, I) (`init="normal"`, LEBM's choice) or from the flow's samples (`init="flow"`,
    temperature 1).

    space="base" (neural transport, Hoffman et al. 2019) needs a `FlowBasedEnergy`, E = log p0 −
    log q_base + E_res, so that p_θ = q_base·exp(−E_res)/Z. With z = f(u), f the frozen base flow's
    `from_base`, the Jacobian of f cancels q_base and u has the density N(u; 0, I)·exp(−E_res(f(u)))/Z.
    With a mixture base (`Flow.base_components` > 1), whose components can be far narrower than the step,
    each chain runs in the standardized coordinates ξ of one component, u = μ_k + σ_k·ξ, with k drawn from
    the mixture weights and kept: exact within each component, but the residual's reweighting between
    components is not sampled (see `_langevin_chain_in_base`).
    The same update runs on u, and z = f(u) is returned:

        u ← u − ½ s² (∇_u E_res(f(u)) + u) / T + s ξ,    u (N, D),    D = prod(latent_shape)

    i.e. LEBM's sampler with f as a fixed generator. This is the same target p_θ, but well conditioned:
    in z, −log q_base has curvature ~ 1/variance of the latents, and on sharp latent sets the z-chain
    overflows at s = 0.4 (it did at every s tried, down to 0.05); in u only the small residual E_res
    shapes the target. `init="normal"` starts from u ~ N(0, I) (z then starts at q_base's samples),
    `init="flow"` from u = f⁻¹(the sampler's samples). T tempers the u-density,
    p_T(u) ∝ (N(u; 0, I)·exp(−E_res(f(u))))^(1/T), not p_θ(z): for E_res = 0 it is the base flow at
    flow temperature √T. T = 1 targets p_θ exactly, like the latent chain.

    space="auto" (the default) is "base" when the energy has a flow base (also inside a DDP or
    torch.compile wrapper), else "latent": the base-space chain is the one that does not diverge on
    sharp latents, and without a flow base there is only the latent chain.

    Both are unadjusted chains: with 60 steps of 0.4 they are short-run samplers, not exact ones (for
    a standard normal target the ULA variance tends to 1/(1 − s²/4), 1.042 at s = 0.4). Gradients
    are taken with autograd w.r.t. the chain's state only, so no parameter accumulates `.grad`; it
    works when called under `torch.no_grad()` or `torch.inference_mode()`. The base flow runs in its
    own dtype with autocast off, as in `FlowBasedEnergy.forward`. Returns (n, *latent_shape), detached.
    """
    n, batch_size = _check_common(n, temperature, batch_size)
    steps = _as_count(steps, "steps", minimum=0)
    if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
        raise LatentPriorError(f"step_size={step_size!r}: pass a finite number > 0 (LEBM uses 0.4).")
    if init not in ("normal", "flow"):
        raise LatentPriorError(f"init={init!r}: Langevin starts from 'normal' (N(0, I)) or 'flow' (the sampler's samples).")
    space, flow_based = _resolve_space(space, energy)
    batch_size = batch_size or _default_batch(flow)
    device = _device_of(flow, generator)
    parts = []
    # inference_mode(False) so a caller's inference mode cannot turn the chain into an inference tensor.
    with torch.inference_mode(False), torch.enable_grad():
        for m in _chunks(n, batch_size):
            if space == "base":
                z = _langevin_chain_in_base(flow_based, flow, m, generator, device, temperature, steps, step_size, init)
            else:
                z = _langevin_chain_in_latent(energy, flow, m, generator, device, temperature, steps, step_size, init)
            if not torch.isfinite(z).all():
                hint = (
                    "lower step_size or use method='sir'"
                    if space == "base"
                    else "pass space='base' (Langevin in the base flow's coordinates, for a flow-based energy), "
                    "lower step_size or use method='sir'"
                )
                raise LatentPriorError(
                    f"sample_langevin: the chain diverged (non-finite latents) with step_size={step_size} in space={space!r}; {hint}."
                )
            parts.append(z.detach())
    return torch.cat(parts)


def _langevin_step(
    x: torch.Tensor, grad: torch.Tensor, generator: torch.Generator | None, temperature: float, step_size: float
) -> torch.Tensor:
    """One LEBM update x − ½ s² (grad + x) / T + s ξ, detached."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x - 0.5 * step_size**2 * (grad + x) / temperature + step_size * noise).detach()


def _langevin_chain_in_latent(
    energy: Energy,
    flow: Sampler,
    m: int,
    generator: torch.Generator | None,
    device: torch.device,
    temperature: float,
    steps: int,
    step_size: float,
    init: str,
) -> torch.Tensor:
    """m chains in z: (m, *latent_shape)."""
    if init == "flow":
        z = flow.sample(m, generator=generator, temperature=1.0).detach().clone()
    else:
        z = torch.randn((m, *flow.latent_shape), generator=generator, device=device)
    for _ in range(steps):
        z.requires_grad_(True)
        z = _langevin_step(z, _grad_wrt(energy(z), z), generator, temperature, step_size)
    return z


def _langevin_chain_in_base(
    flow_based: Any,
    flow: Sampler,
    m: int,
    generator: torch.Generator | None,
    device: torch.device,
    temperature: float,
    steps: int,
    step_size: float,
    init: str,
) -> torch.Tensor:
    """m chains in the base flow's coordinates; returns z = f(u), (m, *latent_shape).

    Each chain runs in the standardized coordinates ξ of one component of the base, u = μ_k + L_k·ξ
    (`Flow.from_standard`; u = ξ for an N(0, I) base), where its target is N(ξ; 0, I)·exp(−E_res(f(u))): LEBM's update
    on ξ, well conditioned even when the components are much narrower than the step. The component is
    drawn from the mixture weights (or, for init="flow", is the one that explains the start best) and
    kept, so with a mixture base the chains are exact within each component, while the residual's
    reweighting between components is not sampled (it is when E_res = 0, and SIR does it in general)."""
    base, residual = flow_based.base, flow_based.residual
    # The residual sees z in its own dtype, so a prior cast to bfloat16 runs (ξ itself stays float32).
    residual_dtype = next((p.dtype for p in residual.parameters() if p.is_floating_point()), torch.float32)
    mixture = getattr(base, "base_components", 1) > 1
    if init == "flow":
        u = _to_base(base, flow.sample(m, generator=generator, temperature=1.0).detach())
        # the component that explains each start best
        k = base.component_log_probs(u.to(next(base.parameters()).dtype)).argmax(1) if mixture else None
        with torch.no_grad():
            xi = base.to_standard(u, k)
    else:
        k = base.sample_components(m, generator) if mixture else None
        xi = torch.randn((m, base.dim), generator=generator, device=device)
    for _ in range(steps):
        xi.requires_grad_(True)
        energies = residual(_from_base(base, base.from_standard(xi, k)).to(residual_dtype)).float()
        xi = _langevin_step(xi, _grad_wrt(energies, xi), generator, temperature, step_size)
    with torch.no_grad():
        return _from_base(base, base.from_standard(xi, k))


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "sampler": sample_flow,
    "sir": sample_sir,
    "langevin": sample_langevin,
}


def sample(method: str, energy: Energy, flow: Sampler, n: int, **kwargs: Any) -> torch.Tensor:
    """Dispatch to `SAMPLERS[method]`; kwargs are the shared keywords plus that method's options."""
    if method not in SAMPLERS:
        raise LatentPriorError(f"method={method!r}: choose one of {', '.join(SAMPLERS)}.")
    return SAMPLERS[method](energy, flow, n, **kwargs)


# ----------------------------------------------------------------------------------------------
# log Z by importance sampling


class _StreamingLogSumExp:
    """Running logsumexp over a stream of float64 chunks, plus its value at chosen prefix lengths."""

    def __init__(self, checkpoints: set[int] | None = None) -> None:
        self.value = torch.tensor(-math.inf, dtype=torch.float64)
        self.count = 0
        self.checkpoints = checkpoints or set()
        self.at: dict[int, float] = {}

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().reshape(-1).cpu()
        if self.checkpoints:
            wanted = [k for k in sorted(self.checkpoints) if self.count < k <= self.count + len(values)]
            if wanted:
                prefix = torch.logcumsumexp(values, dim=0)
                for k in wanted:
                    self.at[k] = torch.logaddexp(self.value, prefix[k - self.count - 1]).item()
        self.value = torch.logaddexp(self.value, torch.logsumexp(values, dim=0))
        self.count += len(values)


@dataclass
class LogZEstimate:
    """Importance-sampling estimate of log Z with its diagnostics.

    log_z:         log Ẑ_K in nats. E[log Ẑ_K] ≤ log Z (Jensen), so it is biased low and tightens as K grows.
    ess:           effective sample size (Σw)² / Σw² of the K importance weights, in [1, K].
    ess_fraction:  ess / K; near 1 when q_φ ≈ p_θ, near 0 when the weights degenerate (then log Ẑ is unreliable).
    num_samples:   K.
    curve:         [(k, log Ẑ_k)] for k = 1, 2, 4, ... and K: the running estimate, to judge convergence in K.
    """

    log_z: float
    ess: float
    ess_fraction: float
    num_samples: int
    curve: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def estimate_log_z(
    energy: Energy,
    flow: Sampler,
    num_samples: int = 4096,
    *,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> LogZEstimate:
    """log Ẑ_K = logsumexp_k[log p0(z_k) − E(z_k) − log q_φ(z_k)] − log K with z_k ~ q_φ, in float64.

    Streams over chunks of `batch_size` proposals, keeping running logsumexps of log w and 2·log w,
    so memory does not grow with K. ESS = exp(2·lse(log w) − lse(2·log w)).
    """
    num_samples = _as_count(num_samples, "num_samples")
    batch_size = None if batch_size is None else _as_count(batch_size, "batch_size")
    batch_size = batch_size or _default_batch(flow)
    checkpoints = {2**i for i in range(num_samples.bit_length()) if 2**i <= num_samples} | {num_samples}
    lse_w = _StreamingLogSumExp(checkpoints)
    lse_w2 = _StreamingLogSumExp()
    shared = shares_basis(energy, flow)
    for m in _chunks(num_samples, batch_size):
        z, log_q, e = propose(energy, flow, m, generator=generator, shared_basis=shared)
        log_w = log_importance_weights(e, z, log_q)
        if torch.isnan(log_w).any() or torch.isposinf(log_w).any():
            raise LatentPriorError("estimate_log_z: the energy or the flow returned NaN/inf log-densities; check the checkpoint.")
        lse_w.update(log_w)
        lse_w2.update(2.0 * log_w)
    log_z = lse_w.value.item() - math.log(num_samples)
    ess = math.exp(2.0 * lse_w.value.item() - lse_w2.value.item()) if math.isfinite(lse_w.value.item()) else 0.0
    curve = [(k, lse_w.at[k] - math.log(k)) for k in sorted(lse_w.at)]
    return LogZEstimate(log_z=log_z, ess=ess, ess_fraction=ess / num_samples, num_samples=num_samples, curve=curve)


# ----------------------------------------------------------------------------------------------
# ELBO gain


@torch.no_grad()
def elbo_gain(
    energy: Energy,
    posterior_mean: torch.Tensor,
    posterior_logvar: torch.Tensor | None,
    log_z: float | LogZEstimate,
    *,
    num_draws: int = 1,
    generator: torch.Generator | None = None,
    batch_size: int = 4096,
    data_dims: int | None = None,
) -> dict[str, Any]:
    """ELBO_θ(x) − ELBO_0(x) = E_{q(z|x)}[−E(z)] − log Z, averaged over the given posteriors.

    posterior_mean, posterior_logvar: (N, *latent_shape) in *normalized* latent space (logvar None
    for a deterministic encoder: then z = mean). The expectation uses `num_draws` reparameterised
    draws per item. With the encoder and decoder frozen, only the prior term of the ELBO changes.

    Returns a JSON-able dict: `gain_nats` (mean per item), `std_err_nats` (over items),
    `gain_bits_per_latent_dim` (÷ D_z ln 2), `gain_bits_per_data_dim` (÷ D_x ln 2, the usual ELBO
    bits/dim, when `data_dims` = D_x is given, else None), `mean_neg_energy_nats`, `log_z`, counts,
    and `is_estimate`/`note`: log Ẑ is biased low, so this gain is optimistic.
    """
    if posterior_mean.dim() < 2 or posterior_mean.shape[0] == 0:
        raise LatentPriorError(f"posterior_mean has shape {tuple(posterior_mean.shape)}: pass (N, *latent_shape) with N ≥ 1.")
    if posterior_logvar is not None and posterior_logvar.shape != posterior_mean.shape:
        raise LatentPriorError(
            f"posterior_logvar has shape {tuple(posterior_logvar.shape)} but posterior_mean has "
            f"{tuple(posterior_mean.shape)}; pass moments of the same latents."
        )
    num_draws = _as_count(num_draws, "num_draws")
    batch_size = _as_count(batch_size, "batch_size")
    log_z_value = log_z.log_z if isinstance(log_z, LogZEstimate) else float(log_z)
    n, dims = posterior_mean.shape[0], int(math.prod(posterior_mean.shape[1:]))
    neg_energy = torch.zeros(n, dtype=torch.float64)
    for start in range(0, n, batch_size):
        mean = posterior_mean[start : start + batch_size]
        for _ in range(num_draws):
            logvar = None if posterior_logvar is None else posterior_logvar[start : start + batch_size]
            z = posterior_draw(mean, logvar, generator)
            neg_energy[start : start + len(mean)] -= energy(z).double().reshape(-1).cpu() / num_draws
    gain = neg_energy - log_z_value
    gain_nats = gain.mean().item()
    std_err = (gain.std().item() / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "gain_nats": gain_nats,
        "std_err_nats": std_err,
        "gain_bits_per_latent_dim": gain_nats / (dims * math.log(2)),
        "gain_bits_per_data_dim": None if data_dims is None else gain_nats / (data_dims * math.log(2)),
        "mean_neg_energy_nats": neg_energy.mean().item(),
        "log_z": log_z_value,
        "num_items": n,
        "num_draws": num_draws,
        "latent_dims": dims,
        "is_estimate": True,
        "note": "optimistic estimate: log Z is replaced by its importance-sampling estimate, which is biased low (E[log Ẑ] ≤ log Z)",
    }
