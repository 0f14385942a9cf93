"""VAE families behind the `latent_prior.vae.VAEAdapter` interface (installed as `latent_prior.adapters`)."""
