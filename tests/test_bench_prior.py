"""Smoke tests of the prior benchmark (bench/prior.py) and its synthetic latent sets (bench/datasets.py).

The harness runs for real on a tiny setting (one synthetic set, a 30-step EVaLP fit); nothing is mocked.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench/` lives at the repo root, outside the installed package

from bench import prior as bench_prior  # noqa: E402
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
    expected = np.log(sum(w * multivariate_normal(m.numpy(), c.numpy()).pdf(x.numpy())
                          for w, m, c in zip(weights.tolist(), means, covs)))
    np.testing.assert_allclose(density.log_prob(x).numpy(), expected, rtol=1e-10, atol=1e-10)
    # convolving with N(0, s²I) adds s² to each covariance: check on one component
    conv = density.convolved(0.25)
    single = MixtureDensity(torch.ones(1), means[:1], covs[:1]).convolved(0.25)
    np.testing.assert_allclose(single.log_prob(x).numpy(),
                               multivariate_normal(means[0].numpy(), (covs[0] + 0.25 * torch.eye(d, dtype=torch.float64)).numpy()).logpdf(x.numpy()),
                               rtol=1e-10)
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


def test_quick_run_writes_tables_and_goals(tmp_path, capsys):
    out = tmp_path / "prior.md"
    rc = bench_prior.main([
        "--quick", "--sets", "mixture", "--methods", "gaussian,gmm,evalp,langevin", "--steps", "30",
        "--samples", "300", "--timing-batch", "100", "--threads", "1",
        "--fit", "flow_hidden=32", "energy_hidden=32", "eval_samples=256", "log_z_samples=512",
        "--out", str(out),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "command:" in printed and "seed: 0" in printed and "torch" in printed
    data = json.loads(out.with_suffix(".json").read_text())
    (result,) = data["sets"]
    rows = {r["method"]: r for r in result["rows"]}
    for method in ("N(0, I)", "GMM (10, full cov, on posterior draws)", "EVaLP sampler", "Langevin (60, s=0.4) on EVaLP energy"):
        row = rows[method]
        assert "error" not in row, row.get("error")
        for key in ("excess_fd", "mmd2", "precision", "recall", "log_p_true", "samples_per_second"):
            assert math.isfinite(row[key]), (method, key)
        assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0
    assert rows["train posteriors (floor)"]["excess_fd"] == 0.0
    # --quick measures each cheap method on 2 independent sample sets and reports their spread
    assert rows["N(0, I)"]["repeats"] == 2 and rows["N(0, I)"]["excess_fd_sd"] > 0
    assert math.isfinite(result["fd_noise"]) and result["fd_noise"] > 0
    # On 8 well-separated modes the GMM lands on the modes, N(0, I) mostly between them.
    gmm, gauss = rows["GMM (10, full cov, on posterior draws)"], rows["N(0, I)"]
    assert gmm["precision"] > gauss["precision"] + 0.3
    assert gmm["log_p_true"] > gauss["log_p_true"] + 1.0
    # the Langevin-vs-sampler goal is computed for this set; the digits goals are not (set not run)
    assert any("faster than Langevin" in g["goal"] and g["status"] in ("pass", "noise", "miss") for g in data["goals"])
    md = out.read_text()
    assert "| method | excess FD | MMD² | prec | rec | log p_true | samples/s | fit s |" in md
    assert "EVaLP sampler" in md and "## Goals" in md
    # the report can be rebuilt from its .json alone, with the same goals
    again = tmp_path / "again.md"
    assert bench_prior.main(["--rerender", str(out.with_suffix(".json")), "--out", str(again)]) == 0
    assert json.loads(again.with_suffix(".json").read_text())["goals"] == data["goals"]
    assert "EVaLP sampler" in again.read_text()


def test_goal_logic_on_handmade_results():
    cfg = bench_prior.BenchConfig(threads=2)
    m = bench_prior.METHODS

    def row(method, fd, conf, rate=1000.0, fit=50.0):
        return {"method": m[method], "excess_fd": fd, "confidence": conf, "confidence_se": 0.001,
                "samples_per_second": rate, "fit_seconds": fit}

    results = [
        {"name": "digits-b1", "fd_noise": 0.005, "rows": [row("gaussian", 0.9, 0.9), row("gmm", 0.105, 0.97),
                                                         row("evalp", 0.11, 0.98, rate=1e5), row("langevin", 0.2, 0.97, rate=1e3)]},
        {"name": "digits-b0.1", "fd_noise": 0.005, "rows": [row("gaussian", 0.3, 0.85), row("gmm", 0.05, 0.95),
                                                           row("evalp", 0.2, 0.90, rate=1e4, fit=200.0), row("langevin", 0.1, 0.95)]},
    ]
    goals = {g["goal"]: g["status"] for g in bench_prior.evaluate_goals(results, cfg, default_settings=True)}
    assert goals["digits-b1: EVaLP excess FD ≤ 1/3 of Gaussian's"] == "pass"
    assert goals["digits-b1: EVaLP excess FD ≤ GMM's"] == "noise"  # 0.11 vs 0.105; 2 s.e. of the difference = 2·0.005·√2 ≈ 0.014
    assert goals["digits-b1: classifier confidence EVaLP ≥ GMM"] == "pass"
    assert goals["digits-b0.1: EVaLP excess FD ≤ 1/3 of Gaussian's"] == "miss"
    assert goals["digits-b0.1: EVaLP excess FD ≤ GMM's"] == "miss"
    assert goals["digits-b0.1: classifier confidence EVaLP ≥ GMM"] == "miss"
    assert goals["digits-b1: sampler ≥ 30× faster than Langevin(60) at equal or better FD"] == "pass"
    assert goals["digits-b0.1: sampler ≥ 30× faster than Langevin(60) at equal or better FD"] == "miss"
    assert goals["digits-b1: default fit ≤ 120 s on 2 threads"] == "pass"
    assert goals["digits-b0.1: default fit ≤ 120 s on 2 threads"] == "miss"
    not_default = bench_prior.evaluate_goals(results, cfg, default_settings=False)
    assert {g["status"] for g in not_default if "default fit" in g["goal"]} == {"n/a"}


@pytest.mark.parametrize("argv, words", [
    (["--sets", "mixture,nope"], "--sets"),
    (["--methods", "gaussian,magic"], "--methods"),
    (["--sets", "mixture", "--variants", "no-colon"], "--variants"),
    (["--sets", "mixture", "--fit", "not_a_field=1"], "--fit"),
    (["--sets", "mixture", "--variant-sampling", "sampler@0"], "--variant-sampling"),
])
def test_bad_arguments_give_one_clear_error(argv, words, capsys, tmp_path):
    rc = bench_prior.main([*argv, "--out", str(tmp_path / "x.md")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and words in err
    assert not (tmp_path / "x.md").exists()


def test_script_and_module_entry_points_both_work():
    for cmd in ([sys.executable, "bench/prior.py", "--help"], [sys.executable, "-m", "bench.prior", "--help"]):
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "--sets" in done.stdout and "--quick" in done.stdout


def test_override_and_sampling_parsing():
    assert bench_prior._parse_overrides(["forward_kl_weight=5", "flow_kind=spline", "spectral_norm=true", "betas=0.9/0.99"], "--fit") == {
        "forward_kl_weight": 5, "flow_kind": "spline", "spectral_norm": True, "betas": (0.9, 0.99)}
    assert bench_prior._parse_variants(("a:steps=10,seed=2",)) == {"a": {"steps": 10, "seed": 2}}
    assert bench_prior._parse_sampling("sir") == ("sir", 1.0)
    assert bench_prior._parse_sampling("sampler@0.8") == ("sampler", 0.8)
