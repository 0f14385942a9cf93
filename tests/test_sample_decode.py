"""`latent-prior sample --vae ... --out grid.png | FOLDER`: decoded samples of a real prior fitted on real
latents of the embedded default VAE; refusals (no --vae, another VAE, an occupied folder); a sample file fed
back to `latent-prior eval`."""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from _cli import argv
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from latent_prior.cache import open_latents
from latent_prior.cli import main
from latent_prior.images import to_uint8
from latent_prior.prior import LatentPrior

sys.path.insert(0, str(Path(__file__).parent))


def test_sample_decodes_to_a_grid_and_to_one_png_per_sample(default_vae_prior, tmp_path, capsys):
    from latent_prior.adapters import load_vae

    _, prior_dir, _ = default_vae_prior
    grid = tmp_path / "grid.png"
    assert main(argv("sample --prior", prior_dir, "-n 6 --vae default --out", grid, "--grid-columns 3 --scale 2 --quiet")) == 0
    image = Image.open(grid)
    # 3 × 2 tiles of 32·2 px with 2 px padding: 3·66 + 2 by 2·66 + 2
    assert image.size == (200, 134) and image.mode == "RGB"
    assert "decoded" in capsys.readouterr().err

    folder = tmp_path / "pngs"
    assert main(argv("sample --prior", prior_dir, "-n 5 --seed 4 --vae default --out", folder, "--decode-batch-size 2 --quiet")) == 0
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"sample_{i:06d}.png" for i in range(5)]
    pngs = np.stack([np.asarray(Image.open(folder / f).convert("RGB")) for f in files])
    assert pngs.shape == (5, 32, 32, 3)

    # The PNGs are the decodes of exactly the latents the same seed writes to a .safetensors file.
    latents_file = tmp_path / "z.safetensors"
    assert main(["sample", "--prior", str(prior_dir), "-n", "5", "--seed", "4", "--vae", "default", "--out", str(latents_file)]) == 0
    latents = load_file(str(latents_file))["latents"]
    expected = to_uint8(load_vae("default").decode(latents)).numpy()
    assert np.abs(expected.astype(int) - pngs.astype(int)).max() <= 1  # batches of 2 vs 5: float rounding only
    assert pngs.std() > 5  # real images, not a blank


def test_sample_refuses_png_without_vae_another_vae_and_an_occupied_folder(default_vae_prior, tmp_path, capsys):
    from _encode_helpers import make_tiny_vae

    _, prior_dir, _ = default_vae_prior
    assert main(["sample", "--prior", str(prior_dir), "-n", "4", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs --vae" in err and not (tmp_path / "g.png").exists()
    assert main(["sample", "--prior", str(prior_dir), "-n", "4", "--out", str(tmp_path / "pngs")]) == 2
    assert "needs --vae" in capsys.readouterr().err

    other = make_tiny_vae(tmp_path / "other_vae")
    assert main(["sample", "--prior", str(prior_dir), "-n", "4", "--vae", str(other), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "does not match the prior" in err and "VAE config differs" in err

    assert main(["sample", "--prior", str(prior_dir), "-n", "4", "--vae", "default", "--out", str(tmp_path / "z.jpg")]) == 2
    assert ".safetensors" in capsys.readouterr().err

    folder = tmp_path / "samples"
    assert main(["sample", "--prior", str(prior_dir), "-n", "4", "--vae", "default", "--out", str(folder), "--quiet"]) == 0
    assert main(["sample", "--prior", str(prior_dir), "-n", "2", "--vae", "default", "--out", str(folder), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["sample", "--prior", str(prior_dir), "-n", "2", "--vae", "default", "--out", str(folder), "--quiet", "--overwrite"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["sample_000000.png", "sample_000001.png"]  # no stale files left


def test_a_sample_file_opens_as_latents_and_feeds_eval(default_vae_prior, tmp_path, capsys):
    latents, prior_dir, _ = default_vae_prior
    prior = LatentPrior.from_pretrained(prior_dir)
    samples = tmp_path / "z.safetensors"
    assert main(["sample", "--prior", str(prior_dir), "-n", "40", "--out", str(samples)]) == 0
    with safe_open(str(samples), framework="pt") as f:
        assert json.loads(f.metadata()["latent_shape"]) == [4, 8, 8]
    source = open_latents(samples)
    assert len(source) == 40 and source.deterministic and source.latent_shape == (4, 8, 8)
    assert source.normalization == prior.normalization and source.provenance == prior.provenance
    mean, logvar = source.read([0, 39])
    torch.testing.assert_close(mean, load_file(str(samples))["latents"][[0, 39]])
    assert logvar is None

    out = tmp_path / "r.json"
    quick = "--samples 100 --methods gaussian --quiet --out"
    assert main(argv("eval --prior", prior_dir, "--latents", samples, "--train-latents", latents, quick, out)) == 0
    report = json.loads(out.read_text())
    assert report["n_heldout"] == 40 and str(latents) in report["training_reference"]
    # without --train-latents the path the prior recorded is not opened: half of the samples are the reference
    assert main(argv("eval --prior", prior_dir, "--latents", samples, quick, out, "--overwrite")) == 0
    report = json.loads(out.read_text())
    assert report["n_heldout"] == 20 and str(latents) not in report["training_reference"]
