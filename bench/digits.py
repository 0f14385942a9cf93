"""Flat-latent VAEs on the 8×8 digits and a digit classifier: the ground truth for prior benchmarks.

A latent prior is judged on real VAEs whose aggregate posterior is known to be non-Gaussian. Here the
VAEs are small MLPs on scikit-learn's 1797 real 8×8 digits (64 pixels), trained in seconds on a CPU:

* `train_digits_vae(beta)`: a VAE with a d-dim latent (d = 8 by default) and a **Bernoulli decoder**
  on pixel intensities scaled to [0, 1] (binary cross-entropy on grey levels, the usual choice for
  MNIST-like digits; it needs no decoder variance to tune). Loss per image, in nats:

      BCE(x, decoder(z)) summed over the 64 pixels  +  beta · KL(q(z|x) ‖ N(0, I)) summed over d

  beta = 1 is the ELBO; beta = 0.1 gives a weakly regularised latent space whose aggregate posterior
  is far from N(0, I), where a learned prior has the most room to win.
* a fixed, seeded split of the 1797 digits: 1500 to train the VAE (and fit priors on their latents),
  297 held out (to measure priors on latents of images the prior never saw).
* `save_digits_vae` / `load_digits_vae`: one directory with `model.safetensors`, `config.json`,
  `split.safetensors` and the latents `train_latents.safetensors` / `heldout_latents.safetensors`
  (each `mean`, `logvar`: (N, d) float32, the layout `latent_prior.cache.open_latents` reads).
* `train_digit_classifier()` + `classifier_confidence(classifier, images)`: an MLP classifier trained
  on the real training digits; the mean max-softmax probability of decoded samples says how
  digit-like they are (real held-out digits score close to 1, decoded N(0, I) draws of a weak-KL VAE
  clearly less).
* `wrap_digits_vae(model)`: the VAE behind `latent_prior.adapters.wrap`, images (N, 1, 8, 8) in [-1, 1].

Pixels are (N, 64) float32 in [0, 1] throughout this module unless a function says otherwise.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

NUM_PIXELS = 64  # 8 × 8
NUM_CLASSES = 10
NUM_TRAIN = 1500  # of 1797; the other 297 are held out


# ---------------------------------------------------------------------------------------------------
# data


@dataclass
class DigitsSplit:
    """The seeded train / held-out split of sklearn's digits.

    train_x: (1500, 64) float32 in [0, 1];  train_y: (1500,) int64 labels;  train_index: rows of load_digits()
    heldout_x: (297, 64);  heldout_y: (297,);  heldout_index: (297,)
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    train_index: torch.Tensor
    heldout_x: torch.Tensor
    heldout_y: torch.Tensor
    heldout_index: torch.Tensor
    seed: int


