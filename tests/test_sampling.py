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
    torch.testing.assert_close(log_importance_weights(energy, z, log_q), expected)


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
