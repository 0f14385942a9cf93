"""The Python API (`latent_prior.api`): fit(adapter, images) with a real diffusers AutoencoderKL (tiny
config) and with a user's own torch VAE wrapped by `wrap`, from tensors, DataLoaders and image folders;
priors that move between the API and the command line in both directions; errors.

Every fit is tiny (20 steps, small networks) so the file stays fast on 2 cores. Nothing is mocked.
"""

from __future__ import annotations

import json

import pytest
import torch
from _cli import argv
from _encode_helpers import make_tiny_vae, sample_photos, write_images
from _tiny import FLAT_NETS, SPATIAL_NETS
from safetensors.torch import load_file

from latent_prior import EncodedLatents, LatentPriorError, encode_latents, fit, open_latents
from latent_prior.adapters import DiffusersKLAdapter, load_vae, wrap
from latent_prior.cli import main
from latent_prior.prior import LatentPrior
from latent_prior.train import FitConfig

BUDGET = dict(steps=20, checkpoint_every=10, batch_size=32, eval_samples=128, eval_latents=64, log_z_samples=256, log_every=5, quiet=True)
SPATIAL = {**BUDGET, **SPATIAL_NETS}
FLAT = {**BUDGET, **FLAT_NETS}
# The same settings as flags, for the command line.
SPATIAL_FLAGS = [tok for k, v in SPATIAL.items() if k != "quiet" for tok in (f"--{k.replace('_', '-')}", str(v))] + ["--quiet"]


def photo_crops(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """n random crops of scikit-image's photos, (n, 3, size, size) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    photos = [torch.from_numpy(p).permute(2, 0, 1).float() / 127.5 - 1 for p in sample_photos() if p.ndim == 3]
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        top = int(torch.randint(0, photo.shape[1] - 4 * size, (1,), generator=g))
        left = int(torch.randint(0, photo.shape[2] - 4 * size, (1,), generator=g))
        crop = photo[None, :, top : top + 4 * size, left : left + 4 * size]
        out.append(torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True))
    return torch.cat(out).clamp(-1, 1)


def digits(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """n real 8x8 scikit-learn digits (n, 1, 8, 8) in [-1, 1], with their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images[:n]).float()[:, None] / 8.0 - 1.0, torch.from_numpy(d.target[:n])


