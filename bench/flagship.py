"""The flagship path, measured: `fit --vae stabilityai/sd-vae-ft-mse` at 256 px (4×32×32) and 512 px (4×64×64).

    python -m bench.flagship                                  # CPU: both sizes, the figures of docs/benchmarks-flagship.md
    python -m bench.flagship --device cuda --images 256 --fit-steps 200 --batch-size 256   # the same columns on a GPU
    python -m bench.flagship --resolutions 256 --out /tmp/flagship.md

The sd-vae-ft-mse architecture is built from its config with random weights (the Hub is offline here, and the
cost of a pass does not depend on the weights), saved with `save_pretrained` into a temporary folder and then
driven through the package's own entry points, one resolution per subprocess (so the peak memory of each is its
own): `latent_prior.encode.encode_images` on real photo crops, `latent_prior.train.fit` with FitConfig
defaults except the length and the evaluation sizes below (on the encoded moments tiled to --fit-latents: a fit's
cost does not depend on the values), `LatentPrior.sample` for the sampler, SIR and
Langevin(60), the adapter's decode for a grid, and `latent-prior sample` from the CLI in a fresh process.

Columns: s per encoded image (at --encode-batch-size), s per fit step in the warm-up and in the alternating
phase (from metrics.csv, at --batch-size), peak resident memory (CUDA: peak allocated too), samples/s of the
three samplers (SIR: M = 100 proposals), the seconds to decode a grid, and the wall time of the CLI command.
The fit runs `--fit-steps` steps, half of them warm-up, evaluates with 512 importance samples and 512 FD draws,
and exports with 4,096 log Z samples (the defaults, 4,096 / 2,048 / 32,768, cost minutes at these sizes: their
cost is reported by the "export s" column as a separate figure).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

SD_VAE_CONFIG = dict(
    block_out_channels=[128, 256, 512, 512],
    norm_num_groups=32,
    latent_channels=4,
    layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    scaling_factor=0.18215,
)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _step_seconds(metrics_csv: Path, warmup: int) -> tuple[float | None, float | None]:
    """Mean seconds per step of the warm-up and of the alternating phase, from metrics.csv's cumulative clock.

    A row's clock is read before that step's evaluation, so the held-out evaluation that ends the warm-up falls in
    the first alternating window: the alternating rate starts at the first row after it."""
    with metrics_csv.open(newline="") as f:
        rows = [(int(r["step"]), float(r["seconds"])) for r in csv.DictReader(f) if r.get("seconds")]

    def rate(lo: int, hi: int) -> float | None:
        inside = [(s, t) for s, t in rows if lo <= s <= hi]
        if len(inside) < 2 or inside[-1][0] == inside[0][0]:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    last = rows[-1][0] if rows else 0
    return rate(0, warmup), rate(warmup + 1, last)


def _rate(fn: Any, n: int, device: torch.device) -> float:
    fn(min(n, 4))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def measure(resolution: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One resolution, in this process: encode, fit, sample, decode; returns the row."""
    from diffusers import AutoencoderKL

    from bench.encode import write_images
    from latent_prior.adapters import load_vae
    from latent_prior.encode import EncodeConfig, encode_images
    from latent_prior.prior import TRAIN_DIR
    from latent_prior.threads import cpu_threads
    from latent_prior.train import fit

    device = torch.device(args.device)
    torch.manual_seed(0)
    vae_dir = work / "vae"
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(vae_dir)
    images = work / "images"
    write_images(images, args.images)
    adapter = load_vae(str(vae_dir), device=str(device))
    row: dict[str, Any] = {
        "resolution": resolution,
        "latent_shape": list(adapter.latent_shape(resolution)),
        "images": args.images,
        "device": str(device),
    }

    cache = work / "cache"
    start = time.perf_counter()
    encode_images(
        adapter,
        EncodeConfig(
            vae=str(vae_dir),
            data=str(images),
            out=str(cache),
            resolution=resolution,
            batch_size=args.encode_batch_size,
            num_workers=0,
            quiet=True,
        ),
    )
    row["encode_s_per_image"] = (time.perf_counter() - start) / args.images
    row["encode_batch_size"] = args.encode_batch_size

    # The fit's cost does not depend on the values, so the encoded moments are tiled to --fit-latents: a batch of
    # 64 and a held-out split need more latents than a CPU encodes at 512 px in a benchmark's time.
    from safetensors.torch import save_file

    from latent_prior.cache import open_latents

    source = open_latents(cache)
    mean, logvar = source.read(list(range(len(source))))
    reps = -(-args.fit_latents // len(mean))
    latents = work / "tiled.safetensors"
    save_file(
        {
            "mean": mean.repeat(reps, 1, 1, 1)[: args.fit_latents].contiguous(),
            "logvar": logvar.repeat(reps, 1, 1, 1)[: args.fit_latents].contiguous(),
        },
        str(latents),
        metadata={"normalization": json.dumps(source.normalization.to_dict())},
    )
    out = work / "fit"
    warmup = args.fit_steps // 2
    start = time.perf_counter()
    prior = fit(
        str(latents),
        out=str(out),
        steps=args.fit_steps,
        warmup_steps=warmup,
        batch_size=args.batch_size,
        checkpoint_every=args.fit_steps,
        eval_samples=512,
        fd_samples=512,
        log_z_samples=4096,
        log_every=max(1, min(25, (args.fit_steps - warmup) // 4)),
        quiet=True,
        mixed_precision="bf16" if device.type == "cuda" and args.bf16 else "no",
    )
    row["fit_s"] = time.perf_counter() - start
    row["warmup_s_per_step"], row["alternating_s_per_step"] = _step_seconds(out / TRAIN_DIR / "metrics.csv", warmup)
    summary = prior.training_info.get("summary", {})
    row["train_loop_s"] = summary.get("seconds")
    row["export_s"] = row["fit_s"] - (summary.get("seconds") or 0.0)
    row["log_z_ess_fraction"] = summary.get("log_z_ess_fraction")
    row["batch_size"] = args.batch_size

    prior = prior.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    with cpu_threads(None) if device.type == "cpu" else contextlib.nullcontext():
        row["sampler_per_s"] = _rate(lambda n: prior.sample(n, generator=generator), args.sample_n, device)
        row["sir_per_s"] = _rate(
            lambda n: prior.sample(n, method="sir", proposals=100, generator=generator), max(2, args.sample_n // 50), device
        )
        row["langevin_per_s"] = _rate(
            lambda n: prior.sample(n, method="langevin", steps=60, generator=generator), max(2, args.sample_n // 20), device
        )
    z = prior.sample(args.grid, generator=generator)
    start = time.perf_counter()
    with torch.no_grad():
        adapter.decode(z.to(adapter.device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    row["decode_grid_s"] = time.perf_counter() - start
    row["grid"] = args.grid

    # `latent-prior sample` from the CLI, in a fresh process: what a user's command costs, start-up included
    cmd = [
        sys.executable,
        "-m",
        "latent_prior.cli",
        "sample",
        "--prior",
        str(out),
        "-n",
        str(args.sample_n),
        "--out",
        str(work / "samples.safetensors"),
        "--device",
        str(device),
        "--quiet",
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    row["cli_sample_s"] = time.perf_counter() - start if done.returncode == 0 else None
    row["cli_sample_error"] = None if done.returncode == 0 else done.stderr.strip()[-300:]
    row["peak_rss_bytes"] = _peak_rss_bytes()
    if device.type == "cuda":
        row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return row


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def render(result: dict[str, Any]) -> str:
    from latent_prior.encode import human_bytes

    lines = [
        "# The flagship path: sd-vae-ft-mse's architecture at 256 and 512 px",
        "",
        "Generated by one command; every figure comes from the run it describes.",
        "",
        f"    {result['command']}",
        "",
        f"- date: {result['date']}; machine: {result['machine']}",
        f"- settings: {result['settings']}",
        *(f"- note: {note}" for note in result.get("notes", [])),
        "",
        "| resolution | latents | device | encode s/image | fit s/step warm-up | fit s/step alternating | fit s (export s) "
        "| peak RSS | sampler /s | SIR /s | Langevin(60) /s | decode grid s | CLI sample s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            what = r["error"] if r["error"].startswith("not measured") else f"failed: {r['error'][:300]}"
            lines.append(f"| {r['resolution']} px | {what} |" + " |" * 11)
            continue
        shape = "×".join(map(str, r["latent_shape"]))
        memory = human_bytes(r["peak_rss_bytes"]) + (f" (CUDA {human_bytes(r['peak_cuda_bytes'])})" if r.get("peak_cuda_bytes") else "")
        lines.append(
            f"| {r['resolution']} px | {shape} | {r['device']} | {r['encode_s_per_image']:.2f} (batch {r['encode_batch_size']}) | "
            f"{_fmt(r['warmup_s_per_step'], '.3f')} | {_fmt(r['alternating_s_per_step'], '.3f')} (batch {r['batch_size']}) | "
            f"{r['fit_s']:.0f} ({r['export_s']:.0f}) | {memory} | {r['sampler_per_s']:,.0f} | {r['sir_per_s']:,.1f} | "
            f"{r['langevin_per_s']:,.1f} | {r['decode_grid_s']:.1f} ({r['grid']}) | "
            f"{_fmt(r['cli_sample_s'], '.1f') if r.get('cli_sample_s') is not None else 'failed: ' + str(r.get('cli_sample_error'))} |"
        )
    lines += [
        "",
        "The per-step figures are training steps alone: the alternating-phase rate spans the logged steps after "
        "the first one past the warm-up, so neither the held-out evaluation that ends the warm-up nor the final "
        "one is in it ('export s', the fit's wall time outside the training loop, holds the set-up, the evaluations of "
        "step 0 and of the last step, and the exported log Z).",
        "",
        "Targets of issue 12 at 4×32×32: ≤ 0.5 s per step at batch 64 on 2 CPU cores; ≤ 20 ms per step at batch 256 "
        "on one GPU (bf16 where safe). GPU rows appear only where a GPU was lent; where none is, they are not measured. "
        "`bench/gpu_checks.sh` is the prepared GPU run (fp32 and bf16 rows, `latent-prior sample --device cuda`, "
        "and `accelerate launch --multi_gpu` where there are several GPUs).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flagship",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--resolutions", default="256,512", help="comma-separated image sizes (256: 4×32×32 latents, 512: 4×64×64)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--images", type=int, default=24, help="photo crops encoded and fitted on (the cost per image and per step is what is measured)"
    )
    parser.add_argument("--encode-batch-size", type=int, default=4, help="images per encoder call")
    parser.add_argument(
        "--fit-latents",
        type=int,
        default=512,
        help="latents the fit sees: the encoded ones, tiled (the cost does not depend on their values)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="latents per fit step (the CPU target is stated at 64)")
    parser.add_argument("--fit-steps", type=int, default=10, help="fit steps, half of them warm-up")
    parser.add_argument("--sample-n", type=int, default=200, help="latents drawn for the sampler rate (SIR: /50, Langevin: /20)")
    parser.add_argument("--grid", type=int, default=4, help="latents decoded for the grid time")
    parser.add_argument("--bf16", action="store_true", help="CUDA: fit in bf16 mixed precision")
    parser.add_argument("--out", default="docs/benchmarks-flagship.md", help="markdown report (the JSON goes beside it)")
    parser.add_argument("--rerender", default=None, help="measure nothing: rebuild --out from the JSON of an earlier run")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: measure one resolution here
    parser.add_argument("--row-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.rerender:
        Path(args.out).write_text(render(json.loads(Path(args.rerender).read_text())))
        print(f"wrote {args.out} from {args.rerender}", file=sys.stderr)
        return 0
    if args.one is not None:
        with tempfile.TemporaryDirectory(prefix=f"flagship-{args.one}-") as tmp:
            try:
                row = measure(args.one, args, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - a failed size is a row of the table, not a crash of the others
                row = {"resolution": args.one, "error": f"{type(exc).__name__}: {exc}"}
        Path(args.row_json).write_text(json.dumps(row, indent=2))
        return 0
    rows = []
    for resolution in (int(r) for r in args.resolutions.split(",") if r.strip()):
        with tempfile.TemporaryDirectory(prefix="flagship-row-") as tmp:
            row_json = Path(tmp) / "row.json"
            cmd = [
                sys.executable,
                "-m",
                "bench.flagship",
                *(argv if argv is not None else sys.argv[1:]),
                "--one",
                str(resolution),
                "--row-json",
                str(row_json),
            ]
            print(f"[flagship] {resolution} px ...", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=False, cwd=Path(__file__).resolve().parents[1])
            rows.append(json.loads(row_json.read_text()) if row_json.exists() else {"resolution": resolution, "error": "the worker died"})
            print(f"[flagship] {resolution} px: {json.dumps(rows[-1])[:400]}", file=sys.stderr, flush=True)
    result = {
        "command": " ".join(["python -m bench.flagship", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name(0)}" if args.device.startswith("cuda") and torch.cuda.is_available() else ""),
        "settings": {k: v for k, v in vars(args).items() if k not in ("one", "row_json", "out", "rerender")},
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.write_text(render(result))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
