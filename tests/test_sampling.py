"""Samplers, log Ẑ and the ELBO gain, checked on a 2-D case whose answer is known in closed form.

With E(z) = ½ zᵀ(A − I)z the model p_θ ∝ N(0, I)·exp(−E) is exactly N(0, A⁻¹), and
Z = E_{p0}[exp(−E)] = det(A)^(−1/2). The proposal q_φ is `GaussianFlow`, a real multivariate normal
with the flow interface (sample / log_prob / sample_and_log_prob / latent_shape): an exact density,
not a mock, standing in for `latent_prior.flows` so these tests do not depend on that module.

Tolerances were measured over seeds before being set: at n = 4000 and M = 50 the SIR mean and
covariance entries erred by at most 0.033 / 0.031 (30 seeds); log Ẑ at K = 4096 by at most 0.041
(sd 0.014, 30 seeds); Langevin covariances (60 steps of 0.4) by at most 0.038 at n = 4000 (10
seeds), hence n = 20000 for a 0.03 tolerance; and at T = 2 with 300 steps of 0.15 by at most 0.051
(10 seeds), against a 0.1 tolerance.
"""

import math

import numpy as np
import pytest
import torch

from latent_prior.errors import LatentPriorError
from latent_prior.sampling import (
    SAMPLERS,
    TEMPERATURE_MEANING,
    LogZEstimate,
    _StreamingLogSumExp,
    elbo_gain,
    estimate_log_z,
    log_importance_weights,
    log_standard_normal,
    sample,
    sample_flow,
    sample_langevin,
    sample_sir,
)

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
TARGET_COV = torch.linalg.inv(A)
TRUE_LOG_Z = -0.5 * math.log(torch.linalg.det(A).item())


class GaussianFlow:
    """N(mean, cov) with the flow interface; `temperature` scales the base noise like a flow's ε."""

    def __init__(self, mean, cov):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.chol = torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float32))
        self.latent_shape = (len(self.mean),)

    def sample(self, n, *, generator=None, temperature=1.0):
        eps = torch.randn(n, len(self.mean), generator=generator)
        return self.mean + temperature * eps @ self.chol.T

    def log_prob(self, z):
        return torch.distributions.MultivariateNormal(self.mean, scale_tril=self.chol).log_prob(z)

    def sample_and_log_prob(self, n, *, generator=None, temperature=1.0):
        z = self.sample(n, generator=generator, temperature=temperature)
        return z, torch.distributions.MultivariateNormal(self.mean, scale_tril=temperature * self.chol).log_prob(z)


class QuadraticEnergy(torch.nn.Module):
    """E(z) = ½ zᵀ(A − I)z in nats, with A as a trainable parameter (to check no .grad leaks)."""

    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(a.clone())

    def forward(self, z):
        b = self.a - torch.eye(len(self.a))
        return 0.5 * ((z @ b) * z).sum(dim=1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# A proposal that is off-centre and round, so SIR must both move and correlate the samples.
PROPOSAL = GaussianFlow([0.5, 0.5], 0.81 * torch.eye(2))


def test_log_standard_normal_matches_torch():
    z = torch.randn(5, 2, 3, 4, generator=gen())
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=(1, 2, 3))
    torch.testing.assert_close(log_standard_normal(z), expected)


def test_sample_flow_is_the_flow_and_respects_chunks():
    z = sample_flow(None, PROPOSAL, 10, generator=gen(3), batch_size=4)
    assert z.shape == (10, 2)
    again = sample_flow(None, PROPOSAL, 10, generator=gen(3), batch_size=4)
    torch.testing.assert_close(z, again)  # the generator drives all randomness
    # Same numbers as calling the flow chunk by chunk.
    g = gen(3)
    direct = torch.cat([PROPOSAL.sample(m, generator=g) for m in (4, 4, 2)])
    torch.testing.assert_close(z, direct)


def test_sir_matches_the_target_not_the_authors_weighting():
    energy = QuadraticEnergy(A)
    z = sample_sir(energy, PROPOSAL, 4000, generator=gen(0), proposals=50, batch_size=1500)
    assert z.shape == (4000, 2)
    assert z.mean(0).abs().max() < 0.06
    assert (torch.cov(z.T) - TARGET_COV).abs().max() < 0.06
    # Weighting by exp(−E) alone would target q·exp(−E), whose mean is about (0.12, 0.22) here.
    precision = torch.eye(2) / 0.81 + A - torch.eye(2)
    wrong_mean = torch.linalg.solve(precision, torch.tensor([0.5, 0.5]) / 0.81)
    assert wrong_mean.abs().min() > 0.1
    assert (z.mean(0) - wrong_mean).abs().max() > 0.08


