"""The photo-patch set of the prior benchmark: bench/photos.py crops, scripts/train_photo_vae.py, and
`load_set("photos")`.

Real data and real models throughout: the photos that ship with scikit-image and scikit-learn, a real
diffusers AutoencoderKL trained for one or two epochs on a few hundred crops, loaded back through
`latent_prior.adapters.load_vae`.
"""

import json

import numpy as np
import pytest
import torch

from bench.datasets import ALL_SETS, REAL_SETS, load_set, photo_vae_dir
from bench.photos import PHOTO_NAMES, import_repo_script, load_photos, make_patches
from latent_prior.errors import LatentPriorError

script = import_repo_script("train_photo_vae")


def test_crops_are_seeded_in_range_and_held_out_by_region():
    a = make_patches(num_train=200, num_heldout=60, seed=0)
    assert a.train.shape == (200, 3, 32, 32) and a.heldout.shape == (60, 3, 32, 32)
    assert a.train.dtype == torch.float32
    for x in (a.train, a.heldout):
        assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.2  # real content, not a constant
    assert a.photos == PHOTO_NAMES
    assert set(a.train_photo.tolist()) == set(a.heldout_photo.tolist()) == set(range(len(PHOTO_NAMES)))
    b = make_patches(num_train=200, num_heldout=60, seed=0)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    assert not torch.equal(make_patches(num_train=200, num_heldout=60, seed=1).train, a.train)

    # Each crop is the photo at its recorded origin, and no held-out crop overlaps a training crop.
    photos = list(load_photos().values())
    for x, photo, origin in ((a.train, a.train_photo, a.train_origin), (a.heldout, a.heldout_photo, a.heldout_origin)):
        for i in range(0, len(x), 17):
            (top, left), image = origin[i].tolist(), photos[photo[i]]
            expected = torch.from_numpy(image[top : top + 32, left : left + 32].copy()).permute(2, 0, 1).float() / 127.5 - 1
            assert torch.equal(x[i], expected)
    for p in range(len(PHOTO_NAMES)):
        tr, he = a.train_origin[a.train_photo == p], a.heldout_origin[a.heldout_photo == p]
        apart = ((tr[:, None, :] - he[None, :, :]).abs() >= 32).any(-1)  # separated along rows or columns
        assert apart.all(), f"photo {PHOTO_NAMES[p]}: a held-out crop overlaps a training crop"


def test_patch_arguments_are_checked():
    with pytest.raises(LatentPriorError, match="heldout_fraction"):
        make_patches(num_train=10, num_heldout=10, heldout_fraction=1.0)
    with pytest.raises(LatentPriorError, match="photo_side"):
        make_patches(num_train=10, num_heldout=10, crop_size=128)


def test_help_documents_every_flag_and_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        script.main(["--help"])
    text = capsys.readouterr().out
    for name in script.TrainPhotoVAEConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert script.main(["--crop-size", "30", "--output-dir", "unused", "--quiet"]) == 2
    assert "--crop-size 30" in capsys.readouterr().err
    assert script.main(["--downsamplings", "5", "--output-dir", "unused", "--quiet"]) == 2
    assert "--downsamplings 5" in capsys.readouterr().err
    assert script.main(["--downsamplings", "3", "--crop-size", "36", "--output-dir", "unused", "--quiet"]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_a_third_downsampling_and_more_channels_give_the_photos_c32_shape(tmp_path):
    from bench.datasets import PHOTO_SETS, _cached_photo_vae

    shape = {k: PHOTO_SETS["photos-c32"][False][k] for k in ("crop_size", "photo_side", "latent_channels", "downsamplings")}
    cfg = script.TrainPhotoVAEConfig(
        output_dir=str(tmp_path / "c32"), epochs=1, num_train=64, num_heldout=20, batch_size=32, quiet=True, **shape
    )
    summary = script.train_photo_vae(cfg)
    assert summary["latent_shape"] == [32, 8, 8]
    assert summary["architecture"]["block_out_channels"] == [16, 32, 32, 64]

    # A folder trained before the script had these fields was trained with their defaults: it still counts as cached
    # for the defaults, and not for photos-c32.
    wanted, defaults = script.to_dict(cfg), script.to_dict(script.TrainPhotoVAEConfig())
    old = tmp_path / "old"
    old.mkdir()
    old_config = {k: v for k, v in wanted.items() if k not in ("latent_channels", "downsamplings")}
    (old / "training_summary.json").write_text(json.dumps({"train_config": old_config, "architecture": script.photo_vae_architecture(64)}))
    plain = {**wanted, "latent_channels": 4, "downsamplings": 2}
    assert _cached_photo_vae(old, plain, defaults, script.photo_vae_architecture(64)) is not None
    assert _cached_photo_vae(old, wanted, defaults, script.architecture_of(cfg)) is None


def test_one_epoch_gives_a_loadable_vae_that_beats_the_mean_crop(tmp_path):
    from diffusers import AutoencoderKL

    from latent_prior.adapters import load_vae

    out = tmp_path / "vae"
    cfg = script.TrainPhotoVAEConfig(output_dir=str(out), epochs=1, num_train=400, num_heldout=100, batch_size=32, quiet=True)
    summary = script.train_photo_vae(cfg)
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "training_summary.json").read_text())["steps"] == summary["steps"] == 13
    assert summary["epochs"] == 1 and summary["seed"] == 0 and summary["train_seconds"] > 0
    assert summary["latent_shape"] == [4, 8, 8]

    patches = make_patches(num_train=400, num_heldout=100, seed=0)
    assert AutoencoderKL.from_pretrained(out).config.latent_channels == 4  # a plain diffusers folder
    adapter = load_vae(str(out))
    assert adapter.normalization.scaling_factor == pytest.approx(summary["scaling_factor"])
    posterior = adapter.encode(patches.heldout)
    assert posterior.mean.shape == posterior.logvar.shape == (100, 4, 8, 8)
    recon_mse = torch.mean((adapter.decode(posterior.mean) - patches.heldout) ** 2).item()
    mean_crop_mse = torch.mean((patches.heldout - patches.train.mean(0)) ** 2).item()
    assert recon_mse == pytest.approx(summary["heldout_recon_mse"], rel=1e-3)
    assert recon_mse < 0.8 * mean_crop_mse, (recon_mse, mean_crop_mse)


