"""The embedded default: bundled digit PNGs and the small AutoencoderKL shipped in latent_prior/assets.

Thresholds come from `scripts/train_default_vae.py`'s own figures (recorded in
`assets/default_vae/training_summary.json` and the model card): over all 1797 digits the shipped VAE
reconstructs from the posterior mean with a per-pixel MSE of about 6e-4 in [-1, 1] units, its posterior
std averages about 0.7 (raw latents have std about 1), and decodes of N(0, I) are not digits.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from latent_prior.defaults import (
    DEFAULT_DATA_DIR,
    DEFAULT_NUM_IMAGES,
    DEFAULT_RESOLUTION,
    DEFAULT_VAE_DIR,
    require_embedded_default,
)
from latent_prior.errors import LatentPriorError


def _load_digits_32px(paths) -> torch.Tensor:
    """PNG paths -> (N, 3, 32, 32) in [-1, 1], with the package's own image loader when present."""
    try:
        from latent_prior.data import load_image
    except ImportError:  # the same PIL path: RGB, bicubic resize, [-1, 1]

        def load_image(path, resolution):
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB").resize((resolution, resolution), Image.BICUBIC), dtype=np.float32)
            return torch.from_numpy(rgb).permute(2, 0, 1) / 127.5 - 1.0

    return torch.stack([load_image(p, DEFAULT_RESOLUTION) for p in paths])


@pytest.fixture(scope="module")
def png_paths():
    return sorted(DEFAULT_DATA_DIR.glob("*/*.png"), key=lambda p: int(p.stem))


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(DEFAULT_VAE_DIR).eval()


@pytest.fixture(scope="module")
def batch(png_paths):
    # Every 28th digit: 65 images spread over all labels.
    return _load_digits_32px(png_paths[::28])


def test_importing_defaults_loads_nothing_beyond_the_package():
    # defaults.py itself needs only pathlib: it adds no module (torch, diffusers, PIL) to what
    # `import latent_prior` already loads.
    code = "import sys, latent_prior; before = set(sys.modules); import latent_prior.defaults; print(sorted(set(sys.modules) - before))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['latent_prior.defaults']"


def test_require_embedded_default_finds_the_assets_and_names_missing_ones(monkeypatch, tmp_path):
    assert require_embedded_default() == (DEFAULT_VAE_DIR, DEFAULT_DATA_DIR)
    import latent_prior.defaults as defaults

    monkeypatch.setattr(defaults, "DEFAULT_VAE_DIR", tmp_path / "gone")
    with pytest.raises(LatentPriorError, match="gone.*reinstall"):
        defaults.require_embedded_default()


def test_bundled_digits_are_sklearn_digits_as_8x8_pngs(png_paths):
    from sklearn.datasets import load_digits

    digits = load_digits()
    assert len(png_paths) == DEFAULT_NUM_IMAGES == len(digits.target)
    expected = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for path in png_paths:
        index, label = int(path.stem), int(path.parent.name)
        assert label == digits.target[index]
        with Image.open(path) as im:
            assert im.size == (8, 8) and im.mode == "L"
            assert np.array_equal(np.asarray(im), expected[index])
    assert (DEFAULT_DATA_DIR / "README.md").is_file()
    total = sum(p.stat().st_size for p in png_paths)
    assert total < 1_000_000  # tiny package data


def test_shipped_vae_encodes_to_4x8x8_and_reconstructs(vae, batch):
    config = json.loads((DEFAULT_VAE_DIR / "config.json").read_text())
    summary = json.loads((DEFAULT_VAE_DIR / "training_summary.json").read_text())
    assert config["latent_channels"] == 4 and config["sample_size"] == DEFAULT_RESOLUTION
    assert vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    with torch.no_grad():
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.mean).sample
    assert posterior.mean.shape == (len(batch), 4, 8, 8)
    mse = torch.mean((recon - batch) ** 2).item()
    # Training measured 6.3e-4 over all digits; 1e-2 leaves room for this subset and for float noise,
    # and is still 20x below predicting the mean image (the check below).
    assert mse < 1e-2
    assert mse < 0.05 * torch.mean((batch - batch.mean(0)) ** 2).item()
    assert mse < 3 * summary["final"]["recon_mse_posterior_mean"]


def test_posterior_variance_is_real_and_latents_are_unit_scaled(vae, batch):
    with torch.no_grad():
        posterior = vae.encode(batch).latent_dist
    logvar = posterior.logvar
    assert torch.isfinite(logvar).all()
    assert logvar.min() > -29.0  # diffusers clamps at -30: touching it means a collapsed posterior
    assert torch.exp(0.5 * logvar).mean() > 0.1  # a real, non-degenerate posterior spread (~0.7)
    draws = posterior.sample(generator=torch.Generator().manual_seed(0))
    normalized_std = (draws * vae.config.scaling_factor).std().item()
    assert 0.7 < normalized_std < 1.4


def test_gaussian_decodes_are_far_from_digits_posterior_decodes_are_not(vae, png_paths, batch):
    """The aggregate posterior is not N(0, I): decoding N(0, I) in normalized space gives images much
    farther from every real digit than decoding posterior draws does. That is the gap a prior closes."""
    reference = _load_digits_32px(png_paths[1::4]).flatten(1)  # 450 real digits, disjoint from `batch`
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        from_posterior = vae.decode(vae.encode(batch).latent_dist.sample(generator=gen)).sample
        from_gaussian = vae.decode(torch.randn(len(batch), 4, 8, 8, generator=gen) / vae.config.scaling_factor).sample

    def nearest_digit_mse(images):
        return (torch.cdist(images.clamp(-1, 1).flatten(1), reference) ** 2 / reference.shape[1]).amin(1).median().item()

    assert nearest_digit_mse(from_gaussian) > 2.0 * nearest_digit_mse(from_posterior)


def test_image_folder_and_adapter_read_the_embedded_default(vae, batch):
    data = pytest.importorskip("latent_prior.data")  # written by another part of the package
    folder = data.ImageFolder(DEFAULT_DATA_DIR, DEFAULT_RESOLUTION)
    assert len(folder) == DEFAULT_NUM_IMAGES
    item = folder[0]
    assert item["image"].shape == (3, DEFAULT_RESOLUTION, DEFAULT_RESOLUTION)

    adapters = pytest.importorskip("latent_prior.adapters")
    if not hasattr(adapters, "load_vae"):
        pytest.skip("latent_prior.adapters.load_vae is not written yet")
    adapter = adapters.load_vae(str(DEFAULT_VAE_DIR))
    assert adapter.latent_shape(DEFAULT_RESOLUTION) == (4, 8, 8)
    assert adapter.normalization.scaling_factor == pytest.approx(vae.config.scaling_factor)
    posterior = adapter.encode(batch[:4])
    with torch.no_grad():
        expected = vae.encode(batch[:4]).latent_dist
    torch.testing.assert_close(posterior.mean, expected.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(posterior.logvar, expected.logvar, rtol=1e-4, atol=1e-5)
