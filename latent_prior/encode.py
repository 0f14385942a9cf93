"""Images -> latent cache: encode an image folder with a VAE, resumable and distributed.

    latent-prior encode --vae stabilityai/sd-vae-ft-mse --data photos/ --out cache/ --resolution 256
    accelerate launch --num_processes 4 -m latent_prior encode ...       # same, on 4 GPUs

The sorted file list is cut into fixed chunks of `shard_size` images; rank r of a world of W encodes
chunks k with k % W == r and writes each as one shard as soon as it is full, so memory does not grow
with the dataset and a killed run loses at most the shards in flight. Rerunning the same command
resumes: finished shards are kept, missing ones encoded. A rerun with another VAE, resolution, dtype,
flip setting, shard size or image list is refused rather than mixed (see `latent_prior.cache`).
After every rank is done, the main process writes manifest.json, which marks the cache complete.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latent_prior.cache import CacheWriter, shard_name
from latent_prior.config import option
from latent_prior.data import ImageFolder, image_loader, list_images
from latent_prior.errors import LatentPriorError
from latent_prior.log import log_result, logger
from latent_prior.vae import Posterior, VAEAdapter, parse_dtype

#: User VAEs default to this resolution (the SD VAEs' native 256 px) when --resolution is not given.
DEFAULT_USER_RESOLUTION = 256


@dataclass
class EncodeConfig:
    """`latent-prior encode`: the fields are the CLI flags (`shard_size` <-> `--shard-size`)."""

    vae: str | None = option(
        None,
        "VAE to encode with: a hub id, a local save_pretrained or "
        "pipeline folder, or a .safetensors file; leave out for the embedded default digits VAE",
    )
    data: str | None = option(None, "folder of images (.jpg/.jpeg/.png/.webp, searched recursively); leave out for the bundled digits")
    out: str | None = option(None, "cache folder to write (rerun the same command to resume it)", required=True)
    resolution: int | None = option(
        None, "square image size in pixels (shorter side resized, then center-cropped); leave out for 256, or the embedded VAE's own 32"
    )
    batch_size: int = option(8, "images per encoder call")
    dtype: str = option("fp32", "precision of the encoder", choices=("fp32", "fp16", "bf16"))
    subfolder: str | None = option(None, "subfolder of --vae holding the VAE (e.g. 'vae' in a pipeline repo)")
    revision: str | None = option(None, "hub revision (branch, tag or commit) of --vae")
    flip: bool = option(False, "also store the moments of horizontally flipped images (mean_flip / logvar_flip)")
    num_workers: int = option(2, "background processes decoding images (0 = decode in the main process)")
    shard_size: int = option(1024, "images per safetensors shard: the unit of streaming writes and of resume")
    quiet: bool = option(False, "no progress bar and no per-file notes (the summary line is still printed)")


def _uses_embedded_default(config: EncodeConfig) -> bool:
    return config.vae is None or str(config.vae) == "default"


def resolve_data_dir(config: EncodeConfig) -> Path:
    """--data, or the bundled digits folder when it is left out."""
    if config.data is not None:
        return Path(config.data)
    from latent_prior import defaults  # lazily: the assets are only needed when asked for

    return Path(defaults.DEFAULT_DATA_DIR)


def resolve_resolution(config: EncodeConfig) -> int:
    """--resolution; else the embedded default VAE's own resolution, else 256."""
    if config.resolution is not None:
        if int(config.resolution) < 1:
            raise LatentPriorError(f"--resolution {config.resolution}: must be a positive number of pixels.")
        return int(config.resolution)
    if _uses_embedded_default(config):
        from latent_prior import defaults

        return int(defaults.DEFAULT_RESOLUTION)
    return DEFAULT_USER_RESOLUTION


def _check_config(config: EncodeConfig) -> None:
    if not config.out:
        raise LatentPriorError("--out is required: name the cache folder to write (rerun with the same --out to resume).")
    if int(config.batch_size) < 1:
        raise LatentPriorError(f"--batch-size {config.batch_size}: must be at least 1.")
    if int(config.num_workers) < 0:
        raise LatentPriorError(f"--num-workers {config.num_workers}: must be 0 or more.")
    if int(config.shard_size) < 1:
        raise LatentPriorError(f"--shard-size {config.shard_size}: must be at least 1.")


def _nonfinite_rows(posterior: Posterior) -> torch.Tensor:
    """Indices of the batch rows whose mean or logvar holds a NaN or inf."""
    bad = ~torch.isfinite(posterior.mean.flatten(1)).all(dim=1)
    if posterior.logvar is not None:
        bad |= ~torch.isfinite(posterior.logvar.flatten(1)).all(dim=1)
    return torch.nonzero(bad).flatten()


