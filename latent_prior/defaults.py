"""The embedded default: a small real VAE and the digit images it was trained on, shipped in the package.

They let every command run out of the box, offline, with no download (`--vae default`, the demos, the
tests), and they go through the same paths as user data: the VAE is a diffusers `save_pretrained`
folder and the digits are an image folder of PNGs.

* `DEFAULT_VAE_DIR`: a diffusers `AutoencoderKL` (RGB in, 4×8×8 latents at 32 px, 0.95M parameters),
  trained by `scripts/train_default_vae.py`; its model card is `assets/default_vae/README.md`.
* `DEFAULT_DATA_DIR`: the 1797 scikit-learn digits as 8×8 greyscale PNGs, `<label>/<index:04d>.png`;
  see `assets/digits/README.md` for their source and licence.

Importing this module is cheap (pathlib only, no torch).
"""

from __future__ import annotations

from pathlib import Path

from latent_prior.errors import LatentPriorError

ASSETS_DIR: Path = Path(__file__).resolve().parent / "assets"
DEFAULT_VAE_DIR: Path = ASSETS_DIR / "default_vae"
DEFAULT_DATA_DIR: Path = ASSETS_DIR / "digits"
#: Pixel size the default VAE was trained at; its latents are (4, R/4, R/4), so (4, 8, 8) here.
DEFAULT_RESOLUTION: int = 32
#: Number of bundled digit images (scikit-learn's `load_digits()`), for integrity checks.
DEFAULT_NUM_IMAGES: int = 1797

_VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def require_embedded_default() -> tuple[Path, Path]:
    """Return (DEFAULT_VAE_DIR, DEFAULT_DATA_DIR) after checking that the shipped files are there.

    Raises `LatentPriorError` when the package was installed without its assets (e.g. a build that
    dropped package data), rather than letting diffusers report a misleading hub/network error.
    """
    missing = [str(DEFAULT_VAE_DIR / name) for name in _VAE_FILES if not (DEFAULT_VAE_DIR / name).is_file()]
    if missing:
        raise LatentPriorError(
            f"the embedded default VAE is missing ({', '.join(missing)}); reinstall latent-prior with its "
            "package data (pip install --force-reinstall latent-prior) or pass --vae with your own VAE."
        )
    if not DEFAULT_DATA_DIR.is_dir() or next(DEFAULT_DATA_DIR.glob("*/*.png"), None) is None:
        raise LatentPriorError(
            f"the bundled digit images are missing from {DEFAULT_DATA_DIR}; reinstall latent-prior with its "
            "package data (pip install --force-reinstall latent-prior) or pass your own image folder."
        )
    return DEFAULT_VAE_DIR, DEFAULT_DATA_DIR
