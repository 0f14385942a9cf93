"""Train the embedded default VAE that ships in `latent_prior/assets/default_vae/`.

What it does, in order (seeded, reproducible on CPU):

1. Writes scikit-learn's 1797 real 8×8 digits as greyscale PNGs into `latent_prior/assets/digits/`
   (`<label>/<index:04d>.png`, ink = bright, 0..16 scaled to 0..255), so the default VAE and user data
   go through the same image-folder path. Existing identical files are left alone.
2. Reads those PNGs back with `latent_prior.data.load_image`, the loader `latent-prior encode` uses
   for user folders (PIL: convert to RGB, so grey is replicated; bicubic resize of the 8×8 to 32×32;
   scale to [-1, 1]).
3. Trains a tiny diffusers `AutoencoderKL` (block_out_channels [32, 64, 64], one layer per block,
   4 latent channels: 32 px -> 4×8×8 latents, 0.95M parameters) with

       loss = MSE(x, x̂) (mean over pixels) + kl_weight · KL(q(z|x) ‖ N(0, I)) (nats summed over the 256 latent dims)

   averaged over the batch. The KL weight is chosen so reconstructions are good but the posterior
   keeps a real variance (an SD-like, weakly regularised latent space whose aggregate posterior is far
   from N(0, I): that is the room a learned prior has to win).
4. Sets `scaling_factor` = 1 / std of posterior samples over the training set, so normalized latents
   have unit std, as SD's 0.18215 does for SD. Like SD 1.x there is no `shift_factor`: the latent mean
   comes out near 0 (recorded in `training_summary.json`).
5. Saves with `save_pretrained` (safetensors + config.json) and writes `training_summary.json`
   (config, seed, steps, seconds, final figures) beside it.

Run from the repo root:

    .venv/bin/python scripts/train_default_vae.py --threads 1   # how the shipped VAE was made
    .venv/bin/python scripts/train_default_vae.py --help

About 0.6 s per step on 2 idle cores (~4 minutes); on busy shared cores use --threads 1, which was
faster there and gave the same losses as 2 threads.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

from latent_prior.config import option, parse_config, to_dict  # noqa: E402
from latent_prior.defaults import DEFAULT_DATA_DIR, DEFAULT_RESOLUTION, DEFAULT_VAE_DIR  # noqa: E402

# The architecture, fixed: the shipped VAE is this config plus the fitted scaling_factor.
VAE_ARCHITECTURE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[32, 64, 64],  # 3 blocks -> 2 downsamplings -> 32 px / 4 = 8
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=DEFAULT_RESOLUTION,
    force_upcast=False,  # fp32 weights, no fp16 overflow to guard against
)


@dataclass
class TrainDefaultVAEConfig:
    output_dir: str = option(str(DEFAULT_VAE_DIR), "where to save_pretrained the VAE")
    data_dir: str = option(str(DEFAULT_DATA_DIR), "where to write / read the digit PNGs")
    resolution: int = option(DEFAULT_RESOLUTION, "training image size in pixels")
    steps: int = option(400, "optimizer steps")
    batch_size: int = option(64, "images per step")
    lr: float = option(2e-3, "peak Adam learning rate (cosine decay to lr/20)")
    kl_weight: float = option(1e-5, "weight of the KL (nats summed over latent dims) against the per-pixel MSE")
    seed: int = option(0, "seed for init, batches and posterior draws")
    threads: int = option(2, "torch CPU threads")


# ---------------------------------------------------------------------------------------------------
# data


def export_digit_pngs(data_dir: Path) -> int:
    """Write sklearn's digits as 8×8 greyscale PNGs `<label>/<index:04d>.png`; returns how many."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (1797, 8, 8)
    for index, (image, label) in enumerate(zip(images, digits.target)):
        path = data_dir / str(int(label)) / f"{index:04d}.png"
        if path.is_file() and np.array_equal(np.asarray(Image.open(path)), image):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, optimize=True)  # uint8 (8, 8) -> mode "L"
    return len(images)


