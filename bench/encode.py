"""Benchmark: `latent-prior encode` against a bare diffusers loop on the same images and model.

    python bench/encode.py                       # [32, 64, 64, 64] VAE (8x down), 128 px, 128 images
    python bench/encode.py --arch sd --images 64 # the sd-vae-ft-mse architecture (random weights)

Both runs use the same AutoencoderKL (built from a config with random weights: the cost of a
forward pass does not depend on the weights), the same images, batch size, resolution, dtype and
device. The bare loop is what a user would write by hand: PIL load -> resize/crop -> tensor ->
`vae.encode(x).latent_dist` -> keep mean and logvar in memory. `latent-prior encode` additionally
decodes in DataLoader workers, checks for NaN/inf, and writes atomic safetensors shards plus a
manifest. The table reports images/s for both and the overhead of ours in percent (negative = faster).
Model loading is excluded from both timings; each run is preceded by one warm-up batch.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ARCHS = {
    # 8x downsampling, 1.25M parameters: the encoder still dominates the cost.
    "small": dict(block_out_channels=[32, 64, 64, 64], norm_num_groups=32, latent_channels=4, layers_per_block=2),
    # stabilityai/sd-vae-ft-mse's architecture.
    "sd": dict(block_out_channels=[128, 256, 512, 512], norm_num_groups=32, latent_channels=4, layers_per_block=2),
}


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """Real photo crops (scikit-image samples), 160-320 px on a side, as JPEG and PNG."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = int(rng.integers(160, 300)), int(rng.integers(160, 300))
        h, w = min(h, photo.shape[0]), min(w, photo.shape[1])
        top, left = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
        image = Image.fromarray(photo[top : top + h, left : left + w])
        sub = folder / f"part{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        image.save(sub / (f"{i:04d}.jpg" if i % 2 else f"{i:04d}.png"), quality=92)


def bare_loop(vae, files: list[Path], resolution: int, batch_size: int, device, dtype) -> int:
    """The hand-written baseline: load, resize/crop, encode, keep moments. Returns images encoded."""
    from PIL import Image

    means, logvars = [], []
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start : start + batch_size]:
            with Image.open(path) as image:
                image = image.convert("RGB")
            w, h = image.size
            s = resolution / min(w, h)
            image = image.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
            left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
            batch.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        x = torch.stack(batch).to(device=device, dtype=dtype) / 127.5 - 1
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        means.append(dist.mean.float().cpu())
        logvars.append(dist.logvar.float().cpu())
    return sum(len(m) for m in means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="small")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL

    from latent_prior.adapters import load_vae
    from latent_prior.encode import EncodeConfig, encode_images
    from latent_prior.vae import parse_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(args.dtype)
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if device.type == "cuda" else ""
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"
    )

    work = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    try:
        torch.manual_seed(0)
        config = dict(
            ARCHS[args.arch],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            sample_size=args.resolution,
            force_upcast=False,
        )
        AutoencoderKL(**config).save_pretrained(work / "vae")
        write_images(work / "images", args.images)
        files = sorted(p for p in (work / "images").rglob("*") if p.is_file())
        params = sum(p.numel() for p in AutoencoderKL.from_pretrained(work / "vae").parameters())
        print(
            f"model: AutoencoderKL {ARCHS[args.arch]['block_out_channels']} ({params / 1e6:.2f}M parameters), "
            f"{args.images} images at {args.resolution} px, batch {args.batch_size}, {args.dtype}, {device.type}, "
            f"num_workers {args.num_workers}"
        )

        vae = AutoencoderKL.from_pretrained(work / "vae").to(device=device, dtype=dtype).eval()
        adapter = load_vae(work / "vae", dtype=args.dtype, device=str(device))
        t0 = time.perf_counter()
        adapter.provenance  # the weight fingerprint: computed once per run of `latent-prior encode`
        fingerprint_s = time.perf_counter() - t0
        bare_loop(vae, files[: args.batch_size], args.resolution, args.batch_size, device, dtype)  # warm-up
        adapter.encode(torch.zeros(args.batch_size, 3, args.resolution, args.resolution))  # warm-up

        def cpu_seconds() -> float:
            # This process plus reaped children (DataLoader workers are joined at the end of each run).
            own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

        def timed(run) -> tuple[float, float]:
            wall, cpu = time.perf_counter(), cpu_seconds()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - wall, cpu_seconds() - cpu

        def run_bare() -> None:
            assert bare_loop(vae, files, args.resolution, args.batch_size, device, dtype) == len(files)

        def run_ours() -> None:
            out = work / "cache"
            shutil.rmtree(out, ignore_errors=True)
            cfg = EncodeConfig(
                vae=str(work / "vae"),
                data=str(work / "images"),
                out=str(out),
                resolution=args.resolution,
                batch_size=args.batch_size,
                dtype=args.dtype,
                num_workers=args.num_workers,
                quiet=True,
            )
            assert encode_images(adapter, cfg)["count"] == len(files)

        runs = {"bare diffusers loop": [], "latent-prior encode": []}
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            runs["bare diffusers loop"].append(timed(run_bare))
            runs["latent-prior encode"].append(timed(run_ours))
        best = {name: min(r) for name, r in runs.items()}  # (wall, cpu) of the fastest run
        print()
        print(f"| pipeline | images/s (best of {args.repeats}) | wall s | CPU s (incl. workers) |")
        print("|---|---|---|---|")
        for name, (wall, cpu) in best.items():
            print(f"| {name} | {len(files) / wall:.2f} | {wall:.2f} | {cpu:.2f} |")
        bare, ours = best["bare diffusers loop"][0], best["latent-prior encode"][0]
        print(
            f"\nwall-time overhead of latent-prior encode: {(ours / bare - 1) * 100:+.1f}% "
            f"(negative = faster); one-time VAE fingerprint: {fingerprint_s:.2f} s (not in the table)"
        )
        print("all runs (wall s): " + "; ".join(f"{name}: {', '.join('%.2f' % w for w, _ in r)}" for name, r in runs.items()))
        print(f"load average during the run: {os.getloadavg()[0]:.1f} (1 min)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
