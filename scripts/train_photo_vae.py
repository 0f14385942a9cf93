"""Train the small photo-patch AutoencoderKL of the prior benchmark (set "photos" of `bench/datasets.py`).

What it does, in order (seeded, reproducible on CPU):

1. Makes the real-photo patch set of `bench.photos`: seeded RGB crops (32×32 by default, `--crop-size`)
   of the ten photos that ship with scikit-image and scikit-learn, each photo first resized to a short
   side of `--photo-side` pixels (256), 3000 for training and 500 held out, split by image region
   (held-out crops come from tiles that no training crop touches), pixels in [-1, 1].
2. Trains a small diffusers `AutoencoderKL` (block_out_channels [16, 32, 32], one layer per block,
   no mid-block attention, 4 latent channels: 32 px -> 4×8×8 latents, 64 px -> 4×16×16, 0.23M parameters;
   `--downsamplings 3 --latent-channels 32` adds a 64-channel block: 64 px -> 32×8×8) with the
   same loop as the embedded default VAE (`scripts/train_default_vae.py`, imported, not copied):

       loss = MSE(x, x̂) (mean over pixels) + kl_weight · KL(q(z|x) ‖ N(0, I)) (nats summed over the 256 latent dims)

   Adam with a short warm-up and a cosine decay to lr/20, batches drawn with replacement; an
   "epoch" is ⌈num_train / batch_size⌉ steps. The KL weight is small (1e-5 by default; `--kl-weight 1e-6`
   is SD's order, with nearly deterministic posteriors): reconstructions come first, and the aggregate
   posterior is left far from N(0, I), which is what a learned prior is for.
3. Sets `scaling_factor` = 1 / std of posterior draws over the training crops (SD's recipe).
4. Saves with `save_pretrained` (safetensors + config.json) and writes `training_summary.json`
   beside it: the config, epochs, steps, seconds, seed, the held-out reconstruction MSE (posterior
   mean decoded; pixels in [-1, 1]) next to the MSE of the mean training crop, and latent figures.

Run from the repo root:

    .venv/bin/python scripts/train_photo_vae.py --output-dir runs/photo_vae --threads 1
    .venv/bin/python scripts/train_photo_vae.py --output-dir runs/photo_vae16 --crop-size 64 --photo-side 384 \
        --kl-weight 1e-6 --epochs 6        # the benchmark's "photos-16" set: 4×16×16 latents
    .venv/bin/python scripts/train_photo_vae.py --help

`bench/datasets.py` calls `train_photo_vae(config)` on demand (its `PHOTO_SETS` hold each set's
settings) and caches the folder under the benchmark's `--cache-dir`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

from bench.photos import CROP_SIZE, NUM_HELDOUT, NUM_TRAIN, PHOTO_SIDE, import_repo_script, make_patches  # noqa: E402
from latent_prior.config import option, parse_config, to_dict  # noqa: E402
from latent_prior.errors import LatentPriorError  # noqa: E402

_default_vae = import_repo_script("train_default_vae")  # its `train` loop and `measure` figures


def photo_vae_architecture(crop_size: int = CROP_SIZE, latent_channels: int = 4, downsamplings: int = 2) -> dict[str, Any]:
    """The AutoencoderKL config: `downsamplings` + 1 blocks, so latents are latent_channels × crop/2^downsamplings
    × crop/2^downsamplings (by default 4 × crop/4 × crop/4).

    Narrow channels and no mid-block attention: 0.35-0.45 s per step of 64 crops on one thread of
    busy shared cores, so the default 8 epochs of 3000 crops (376 steps) train in under 3 minutes. A third
    downsampling adds a block of 64 channels (e.g. 32 × 8 × 8 latents of 64-px crops, the shape of a
    high-channel image autoencoder).
    """
    blocks = downsamplings + 1
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=[16, 32, 32, 64, 64][:blocks],
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        mid_block_add_attention=False,
        sample_size=crop_size,
        force_upcast=False,  # fp32 weights
    )


@dataclass
class TrainPhotoVAEConfig:
    output_dir: str = option("runs/photo_vae", "folder to save_pretrained the VAE and write training_summary.json into")
    epochs: int = option(8, "passes over the training crops; one epoch is ceil(num_train / batch_size) steps")
    batch_size: int = option(64, "crops per step")
    lr: float = option(2e-3, "peak Adam learning rate (warm-up over the first 5%% of steps, cosine decay to lr/20)")
    kl_weight: float = option(1e-5, "weight of the KL (nats summed over latent dims) against the per-pixel MSE")
    num_train: int = option(NUM_TRAIN, "training crops")
    num_heldout: int = option(NUM_HELDOUT, "held-out crops (from image tiles no training crop touches)")
    crop_size: int = option(CROP_SIZE, "crop side in pixels; latents are latent_channels x crop/2^downsamplings x crop/2^downsamplings")
    latent_channels: int = option(4, "channels of the latents")
    downsamplings: int = option(2, "the encoder's downsamplings by 2 (2 to 4)")
    photo_side: int = option(
        PHOTO_SIDE,
        "each photo is resized so its shorter side has this many pixels before cropping (at least 4 x crop size: two tiles of 2 x crop)",
    )
    seed: int = option(0, "seed of the crops, the initialisation, the batches and the posterior draws")
    threads: int | None = option(None, "torch CPU threads (leave out to keep torch's setting; 1 is fastest on busy shared cores)")
    quiet: bool = option(False, "print nothing")


def architecture_of(cfg: TrainPhotoVAEConfig) -> dict[str, Any]:
    return photo_vae_architecture(cfg.crop_size, cfg.latent_channels, cfg.downsamplings)


def build_photo_vae(cfg: TrainPhotoVAEConfig):
    """A freshly initialised (seeded) AutoencoderKL of `photo_vae_architecture`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    return AutoencoderKL(**architecture_of(cfg))


