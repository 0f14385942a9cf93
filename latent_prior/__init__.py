"""latent-prior: a learned, energy-based prior (EVaLP) for any pretrained VAE.

Data flows one way: images -> adapter (`latent_prior.adapters`) -> cache (`latent_prior.cache`)
-> trainer (`latent_prior.train`) -> prior (`latent_prior.prior`) -> samples.
"""

__version__ = "0.1.0"

from latent_prior.errors import LatentPriorError
from latent_prior.vae import LatentNormalization, Posterior, VAEAdapter, VAEProvenance

__all__ = ["LatentPriorError", "LatentNormalization", "Posterior", "VAEAdapter", "VAEProvenance", "__version__"]