def load_digits_split(seed: int = 0, num_train: int = NUM_TRAIN) -> DigitsSplit:
    """sklearn's 1797 digits, 0..16 grey levels scaled to [0, 1], split by a seeded permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, heldout = order[:num_train].sort().values, order[num_train:].sort().values
    return DigitsSplit(x[train], y[train], train, x[heldout], y[heldout], heldout, seed)


# ---------------------------------------------------------------------------------------------------
# the VAE


@dataclass
class DigitsVAEConfig:
    latent_dim: int = 8
    hidden: int = 256
    beta: float = 1.0
    epochs: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    split_seed: int = 0
    num_train: int = NUM_TRAIN


class DigitsVAE(nn.Module):
    """MLP VAE: 64 pixels in [0, 1] -> d-dim Gaussian posterior -> 64 Bernoulli logits."""

    def __init__(self, latent_dim: int = 8, hidden: int = 256):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Linear(NUM_PIXELS, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2 * latent_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, NUM_PIXELS)
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 64) in [0, 1] -> (mean, logvar), each (N, d)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, d) -> Bernoulli logits (N, 64)."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, d) -> mean images (N, 64) in [0, 1] (the Bernoulli means)."""
        return torch.sigmoid(self.decoder(z))

    def loss_terms(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image (reconstruction BCE, KL), both (N,) in nats, from one reparameterised draw."""
        mean, logvar = self.encode(x)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * eps
        recon = F.binary_cross_entropy_with_logits(self.decode_logits(z), x, reduction="none").sum(1)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        return recon, kl


@torch.no_grad()
def encode_moments(model: DigitsVAE, x: torch.Tensor, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 64) in [0, 1] -> posterior (mean, logvar), each (N, d) float32."""
    model.eval()
    parts = [model.encode(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts])


@torch.no_grad()
def evaluate_vae(model: DigitsVAE, x: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Mean per-image figures in nats: reconstruction BCE, KL, negative ELBO (beta = 1), and the
    per-pixel MSE of the decoded posterior means in [0, 1] units."""
    model.eval()
    recon, kl = model.loss_terms(x, torch.Generator().manual_seed(seed))
    mean, _ = model.encode(x)
    mse = F.mse_loss(model.decode(mean), x).item()
    return {
        "recon_nats": recon.mean().item(),
        "kl_nats": kl.mean().item(),
        "neg_elbo_nats": (recon + kl).mean().item(),
        "mse_of_mean_decode": mse,
    }


def train_digits_vae(
    beta: float = 1.0,
    latent_dim: int = 8,
    seed: int = 0,
    epochs: int = 300,
    *,
    hidden: int = 256,
    batch_size: int = 128,
    lr: float = 2e-3,
    split: DigitsSplit | None = None,
    verbose: bool = False,
) -> tuple[DigitsVAE, DigitsSplit]:
    """Train a digits VAE on the 1500 training digits; returns (model in eval mode, split).

    The model carries its `DigitsVAEConfig` as `model.config` and its figures as `model.metrics`
    (train and held-out, see `evaluate_vae`, plus `train_seconds`). Seeded: same arguments, same weights.
    """
    split = split if split is not None else load_digits_split()
    config = DigitsVAEConfig(latent_dim, hidden, float(beta), epochs, batch_size, lr, seed, split.seed, len(split.train_x))
    torch.manual_seed(seed)
    model = DigitsVAE(latent_dim, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=lr / 20)
    gen = torch.Generator().manual_seed(seed)
    x = split.train_x
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            recon, kl = model.loss_terms(x[order[i : i + batch_size]], gen)
            loss = (recon + beta * kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if verbose and (epoch + 1) % 50 == 0:
            print(f"beta {beta:g} epoch {epoch + 1}: recon {recon.mean().item():.2f} kl {kl.mean().item():.2f} nats")
    seconds = time.perf_counter() - start
    model.eval()
    model.config = config
    model.metrics = {
        "train": evaluate_vae(model, split.train_x, seed),
        "heldout": evaluate_vae(model, split.heldout_x, seed),
        "train_seconds": seconds,
    }
    return model, split


# ---------------------------------------------------------------------------------------------------
# saving and loading (safetensors + JSON only)


def save_digits_vae(model: DigitsVAE, split: DigitsSplit, directory: str | Path) -> Path:
    """Write model weights, config, split and the posterior moments of both subsets into `directory`.

    Files: model.safetensors, config.json (config + metrics), split.safetensors (indices, labels),
    train_latents.safetensors and heldout_latents.safetensors (`mean`, `logvar`, each (N, d) float32).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    meta = {
        "config": asdict(model.config),
        "metrics": getattr(model, "metrics", None),
        "decoder": "bernoulli",
        "pixels": "(N, 64) in [0, 1] = sklearn load_digits().data / 16",
    }
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    save_file(
        {
            "train_index": split.train_index,
            "train_labels": split.train_y,
            "heldout_index": split.heldout_index,
            "heldout_labels": split.heldout_y,
        },
        str(directory / "split.safetensors"),
    )
    for name, x in (("train", split.train_x), ("heldout", split.heldout_x)):
        mean, logvar = encode_moments(model, x)
        save_file({"mean": mean.contiguous(), "logvar": logvar.contiguous()}, str(directory / f"{name}_latents.safetensors"))
    return directory


def load_digits_vae(directory: str | Path) -> tuple[DigitsVAE, DigitsSplit, dict[str, dict[str, torch.Tensor]]]:
    """Reload what `save_digits_vae` wrote: (model in eval mode, split, {"train"|"heldout": {"mean", "logvar"}})."""
    from latent_prior.errors import LatentPriorError

    directory = Path(directory)
    needed = ["model.safetensors", "config.json", "split.safetensors", "train_latents.safetensors", "heldout_latents.safetensors"]
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise LatentPriorError(
            f"{directory} is not a saved digits VAE (missing {', '.join(missing)}); write it with bench.digits.save_digits_vae."
        )
    meta = json.loads((directory / "config.json").read_text())
    config = DigitsVAEConfig(**meta["config"])
    model = DigitsVAE(config.latent_dim, config.hidden)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    model.eval()
    model.config, model.metrics = config, meta.get("metrics")
    full = load_digits_split(config.split_seed, config.num_train)
    saved = load_file(str(directory / "split.safetensors"))
    if not torch.equal(saved["train_index"], full.train_index):
        raise LatentPriorError(f"{directory}/split.safetensors does not match the seeded split; retrain and save again.")
    latents = {name: load_file(str(directory / f"{name}_latents.safetensors")) for name in ("train", "heldout")}
    return model, full, latents


# ---------------------------------------------------------------------------------------------------
# the judge: a digit classifier


class DigitClassifier(nn.Module):
    """MLP 64 -> 256 -> 10 on pixels in [0, 1]. `heldout_accuracy` is set by `train_digit_classifier`."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(NUM_PIXELS, hidden), nn.SiLU(), nn.Dropout(0.2), nn.Linear(hidden, NUM_CLASSES))
        self.heldout_accuracy: float = math.nan

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 64), (N, 8, 8) or (N, 1, 8, 8) in [0, 1] -> logits (N, 10)."""
        return self.net(images.reshape(len(images), NUM_PIXELS))


def train_digit_classifier(split: DigitsSplit | None = None, seed: int = 0, epochs: int = 200) -> DigitClassifier:
    """Train on the real training digits (full-batch Adam with weight decay, a few seconds); the
    returned model is in eval mode and carries `heldout_accuracy` on the 297 held-out digits."""
    split = split if split is not None else load_digits_split()
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    model.train()
    for _ in range(epochs):
        loss = F.cross_entropy(model(split.train_x), split.train_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        model.heldout_accuracy = (model(split.heldout_x).argmax(1) == split.heldout_y).float().mean().item()
    return model


@torch.no_grad()
def classifier_confidence(classifier: DigitClassifier, images: torch.Tensor) -> float:
    """Mean max-softmax probability over images (N, 64) in [0, 1]: near 1 for clear digits."""
    classifier.eval()
    return F.softmax(classifier(images), dim=1).amax(1).mean().item()


@torch.no_grad()
def predicted_class_histogram(classifier: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    """Fraction of images assigned to each class, (10,): shows dropped or over-represented digits."""
    classifier.eval()
    return torch.bincount(classifier(images).argmax(1), minlength=NUM_CLASSES).float() / max(1, len(images))


# ---------------------------------------------------------------------------------------------------
# the package's adapter


def wrap_digits_vae(model: DigitsVAE, source: str = "bench.digits.DigitsVAE") -> Any:
    """The VAE behind `latent_prior.adapters.wrap`: images (N, 1, 8, 8) in [-1, 1] <-> raw latents (N, d),
    identity normalization (the prior's p0 = N(0, I) is the VAE's own prior)."""
    from latent_prior.adapters import wrap

    return wrap(
        model,
        encode=lambda m, images: m.encode((images.reshape(len(images), NUM_PIXELS) + 1.0) / 2.0),
        decode=lambda m, z: m.decode(z).view(-1, 1, 8, 8) * 2.0 - 1.0,
        latent_shape=(model.latent_dim,),
        source=source,
        image_channels=1,
    )
