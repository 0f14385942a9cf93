"""`fit`: an EVaLP prior from cached latents, exported as a `LatentPrior`, and `latent-prior fit --latents`'s run.

    prior = fit("runs/latents", steps=2000, out="runs/fit")    # keywords are FitConfig fields
    z = prior.sample(64)

`fit` opens the latents, checks `out` against the run it may already hold (a resume with `resume=True`, which
reads the checkpoint it starts from before writing anything), creates the run's one Accelerator and hands over
to `latent_prior.trainer.Trainer`, which trains, selects a checkpoint on held-out latents and exports it. What
lands in `out`: `out/prior/`, a folder that holds only the prior (`LatentPrior.from_pretrained(out / "prior")`), to
copy or upload as it is, and the training records in `out/train/` (checkpoints/, metrics.csv, fit_config.json,
fit_summary.json, training.png).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from latent_prior.checkpoints import check_checkpoint, checkpoint_dirs
from latent_prior.config import to_dict
from latent_prior.errors import LatentPriorError
from latent_prior.files import atomic_write_json
from latent_prior.fit_config import (
    COSMETIC_FIELDS,
    FitConfig,
    check_config,
    resolve_objective,
    tracker_names,
)
from latent_prior.log import log_result, logger
from latent_prior.prior import PRIOR_DIR, TRAIN_DIR
from latent_prior.threads import cpu_threads
from latent_prior.trainer import Trainer

if TYPE_CHECKING:
    from latent_prior.cache import LatentSource
    from latent_prior.prior import LatentPrior

__all__ = ["FitConfig", "fit", "run_fit", "plot_training_curves"]


def _open_source(latents: Any) -> Any:
    if isinstance(latents, torch.Tensor):
        from latent_prior.cache import EncodedLatents

        if latents.dim() < 2 or latents.shape[0] < 1:
            raise LatentPriorError(f"latents tensor has shape {tuple(latents.shape)}; pass posterior means as (N, *latent_shape).")
        return EncodedLatents(latents, description=f"<tensor {tuple(latents.shape)}>")
    if isinstance(latents, (str, os.PathLike)):
        from latent_prior.cache import open_latents

        return open_latents(latents)
    if hasattr(latents, "iter_moments") and hasattr(latents, "latent_shape"):
        return latents
    raise LatentPriorError(
        f"latents of type {type(latents).__name__}: pass a cache folder, a .safetensors file, a LatentSource or a tensor (N, *shape)."
    )


def _identity(config_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config_dict.items() if k not in COSMETIC_FIELDS}


#: What a fit writes into --out besides train/fit_config.json: a folder holding either without that file is not
#: a fit's, and nothing in it may be replaced.
_FIT_FILES = (PRIOR_DIR, TRAIN_DIR)


def _prepare_out(out: Path, config: FitConfig, is_main: bool) -> Path | None:
    """Check `out` against the run it may already hold; return the checkpoint to resume from, if any."""
    saved = out / TRAIN_DIR / "fit_config.json"
    ckpts = checkpoint_dirs(out / TRAIN_DIR / "checkpoints")
    for old in (out, out / PRIOR_DIR):  # --out of `fit --latents`, the prior/ of `fit` on images
        if (old / "fit_config.json").is_file():
            raise LatentPriorError(
                f"--out {out} holds a fit written by latent-prior 0.1.0 (the prior, checkpoints/ and fit_config.json side by "
                f"side in {old}, which still loads as a prior); a fit now writes {out / PRIOR_DIR} and "
                f"{out / TRAIN_DIR}, so use a new --out."
            )
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict):
            raise LatentPriorError(f"{saved} is not a JSON object of fit settings; use a new --out.")
        new = to_dict(config)
        same = _identity(old) == _identity(new)
        if not same and not config.resume:
            diff = [
                f"{k} {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted(set(_identity(old)) | set(_identity(new)))
                if old.get(k) != new.get(k)
            ]
            raise LatentPriorError(
                f"--out {out} holds a different fit ({'; '.join(diff[:4])}); use a new --out, or pass --resume to continue "
                "that run with these settings."
            )
        if not same and is_main:
            changed = [k for k in sorted(set(old) | set(new)) if k not in COSMETIC_FIELDS and old.get(k) != new.get(k)]
            logger.info(f"latent-prior fit: resuming with changed settings: {', '.join(changed)}")
    elif out.is_dir() and any((out / name).exists() or (out / name).is_symlink() for name in _FIT_FILES):
        found = [name for name in _FIT_FILES if (out / name).exists() or (out / name).is_symlink()]
        raise LatentPriorError(
            f"--out {out} holds {', '.join(found)} but no {TRAIN_DIR}/fit_config.json, so they are not from a fit "
            "and would be overwritten; use a new --out."
        )
    if not ckpts:
        if config.resume and is_main:
            logger.info(f"latent-prior fit: --resume: no checkpoint in {out / TRAIN_DIR / 'checkpoints'} yet, starting from scratch.")
        return None
    return ckpts[-1][1]


def _make_accelerator(config: FitConfig, out: Path) -> tuple[Any, bool]:
    from accelerate import Accelerator

    log_with = tracker_names(config.log_with)
    acc = Accelerator(log_with=log_with, project_dir=str(out / TRAIN_DIR))
    if config.mixed_precision == "bf16" and acc.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LatentPriorError(
            f"--mixed-precision bf16: {torch.cuda.get_device_name(acc.device)} has no bfloat16; use --mixed-precision no."
        )
    return acc, log_with is not None


def fit(
    latents: str | os.PathLike | LatentSource | torch.Tensor,
    config: FitConfig | None = None,
    *,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **overrides: Any,
) -> LatentPrior:
    """Fit an EVaLP prior and return it as a `latent_prior.prior.LatentPrior` (also exported to `config.out`/prior).

    latents: a cache folder or .safetensors path, a `LatentSource` (`latent_prior.cache.open_latents`),
        or a tensor (N, *latent_shape) of posterior means (treated as exact latents, identity normalization).
    config: a FitConfig (defaults when None); keyword overrides replace its fields, e.g. steps=500.
    decode: raw latents (n, *latent_shape) -> images (n, C, H, W) in [-1, 1], e.g. a VAE adapter's `decode`; with
        `log_with` trackers, a grid of decoded sampler draws goes to them at every checkpoint.
        With no `out`, the run lives in a temporary folder that is deleted afterwards.
    Runs on whatever Accelerate was launched with (`accelerate launch ...`), or one process.
    """
    from latent_prior.prior import LatentPrior

    try:
        config = dataclasses.replace(config or FitConfig(), **overrides)
    except TypeError as exc:
        names = ", ".join(f.name for f in dataclasses.fields(FitConfig))
        raise LatentPriorError(f"fit(): {exc}; valid settings are {names}.") from None
    if isinstance(latents, (str, os.PathLike)):
        config = dataclasses.replace(config, latents=str(latents))
    elif config.latents is None:
        config = dataclasses.replace(config, latents=getattr(latents, "path", None) and str(latents.path) or f"<{type(latents).__name__}>")
    config = resolve_objective(config)
    check_config(config)
    source = _open_source(latents)
    if isinstance(latents, (str, os.PathLike)):
        config = dataclasses.replace(config, latents=str(Path(latents).resolve()))

    temp_dir = None
    if config.out is None:
        temp_dir = tempfile.mkdtemp(prefix="latent-prior-fit-")
        out = Path(temp_dir)
    else:
        out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise LatentPriorError(f"--out {out} exists and is not a folder; choose a folder.")

    accelerator, tracking = _make_accelerator(config, out)
    threads = contextlib.ExitStack()
    if accelerator.device.type == "cpu":
        threads.enter_context(cpu_threads(config.cpu_threads))  # latent_prior.threads: one, unless the user chose
    try:
        resume_from = _prepare_out(out, config, accelerator.is_main_process)
        trainer = Trainer(config, source, out, accelerator)  # checks the data against the batch size; writes nothing
        if resume_from is not None:
            # reads only: a refused resume leaves --out as it was
            networks = {"energy": trainer.energy, "flow": trainer.flow, "flow_ema": trainer.flow}
            check_checkpoint(resume_from, networks, trainer.world_size, trainer.rank)
        trainer.tracking, trainer.decode = tracking, decode
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            trainer.ckpt_root.mkdir(parents=True, exist_ok=True)
            for leftover in trainer.ckpt_root.glob(".tmp-*"):  # from a run killed mid-save
                shutil.rmtree(leftover, ignore_errors=True)
            atomic_write_json(trainer.train_dir / "fit_config.json", to_dict(config))
        accelerator.wait_for_everyone()
        if tracking:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in to_dict(config).items()}
            accelerator.init_trackers("latent-prior", config=flat)
        if resume_from is not None and accelerator.is_main_process:
            logger.info(f"latent-prior fit: resuming from {resume_from}")
        trainer.train(resume_from)
        summary = trainer.export(str(config.latents))
        if accelerator.is_main_process:
            log_result(_summary_line(summary, out if temp_dir is None else None))
        prior = LatentPrior.from_pretrained(out / PRIOR_DIR, device=accelerator.device)
        if tracking:
            accelerator.end_training()
        return prior
    finally:
        threads.close()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _summary_line(s: dict[str, Any], out: Path | None) -> str:
    where = f"; prior written to {out / PRIOR_DIR}, training records to {out / TRAIN_DIR}" if out is not None else ""
    gain = s["heldout_gain_nats"]
    if math.isfinite(gain):
        bits = (
            f"{s['heldout_gain_bits_per_data_dim']:+.5f} bits/dim"
            if "heldout_gain_bits_per_data_dim" in s
            else f"{s['heldout_gain_bits_per_latent_dim']:+.4f} bits/latent-dim"
        )
        gain_text = f"held-out ELBO gain ≈ {gain:+.3f} nats = {bits}"
    else:
        gain_text = f"train ELBO gain ≈ {s['train_gain_nats']:+.3f} nats (no validation split)"
    return (
        f"latent-prior fit: {s['steps']} steps in {s['seconds']:.0f} s (selected step {s['selected_step']}); "
        f"log Ẑ ≈ {s['log_z']:.3f} nats (IS estimate, K={s['log_z_samples']}, ESS {s['log_z_ess']:.0f} = "
        f"{100 * s['log_z_ess_fraction']:.1f}%); {gain_text} (estimates, optimistic){where}"
    )


def run_fit(config: FitConfig) -> int:
    """`latent-prior fit`: fit and export; returns the exit code."""
    if config.latents is None:
        raise LatentPriorError("--latents is required: a cache folder from `latent-prior encode` or a .safetensors file with `mean`.")
    if config.out is None:
        raise LatentPriorError("--out is required: the folder that receives the exported prior.")
    prior = fit(config.latents, config)
    from accelerate import PartialState

    if PartialState().is_main_process:
        plot_training_curves(Path(config.out), prior)
    return 0


def plot_training_curves(out: Path, prior: LatentPrior) -> Path:
    """out/train/training.png from out/train/metrics.csv, marking the step the prior was selected at."""
    from latent_prior.report import plot_training

    summary = (prior.training_info or {}).get("summary") or {}
    return plot_training(out / TRAIN_DIR / "metrics.csv", out / TRAIN_DIR / "training.png", selected_step=summary.get("selected_step"))