def test_sir_temperature_tempers_the_target():
    energy = QuadraticEnergy(A)
    z = sample_sir(energy, PROPOSAL, 4000, generator=gen(1), temperature=0.5, proposals=50)
    # p_T ∝ N(0, A⁻¹)^(1/T) = N(0, T·A⁻¹).
    assert (torch.cov(z.T) - 0.5 * TARGET_COV).abs().max() < 0.04
    assert "tempers the target" in TEMPERATURE_MEANING["sir"]


def test_sir_reproducible_and_weights_formula():
    energy = QuadraticEnergy(A)
    a = sample_sir(energy, PROPOSAL, 7, generator=gen(5), proposals=9, batch_size=3)
    b = sample_sir(energy, PROPOSAL, 7, generator=gen(5), proposals=9, batch_size=3)
    torch.testing.assert_close(a, b)
    z, log_q = PROPOSAL.sample_and_log_prob(4, generator=gen(2))
    expected = (log_standard_normal(z) - energy(z) - log_q).double()
    torch.testing.assert_close(log_importance_weights(energy(z), z, log_q), expected)


def ula_covariance(steps, step_size, temperature=1.0):
    """Covariance of the unadjusted Langevin chain from N(0, I) on this Gaussian, exactly."""
    b = torch.eye(2, dtype=torch.float64) - 0.5 * step_size**2 * A.double() / temperature
    c = torch.eye(2, dtype=torch.float64)
    for _ in range(steps):
        c = b @ c @ b.T + step_size**2 * torch.eye(2, dtype=torch.float64)
    return c.float()


def test_langevin_follows_the_exact_discretised_chain():
    energy = QuadraticEnergy(A)
    z = sample_langevin(energy, PROPOSAL, 20000, generator=gen(0))  # 60 steps of 0.4 (LEBM defaults)
    expected = ula_covariance(60, 0.4)
    assert z.mean(0).abs().max() < 0.03
    assert (torch.cov(z.T) - expected).abs().max() < 0.03
    # The short-run chain is biased at s = 0.4 by more than that tolerance: the check can tell.
    assert (expected - TARGET_COV).abs().max() > 0.04


def test_langevin_small_steps_reach_the_tempered_target():
    energy = QuadraticEnergy(A)
    z = sample_langevin(energy, PROPOSAL, 4000, generator=gen(1), steps=300, step_size=0.15, temperature=2.0)
    assert (torch.cov(z.T) - 2.0 * TARGET_COV).abs().max() < 0.1


def test_langevin_under_no_grad_and_inference_mode_leaves_no_parameter_grads():
    energy = QuadraticEnergy(A)
    with torch.no_grad():
        a = sample_langevin(energy, PROPOSAL, 50, generator=gen(4), steps=5)
    with torch.inference_mode():
        b = sample_langevin(energy, PROPOSAL, 50, generator=gen(4), steps=5)
    torch.testing.assert_close(a, b)
    assert energy.a.grad is None
    assert not a.requires_grad


def test_langevin_flow_init_starts_from_the_flow():
    z = sample_langevin(QuadraticEnergy(A), PROPOSAL, 9, generator=gen(6), steps=0, init="flow", batch_size=4)
    g = gen(6)
    torch.testing.assert_close(z, torch.cat([PROPOSAL.sample(m, generator=g) for m in (4, 4, 1)]))


def test_langevin_with_zero_energy_samples_the_gaussian_base():
    # E = 0 (z drops out of the energy's graph): the chain targets N(0, I); its exact ULA variance
    # after k steps from N(0, I) is v_k = (1 − s²/2)² v_(k−1) + s².
    z = sample_langevin(lambda z: torch.zeros(len(z)), PROPOSAL, 20000, generator=gen(7), steps=5)
    v = 1.0
    for _ in range(5):
        v = (1 - 0.4**2 / 2) ** 2 * v + 0.4**2
    assert (z.var(0) - v).abs().max() < 0.04


def test_langevin_divergence_is_reported():
    with pytest.raises(LatentPriorError, match="step_size"):
        sample_langevin(QuadraticEnergy(A), PROPOSAL, 10, generator=gen(0), steps=200, step_size=3.0)


