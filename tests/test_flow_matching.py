"""`latent_prior.flow_matching`: the rectified-flow baseline, fitted for real on known mixtures (no mocks),
and its row in `latent_report`. Small nets and short fits keep the file to about 20 s on 2 cores."""

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from latent_prior.baselines import load_baseline
from latent_prior.cache import open_latents
from latent_prior.errors import LatentPriorError
from latent_prior.evaluate import DEFAULT_METHODS, latent_report, latent_table_markdown
from latent_prior.flow_matching import FlowMatchingPrior
from latent_prior.metrics import frechet_distance
from latent_prior.train import fit
from latent_prior.vae import LatentNormalization

sys.path.insert(0, str(Path(__file__).parent))
from test_evaluate import two_modes, write_moments  # noqa: E402
from test_train import CENTRES, TINY_KW, mixture  # noqa: E402

SMALL = dict(hidden=64, depth=2, time_features=16)


@pytest.fixture(scope="module")
def fitted():
    """A small MLP fitted for 400 steps on RAW moments of the 2-D three-mode mixture, with a normalization that
    maps them to the mixture itself (about 2 s)."""
    norm = LatentNormalization(scaling_factor=0.5, shift_factor=1.0)
    mean = norm.denormalize(mixture(1500, seed=0))
    logvar = torch.full_like(mean, -4.0) + 2 * math.log(2.0)  # σ = 0.5·(raw σ) = e^-2 in normalized space
    prior = FlowMatchingPrior(**SMALL).fit(mean, logvar, normalization=norm, steps=400, batch_size=256, lr=2e-3, seed=0)
    return prior, mean, logvar, norm


def test_samples_land_on_the_modes_and_beat_the_gaussian(fitted):
    prior, *_ = fitted
    assert prior.kind_ == "mlp" and prior.steps_done_ == 400 and prior.fit_seconds_ > 0
    assert prior.network_evaluations == 63 and prior.solver_steps == 32
    assert prior.loss_history_[-1] < prior.loss_history_[0]
    g = torch.Generator().manual_seed(1)
    z = prior.sample(2000, generator=g)
    assert z.shape == (2000, 2) and z.dtype == torch.float32
    nearest = torch.cdist(z, CENTRES).min(1).values
    # The modes have std 0.3 (and posterior σ e^-2): 2σ holds 86% of a 2-D Gaussian's mass and its median radius is
    # 0.36. (Fits with seeds 0-3: 85-87% within 0.6, median 0.32-0.33; N(0, I): 3% within 0.6.)
    assert (nearest < 0.6).float().mean() > 0.78 and nearest.median() < 0.42, nearest.median()
    # Each mode gets its share (a third) of the samples, and every sample lies near one.
    share = torch.bincount(torch.cdist(z, CENTRES).argmin(1), minlength=3).float() / len(z)
    assert (share - 1 / 3).abs().max() < 0.08, share
    held = mixture(2000, seed=7)
    fd_fm = frechet_distance(z, held)
    fd_gauss = frechet_distance(torch.randn(2000, 2, generator=g), held)
    assert fd_fm < fd_gauss / 10, (fd_fm, fd_gauss)
    # Temperature 0 starts every sample at the origin: one deterministic point.
    cold = prior.sample(5, generator=g, temperature=0.0)
    torch.testing.assert_close(cold, cold[:1].expand(5, 2))
    # Fewer solver steps still sample from the same model (Heun is accurate on these straight-ish paths).
    coarse = prior.sample(2000, generator=torch.Generator().manual_seed(1), solver_steps=8)
    assert frechet_distance(coarse, held) < fd_gauss / 10


