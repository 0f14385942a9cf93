"""Tiny networks and cheap evaluations that the tests' fits share (seconds per fit on a CPU), as `fit` keyword
arguments; `flags` writes them as the `latent-prior fit` flags that set them."""

from __future__ import annotations

#: one-block convolutional networks, for spatial (C, H, W) latents
SPATIAL_NETS = dict(energy_channels=8, energy_depth=1, flow_blocks=1, flow_channels=8)
#: small MLPs, for flat (D,) latents
FLAT_NETS = dict(energy_hidden=32, energy_depth=2, flow_blocks=2, flow_hidden=16)
#: conftest's `default_vae_prior` fit (with steps=10); a --resume of it must pass the same architecture
DEFAULT_VAE_FIT = dict(checkpoint_every=5, batch_size=32, eval_samples=64, eval_latents=64, log_z_samples=128, quiet=True, **SPATIAL_NETS)


def flags(options: dict) -> list[str]:
    """`fit` keyword arguments as command-line flags: energy_hidden=32 -> --energy-hidden 32; quiet=True -> --quiet."""
    words = []
    for name, value in options.items():
        words.append("--" + name.replace("_", "-"))
        if value is not True:
            words.append(str(value))
    return words