def load_png_folder(data_dir: Path, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PNG folder -> images (N, 3, R, R) float32 in [-1, 1] and labels (N,), sorted by file index,
    decoded by the same `load_image` that `latent-prior encode` applies to user folders."""
    from latent_prior.data import load_image

    paths = sorted(data_dir.glob("*/*.png"), key=lambda p: int(p.stem))
    images = torch.stack([load_image(path, resolution) for path in paths])
    labels = torch.tensor([int(path.parent.name) for path in paths])
    return images, labels


# ---------------------------------------------------------------------------------------------------
# model, training, measurement


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_ARCHITECTURE)


def train(vae, x: torch.Tensor, cfg: TrainDefaultVAEConfig) -> list[dict]:
    """Adam + cosine schedule on MSE + kl_weight·KL; returns a short log (every 50 steps)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    warmup = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    log, window = [], []
    vae.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        batch = x[idx]
        posterior = vae.encode(batch).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=gen)
        z = posterior.mean + posterior.std * eps
        recon = vae.decode(z).sample
        mse = torch.mean((recon - batch) ** 2)
        kl = posterior.kl().mean()  # nats per image, summed over latent dims
        loss = mse + cfg.kl_weight * kl
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        window.append((mse.item(), kl.item()))
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            m, k = np.mean(window, axis=0)
            log.append({"step": step + 1, "mse": float(m), "kl_nats": float(k)})
            print(f"step {step + 1:5d}  mse {m:.5f}  kl {k:7.2f} nats", flush=True)
            window = []
    vae.eval()
    return log


@torch.no_grad()
def measure(vae, x: torch.Tensor, seed: int, batch_size: int = 256) -> dict:
    """Figures over the whole set, in raw latent space: recon MSE (of the posterior mean and of a
    posterior draw), KL, latent mean/std of posterior draws, posterior std, and the decode of N(0, I)."""
    gen = torch.Generator().manual_seed(seed + 1)
    means, logvars, draws, mse_mode, mse_draw, kls = [], [], [], 0.0, 0.0, []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        post = vae.encode(batch).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        mse_mode += torch.sum((vae.decode(post.mean).sample - batch) ** 2).item()
        mse_draw += torch.sum((vae.decode(z).sample - batch) ** 2).item()
        means.append(post.mean)
        logvars.append(post.logvar)
        draws.append(z)
        kls.append(post.kl())
    mean, logvar, draws = torch.cat(means), torch.cat(logvars), torch.cat(draws)
    n_pixels = x.numel()
    # How far the aggregate posterior is from a Gaussian: the share of variance the posterior
    # means carry (1 = deterministic codes) and the spread of per-dimension stds.
    per_dim_std = draws.flatten(1).std(0)
    return {
        "recon_mse_posterior_mean": mse_mode / n_pixels,
        "recon_mse_posterior_sample": mse_draw / n_pixels,
        "kl_nats_per_image": torch.cat(kls).mean().item(),
        "latent_mean": draws.mean().item(),
        "latent_std": draws.std().item(),
        "latent_channel_mean": draws.mean(dim=(0, 2, 3)).tolist(),
        "latent_channel_std": draws.std(dim=(0, 2, 3)).tolist(),
        "latent_per_dim_std_min_max": [per_dim_std.min().item(), per_dim_std.max().item()],
        "posterior_std_mean": torch.exp(0.5 * logvar).mean().item(),
        "posterior_logvar_min_max": [logvar.min().item(), logvar.max().item()],
        "posterior_mean_variance_share": (mean.var(0).sum() / draws.var(0).sum()).item(),
    }


def main(argv: list[str] | None = None) -> int:
    what_it_does = "Writes the digit PNGs, trains, calibrates scaling_factor and save_pretrained's the VAE."
    cfg = parse_config(TrainDefaultVAEConfig, argv, description=__doc__.split("\n\n")[0], epilog=what_it_does)
    torch.set_num_threads(cfg.threads)
    data_dir, output_dir = Path(cfg.data_dir), Path(cfg.output_dir)

    n = export_digit_pngs(data_dir)
    x, _ = load_png_folder(data_dir, cfg.resolution)
    assert len(x) == n, f"read {len(x)} PNGs from {data_dir}, expected {n}"
    print(f"{n} digits -> {tuple(x.shape)} in [{x.min():.2f}, {x.max():.2f}]")

    vae = build_vae(cfg.seed)
    print(f"AutoencoderKL with {sum(p.numel() for p in vae.parameters()):,} parameters")
    start = time.perf_counter()
    log = train(vae, x, cfg)
    seconds = time.perf_counter() - start

    figures = measure(vae, x, cfg.seed)
    # Normalized = raw * scale has unit std over the training draws (SD's recipe for 0.18215).
    scale = 1.0 / figures["latent_std"]
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(output_dir, safe_serialization=True)
    for path in output_dir.iterdir():  # diffusers writes the weights 0600; package data must be readable by all
        path.chmod(0o644)

    summary = {
        "train_config": to_dict(cfg),
        "architecture": VAE_ARCHITECTURE,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "train_seconds": seconds,
        "torch_version": torch.__version__,
        "scaling_factor": scale,
        "final": figures,
        "log": log,
    }
    (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("log", "architecture", "train_config")}, indent=2))
    print(f"saved to {output_dir} in {seconds:.0f} s of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