def test_dispatcher_and_bad_input():
    assert set(SAMPLERS) == {"sampler", "sir", "langevin"}
    z = sample("langevin", QuadraticEnergy(A), PROPOSAL, 6, generator=gen(0), steps=2)
    assert z.shape == (6, 2)
    with pytest.raises(LatentPriorError, match="method='mcmc'"):
        sample("mcmc", QuadraticEnergy(A), PROPOSAL, 6)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(LatentPriorError, match="n="):
            sample("sampler", None, PROPOSAL, bad)
    assert sample("sampler", None, PROPOSAL, np.int64(3)).shape == (3, 2)  # numpy ints are counts too
    with pytest.raises(LatentPriorError, match="steps=-1"):
        sample("langevin", QuadraticEnergy(A), PROPOSAL, 4, steps=-1)
    with pytest.raises(LatentPriorError, match="batch_size=0"):
        sample("sampler", None, PROPOSAL, 4, batch_size=0)
    with pytest.raises(LatentPriorError, match="temperature"):
        sample("sir", QuadraticEnergy(A), PROPOSAL, 4, temperature=0.0)
    with pytest.raises(LatentPriorError, match="proposals"):
        sample("sir", QuadraticEnergy(A), PROPOSAL, 4, proposals=0)
    with pytest.raises(LatentPriorError, match="init"):
        sample("langevin", QuadraticEnergy(A), PROPOSAL, 4, init="uniform")


def test_sir_reports_all_nan_weights():
    def broken(z):
        return torch.full((len(z),), float("nan"))

    with pytest.raises(LatentPriorError, match="non-finite"):
        sample_sir(broken, PROPOSAL, 3, generator=gen(0), proposals=4)


def test_log_z_matches_closed_form():
    est = estimate_log_z(QuadraticEnergy(A), PROPOSAL, 4096, batch_size=1000, generator=gen(0))
    assert isinstance(est, LogZEstimate)
    assert abs(est.log_z - TRUE_LOG_Z) < 0.06
    assert 0.2 < est.ess_fraction < 0.9  # a mismatched proposal loses effective samples
    ks = [k for k, _ in est.curve]
    assert ks == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert est.curve[-1][1] == pytest.approx(est.log_z)


def test_log_z_with_the_exact_proposal_has_full_ess():
    # q = p_θ makes every weight equal to Z: log Ẑ is exact for any K and ESS = K.
    exact = GaussianFlow([0.0, 0.0], TARGET_COV)
    est = estimate_log_z(QuadraticEnergy(A), exact, 1000, batch_size=300, generator=gen(1))
    assert est.log_z == pytest.approx(TRUE_LOG_Z, abs=1e-4)
    assert est.ess == pytest.approx(1000, rel=1e-4)
    assert [k for k, _ in est.curve][-1] == 1000 and len(est.curve) == 11
    assert all(v == pytest.approx(TRUE_LOG_Z, abs=1e-4) for _, v in est.curve)


def test_streaming_logsumexp_equals_one_shot():
    values = torch.randn(1000, generator=gen(2), dtype=torch.float64) * 5
    stream = _StreamingLogSumExp({1, 64, 1000})
    for chunk in values.split(37):
        stream.update(chunk)
    assert stream.value.item() == pytest.approx(torch.logsumexp(values, 0).item(), rel=1e-12)
    assert stream.at[1] == pytest.approx(values[0].item())
    assert stream.at[64] == pytest.approx(torch.logsumexp(values[:64], 0).item(), rel=1e-12)


