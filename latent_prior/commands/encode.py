"""`latent-prior encode`: resolve --vae to an adapter, then hand over to the core's `encode_images` (the config is
the core's `EncodeConfig`, so the Python API and the CLI share it)."""

from __future__ import annotations

from latent_prior.encode import EncodeConfig, encode_images
from latent_prior.vae import VAEAdapter


def run_encode(config: EncodeConfig, adapter: VAEAdapter) -> int:
    encode_images(adapter, config)
    return 0