class MLPVAE(torch.nn.Module):
    """A user's own VAE: 8x8 grey digits <-> 4-D latents."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8))
        self.decoder = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.SiLU(), torch.nn.Linear(32, 64), torch.nn.Tanh())


def wrapped_mlp() -> object:
    return wrap(
        MLPVAE(),
        encode=lambda m, x: m.encoder(x).chunk(2, dim=1),
        decode=lambda m, z: m.decoder(z).view(-1, 1, 8, 8),
        latent_shape=(4,),
        image_channels=1,
        source="mlp-digits",
    )


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "vae", scaling_factor=0.5, shift_factor=0.1)


# ---- a diffusers VAE ------------------------------------------------------------------------------
def test_fit_diffusers_vae_on_a_tensor_keeps_moments_normalization_and_provenance(tmp_path, kl_dir):
    adapter = load_vae(kl_dir)
    images = photo_crops(80)
    latents = encode_latents(adapter, images, batch_size=24, quiet=True)
    direct = adapter.encode(images)
    assert isinstance(latents, EncodedLatents) and len(latents) == 80 and latents.latent_shape == (4, 8, 8)
    torch.testing.assert_close(latents.mean, direct.mean)  # the posterior moments, not one draw
    torch.testing.assert_close(latents.logvar, direct.logvar)
    assert latents.normalization == adapter.normalization and latents.provenance == adapter.provenance.to_dict()

    prior = fit(adapter, images, out=str(tmp_path / "fit"), **SPATIAL)
    assert isinstance(prior, LatentPrior) and prior.latent_shape == (4, 8, 8)
    assert prior.normalization.matches(adapter.normalization)
    assert prior.provenance == adapter.provenance.to_dict()
    prior.check_compatible(adapter, resolution=16)
    x = adapter.decode(prior.sample(16, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (16, 3, 16, 16) and x.abs().max() <= 1
    # the image size travels with in-memory latents, so the fit reports bits per image dimension
    summary = json.loads((tmp_path / "fit" / "train" / "fit_summary.json").read_text())
    assert summary["data_dims"] == 3 * 16 * 16 and summary["num_train"] + summary["num_validation"] == 80


def test_an_already_loaded_diffusers_model_works_through_its_adapter(kl_dir):
    from diffusers import AutoencoderKL

    adapter = DiffusersKLAdapter(AutoencoderKL.from_pretrained(kl_dir), source="my-kl")
    prior = fit(adapter, photo_crops(40), **{**SPATIAL, "batch_size": 16})
    assert adapter.decode(prior.sample(2)).shape == (2, 3, 16, 16)
    assert prior.provenance["source"] == "my-kl"


# ---- a user's own torch VAE -----------------------------------------------------------------------
def test_wrapped_torch_vae_from_a_dataloader_of_image_label_pairs(tmp_path):
    adapter = wrapped_mlp()
    x, y = digits(200)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=48, shuffle=False)
    from_loader = encode_latents(adapter, loader, quiet=True)
    from_tensor = encode_latents(adapter, x, batch_size=7, quiet=True)
    torch.testing.assert_close(from_loader.mean, from_tensor.mean)
    torch.testing.assert_close(from_loader.logvar, from_tensor.logvar)
    # a TensorDataset without labels yields one-element lists
    no_labels = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)
    torch.testing.assert_close(encode_latents(adapter, no_labels, quiet=True).mean, from_tensor.mean)

    prior = fit(adapter, loader, out=str(tmp_path / "p"), **FLAT)
    assert prior.latent_shape == (4,) and prior.provenance["source"] == "mlp-digits"
    samples = adapter.decode(prior.sample(16))
    assert samples.shape == (16, 1, 8, 8)
    assert json.loads((tmp_path / "p" / "train" / "fit_summary.json").read_text())["data_dims"] == 64


def test_encoded_latents_save_and_reload_like_a_cache(tmp_path):
    adapter = wrapped_mlp()
    latents = encode_latents(adapter, digits(100)[0], quiet=True)
    path = latents.save(tmp_path / "latents.safetensors")
    source = open_latents(path)
    assert source.latent_shape == (4,) and len(source) == 100 and not source.deterministic
    assert source.provenance == latents.provenance and source.normalization == latents.normalization
    mean, logvar = source.read(range(100))
    torch.testing.assert_close(mean, latents.mean)
    torch.testing.assert_close(logvar, latents.logvar)
    # fitting on the in-memory latents and on the saved file is the same fit
    a = fit(latents, **FLAT)
    b = fit(str(path), **FLAT)
    z = latents.mean[:8]
    torch.testing.assert_close(a.log_prob(z), b.log_prob(z))


def test_latents_keep_train_fit_signature():
    means = digits(120)[0].flatten(1)[:, :3].contiguous()
    prior = fit(means, FitConfig(**FLAT))  # the config as the second positional argument
    assert prior.latent_shape == (3,)


# ---- API <-> command line -------------------------------------------------------------------------
def test_a_prior_saved_by_the_api_samples_in_the_cli(tmp_path, kl_dir):
    adapter = load_vae(kl_dir)
    prior = fit(adapter, photo_crops(64), **SPATIAL)
    prior.save_pretrained(tmp_path / "saved")
    out = tmp_path / "z.safetensors"
    assert main(["sample", "--prior", str(tmp_path / "saved"), "-n", "6", "--out", str(out), "--seed", "1"]) == 0
    z = load_file(str(out))["latents"]
    assert z.shape == (6, 4, 8, 8)
    torch.testing.assert_close(z, prior.sample(6, generator=torch.Generator().manual_seed(1)))  # same prior, same draws
    assert adapter.decode(z).shape == (6, 3, 16, 16)
    # decoded by the CLI with the same VAE, to a grid
    grid = tmp_path / "grid.png"
    assert main(["sample", "--prior", str(tmp_path / "saved"), "--vae", str(kl_dir), "-n", "4", "--out", str(grid), "--quiet"]) == 0
    assert grid.stat().st_size > 0
    # a prior of another VAE is refused by the CLI
    fit(wrapped_mlp(), digits(100)[0], **FLAT).save_pretrained(tmp_path / "other")
    assert main(["sample", "--prior", str(tmp_path / "other"), "--vae", str(kl_dir), "-n", "4", "--out", str(tmp_path / "x.png")]) != 0


def test_a_prior_fitted_by_the_cli_loads_in_the_api_and_the_api_reuses_the_cli_cache(tmp_path, kl_dir):
    write_images(tmp_path / "img", 40, size=(24, 20))
    cache, prior_dir = tmp_path / "cache", tmp_path / "prior"
    assert main(argv("encode --vae", kl_dir, "--data", tmp_path / "img", "--out", cache, "--resolution 16 --num-workers 0 --quiet")) == 0
    assert main(["fit", "--latents", str(cache), "--out", str(prior_dir), *SPATIAL_FLAGS, "--batch-size", "16"]) == 0
    from_cli = LatentPrior.from_pretrained(prior_dir)
    adapter = load_vae(kl_dir)
    from_cli.check_compatible(adapter, resolution=16)
    assert adapter.decode(from_cli.sample(4)).shape == (4, 3, 16, 16)

    # The API on the same folder with cache= finds the CLI's cache complete and rewrites no shard.
    shards = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.safetensors")}
    from_api = fit(adapter, tmp_path / "img", cache=cache, resolution=16, **{**SPATIAL, "batch_size": 16})
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.safetensors")} == shards
    assert from_api.provenance == from_cli.provenance
    z = from_cli.sample(8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(from_api.log_prob(z), from_cli.log_prob(z))  # same latents, same settings, same prior
    # ... and refuses that cache at another resolution instead of mixing
    with pytest.raises(LatentPriorError, match="resolution"):
        fit(adapter, tmp_path / "img", cache=cache, resolution=8, **SPATIAL)
    # A folder without cache= is encoded into memory via a temporary cache.
    in_memory = encode_latents(adapter, tmp_path / "img", resolution=16, quiet=True)
    torch.testing.assert_close(in_memory.mean, open_latents(cache).read(range(40))[0])


# ---- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "images, match",
    [
        (torch.zeros(4, 3, 8, 8), r"\(N, 1, H, W\)"),  # RGB into a grey VAE
        (torch.zeros(1, 8, 8), r"unsqueeze\(0\)"),  # one image without the batch axis
        (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), "127.5"),  # uint8 pixels
        (torch.full((4, 1, 8, 8), 200.0), r"\[-1, 1\]"),  # 0..255 floats
        (torch.tensor(float("nan")).expand(2, 1, 8, 8), "NaN"),
        ([torch.full((2, 1, 8, 8), -0.5), torch.full((2, 1, 9, 9), -0.5)], "one size"),  # mixed sizes
        (torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8)), batch_size=4), "no images"),
        ([], "no images"),
        ([("not", "a tensor")], "not a tensor"),
        ({"image": torch.zeros(2, 1, 8, 8)}, "pass a tensor"),
        ("/no/such/folder", "no such folder"),
    ],
)
def test_bad_images_are_one_clear_error(images, match):
    with pytest.raises(LatentPriorError, match=match):
        fit(wrapped_mlp(), images, **FLAT)


def test_images_in_zero_one_warn():
    with pytest.warns(UserWarning, match=r"x \* 2 - 1"):
        encode_latents(wrapped_mlp(), torch.rand(8, 1, 8, 8), quiet=True)


def test_misused_arguments_are_one_clear_error(tmp_path):
    adapter = wrapped_mlp()
    x = digits(64)[0]
    with pytest.raises(LatentPriorError, match="needs the images"):
        fit(adapter)
    with pytest.raises(LatentPriorError, match="wrap it first"):
        fit(MLPVAE(), x)
    with pytest.raises(LatentPriorError, match="only used with a VAEAdapter"):
        fit(x.flatten(1), x)
    with pytest.raises(LatentPriorError, match="applies to an image folder"):
        fit(adapter, x, cache=tmp_path / "c")
    with pytest.raises(LatentPriorError, match="unknown setting.*stpes"):
        fit(adapter, x, stpes=10)
    with pytest.raises(LatentPriorError, match="VAEAdapter"):
        encode_latents("not a vae", x)


def test_a_folder_under_several_processes_needs_a_shared_cache(tmp_path, monkeypatch, kl_dir):
    write_images(tmp_path / "img", 3)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what `accelerate launch --num_processes 2` sets in each process
    with pytest.raises(LatentPriorError, match="cache=DIR"):
        fit(load_vae(kl_dir), tmp_path / "img", resolution=16, **SPATIAL)