def test_fit_is_deterministic_for_a_seed(fitted):
    _, mean, logvar, norm = fitted
    a, b, c = (FlowMatchingPrior(**SMALL).fit(mean, logvar, normalization=norm, steps=15, seed=s) for s in (3, 3, 4))
    za, zb, zc = (p.sample(50, generator=torch.Generator().manual_seed(0)) for p in (a, b, c))
    assert torch.equal(za, zb) and not torch.equal(za, zc)
    assert all(torch.equal(x, y) for x, y in zip(a.to_tensors().values(), b.to_tensors().values()) if x.dim())
    # Fitting does not consume the caller's global RNG.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    FlowMatchingPrior(**SMALL).fit(mean, steps=2)
    assert torch.equal(torch.rand(3), expected)


def test_save_and_load_give_identical_samples(fitted, tmp_path):
    prior, *_ = fitted
    prior.save_pretrained(tmp_path / "fm")
    meta = json.loads((tmp_path / "fm" / "baseline.json").read_text())
    assert meta["class"] == "FlowMatchingPrior" and meta["latent_shape"] == [2]
    assert meta["config"]["kind"] == "mlp" and meta["config"]["hidden"] == 64
    for loaded in (load_baseline(tmp_path / "fm"), FlowMatchingPrior.from_pretrained(tmp_path / "fm")):
        assert isinstance(loaded, FlowMatchingPrior)
        assert loaded.steps_done_ == 400 and loaded.fit_seconds_ == pytest.approx(prior.fit_seconds_)
        assert torch.equal(
            loaded.sample(100, generator=torch.Generator().manual_seed(5)), prior.sample(100, generator=torch.Generator().manual_seed(5))
        )
    # A config that does not describe the weights is refused with one sentence.
    meta["config"]["hidden"] = 32
    (tmp_path / "fm" / "baseline.json").write_text(json.dumps(meta))
    with pytest.raises(LatentPriorError, match="do not match"):
        load_baseline(tmp_path / "fm")


def test_the_time_budget_is_respected(fitted):
    _, mean, logvar, norm = fitted
    start = time.perf_counter()
    prior = FlowMatchingPrior().fit(mean, logvar, normalization=norm, seconds=0.5)  # the default (width 256) net
    wall = time.perf_counter() - start
    # It stops at the first step that starts after the budget (a step of this net takes ~20 ms).
    assert 0.5 <= prior.fit_seconds_ < 1.0 and wall < 1.5 and prior.steps_done_ >= 1
    # Whichever budget ends first: here the steps.
    assert FlowMatchingPrior(**SMALL).fit(mean, logvar, steps=3, seconds=60).steps_done_ == 3


def test_conv_net_for_spatial_latents_above_1024_dims():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(16, 2, 32, 32, generator=g)  # 2048 dims
    prior = FlowMatchingPrior(channels=16, blocks=2, time_features=16).fit(mean, torch.full_like(mean, -3.0), steps=2, batch_size=4)
    assert prior.kind_ == "conv" and prior.config()["kind"] == "conv" and prior.steps_done_ == 2
    z = prior.sample(3, generator=g, solver_steps=2)
    assert z.shape == (3, 2, 32, 32) and torch.isfinite(z).all()
    # At most 1024 dims, "auto" flattens into the MLP; "conv" can be asked for.
    small = torch.randn(8, 4, 8, 8, generator=g)
    assert FlowMatchingPrior(**SMALL).fit(small, steps=1, batch_size=4).kind_ == "mlp"
    forced = FlowMatchingPrior(kind="conv", channels=8, blocks=1, time_features=16).fit(small, steps=1, batch_size=4)
    assert forced.kind_ == "conv" and forced.sample(2, solver_steps=1).shape == (2, 4, 8, 8)


