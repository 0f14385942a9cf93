"""`latent-prior sample --prior DIR -n N --out FILE.safetensors`: N raw latents from a saved prior; with
`--vae VAE --out grid.png` or `--out FOLDER/` it decodes them into one grid or one PNG per sample.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latent_prior.commands import check_new_output, load_prior_for, resolve_device
from latent_prior.config import option
from latent_prior.errors import LatentPriorError
from latent_prior.files import atomic_save_safetensors, atomic_write
from latent_prior.log import logger
from latent_prior.prior import SAMPLE_METHODS, LatentPrior
from latent_prior.threads import cpu_threads
from latent_prior.vae import VAEAdapter


@dataclass
class SampleConfig:
    """`latent-prior sample`: draw raw latents from an exported prior into a .safetensors file, or decode
    them with --vae into one grid (.png) or one PNG per sample (a folder)."""

    prior: str | None = option(
        None, "folder of an exported prior (the --out of `latent-prior fit --latents`, or RUN_DIR/prior)", required=True
    )
    n: int | None = option(None, "number of latents to draw", flags=("-n",), required=True)
    out: str | None = option(
        None,
        "FILE.safetensors: tensor `latents` (N, *latent_shape) in "
        "raw latent space; FILE.png: one grid of the decoded samples (needs --vae); FOLDER: one PNG per decoded "
        "sample, sample_000000.png, ... (needs --vae)",
        required=True,
    )
    vae: str | None = option(
        None, "VAE to decode with (hub id, folder, .safetensors, or 'default' for the embedded one): the one the prior was fitted on"
    )
    dtype: str = option("fp32", "precision of the VAE decoder", choices=("fp32", "fp16", "bf16"))
    subfolder: str | None = option(None, "subfolder of --vae holding the VAE (e.g. 'vae' in a pipeline repo)")
    revision: str | None = option(None, "hub revision (branch, tag or commit) of --vae")
    decode_batch_size: int = option(32, "latents per decoder call")
    grid_columns: int | None = option(None, "--out .png: images per grid row (about sqrt(N) when left out)")
    scale: int | None = option(
        None, "--out .png: enlarge each image this many times, nearest neighbour (when left out, enough for tiles of at least 64 px)"
    )
    overwrite: bool = option(
        False,
        "replace an existing --out file, or the sample_*.png "
        "files a previous run left in --out FOLDER (otherwise refused); the prior's own folder is never written to",
    )
    quiet: bool = option(False, "no progress bar")
    method: str = option(
        "sampler",
        "sampler: one flow pass; sir: importance resampling towards the EBM; langevin: short-run Langevin",
        choices=SAMPLE_METHODS,
    )
    seed: int = option(0, "random seed")
    batch_size: int | None = option(None, "latents per chunk (automatic when left out)")
    temperature: float = option(1.0, "sampler: scale of the flow's base noise; sir/langevin: temperature of the target")
    proposals: int | None = option(None, "sir: proposals per sample (100 when left out)")
    langevin_steps: int | None = option(None, "langevin: number of steps (60 when left out)")
    step_size: float | None = option(None, "langevin: step size s (0.4 when left out)")
    langevin_space: str = option(
        "auto",
        "langevin: where the chain runs. base: in the "
        "coordinates of the energy's frozen base flow (same target; does not blow up on sharp latents, where the "
        "latent chain overflows); latent: in z itself (LEBM's chain); auto: base when the energy has a base flow, "
        "else latent",
        choices=("auto", "latent", "base"),
    )
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (CUDA when available)")
    cpu_threads: int = option(
        0,
        "torch threads of the prior's sampling on CPU (0: one, or "
        "OMP_NUM_THREADS when set: the small networks ran 15-60x slower on two threads of a busy 2-core machine); "
        "decoding keeps torch's own count",
    )
    allow_finetuned_vae: bool = option(
        False,
        "decode with a --vae whose weights differ from "
        "the VAE the prior was fitted on (same config: a fine-tune of it); refused otherwise, since its latents "
        "may be distributed differently",
    )


def _output_kind(out: Path) -> str:
    """ "latents" (.safetensors), "grid" (.png) or "folder" (no suffix, or an existing folder)."""
    if out.suffix == ".safetensors":
        return "latents"
    if out.suffix.lower() == ".png":
        return "grid"
    if out.is_dir() or (out.suffix == "" and not out.exists()):
        return "folder"
    raise LatentPriorError(
        f"--out {out}: write raw latents to a .safetensors file (e.g. {out.with_suffix('.safetensors').name}), a grid of "
        "decoded samples to a .png file, or one PNG per sample to a folder."
    )


def _check_sample_memory(n: int, prior: LatentPrior, device: torch.device) -> None:
    """Refuse an -n whose latents alone (with a few working copies) exceed the memory of the device."""
    from latent_prior.encode import human_bytes, machine_memory_bytes

    needed, available = 4 * n * prior.num_latent_dims * 4, machine_memory_bytes(device)
    if available is not None and needed > available:
        raise LatentPriorError(
            f"-n {n}: {n} latents of {prior.num_latent_dims} values need at least {human_bytes(needed)}, "
            f"more than the {human_bytes(available)} of memory here; draw fewer at a time."
        )


def _prepare_folder(out: Path, overwrite: bool) -> None:
    old = sorted(out.glob("sample_*.png")) if out.is_dir() else []
    if old and not overwrite:
        raise LatentPriorError(
            f"--out {out} already holds {len(old)} sample_*.png files from an earlier run; pass --overwrite to replace "
            "them, or choose another folder."
        )
    for path in old:
        path.unlink()
    out.mkdir(exist_ok=True)


def run_sample(config: SampleConfig, adapter: VAEAdapter | None = None) -> int:
    """Load the prior and draw `config.n` latents: write them (raw space) to `config.out` (.safetensors), or,
    with a VAE adapter, decode them to one grid (`--out x.png`) or one PNG per sample (`--out FOLDER`)."""
    if config.prior is None:
        raise LatentPriorError("--prior is required: the folder written by `latent-prior fit --out`.")
    if config.out is None:
        raise LatentPriorError("--out is required: a .safetensors file, a .png grid or a folder of PNGs.")
    if config.n is None or config.n <= 0:
        raise LatentPriorError(f"-n {config.n}: the number of samples must be a positive integer.")
    if config.cpu_threads < 0:
        raise LatentPriorError(f"--cpu-threads {config.cpu_threads}: pass 0 (the policy: one thread) or a number of threads.")
    out = Path(config.out)
    kind = _output_kind(out)
    if kind != "latents" and adapter is None:
        raise LatentPriorError(
            f"--out {out}: decoding samples to PNGs needs --vae, the VAE the prior was fitted on ('default' for the "
            "embedded one); or write raw latents to a .safetensors file."
        )
    if not out.parent.exists():
        raise LatentPriorError(f"--out {out}: the folder {out.parent} does not exist; create it first.")
    check_new_output(out, Path(config.prior), config.overwrite, what="samples", folder=kind == "folder")
    for name in ("decode_batch_size", "grid_columns", "scale"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise LatentPriorError(f"--{name.replace('_', '-')} {value}: pass a positive integer.")
    device = resolve_device(config.device)
    prior = load_prior_for(config.prior, device, adapter, config.vae, allow_other_weights=config.allow_finetuned_vae)
    _check_sample_memory(config.n, prior, device)
    if kind == "folder":
        _prepare_folder(out, config.overwrite)
    options: dict[str, Any] = {}
    if config.method == "sir" and config.proposals is not None:
        options["proposals"] = config.proposals
    if config.method == "langevin":
        if config.langevin_steps is not None:
            options["steps"] = config.langevin_steps
        if config.step_size is not None:
            options["step_size"] = config.step_size
        options["space"] = config.langevin_space
    generator = torch.Generator(device=device).manual_seed(config.seed)
    start = time.perf_counter()
    with cpu_threads(config.cpu_threads) if device.type == "cpu" else contextlib.nullcontext():
        latents = prior.sample(
            config.n, method=config.method, temperature=config.temperature, generator=generator, batch_size=config.batch_size, **options
        )
    seconds = time.perf_counter() - start
    what = f"(method={config.method}, seed={config.seed}, temperature={config.temperature})"
    if kind != "latents":
        _decode_to_pngs(latents, adapter, out, kind, config, device)
        logger.info(
            f"latent-prior sample: drew {config.n} latents {tuple(latents.shape[1:])} {what} in {seconds:.1f} s and decoded "
            f"them with {config.vae or 'the VAE'} to {out}{'' if kind == 'grid' else ' (sample_000000.png, ...)'}"
        )
        return 0
    metadata = {
        "method": config.method,
        "seed": str(config.seed),
        "temperature": repr(float(config.temperature)),
        "prior": str(Path(config.prior).resolve()),
        "space": "raw",
        "latent_shape": json.dumps(list(prior.latent_shape)),
        "normalization": json.dumps(prior.normalization.to_dict()),
        "options": json.dumps(options),
    }
    if prior.provenance:
        metadata["provenance"] = json.dumps(prior.provenance)
    atomic_save_safetensors({"latents": latents.detach().float()}, out, metadata)
    logger.info(
        f"latent-prior sample: wrote {config.n} latents {tuple(latents.shape[1:])} (raw space, method={config.method}, "
        f"seed={config.seed}, temperature={config.temperature}) to {out} in {seconds:.1f} s"
    )
    return 0


def _decode_to_pngs(latents: torch.Tensor, adapter: VAEAdapter, out: Path, kind: str, config: SampleConfig, device: torch.device) -> None:
    """Decode raw latents in batches (with a progress bar) into one grid or one PNG per sample."""
    from tqdm.auto import tqdm

    from latent_prior.images import make_grid, save_pngs

    if adapter.device != device:
        adapter.to(device)
    decoded = []
    with tqdm(total=len(latents), desc="decode", unit="img", disable=config.quiet, dynamic_ncols=True, file=sys.stderr) as bar:
        for i in range(0, len(latents), config.decode_batch_size):
            images = adapter.decode(latents[i : i + config.decode_batch_size]).float().cpu()
            if kind == "folder":
                save_pngs(images, out, prefix="sample", start=i)  # as we go: memory stays at one batch
            else:
                decoded.append(images)
            bar.update(len(images))
    if kind == "grid":
        images = torch.cat(decoded)
        scale = config.scale or max(1, math.ceil(64 / images.shape[-1]))
        grid = make_grid(images, ncol=config.grid_columns, scale=scale)
        atomic_write(out, lambda tmp: grid.save(tmp, format="PNG"))
