"""`latent-prior fit`: with --latents, fit on a cache and export the prior to --out (`latent_prior.train`);
otherwise the whole pipeline (encode -> fit -> export -> sample -> decode -> report) into the run folder --out,
on --vae/--data or the embedded default (`latent_prior.pipeline`). The config is the pipeline's `RunConfig`."""

from __future__ import annotations

from typing import Callable

from latent_prior.errors import LatentPriorError
from latent_prior.pipeline import RunConfig, run_pipeline
from latent_prior.vae import VAEAdapter


def run_fit(config: RunConfig, load_adapter: Callable[[], VAEAdapter]) -> int:
    """`load_adapter` is called only for a fit on images: a fit on --latents needs no VAE (nor diffusers)."""
    if config.latents is not None:
        from latent_prior.train import run_fit as fit_on_latents

        given = [f"--{name}" for name in ("vae", "data") if getattr(config, name, None) is not None]
        if given:
            raise LatentPriorError(
                f"--latents fits an existing cache, while {' and '.join(given)} encode images: "
                "give --latents alone, or leave it out to encode and fit in one run."
            )
        return fit_on_latents(config.fit_config())
    return run_pipeline(config, load_adapter())
