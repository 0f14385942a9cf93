"""The benchmark's synthetic latent sets (bench/datasets.py): their true densities and what makes them tests of a prior.

The suite that measures priors on them is tests/test_bench_suite.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench/` lives at the repo root, outside the installed package

from bench.datasets import MixtureDensity, make_synthetic  # noqa: E402


def test_mixture_density_matches_scipy():
    g = torch.Generator().manual_seed(0)
    k, d = 3, 4
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) + 0.5 * torch.eye(d, dtype=torch.float64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    density = MixtureDensity(weights, means, covs)
    x = torch.randn(50, d, generator=g, dtype=torch.float64)
    expected = np.log(sum(w * multivariate_normal(m.numpy(), c.numpy()).pdf(x.numpy()) for w, m, c in zip(weights.tolist(), means, covs)))
    np.testing.assert_allclose(density.log_prob(x).numpy(), expected, rtol=1e-10, atol=1e-10)
    # convolving with N(0, s²I) adds s² to each covariance: check on one component
    conv = density.convolved(0.25)
    single = MixtureDensity(torch.ones(1), means[:1], covs[:1]).convolved(0.25)
    np.testing.assert_allclose(
        single.log_prob(x).numpy(),
        multivariate_normal(means[0].numpy(), (covs[0] + 0.25 * torch.eye(d, dtype=torch.float64)).numpy()).logpdf(x.numpy()),
        rtol=1e-10,
    )
    assert conv.log_prob(x).shape == (50,)


@pytest.mark.parametrize("name, shape", [("mixture", (8,)), ("ring", (2,)), ("spatial", (4, 8, 8))])
def test_synthetic_sets_have_moments_and_a_true_density(name, shape):
    s = make_synthetic(name, n_train=200, n_heldout=100, seed=0)
    assert s.latent_shape == shape
    assert s.train_mean.shape == (200, *shape) and s.heldout_logvar.shape == (100, *shape)
    assert torch.all(s.train_logvar < 0)  # small posterior variances, so fresh draws differ from the means
    g = torch.Generator().manual_seed(1)
    draws = s.draws("heldout", 400, g)
    assert draws.shape == (400, *shape)
    # the true aggregate density prefers its own draws to N(0, I) draws (by a wide margin for these sets)
    gauss = torch.randn(400, *shape, generator=g)
    assert s.true_log_prob(draws).mean() > s.true_log_prob(gauss).mean() + 1.0
    # latents at roughly unit scale, as normalized VAE latents
    assert 0.3 < draws.reshape(400, -1).var(0).mean().item() < 3.0


def test_a_gmm_on_the_mixture_lands_on_its_modes_and_the_gaussian_between_them():
    """What makes the mixture set a test of priors: 8 separated modes that N(0, I) misses and a GMM fitted to the
    posterior moments finds, by the true density and by k-NN precision against held-out draws."""
    from latent_prior.baselines import GMMPrior
    from latent_prior.metrics import precision_recall_knn
    from latent_prior.vae import posterior_moments

    s = make_synthetic("mixture", n_train=600, n_heldout=300, seed=0)
    means, variances = posterior_moments(s.train_mean, s.train_logvar, normalization=s.normalization)
    gmm = GMMPrior(n_components=10, covariance="full", seed=0).fit(means, variances)
    g = torch.Generator().manual_seed(2)
    held = s.draws("heldout", 300, g)
    fitted, gauss = gmm.sample(300, generator=g).float(), torch.randn(300, 8, generator=g)
    assert precision_recall_knn(held, fitted, k=3).precision > precision_recall_knn(held, gauss, k=3).precision + 0.3
    assert s.true_log_prob(fitted).mean() > s.true_log_prob(gauss).mean() + 1.0
