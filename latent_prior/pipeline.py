"""`latent-prior fit` from images: one command from an image folder to a run folder with a better prior.

    latent-prior fit                                                   # embedded VAE + bundled digits -> runs/default
    latent-prior fit --vae stabilityai/sd-vae-ft-mse --data photos/ --out runs/sd
    accelerate launch --num_processes 4 -m latent_prior fit --vae ... --data ... --out runs/sd   # same, on 4 GPUs

Stages (each prints one line; long ones show a progress bar unless --quiet):

1. encode   images -> RUN_DIR/cache (`latent_prior.encode`; a complete matching cache is reused, a
            cache made with another VAE / resolution / dtype / flip setting is refused);
2. fit      cache -> RUN_DIR/prior, the exported prior alone, and RUN_DIR/train, the checkpoints, metrics.csv
            and fit summary (`latent_prior.train.fit`; an exported prior of the same settings is reused, an
            interrupted fit continues from its last checkpoint);
3. samples  as many N(0, I) latents as EVaLP latents, decoded side by side -> RUN_DIR/samples.png;
4. report   RUN_DIR/train/training.png, RUN_DIR/report.md and report.json (held-out metrics of the Gaussian, GMM and
            EVaLP priors, config, versions, seeds, timings, VAE provenance), `latent_prior.report`.

RUN_DIR also holds config.json (the effective `RunConfig`, written once the fit stage has accepted it, so
a refused command leaves the settings of the run as they were), log.txt (every message of the package and
every Python warning during the run, appended by each invocation; `latent_prior.log`) and the hidden
marker .latent-prior-run, written first. A RUN_DIR that holds a different run is refused unless --overwrite
(start over) or --resume (continue it with the new settings) is given; both act only on a folder that
holds the marker (or a config.json of a run), so a folder of the user's that merely has a cache/ or a
report.md is refused, never cleared.

Every process of an `accelerate launch` runs this function; they encode and fit together, and only
the main process writes config.json, the pictures, the report and the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from latent_prior.config import option, to_dict
from latent_prior.errors import LatentPriorError
from latent_prior.fit_config import FitConfig, check_config, resolve_objective
from latent_prior.log import log_file, log_result, logger, to_file_only
from latent_prior.prior import PRIOR_DIR, SAMPLE_METHODS, TRAIN_DIR
from latent_prior.threads import cpu_threads
from latent_prior.vae import VAEAdapter

__all__ = ["RunConfig", "run_pipeline", "DEFAULT_RUN_DIR", "RUN_FILES"]

#: Where `latent-prior fit` writes when --out is left out (embedded default only).
DEFAULT_RUN_DIR = "runs/default"
#: What a run folder holds; --overwrite deletes exactly these and nothing else.
RUN_FILES = ("config.json", "cache", PRIOR_DIR, TRAIN_DIR, "samples.png", "report.md", "report.json", "log.txt")
#: The entries of RUN_FILES that are folders (the others are files).
_RUN_FOLDERS = ("cache", PRIOR_DIR, TRAIN_DIR)
#: Written into a run folder before anything else: --overwrite and --resume touch only folders that hold it
#: (names alone prove nothing: a user's own cache/ or report.md must never be deleted or replaced).
RUN_MARKER = ".latent-prior-run"
#: Keys every config.json of a run has had: such a file marks a run folder made before RUN_MARKER existed.
_LEGACY_RUN_KEYS = frozenset({"vae", "data", "out", "steps", "seed", "grid_samples", "report_samples", "encode_batch_size"})

#: Fields that change neither the cache nor the prior. A rerun differing only in these is the same run:
#: the pictures and the report are redrawn anyway.
_SAME_RUN_FIELDS = frozenset(
    {
        "resume",
        "overwrite",
        "quiet",
        "log_with",
        "log_every",
        "num_workers",
        "cpu_threads",
        "out",
        "encode_workers",
        "encode_batch_size",
        "grid_samples",
        "report_samples",
        "sample_method",
    }
)
#: FitConfig fields that do not change the fitted prior (latents/out: the cache and prior live in the run folder).
_SAME_FIT_FIELDS = frozenset({"resume", "quiet", "log_with", "log_every", "num_workers", "cpu_threads", "out", "latents"})


@dataclass
class RunConfig(FitConfig):
    """`latent-prior fit`: every FitConfig field (the trainer) plus how to get latents and what to report.

    Field names = CLI flags = keys of RUN_DIR/config.json. With --latents the command
    fits on a cache and exports the prior to --out and the encode/report fields are ignored.
    """

    latents: str | None = option(
        None,
        "skip encoding and reporting: fit on this cache "
        "folder (from `latent-prior encode`) or .safetensors file and export the prior to --out; leave out to run "
        "the whole pipeline from images",
    )
    out: str | None = option(
        None,
        "run folder (cache/, prior/, train/, samples.png, "
        "report.md, report.json, config.json, log.txt); with --latents, the fit's folder (prior/, the exported "
        f"prior, and train/). Leave out for {DEFAULT_RUN_DIR} with the embedded default; required with --vae, "
        "--data or --latents",
    )
    # -- encoding (as `latent-prior encode`)
    vae: str | None = option(
        None,
        "VAE: a hub id, a local save_pretrained or pipeline "
        "folder, or a .safetensors file; leave out (or 'default') for the embedded default digits VAE",
    )
    data: str | None = option(None, "folder of images (.jpg/.jpeg/.png/.webp, searched recursively); leave out for the bundled digits")
    resolution: int | None = option(
        None, "square image size in pixels (shorter side resized, then center-cropped); leave out for 256, or the embedded VAE's own 32"
    )
    dtype: str = option("fp32", "precision of the VAE (encoder and decoder)", choices=("fp32", "fp16", "bf16"))
    subfolder: str | None = option(None, "subfolder of --vae holding the VAE (e.g. 'vae' in a pipeline repo)")
    revision: str | None = option(None, "hub revision (branch, tag or commit) of --vae")
    flip: bool = option(False, "also encode horizontally flipped images and fit on both (doubles the latents)")
    encode_batch_size: int = option(8, "images per encoder (and decoder) call; --batch-size is latents per training step")
    encode_workers: int = option(2, "background processes decoding image files while encoding (0 = in the main process)")
    shard_size: int = option(1024, "images per cache shard: the unit of streaming writes and of resuming an interrupted encode")
    # -- samples and report
    grid_samples: int = option(64, "images in each half of samples.png (N(0, I) prior | EVaLP prior)")
    sample_method: str = option(
        "sampler", "how the EVaLP half of samples.png is drawn: sampler (one flow pass), sir or langevin", choices=SAMPLE_METHODS
    )
    report_samples: int = option(2000, "latents drawn from each prior for the metrics of report.md")
    overwrite: bool = option(
        False,
        "delete what a previous run left in --out (config.json, "
        "cache/, prior/, train/, the pictures, reports and log; nothing else, and only in a run folder latent-prior made) "
        "and start over",
    )

    def fit_config(self) -> FitConfig:
        """The trainer's part of this config, as a plain FitConfig (what fit_config.json should hold)."""
        return FitConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FitConfig)})