def test_elbo_gain_sign_and_units():
    energy = QuadraticEnergy(A)
    n = 4000
    # Posteriors concentrated on draws from p_θ itself: the expected gain is KL(p_θ ‖ p0) > 0.
    means = torch.randn(n, 2, generator=gen(0)) @ torch.linalg.cholesky(TARGET_COV).T
    logvar = torch.full_like(means, math.log(1e-4))
    out = elbo_gain(energy, means, logvar, TRUE_LOG_Z, num_draws=2, generator=gen(1), data_dims=64)
    kl = 0.5 * (torch.trace(TARGET_COV).item() - 2 + math.log(torch.linalg.det(A).item()))
    assert out["gain_nats"] == pytest.approx(kl, abs=4 * out["std_err_nats"] + 0.01)
    assert out["gain_nats"] > 0
    assert out["gain_bits_per_latent_dim"] == pytest.approx(out["gain_nats"] / (2 * math.log(2)))
    assert out["gain_bits_per_data_dim"] == pytest.approx(out["gain_nats"] / (64 * math.log(2)))
    assert out["is_estimate"] is True and "optimistic" in out["note"]
    # Posteriors that follow p0 instead: the learned prior costs nats, gain = −KL(p0 ‖ p_θ) < 0.
    means = torch.randn(n, 2, generator=gen(2))
    est = LogZEstimate(log_z=TRUE_LOG_Z, ess=1.0, ess_fraction=1.0, num_samples=1)
    worse = elbo_gain(energy, means, None, est)
    kl_back = 0.5 * (torch.trace(A).item() - 2 - math.log(torch.linalg.det(A).item()))
    assert worse["gain_nats"] == pytest.approx(-kl_back, abs=4 * worse["std_err_nats"])
    assert worse["gain_nats"] < 0 and worse["gain_bits_per_data_dim"] is None


def test_elbo_gain_bad_shapes():
    with pytest.raises(LatentPriorError, match="posterior_logvar"):
        elbo_gain(QuadraticEnergy(A), torch.zeros(3, 2), torch.zeros(3, 4), 0.0)


# ----------------------------------------------------------------------------------------------
# Langevin in the base flow's coordinates (space="base"), on real `latent_prior` flows and energies


def _flow_based(latent_scale, *, nonlinear, residual=None, seed=0):
    """A FlowBasedEnergy whose base RealNVP is ActNorm-initialized on correlated 2-D latents of about
    `latent_scale` standard deviation (its couplings are the identity unless `nonlinear`), and whose
    residual is `residual` or an MLP with a zeroed head (E_res ≡ 0)."""
    from latent_prior.energy import FlowBasedEnergy, build_energy
    from latent_prior.flows import build_flow

    torch.manual_seed(seed)
    base = build_flow((2,), num_blocks=2, hidden=16)
    mix = torch.tensor([[1.0, 0.0], [0.8, 0.5]])
    base.initialize(latent_scale * torch.randn(2048, 2) @ mix.T + torch.tensor([1.0, -0.5]))
    if nonlinear:  # random conditioner outputs make the couplings, and so q_base, non-Gaussian
        with torch.no_grad():
            for name, p in base.named_parameters():
                if ".net." in name:
                    p.add_(0.3 * torch.randn_like(p))
    if residual is None:
        residual = build_energy((2,), hidden=16, depth=2)
        with torch.no_grad():
            residual.head.weight.zero_()
    return FlowBasedEnergy(residual, base)


def ula_variance(steps, step_size):
    """Variance after `steps` ULA steps from N(0, 1) on a standard normal target: v ← (1 − s²/2)² v + s².
    It tends to 1/(1 − s²/4), 1.042 at s = 0.4 (60 steps are there to within 1e-4)."""
    v = 1.0
    for _ in range(steps):
        v = (1 - step_size**2 / 2) ** 2 * v + step_size**2
    return v


def test_base_space_langevin_follows_q_base_where_the_latent_chain_diverges():
    # The base scales the latents by 0.05: −log q_base has curvature ~1/0.05² = 400 in z, so the
    # z-chain's drift multiplies z by about 1 − ½·0.4²·400 = −31 per step and overflows.
    energy = _flow_based(0.05, nonlinear=True)
    base = energy.base
    with pytest.raises(LatentPriorError, match="space='base'"):
        sample_langevin(energy, base, 200, generator=gen(0), space="latent")
    z = sample_langevin(energy, base, 4000, generator=gen(0), space="base")  # 60 steps of 0.4
    assert z.shape == (4000, 2) and torch.isfinite(z).all()
    # E_res = 0: the chain in u is ULA on N(0, I), exactly; its variance is 1/(1 − s²/4) ≈ 1.042.
    u = base.to_base(z)[0].detach()
    assert u.mean(0).abs().max() < 0.06
    assert (torch.cov(u.T) - ula_variance(60, 0.4) * torch.eye(2)).abs().max() < 0.07
    # In z, the samples follow q_base (up to that 4% excess variance in u): compare with q_base's draws.
    ref = base.sample(4000, generator=gen(1)).detach()
    scale = torch.cov(ref.T).abs().max()
    assert ((z.mean(0) - ref.mean(0)).abs() / scale.sqrt()).max() < 0.07
    assert (torch.cov(z.T) - torch.cov(ref.T)).abs().max() < 0.15 * scale
    assert energy.residual.body[0].weight.grad is None and not z.requires_grad


