"""bench/digits.py: the flat-latent digits VAEs and the digit classifier used by prior benchmarks.

Real data throughout (scikit-learn's 8×8 digits); the fast tests train for a couple of epochs only.
"""

import pytest
import torch

from bench.digits import (
    NUM_TRAIN,
    classifier_confidence,
    encode_moments,
    evaluate_vae,
    load_digits_split,
    load_digits_vae,
    predicted_class_histogram,
    save_digits_vae,
    train_digit_classifier,
    train_digits_vae,
    wrap_digits_vae,
)
from latent_prior.errors import LatentPriorError  # noqa: E402


@pytest.fixture(scope="module")
def split():
    return load_digits_split(seed=0)


def test_split_is_seeded_disjoint_and_covers_all_digits(split):
    assert split.train_x.shape == (NUM_TRAIN, 64) and split.heldout_x.shape == (1797 - NUM_TRAIN, 64)
    assert set(split.train_index.tolist()).isdisjoint(split.heldout_index.tolist())
    assert 0.0 <= split.train_x.min() and split.train_x.max() <= 1.0
    assert torch.equal(load_digits_split(seed=0).train_index, split.train_index)
    assert not torch.equal(load_digits_split(seed=1).train_index, split.train_index)
    assert set(split.heldout_y.tolist()) == set(range(10))


def test_short_training_lowers_the_loss_and_gives_flat_moments(split):
    torch.manual_seed(0)
    untrained, _ = train_digits_vae(beta=1.0, latent_dim=8, seed=0, epochs=0, split=split)
    model, same_split = train_digits_vae(beta=1.0, latent_dim=8, seed=0, epochs=3, split=split)
    assert same_split is split
    assert model.metrics["heldout"]["neg_elbo_nats"] < untrained.metrics["heldout"]["neg_elbo_nats"] - 1.0
    mean, logvar = encode_moments(model, split.heldout_x)
    assert mean.shape == logvar.shape == (len(split.heldout_x), 8)
    assert torch.isfinite(logvar).all() and mean.dtype == torch.float32
    assert model.decode(mean).shape == (len(mean), 64)
    # Seeded: the same call gives the same weights.
    again, _ = train_digits_vae(beta=1.0, latent_dim=8, seed=0, epochs=3, split=split)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_save_and_load_round_trip(split, tmp_path):
    model, _ = train_digits_vae(beta=0.1, latent_dim=4, seed=1, epochs=1, split=split)
    save_digits_vae(model, split, tmp_path / "vae")
    loaded, loaded_split, latents = load_digits_vae(tmp_path / "vae")
    assert loaded.config == model.config
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(loaded_split.heldout_index, split.heldout_index)
    mean, logvar = encode_moments(model, split.train_x)
    assert torch.equal(latents["train"]["mean"], mean) and torch.equal(latents["train"]["logvar"], logvar)
    assert latents["heldout"]["mean"].shape == (len(split.heldout_x), 4)

    (tmp_path / "vae" / "model.safetensors").unlink()
    with pytest.raises(LatentPriorError, match="model.safetensors"):
        load_digits_vae(tmp_path / "vae")


def test_saved_latents_open_as_a_latent_source(split, tmp_path):
    cache = pytest.importorskip("latent_prior.cache")  # written by another part of the package
    model, _ = train_digits_vae(beta=1.0, latent_dim=8, seed=0, epochs=1, split=split)
    save_digits_vae(model, split, tmp_path)
    source = cache.open_latents(tmp_path / "train_latents.safetensors")
    assert len(source) == NUM_TRAIN and tuple(source.latent_shape) == (8,)


def test_classifier_reads_real_digits(split):
    classifier = train_digit_classifier(split, seed=0, epochs=60)
    assert classifier.heldout_accuracy > 0.85
    real = classifier_confidence(classifier, split.heldout_x)
    noise = classifier_confidence(classifier, torch.rand(297, 64, generator=torch.Generator().manual_seed(0)))
    assert real > noise
    hist = predicted_class_histogram(classifier, split.heldout_x)
    assert hist.shape == (10,) and abs(hist.sum().item() - 1.0) < 1e-6


def test_wrapped_digits_vae_matches_the_module(split):
    pytest.importorskip("latent_prior.adapters")  # written by another part of the package
    model, _ = train_digits_vae(beta=1.0, latent_dim=8, seed=0, epochs=1, split=split)
    adapter = wrap_digits_vae(model)
    images = split.heldout_x[:5].view(5, 1, 8, 8) * 2 - 1
    posterior = adapter.encode(images)
    mean, logvar = encode_moments(model, split.heldout_x[:5])
    torch.testing.assert_close(posterior.mean, mean)
    torch.testing.assert_close(posterior.logvar, logvar)
    assert adapter.latent_shape(8) == (8,)
    decoded = adapter.decode(posterior.mean)
    assert decoded.shape == (5, 1, 8, 8) and decoded.min() >= -1 and decoded.max() <= 1


@pytest.mark.slow
def test_full_training_gives_the_benchmark_its_gap(split):
    """The property benchmarks rely on: with beta = 0.1, decoding N(0, I) gives clearly worse digits
    than decoding posterior draws, while beta = 1 keeps that gap small; both reconstruct well."""
    classifier = train_digit_classifier(split, seed=0)
    assert classifier.heldout_accuracy > 0.93
    gen = torch.Generator().manual_seed(0)
    gaps = {}
    for beta in (1.0, 0.1):
        model, _ = train_digits_vae(beta=beta, latent_dim=8, seed=0, split=split)
        assert model.metrics["train_seconds"] < 120
        heldout = evaluate_vae(model, split.heldout_x)
        assert heldout["mse_of_mean_decode"] < 0.03
        mean, logvar = encode_moments(model, split.heldout_x)
        draws = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        with torch.no_grad():
            posterior_conf = classifier_confidence(classifier, model.decode(draws))
            prior_conf = classifier_confidence(classifier, model.decode(torch.randn(2000, 8, generator=gen)))
        gaps[beta] = posterior_conf - prior_conf
    assert gaps[0.1] > 0.05
    assert gaps[0.1] > gaps[1.0]