# ----------------------------------------------------------------------------------------------
# the log: every message of the run, also appended to RUN_DIR/log.txt


@contextmanager
def _run_log(path: Path | None) -> Iterator[None]:
    """`log.log_file(path)`, plus a last line in the file for a run that ends in an error or an interrupt (the CLI
    prints those after this block has closed the file)."""
    with log_file(path) as handler:
        try:
            yield
        except LatentPriorError as exc:
            to_file_only(handler, f"latent-prior fit: error: {exc}")
            raise
        except KeyboardInterrupt:
            to_file_only(handler, "latent-prior fit: interrupted; run the same command again (or with --resume) to continue.")
            raise


# ----------------------------------------------------------------------------------------------
# the run folder


def _uses_embedded_vae(config: RunConfig) -> bool:
    return config.vae is None or str(config.vae) == "default"


def _identity(values: dict[str, Any], ignore: frozenset[str]) -> dict[str, Any]:
    """The fields of a saved config that decide its results, with paths made comparable."""
    out = {k: v for k, v in values.items() if k not in ignore}
    for key in ("vae", "data"):
        if key in out:
            v = out[key]
            if key == "vae" and v in (None, "default"):
                out[key] = "default"
            elif v is not None and Path(str(v)).exists():
                out[key] = str(Path(str(v)).resolve())
    return out


