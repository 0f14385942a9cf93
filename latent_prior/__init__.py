"""latent-prior: a learned, energy-based prior (EVaLP) for any pretrained VAE.

Data flows one way: images -> adapter (`latent_prior.adapters`) -> cache (`latent_prior.cache`)
-> trainer (`latent_prior.train.fit`, `latent_prior.trainer`) -> prior (`latent_prior.prior`) -> samples.

    from latent_prior import fit, LatentPrior
    from latent_prior.adapters import load_vae, wrap

    vae = load_vae("default")                           # or wrap(my_vae, encode=..., decode=...)
    prior = fit(vae, images, steps=500)                 # images (N, C, H, W) in [-1, 1], a DataLoader or a folder
    x = vae.decode(prior.sample(16))                    # (16, C, H, W) in [-1, 1]
    prior = fit("cache/", out="prior/")                 # or on cached latents; LatentPrior.from_pretrained("prior/")
"""

__version__ = "0.1.0"

from latent_prior.errors import LatentPriorError
from latent_prior.vae import LatentNormalization, Posterior, VAEAdapter, VAEProvenance

# The trainer and the prior pull in accelerate and the networks: import them on first use only.
_LAZY = {
    "fit": "latent_prior.api",
    "encode_latents": "latent_prior.api",
    "EncodedLatents": "latent_prior.cache",
    "FitConfig": "latent_prior.fit_config",
    "LatentPrior": "latent_prior.prior",
    "open_latents": "latent_prior.cache",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'latent_prior' has no attribute {name!r}")


__all__ = ["LatentPriorError", "LatentNormalization", "Posterior", "VAEAdapter", "VAEProvenance", "__version__", *_LAZY]