def _check(cfg: TrainPhotoVAEConfig) -> None:
    for name in ("epochs", "batch_size", "num_train", "num_heldout", "latent_channels"):
        if getattr(cfg, name) < 1:
            raise LatentPriorError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: give a positive integer.")
    if cfg.downsamplings not in (2, 3, 4):
        raise LatentPriorError(f"--downsamplings {cfg.downsamplings}: give 2, 3 or 4.")
    if cfg.crop_size % 2**cfg.downsamplings:
        raise LatentPriorError(
            f"--crop-size {cfg.crop_size}: give a multiple of {2**cfg.downsamplings} (the VAE downsamples {cfg.downsamplings} times)."
        )
    if cfg.photo_side < 4 * cfg.crop_size:
        raise LatentPriorError(
            f"--photo-side {cfg.photo_side}: give at least 4 x --crop-size = {4 * cfg.crop_size} (each photo "
            "is cut into tiles of 2 x crop size, and both splits need one)."
        )
    if cfg.lr <= 0 or cfg.kl_weight < 0:
        raise LatentPriorError(f"--lr {cfg.lr} / --kl-weight {cfg.kl_weight}: the learning rate must be > 0 and the KL weight >= 0.")


def train_photo_vae(cfg: TrainPhotoVAEConfig) -> dict[str, Any]:
    """Make the crops, train, calibrate `scaling_factor`, save to `cfg.output_dir`; returns the summary
    that is also written to `output_dir/training_summary.json` (written last: its presence marks a
    complete folder)."""
    _check(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, flush=True))
    output_dir = Path(cfg.output_dir)

    patches = make_patches(cfg.num_train, cfg.num_heldout, cfg.crop_size, seed=cfg.seed, photo_side=cfg.photo_side)
    x, held = patches.train, patches.heldout
    say(f"{len(x)} training / {len(held)} held-out crops {tuple(x.shape[1:])} from {len(patches.photos)} photos")

    vae = build_photo_vae(cfg)
    parameters = sum(p.numel() for p in vae.parameters())
    steps = cfg.epochs * math.ceil(cfg.num_train / cfg.batch_size)
    say(f"AutoencoderKL with {parameters:,} parameters, {cfg.epochs} epochs = {steps} steps of {cfg.batch_size}")
    loop_cfg = SimpleNamespace(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, kl_weight=cfg.kl_weight, seed=cfg.seed)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) if cfg.quiet else contextlib.nullcontext():
        log = _default_vae.train(vae, x, loop_cfg)
    seconds = time.perf_counter() - start

    train_figures = _default_vae.measure(vae, x, cfg.seed)
    heldout_figures = _default_vae.measure(vae, held, cfg.seed)
    mean_image_mse = torch.mean((held - x.mean(0)) ** 2).item()  # what a VAE must beat
    scale = 1.0 / train_figures["latent_std"]  # normalized = raw · scale has unit std over training draws
    vae.register_to_config(scaling_factor=scale)
    output_dir.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(output_dir, safe_serialization=True)

    import diffusers

    summary = {
        "train_config": to_dict(cfg),
        "patches": patches.config,
        "photos": list(patches.photos),
        "architecture": architecture_of(cfg),
        "parameters": parameters,
        "latent_shape": list(vae.encode(held[:1]).latent_dist.mean.shape[1:]),
        "epochs": cfg.epochs,
        "steps": steps,
        "seed": cfg.seed,
        "train_seconds": seconds,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "scaling_factor": scale,
        "heldout_recon_mse": heldout_figures["recon_mse_posterior_mean"],
        "heldout_mean_image_mse": mean_image_mse,
        "train": train_figures,
        "heldout": heldout_figures,
        "log": log,
    }
    (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(
        f"held-out recon MSE {summary['heldout_recon_mse']:.4f} (mean crop: {mean_image_mse:.4f}); "
        f"latents {tuple(summary['latent_shape'])}; {seconds:.0f} s of training; saved to {output_dir}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(
        TrainPhotoVAEConfig,
        argv,
        description=__doc__.split("\n\n")[0],
        epilog="Makes the crops, trains, calibrates scaling_factor and save_pretrained's the VAE with training_summary.json.",
    )
    try:
        train_photo_vae(cfg)
    except LatentPriorError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