class LinearResidual(torch.nn.Module):
    """E_res(z) = a·z_0 in nats, a a trainable parameter (to check that no .grad leaks)."""

    latent_shape = (2,)
    config = {"kind": "linear-test"}

    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(float(a)))

    def forward(self, z):
        return self.a * z[:, 0]


def test_a_linear_residual_shifts_the_mean_by_minus_a_times_the_variance():
    # The base is affine here (identity couplings), z = L u + b, so E_res(f(u)) = a·(L u + b)_0 is
    # linear in u: its gradient is c = a·L[0]ᵀ, the u-chain's mean is exactly −c·(1 − (1 − s²/2)^k)
    # after k steps from 0, and E[z] = b − a·(1 − (1 − s²/2)^k)·Σ[:, 0] with Σ = L Lᵀ the base's
    # covariance: the mean of z_0 moves by −a·Var_q(z_0), less the 0.7% not reached in 60 steps.
    a = 2.0
    energy = _flow_based(0.6, nonlinear=False, residual=LinearResidual(a))
    base = energy.base
    f = lambda u: base.from_base(u)[0]  # noqa: E731
    b = f(torch.zeros(1, 2)).detach()[0]
    jac = torch.autograd.functional.jacobian(f, torch.zeros(1, 2))[0, :, 0, :]
    sigma = jac @ jac.T
    expected = b - a * (1 - (1 - 0.4**2 / 2) ** 60) * sigma[:, 0]
    assert sigma[0, 0] < 0.5 and (expected - b).abs().max() > 0.4  # a visible shift, and unlike −a in u
    with torch.no_grad():
        z = sample_langevin(energy, base, 4000, generator=gen(2), space="base")
    assert (z.mean(0) - expected).abs().max() < 0.05
    assert energy.residual.a.grad is None


def test_space_base_needs_a_flow_based_energy_and_auto_picks_latent_otherwise():
    with pytest.raises(LatentPriorError, match="FlowBasedEnergy"):
        sample_langevin(QuadraticEnergy(A), PROPOSAL, 4, generator=gen(0), space="base")
    with pytest.raises(LatentPriorError, match="space='z'"):
        sample_langevin(QuadraticEnergy(A), PROPOSAL, 4, generator=gen(0), space="z")
    auto = sample_langevin(QuadraticEnergy(A), PROPOSAL, 50, generator=gen(3), steps=5)
    latent = sample_langevin(QuadraticEnergy(A), PROPOSAL, 50, generator=gen(3), steps=5, space="latent")
    torch.testing.assert_close(auto, latent)