def _raise_nonfinite(rows: torch.Tensor, paths: list[str], data_dir: Path, dtype: torch.dtype, what: str, out: Path) -> None:
    names = [paths[int(i)] for i in rows]
    shown = ", ".join(str(data_dir / n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    if dtype == torch.float16:
        remedy = (
            f"fp16 overflowed, so rerun with --dtype fp32 or --dtype bf16 (or a VAE whose config sets force_upcast) "
            f"into a new --out or after deleting {out}, since a cache keeps the dtype it was started with"
        )
    else:
        remedy = (
            f"this happened in {str(dtype).removeprefix('torch.')}, so check the VAE's weights for NaN/inf "
            "(or try --dtype fp32 with a new --out)"
        )
    raise LatentPriorError(
        f"the VAE gave NaN/inf latents for {len(names)} image(s){what} ({shown}) and this shard was not written; {remedy}."
    )


#: Width assumed for an encoder whose first convolution cannot be found: the SD VAEs' 128 channels.
_DEFAULT_ENCODER_WIDTH = 128


def _encoder_width(adapter: VAEAdapter) -> int:
    """Channels of the encoder's first convolution: the widest feature maps it keeps at full resolution."""
    module = getattr(adapter, "module", None)
    if isinstance(module, torch.nn.Module):
        for layer in module.modules():
            if isinstance(layer, torch.nn.Conv2d):
                return int(layer.out_channels)
    return _DEFAULT_ENCODER_WIDTH


def encode_memory_bytes(adapter: VAEAdapter, resolution: int, batch_size: int) -> int:
    """A lower estimate of the memory one encoder call takes: per image, the decoded file (uint8 and float32)
    and, in the encoder's precision, its input and two feature maps of the first layer's width at full
    resolution (a real encoder holds more, so a refusal on this estimate is never a false alarm)."""
    pixels = int(resolution) ** 2
    element = torch.finfo(adapter.dtype).bits // 8 if adapter.dtype.is_floating_point else 4
    per_image = pixels * (3 + 3 * 4) + pixels * element * (adapter.image_channels + 2 * _encoder_width(adapter))
    return int(batch_size) * per_image


def machine_memory_bytes(device: torch.device) -> int | None:
    """The memory of `device`: a GPU's own, else this machine's RAM (or the container's limit when lower);
    None when it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            sizes.append(int(text))
    return min(sizes) if sizes else None


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def _check_memory(adapter: VAEAdapter, resolution: int, batch_size: int, device: torch.device) -> None:
    """Refuse, before anything is written, settings whose encoder calls cannot fit in memory: an
    unbounded --resolution otherwise grows until the kernel kills the process minutes later."""
    needed, available = encode_memory_bytes(adapter, resolution, batch_size), machine_memory_bytes(device)
    if available is not None and needed > available:
        where = f"on {device}" if device.type == "cuda" else "on this machine"
        raise LatentPriorError(
            f"--resolution {resolution} with --batch-size {batch_size}: one encoder call needs at least "
            f"{human_bytes(needed)} (estimated), more than the {human_bytes(available)} of memory {where}; lower "
            "--resolution or --batch-size."
        )


def _cache_size_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def encode_images(adapter: VAEAdapter, config: EncodeConfig) -> dict[str, Any]:
    """Encode `config.data` with `adapter` into the cache folder `config.out`.

    Runs under `accelerate.Accelerator()`: one process, or one per GPU/CPU rank under
    `accelerate launch`, each encoding its own chunks. Returns a summary dict on every rank; on the main
    process it describes the whole cache: {"out", "count" (images in the cache), "encoded" (images
    encoded by this run, all ranks), "reused_shards", "shards", "skipped" ([{"path", "reason"}]),
    "seconds", "size_mb", "world_size", "images_per_second"}. Other ranks report only "encoded" for
    themselves.

    Raises LatentPriorError for a missing/empty data folder, a cache started with other settings,
    or NaN/inf latents (naming the images).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from latent_prior import __version__

    start_time = time.perf_counter()
    _check_config(config)
    data_dir = resolve_data_dir(config)
    resolution = resolve_resolution(config)
    dtype = parse_dtype(config.dtype)
    out = Path(config.out)

    accelerator = Accelerator()
    rank, world_size = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    _check_memory(adapter, resolution, config.batch_size, accelerator.device)

    files = list_images(data_dir)
    latent_shape = tuple(adapter.latent_shape(resolution))
    provenance = adapter.provenance
    writer = CacheWriter(
        out,
        files=files,
        shard_size=config.shard_size,
        identity={
            # Not the source path: the same weights under another path or hub id are the same VAE.
            "vae": {"class_name": provenance.class_name, "config_hash": provenance.config_hash, "fingerprint": provenance.fingerprint},
            "resolution": resolution,
            "dtype": str(dtype).removeprefix("torch."),
            "image_channels": int(adapter.image_channels),
        },
        latent_shape=latent_shape,
        deterministic=adapter.deterministic,
        flip=config.flip,
    )
    writer.check_compatible()
    # Every rank checks the folder as it was: without this barrier a slow rank could find the plan.json that
    # the main process has just written into a new --out, and refuse it as a foreign file.
    accelerator.wait_for_everyone()
    pending_all: list[int] = []
    if is_main:
        pending_all = writer.prepare()
    accelerator.wait_for_everyone()  # nobody writes a shard before plan.json exists and tmp files are gone

    pending = writer.pending_chunks(rank, world_size)
    if accelerator.device != adapter.device:
        adapter.to(accelerator.device)
    dataset = ImageFolder(data_dir, resolution, files=files, channels=adapter.image_channels)
    batches, batch_chunk = [], []
    for k in pending:
        start, end = writer.chunk_range(k)
        for b in range(start, end, config.batch_size):
            batches.append(range(b, min(b + config.batch_size, end)))
            batch_chunk.append(k)
    # Nothing left to encode (a finished cache run again): do not start worker processes for nothing.
    loader = image_loader(dataset, batches, num_workers=config.num_workers, pin_memory=accelerator.device.type == "cuda") if batches else []
    show = is_main and not config.quiet
    desc = "encode" if world_size == 1 else f"encode (rank 0 of {world_size})"
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc=desc, disable=not show, dynamic_ncols=True)

    encoded_here = 0
    rows: dict[str, list[torch.Tensor]] = {}
    chunk_paths: list[str] = []
    chunk_skipped: list[dict[str, str]] = []
    for i, batch in enumerate(loader):
        k = batch_chunk[i]
        for _, path, reason in batch.skipped:
            chunk_skipped.append({"path": path, "reason": reason})
            if not config.quiet:
                logger.warning(f"latent-prior encode: skipped {data_dir / path}: {reason}")
        if batch.indices:
            views = {"": batch.images}
            if config.flip:
                views["_flip"] = torch.flip(batch.images, dims=[-1])
            for suffix, images in views.items():
                posterior = adapter.encode(images)
                bad = _nonfinite_rows(posterior)
                if len(bad):
                    _raise_nonfinite(bad, batch.paths, data_dir, adapter.dtype, " (flipped)" if suffix else "", out)
                rows.setdefault("mean" + suffix, []).append(posterior.mean)
                if posterior.logvar is not None:
                    rows.setdefault("logvar" + suffix, []).append(posterior.logvar)
            chunk_paths.extend(batch.paths)
        bar.update(len(batch.indices) + len(batch.skipped))
        if i + 1 == len(batches) or batch_chunk[i + 1] != k:  # last batch of chunk k: write its shard
            empty = torch.empty(0, *latent_shape)
            tensors = {key: torch.cat(rows[key]) if key in rows else empty for key in ("mean", "logvar", "mean_flip", "logvar_flip")}
            writer.write_shard(
                k,
                files=chunk_paths,
                skipped=chunk_skipped,
                rank=rank,
                world_size=world_size,
                mean=tensors["mean"],
                logvar=None if adapter.deterministic else tensors["logvar"],
                mean_flip=tensors["mean_flip"] if config.flip else None,
                logvar_flip=tensors["logvar_flip"] if config.flip and not adapter.deterministic else None,
            )
            encoded_here += len(chunk_paths)
            rows, chunk_paths, chunk_skipped = {}, [], []
    bar.close()
    accelerator.wait_for_everyone()  # every shard is on disk before the manifest is written

    summary: dict[str, Any] = {"rank": rank, "world_size": world_size, "encoded_by_this_rank": encoded_here}
    if is_main:
        manifest = writer.finalize(
            {
                "latent_prior_version": __version__,
                "vae": provenance.to_dict(),
                "normalization": adapter.normalization.to_dict(),
                "resolution": resolution,
                "dtype": str(dtype).removeprefix("torch."),
                "compute_dtype": str(adapter.dtype).removeprefix("torch."),
                "image_channels": int(adapter.image_channels),
                "data": str(data_dir.resolve()),
                "world_size": world_size,
            }
        )
        by_chunk = {s["file"]: s["count"] for s in manifest["shards"]}
        encoded = sum(by_chunk[shard_name(k)] for k in pending_all)
        seconds = time.perf_counter() - start_time
        size_mb = _cache_size_bytes(out) / 1e6
        summary.update(
            {
                "out": str(out),
                "count": manifest["count"],
                "encoded": encoded,
                "shards": writer.num_chunks,
                "reused_shards": writer.num_chunks - len(pending_all),
                "skipped": manifest["skipped"],
                "seconds": seconds,
                "size_mb": size_mb,
                "images_per_second": encoded / seconds if seconds > 0 else float("nan"),
            }
        )
        reused = f", {summary['reused_shards']} of {writer.num_chunks} shards reused" if summary["reused_shards"] else ""
        log_result(
            f"latent-prior encode: {encoded} images encoded ({manifest['count']} in cache{reused}), "
            f"{len(manifest['skipped'])} files skipped, {seconds:.1f} s, {size_mb:.1f} MB on disk -> {out}"
        )
    accelerator.wait_for_everyone()
    return summary