def test_training_is_seeded(tmp_path):
    from diffusers import AutoencoderKL

    weights = []
    for run in ("a", "b"):
        cfg = script.TrainPhotoVAEConfig(output_dir=str(tmp_path / run), epochs=1, num_train=64, num_heldout=20, batch_size=32, quiet=True)
        script.train_photo_vae(cfg)
        weights.append(AutoencoderKL.from_pretrained(tmp_path / run).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow  # trains the quick photos VAE (~18 s): the benchmark harness, in CI's slow step
def test_load_set_photos_quick_trains_once_and_gives_finite_moments(tmp_path):
    assert "photos" in REAL_SETS and "photos" in ALL_SETS
    lset = load_set("photos", quick=True, cache_dir=tmp_path, verbose=False)
    assert lset.name == "photos" and lset.decode is None and lset.true_log_prob is None
    assert lset.train_mean.shape == lset.train_logvar.shape == (600, 4, 8, 8)
    assert lset.heldout_mean.shape == lset.heldout_logvar.shape == (200, 4, 8, 8)
    for t in (lset.train_mean, lset.train_logvar, lset.heldout_mean, lset.heldout_logvar):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    summary = json.loads((photo_vae_dir(tmp_path, quick=True) / "training_summary.json").read_text())
    assert lset.normalization.scaling_factor == pytest.approx(summary["scaling_factor"])
    # Normalized training draws have about unit std (the scaling factor was fitted on them).
    draws = lset.draws("train", 600, torch.Generator().manual_seed(0))
    assert 0.8 < draws.std().item() < 1.25
    assert summary["heldout_recon_mse"] < summary["heldout_mean_image_mse"]
    json.dumps(lset.info)  # the benchmark writes it to its JSON report

    weights = photo_vae_dir(tmp_path, quick=True) / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = load_set("photos", quick=True, cache_dir=tmp_path, verbose=False)
    assert weights.stat().st_mtime_ns == stamp  # reloaded, not retrained
    assert torch.equal(again.heldout_mean, lset.heldout_mean)
    assert np.isfinite(lset.info["heldout_recon_mse"])


@pytest.mark.slow  # trains the quick photos-16 VAE (~30 s)
def test_photos_32_encodes_larger_crops_with_the_photos_16_vae(tmp_path):
    lset = load_set("photos-32", quick=True, cache_dir=tmp_path, verbose=False)
    assert lset.train_mean.shape == (400, 4, 32, 32) and lset.heldout_mean.shape == (150, 4, 32, 32)
    assert lset.info["patches"]["crop_size"] == 128 and lset.info["data_dims"] == 3 * 128 * 128
    assert lset.info["vae_dir"] == str(photo_vae_dir(tmp_path, quick=True, name="photos-16"))  # no VAE of its own
    assert torch.isfinite(lset.train_mean).all() and torch.isfinite(lset.heldout_logvar).all()
