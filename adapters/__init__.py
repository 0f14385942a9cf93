"""VAE families behind the `latent_prior.vae.VAEAdapter` interface (installed as `latent_prior.adapters`).

* `load_vae(spec, ...)`: a diffusers `AutoencoderKL` / `AutoencoderTiny` from a hub id, a local folder
  (save_pretrained or pipeline) or a single `.safetensors` checkpoint;
* `wrap(module, encode=..., decode=...)` / subclass `TorchVAEAdapter`: a user's own torch VAE;
* `DiffusersKLAdapter`, `DiffusersTinyAdapter`: wrap an already loaded diffusers model.
"""

from .diffusers_kl import DiffusersKLAdapter
from .diffusers_tiny import DiffusersTinyAdapter
from .loading import load_vae
from .torch_vae import TorchVAEAdapter, as_posterior, wrap

__all__ = ["load_vae", "wrap", "TorchVAEAdapter", "DiffusersKLAdapter", "DiffusersTinyAdapter", "as_posterior"]