def _is_run_dir(run_dir: Path) -> bool:
    """Whether latent-prior made this folder: it holds RUN_MARKER, or (a run from before the marker) a
    config.json with the keys of a run's config."""
    if (run_dir / RUN_MARKER).is_file():
        return True
    try:
        saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and _LEGACY_RUN_KEYS <= set(saved)


def _present(run_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (run_dir / name).exists() or (run_dir / name).is_symlink()]


def _check_run_dir(run_dir: Path, config: RunConfig) -> str:
    """Refuse a run folder that holds another run, or files latent-prior did not write; returns "new",
    "same", "changed" (resumed with new settings) or "unfinished" (a run stopped before it recorded its
    config.json: its cache and prior are checked against their own recorded settings). Reads only."""
    if run_dir.exists() and not run_dir.is_dir():
        raise LatentPriorError(f"--out {run_dir} exists and is not a folder; choose a folder for the run.")
    if not run_dir.is_dir():
        return "new"
    ours = _present(run_dir)
    if not _is_run_dir(run_dir):
        if not ours:
            return "new"  # an empty folder, or one holding only unrelated files we never touch
        raise LatentPriorError(
            f"--out {run_dir} already holds {', '.join(ours)} but no config.json or {RUN_MARKER} of a run, so latent-prior "
            "did not write them; --overwrite and --resume touch only run folders latent-prior made, so choose another --out "
            "(or move those files away)."
        )
    if config.overwrite:
        _check_clearable(run_dir)
        return "new"
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return "unfinished"
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        raise LatentPriorError(
            f"{saved_path} is not a JSON object of a run's settings; pass --overwrite to start the run over, or choose another --out."
        )
    old, new = _identity(saved, _SAME_RUN_FIELDS), _identity(to_dict(config), _SAME_RUN_FIELDS)
    if old == new:
        return "same"
    if config.resume:
        return "changed"
    diff = [f"{k} {saved.get(k)!r} -> {getattr(config, k, None)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
    raise LatentPriorError(
        f"--out {run_dir} holds a different run ({shown}); pass --overwrite to replace it, --resume to continue it with "
        "these settings, or choose another --out."
    )


def _check_clearable(run_dir: Path) -> None:
    """Before --overwrite deletes anything: every entry it would delete is what the run wrote there (a real
    folder for cache/ and prior/, a real file for the others), never a link, whose target is not ours."""
    for name in _present(run_dir):
        path = run_dir / name
        want_folder = name in _RUN_FOLDERS
        if path.is_symlink() or (path.is_dir() != want_folder):
            what = "a link" if path.is_symlink() else "a folder" if path.is_dir() else "a file"
            raise LatentPriorError(
                f"--overwrite: {path} is {what}, which latent-prior fit never writes there, so nothing was deleted; "
                "remove or rename it yourself, or choose another --out."
            )


def _clear_run_dir(run_dir: Path) -> list[str]:
    """Delete what a previous run wrote (RUN_FILES, checked by `_check_clearable` first); returns their names."""
    _check_clearable(run_dir)
    removed = []
    for name in _present(run_dir):
        path = run_dir / name
        if name in _RUN_FOLDERS:
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(name)
    return removed


def _mark_run_dir(run_dir: Path) -> None:
    if not (run_dir / RUN_MARKER).exists():
        from latent_prior import __version__
        from latent_prior.files import atomic_write_json

        atomic_write_json(
            run_dir / RUN_MARKER,
            {
                "written_by": "latent-prior fit",
                "latent_prior_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )


def _record_config(run_dir: Path, config: RunConfig) -> None:
    """config.json: written once the stages that check the run folder's cache and prior have accepted this
    config, so a refused command leaves the settings of the run it was refused by."""
    from latent_prior.files import atomic_write_json

    atomic_write_json(run_dir / "config.json", to_dict(config))


def _check_config(config: RunConfig) -> None:
    """Every flag, the fit's too, before anything is encoded."""
    check_config(resolve_objective(config))

    def need(ok: bool, flag: str, value: Any, what: str) -> None:
        if not ok:
            raise LatentPriorError(f"--{flag.replace('_', '-')} {value!r}: {what}.")

    need(config.grid_samples >= 1, "grid_samples", config.grid_samples, "pass at least 1 image per half of samples.png")
    need(config.report_samples >= 2, "report_samples", config.report_samples, "pass at least 2 samples per prior for the metrics")
    need(config.encode_batch_size >= 1, "encode_batch_size", config.encode_batch_size, "pass at least 1 image per encoder call")
    need(config.encode_workers >= 0, "encode_workers", config.encode_workers, "pass 0 or more")
    need(config.sample_method in SAMPLE_METHODS, "sample_method", config.sample_method, f"choose one of {', '.join(SAMPLE_METHODS)}")
    if config.overwrite and config.resume:
        raise LatentPriorError("--overwrite and --resume contradict each other; pass --overwrite to start over or --resume to continue.")


# ----------------------------------------------------------------------------------------------
# stages


def _say(is_main: bool, text: str) -> None:
    if is_main:
        logger.info(f"latent-prior fit: {text}")


def _encode(config: RunConfig, adapter: VAEAdapter, cache_dir: Path) -> dict[str, Any]:
    from latent_prior.encode import EncodeConfig, encode_images

    encode_config = EncodeConfig(
        vae=config.vae,
        data=config.data,
        out=str(cache_dir),
        resolution=config.resolution,
        batch_size=config.encode_batch_size,
        dtype=config.dtype,
        subfolder=config.subfolder,
        revision=config.revision,
        flip=config.flip,
        num_workers=config.encode_workers,
        shard_size=config.shard_size,
        quiet=config.quiet,
    )
    try:
        return encode_images(adapter, encode_config)
    except LatentPriorError as exc:
        # The cache names what differs but calls the cache folder "--out"; restate it for the run folder.
        found = re.search(r"holds a cache started with different settings \((.*)\); rerun", str(exc))
        if found is None:
            raise
        raise LatentPriorError(
            f"{cache_dir} was encoded with different settings ({found.group(1)}); rerun with the run's original settings "
            f"(see {cache_dir.parent / 'config.json'}), pass --overwrite to start the run over, or choose another --out."
        ) from None


def _fit_config(config: RunConfig, cache_dir: Path, run_dir: Path) -> FitConfig:
    return dataclasses.replace(config.fit_config(), latents=str(cache_dir.resolve()), out=str(run_dir))


def _finished_prior(run_dir: Path, fit_config: FitConfig) -> bool:
    """True when run_dir/prior holds an exported prior fitted with these settings (so the fit can be skipped)."""
    from latent_prior.fit_config import resolve_objective

    summary, saved = run_dir / TRAIN_DIR / "fit_summary.json", run_dir / TRAIN_DIR / "fit_config.json"
    if not (summary.is_file() and saved.is_file() and (run_dir / PRIOR_DIR / "model.safetensors").is_file()):
        return False
    try:
        old = json.loads(saved.read_text())
    except ValueError:
        return False
    new = to_dict(resolve_objective(fit_config))
    return _identity(old, _SAME_FIT_FIELDS) == _identity(new, _SAME_FIT_FIELDS)


def _decode(adapter: VAEAdapter, raw: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([adapter.decode(raw[i : i + batch_size]).float().cpu() for i in range(0, len(raw), batch_size)])


def _draw_samples(config: RunConfig, prior: Any, adapter: VAEAdapter, normalization: Any, seed: int) -> tuple[Any, dict[str, Any]]:
    """samples.png: N(0, I) latents and EVaLP latents (both in normalized space, then raw), decoded."""
    from latent_prior.images import labelled_panels

    n = config.grid_samples
    generator = torch.Generator(device=prior.device).manual_seed(seed)
    z_gauss = torch.randn((n, *prior.latent_shape), generator=generator, device=prior.device)
    raw_gauss = normalization.denormalize(z_gauss)
    with cpu_threads(config.cpu_threads) if prior.device.type == "cpu" else contextlib.nullcontext():
        raw_evalp = prior.sample(n, method=config.sample_method, generator=generator)
    x_gauss = _decode(adapter, raw_gauss, config.encode_batch_size)
    x_evalp = _decode(adapter, raw_evalp, config.encode_batch_size)
    ncol = math.ceil(math.sqrt(n))
    scale = max(1, round(64 / x_gauss.shape[-1]))  # small decodes (the digits are 32 px) are enlarged to ~64 px
    image = labelled_panels([("N(0, I) prior (the VAE's own)", x_gauss), ("EVaLP prior", x_evalp)], ncol=ncol, scale=scale)
    stats = {
        "n_per_half": n,
        "method": config.sample_method,
        "seed": seed,
        "image_size": list(image.size),
        "decoded_shape": list(x_gauss.shape[1:]),
        "pixel_mean": {"gaussian": float(x_gauss.mean()), "evalp": float(x_evalp.mean())},
        "pixel_std": {"gaussian": float(x_gauss.std()), "evalp": float(x_evalp.std())},
    }
    return image, stats


def _versions() -> dict[str, str]:
    from latent_prior import __version__

    versions = {"latent-prior": __version__, "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("diffusers", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return versions


# ----------------------------------------------------------------------------------------------
# the pipeline


def run_pipeline(config: RunConfig, adapter: VAEAdapter) -> int:
    """Encode -> fit -> export -> sample -> decode -> report into the run folder `config.out`; returns 0.

    `adapter` is the VAE named by config.vae/dtype/subfolder/revision (`latent_prior.cli.load_adapter`).
    Raises LatentPriorError for bad input: an occupied run folder, a mismatched cache or prior, bad flags.
    """
    from accelerate.state import PartialState

    if config.out is None:
        if not (_uses_embedded_vae(config) and config.data is None):
            raise LatentPriorError("--out is required with --vae or --data: name the run folder to write, e.g. --out runs/my-vae.")
        config = dataclasses.replace(config, out=DEFAULT_RUN_DIR)
    _check_config(config)
    run_dir = Path(config.out)
    from accelerate.utils import parse_flag_from_env

    # As `Accelerator()` does: ACCELERATE_USE_CPU=1 (CPU ranks under `accelerate launch`) must reach the state.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    is_main = state.is_main_process
    status = _check_run_dir(run_dir, config)  # every rank reads, so every rank raises the same error
    state.wait_for_everyone()
    if is_main:
        removed = _clear_run_dir(run_dir) if config.overwrite else []
        run_dir.mkdir(parents=True, exist_ok=True)
        _mark_run_dir(run_dir)
    state.wait_for_everyone()
    with _run_log(run_dir / "log.txt" if is_main else None):
        if is_main:
            logger.info(f"==== latent-prior fit, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {state.num_processes} process(es) ====")
            if config.overwrite:
                _say(True, f"--overwrite: removed {', '.join(removed) or 'nothing'} from {run_dir}")
            elif status == "same":
                _say(True, f"{run_dir} holds this run already: finished stages are reused")
            elif status == "changed":
                _say(True, f"--resume: continuing the run in {run_dir} with changed settings")
            elif status == "unfinished":
                _say(True, f"{run_dir} holds a run stopped before it finished: its cache and prior are reused where their settings match")
        _run_stages(config, adapter, run_dir, state)
    return 0


def _run_stages(config: RunConfig, adapter: VAEAdapter, run_dir: Path, state: Any) -> None:
    from latent_prior.batches import recorded_split
    from latent_prior.cache import open_latents
    from latent_prior.prior import LatentPrior
    from latent_prior.train import fit, plot_training_curves

    is_main = state.is_main_process
    cache_dir, prior_dir = run_dir / "cache", run_dir / PRIOR_DIR
    timings: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()

    # 1. encode --------------------------------------------------------------------------------
    _say(is_main, f"[1/4] encode: {config.data or 'the bundled digits'} with {config.vae or 'the embedded default VAE'} -> {cache_dir}")
    t0 = time.perf_counter()
    encoded = _encode(config, adapter, cache_dir)
    source = open_latents(cache_dir, include_flips=config.flip)
    reused_cache = is_main and encoded.get("encoded", 1) == 0
    timings["encode"] = {"seconds": time.perf_counter() - t0, "reused": bool(reused_cache)}

    # 2. fit + export --------------------------------------------------------------------------
    fit_config = _fit_config(config, cache_dir, run_dir)
    t0 = time.perf_counter()
    if _finished_prior(run_dir, fit_config):
        _say(is_main, f"[2/4] fit: {prior_dir} already holds the prior fitted with these settings; reusing it")
        prior = LatentPrior.from_pretrained(prior_dir)
        reused_prior = True
    else:
        _say(is_main, f"[2/4] fit: {config.steps} steps on {len(source)} latents {tuple(source.latent_shape)} -> {prior_dir}")
        prior = fit(source, fit_config, decode=adapter.decode)
        reused_prior = False
    timings["fit"] = {"seconds": time.perf_counter() - t0, "reused": reused_prior}
    state.wait_for_everyone()
    if not is_main:
        return  # the pictures and the report are written by the main process only
    _record_config(run_dir, config)

    from latent_prior import report

    summary = json.loads((run_dir / TRAIN_DIR / "fit_summary.json").read_text())
    prior = prior.to(adapter.device)
    prior.check_compatible(adapter, source.normalization, resolution=int((source.manifest or {}).get("resolution") or 0) or None)

    # 3. samples -------------------------------------------------------------------------------
    sample_seed = config.seed + 1000
    _say(
        True,
        f"[3/4] samples: {config.grid_samples} N(0, I) and {config.grid_samples} EVaLP latents "
        f"({config.sample_method}), decoded -> {run_dir / 'samples.png'}",
    )
    t0 = time.perf_counter()
    image, sample_stats = _draw_samples(config, prior, adapter, source.normalization, sample_seed)
    image.save(run_dir / "samples.png")
    timings["samples"] = {"seconds": time.perf_counter() - t0, "reused": False}

    # 4. report --------------------------------------------------------------------------------
    _say(True, f"[4/4] report: training curves and held-out metrics of the Gaussian, GMM and EVaLP priors -> {run_dir / 'report.md'}")
    t0 = time.perf_counter()
    plot_training_curves(run_dir, prior)
    timings["training_plot"] = {"seconds": time.perf_counter() - t0, "reused": False}
    t0 = time.perf_counter()
    train_idx, heldout_idx = recorded_split(prior.training_info, len(source))
    on_training = len(heldout_idx) < 2
    if on_training:
        logger.warning(
            "latent-prior fit: warning: --validation-fraction leaves no held-out latents, so report.md measures the priors "
            "on TRAINING latents (optimistic); use --validation-fraction 0.1 for an honest comparison."
        )
        heldout_idx = train_idx
    elif summary.get("num_validation") not in (None, len(heldout_idx)):
        logger.warning(
            f"latent-prior fit: warning: the fit held out {summary['num_validation']} latents but the report's split has "
            f"{len(heldout_idx)}; the metrics may include training latents."
        )
    metrics, metrics_table = report.heldout_metrics(
        prior, source, heldout_idx, train_idx, samples=config.report_samples, seed=config.seed, progress=not config.quiet
    )
    timings["metrics"] = {"seconds": time.perf_counter() - t0, "reused": False}
    timings["total"] = {"seconds": time.perf_counter() - started, "reused": False}

    facts = {
        "run_dir": str(run_dir),
        "config": to_dict(config),
        "versions": _versions(),
        "seeds": {"training": config.seed, "validation_split": config.seed, "samples_png": sample_seed, "metrics": config.seed},
        "timings": timings,
        "world_size": state.num_processes,
        "device": str(state.device),
        "vae": {
            "provenance": source.provenance,
            "normalization": source.normalization.to_dict(),
            "deterministic": bool(source.deterministic),
        },
        "cache": {
            k: (source.manifest or {}).get(k)
            for k in ("count", "resolution", "dtype", "compute_dtype", "image_channels", "data", "flip", "latent_shape", "created")
        },
        "latents": {
            "total": len(source),
            "train": int(len(train_idx)),
            "heldout": int(len(heldout_idx)),
            "metrics_on_training_latents": on_training,
            "include_flips": bool(config.flip),
        },
        "fit_summary": summary,
        "samples": sample_stats,
        "metrics": metrics,
        "metrics_table": metrics_table,
        "files": {
            "samples": "samples.png",
            "training": f"{TRAIN_DIR}/training.png",
            "prior": f"{PRIOR_DIR}/",
            "cache": "cache/",
            "log": "log.txt",
            "config": "config.json",
        },
    }
    report.write_report(run_dir, facts)
    log_result(
        f"latent-prior fit: done in {timings['total']['seconds']:.0f} s; see {run_dir / 'samples.png'} "
        f"(N(0, I) prior | EVaLP prior) and {run_dir / 'report.md'}"
    )