class Wrapper(torch.nn.Module):
    """Keeps the wrapped energy as `.module`, the attribute DDP and Accelerate use."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, z):
        return self.module(z)


def test_auto_picks_base_space_for_a_flow_based_energy_also_when_wrapped():
    energy = _flow_based(0.05, nonlinear=True, residual=LinearResidual(0.3))
    base_run = sample_langevin(energy, energy.base, 30, generator=gen(4), steps=5, space="base")
    for wrapped in (energy, Wrapper(energy)):
        torch.testing.assert_close(sample_langevin(wrapped, energy.base, 30, generator=gen(4), steps=5), base_run)


def test_base_space_flow_init_starts_from_the_samplers_draws():
    energy = _flow_based(0.05, nonlinear=True)
    sampler = GaussianFlow([1.0, -0.5], 0.003 * torch.eye(2))  # another density than the base
    z = sample_langevin(energy, sampler, 9, generator=gen(6), steps=0, init="flow", space="base", batch_size=4)
    g = gen(6)
    torch.testing.assert_close(z, torch.cat([sampler.sample(m, generator=g) for m in (4, 4, 1)]), atol=1e-4, rtol=1e-4)


def test_prior_langevin_default_does_not_diverge_on_sharp_latents(tmp_path, capsys):
    from safetensors.torch import load_file

    from latent_prior.cli import main
    from latent_prior.energy import build_energy
    from latent_prior.prior import LatentPrior

    energy = _flow_based(0.05, nonlinear=True, residual=build_energy((2,), hidden=16, depth=2))
    prior = LatentPrior(energy, energy.base, latent_shape=(2,))
    z = prior.sample(500, method="langevin", generator=gen(0))  # space="auto" -> "base"
    assert torch.isfinite(z).all()
    ref = energy.base.sample(2000, generator=gen(1)).detach()  # the residual is ~0 at init: p ≈ q_base
    assert (z.mean(0) - ref.mean(0)).abs().max() < 0.03 and z.std(0).max() < 2 * ref.std(0).max()
    with pytest.raises(LatentPriorError, match="space='base'"):
        prior.sample(50, method="langevin", generator=gen(0), space="latent")
    # The CLI flag reaches the sampler.
    prior.save_pretrained(tmp_path / "p")
    out = tmp_path / "z.safetensors"
    args = ["sample", "--prior", str(tmp_path / "p"), "-n", "40", "--out", str(out), "--method", "langevin", "--device", "cpu"]
    assert main(args + ["--langevin-space", "latent"]) == 2
    assert "space='base'" in capsys.readouterr().err
    assert main(args) == 0
    assert torch.isfinite(load_file(str(out))["latents"]).all()


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_base_space_langevin_with_a_mixture_base_keeps_both_modes(covariance):
    """With a mixture base each chain runs in the standardized coordinates of one component, so with
    E_res = 0 the chains keep q_base's two narrow modes (0.09-0.56 wide in the base coordinates, down to 4
    times narrower than the step of 0.4) and their weights. A chain in u itself, with −∇log m(u) as its drift, overshoots
    such a mode at every step: on these modes it overflowed (non-finite latents after 60 steps)."""
    from latent_prior.energy import FlowBasedEnergy, build_energy
    from latent_prior.flows import build_flow

    torch.manual_seed(0)
    base = build_flow(
        (2,), num_blocks=2, hidden=16, base_components=2, base_covariance=covariance, base_init="em" if covariance == "full" else "kmeans"
    )
    data = torch.cat([0.1 * torch.randn(3000, 2) + 2.0, 0.1 * torch.randn(1000, 2) - 2.0])
    base.initialize(data)
    residual = build_energy((2,), hidden=16, depth=2)
    with torch.no_grad():
        residual.head.weight.zero_()
    energy = FlowBasedEnergy(residual, base)
    z = sample_langevin(energy, base, 4000, generator=gen(0))  # auto: base space
    right = z[:, 0] > 0
    assert right.float().mean().item() == pytest.approx(0.75, abs=0.03)  # the modes' weights
    between = (z[:, 0].abs() < 1.0).float().mean().item()
    assert between < 0.01, between  # nothing on a bridge between the modes
    assert z[right].mean(0).numpy() == pytest.approx([2.0, 2.0], abs=0.05)
    # Each mode as wide as q_base's own (up to the ULA's 2 % in standard deviation), not as wide as the gap.
    ref = base.sample(4000, generator=gen(1)).detach()
    ratio = z[right].std(0) / ref[ref[:, 0] > 0].std(0)
    assert ((ratio - 1).abs() < 0.1).all(), ratio


def test_base_space_langevin_on_a_subspace_flow_keeps_its_components_apart():
    """The subspace flow's mixture reaches the trailing axes too (a scale per component there): base-space Langevin
    with E_res = 0 keeps both modes, their weights, and each mode's own spread on the trailing axes."""
    from latent_prior.energy import FlowBasedEnergy, build_energy
    from latent_prior.flows import build_flow

    torch.manual_seed(0)
    left = torch.cat([0.1 * torch.randn(1000, 2) - 2.0, 0.05 * torch.randn(1000, 2)], 1)
    right = torch.cat([0.1 * torch.randn(3000, 2) + 2.0, 0.5 * torch.randn(3000, 2)], 1)
    base = build_flow(
        (4,), kind="subspace", subspace_dims=2, num_blocks=2, hidden=16, base_components=2, base_covariance="full", base_init="em"
    )
    base.initialize(torch.cat([right, left]))
    residual = build_energy((4,), hidden=16, depth=2)
    with torch.no_grad():
        residual.head.weight.zero_()
    z = sample_langevin(FlowBasedEnergy(residual, base), base, 4000, generator=gen(0)).detach()
    on_right = z[:, 0] > 0
    assert on_right.float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert (z[:, 0].abs() < 1.0).float().mean().item() < 0.01
    spread = z[on_right, 2:].std().item(), z[~on_right, 2:].std().item()
    assert spread[0] == pytest.approx(0.5, rel=0.1) and spread[1] == pytest.approx(0.05, rel=0.2), spread