def test_bad_input_is_refused_with_one_sentence():
    mean = torch.randn(20, 2)
    with pytest.raises(LatentPriorError, match="steps=0"):
        FlowMatchingPrior(**SMALL).fit(mean, steps=0)
    with pytest.raises(LatentPriorError, match="steps=-3"):
        FlowMatchingPrior(**SMALL).fit(mean, steps=-3)
    with pytest.raises(LatentPriorError, match="budget"):
        FlowMatchingPrior(**SMALL).fit(mean)
    with pytest.raises(LatentPriorError, match="seconds"):
        FlowMatchingPrior(**SMALL).fit(mean, seconds=float("nan"))
    bad = mean.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(LatentPriorError, match="NaN"):
        FlowMatchingPrior(**SMALL).fit(bad, steps=1)
    with pytest.raises(LatentPriorError, match="NaN"):
        FlowMatchingPrior(**SMALL).fit(mean, torch.full_like(mean, float("inf")), steps=1)
    with pytest.raises(LatentPriorError, match="logvar has shape"):
        FlowMatchingPrior(**SMALL).fit(mean, torch.zeros(20, 3), steps=1)
    with pytest.raises(LatentPriorError, match=r"\(N, \*latent_shape\)"):
        FlowMatchingPrior(**SMALL).fit(torch.randn(20), steps=1)
    with pytest.raises(LatentPriorError, match="batch_size"):
        FlowMatchingPrior(**SMALL).fit(mean, steps=1, batch_size=0)
    with pytest.raises(LatentPriorError, match="C×H×W"):
        FlowMatchingPrior(kind="conv").fit(mean, steps=1)
    with pytest.raises(LatentPriorError, match="kind"):
        FlowMatchingPrior(kind="unet")
    with pytest.raises(LatentPriorError, match="unknown argument"):
        FlowMatchingPrior(width=64)
    with pytest.raises(LatentPriorError, match="not fitted"):
        FlowMatchingPrior().sample(4)
    prior = FlowMatchingPrior(**SMALL).fit(mean, steps=1)
    for kwargs in ({"n": 0}, {"n": 2, "temperature": -1.0}, {"n": 2, "solver_steps": 0}):
        with pytest.raises(LatentPriorError):
            prior.sample(**kwargs)
    with pytest.raises(LatentPriorError, match="log_prob"):
        prior.log_prob(mean)


def test_latent_report_has_a_flow_matching_row(tmp_path):
    assert "flow-matching" not in DEFAULT_METHODS  # `latent-prior eval` runs it only when asked
    path = write_moments(tmp_path / "two.safetensors", two_modes(400, dims=4))
    prior = fit(str(path), out=str(tmp_path / "p"), steps=4, checkpoint_every=2, **TINY_KW)
    source = open_latents(path)
    heldout, train = np.arange(300, 400), np.arange(300)
    result = latent_report(
        prior, source, heldout, train, samples=300, seed=0, methods=("gaussian", "flow-matching"), gain=False, flow_matching_seconds=1.5
    )
    gauss, fm = result["rows"]
    assert fm["method"] == "flow-matching" and fm["label"] == "flow matching (Heun 32, 63 NFE)"
    info = fm["info"]
    assert (info["solver"], info["solver_steps"], info["network_evaluations"]) == ("heun", 32, 63)
    assert info["fit_items"] == 300 and info["budget_seconds"] == 1.5 and info["fit_steps"] > 10
    assert fm["fit_seconds"] == info["fit_seconds"] and 1.5 <= info["fit_seconds"] < 2.5
    assert fm["sampling_device"] == "cpu" and fm["samples_per_second"] > 0 and fm["ms_per_1000"] > 0
    # Two modes at ±2.5 on every axis: 1.5 s of training already puts the samples far closer than N(0, I).
    assert fm["excess_fd"] < gauss["excess_fd"] / 4 and fm["hole_share"] < gauss["hole_share"]
    assert "| flow matching (Heun 32, 63 NFE) |" in latent_table_markdown(result)
    # Without flow_matching_seconds the budget is the EVaLP prior's own fit time.
    again = latent_report(prior, source, heldout, train, samples=20, seed=0, methods=("flow-matching",), gain=False, c2st_per_class=10)
    assert again["rows"][0]["info"]["budget_seconds"] == pytest.approx(prior.training_info["summary"]["seconds"])
    with pytest.raises(LatentPriorError, match="flow_matching_seconds"):
        latent_report(prior, source, heldout, train, samples=20, methods=("flow-matching",), flow_matching_seconds=0)
