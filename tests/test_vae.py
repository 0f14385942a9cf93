"""The VAE interface's pure parts: latent normalization and provenance hashing."""

import math

import pytest
import torch

from latent_prior.errors import LatentPriorError
from latent_prior.vae import LatentNormalization, Posterior, fingerprint_module, hash_config, parse_dtype


@pytest.mark.parametrize(
    "norm",
    [
        LatentNormalization(0.18215),  # SD 1.x
        LatentNormalization(1.5305, 0.0609),  # SD3
        LatentNormalization(0.5, 0.0, (0.1, -0.2, 0.3, 0.0), (1.5, 0.5, 2.0, 1.0)),
    ],
)
def test_normalize_round_trip_and_logvar(norm):
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(64, 4, 3, 3, generator=g) * 5 + 1
    z = norm.normalize(raw)
    torch.testing.assert_close(norm.denormalize(z), raw, rtol=1e-5, atol=1e-5)
    # The affine map scales a posterior's variance by (scaling/std_c)^2 per channel.
    logvar = torch.full_like(raw, -2.0)
    std_c = torch.tensor(norm.latents_std or (1.0,) * 4).view(1, 4, 1, 1)
    expected = -2.0 + 2 * torch.log(norm.scaling_factor / std_c)
    torch.testing.assert_close(norm.normalize_logvar(logvar), expected.expand_as(raw), rtol=1e-5, atol=1e-5)


def test_sd_scaling_gives_known_values():
    norm = LatentNormalization(0.18215)
    assert norm.normalize(torch.tensor([[1.0]])).item() == pytest.approx(0.18215)
    assert norm.matches(LatentNormalization.from_dict(norm.to_dict()))
    assert not norm.matches(LatentNormalization(0.13025))
    assert not norm.matches(LatentNormalization(0.18215, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4))


def test_posterior_sample_uses_logvar():
    g = torch.Generator().manual_seed(0)
    post = Posterior(torch.zeros(20000, 2), torch.full((20000, 2), math.log(4.0)))
    assert post.sample(g).std().item() == pytest.approx(2.0, rel=0.03)
    det = Posterior(torch.ones(3, 2))
    assert torch.equal(det.sample(g), det.mean)


def test_hashes_are_stable_and_discriminating():
    assert hash_config({"a": 1, "b": [1, 2]}) == hash_config({"b": [1, 2], "a": 1, "_private": 3})
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    assert fingerprint_module(a) == fingerprint_module(a)
    assert fingerprint_module(a) != fingerprint_module(b)


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    with pytest.raises(LatentPriorError, match="int8"):
        parse_dtype("int8")
