"""The subcommands of `latent-prior`, one module each: encode, fit, sample, eval, info (`latent_prior.cli` routes
to them). A module holds the command's function and, where the config is the command's alone, its dataclass; the
jobs themselves (encoding, training, the pipeline, the metrics) stay in the core modules, which these call. Here:
what `sample` and `eval` share (loading a prior for a VAE, the --device flag, the checks on --out).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from latent_prior.errors import LatentPriorError
from latent_prior.prior import LatentPrior, prior_folder
from latent_prior.vae import VAEAdapter


def load_prior_for(
    prior_dir: str | os.PathLike,
    device: torch.device,
    adapter: VAEAdapter | None = None,
    vae_flag: str | None = None,
    allow_other_weights: bool = False,
) -> LatentPrior:
    """Load the prior in `prior_dir` onto `device`; with an adapter, first check that the prior was fitted
    for that VAE (an error naming --vae `vae_flag` and the prior when not)."""
    prior = LatentPrior.from_pretrained(prior_dir, device=device)
    if adapter is not None:
        try:
            prior.check_compatible(adapter, allow_other_weights=allow_other_weights)
        except LatentPriorError as exc:
            raise LatentPriorError(f"--vae {vae_flag} does not match the prior {prior_dir}: {str(exc).rstrip('.')}.") from None
    return prior


def resolve_device(name: str) -> torch.device:
    """--device: cpu, cuda, cuda:N, or auto (CUDA when available), checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LatentPriorError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LatentPriorError(f"--device {name}: CUDA is not available here; use --device cpu.")
    return device


def check_new_output(out: Path, prior_dir: Path, overwrite: bool, *, what: str, folder: bool = False) -> None:
    """Refuse an --out (of `sample` or `eval`) that would destroy something: a path inside the prior's own
    folder (a sample file named model.safetensors would leave the prior unloadable), a folder where a file
    goes, or an existing file without --overwrite. folder: --out names a folder to write into (its own
    files are checked by the writer)."""
    prior_dir = prior_folder(prior_dir)
    prior_real, target = prior_dir.resolve(), out.resolve()
    if target == prior_real or prior_real in target.parents:
        raise LatentPriorError(
            f"--out {out} is inside the prior folder {prior_dir}; write the {what} elsewhere, so that the prior stays as it was exported."
        )
    if folder or not (out.exists() or out.is_symlink()):
        return
    if out.is_dir():
        raise LatentPriorError(
            f"--out {out} is a folder; name a new file" + (", or a folder without a suffix." if what == "samples" else ".")
        )
    if not overwrite:
        raise LatentPriorError(f"--out {out} already exists; pass --overwrite to replace it, or choose another file name.")
