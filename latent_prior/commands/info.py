"""`latent-prior info PATH`: describe a latent cache, an exported prior, or a run folder of `latent-prior fit`.

    latent-prior info cache/            # count, shards, latent shape, normalization, VAE, complete or resumable
    latent-prior info RUN/prior         # latent shape, log Ẑ and its ESS, ELBO gain, training highlights
    latent-prior info RUN --json        # a run folder (prior/ and cache/), as JSON for scripts

Only JSON files and safetensors headers are read: no weights are loaded and nothing is unpickled, so it
is instant even for large caches.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latent_prior.config import option
from latent_prior.errors import LatentPriorError, read_json_object
from latent_prior.prior import PRIOR_DIR, TRAIN_DIR

__all__ = ["InfoConfig", "run_info", "describe"]


@dataclass
class InfoConfig:
    """`latent-prior info`: `latent-prior info PATH` is the same as `latent-prior info --path PATH`."""

    path: str | None = option(
        None,
        "a latent cache folder, a .safetensors latents file, an exported prior folder, or a run folder of `latent-prior fit`",
        required=True,
        positional=True,
        metavar="PATH",
    )
    json: bool = option(False, "print one JSON object instead of text")
    verify: bool = option(
        False,
        "also compare every shard of a cache with the sha256 its "
        "manifest recorded (reads all of the cache once; without it only headers are read)",
    )


# ----------------------------------------------------------------------------------------------
# reading without loading


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "JSON file", "the folder is damaged")


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, str]]:
    """(shapes, dtypes, metadata) of a safetensors file, from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
            meta = dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - a broken file becomes one clear sentence
        raise LatentPriorError(f"{path}: not a readable .safetensors file ({exc}).") from None
    return shapes, dtypes, meta


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mb(n: int) -> str:
    return f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _meta_json(meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key]) if key in meta else None
    except ValueError:
        return meta[key]


# ----------------------------------------------------------------------------------------------
# what a path is


def _is_cache(path: Path) -> bool:
    return path.is_dir() and ((path / "manifest.json").is_file() or (path / "plan.json").is_file())


def _is_prior(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _is_fit_in_progress(path: Path) -> bool:
    """The --out of a fit that has not exported its prior yet (killed, or still running)."""
    return path.is_dir() and (path / TRAIN_DIR / "fit_config.json").is_file() and not _is_prior(path / PRIOR_DIR)


def _is_run(path: Path) -> bool:
    """A run folder of `latent-prior fit` on images, or the --out of `fit --latents` (prior/ and train/)."""
    return path.is_dir() and (_is_prior(path / PRIOR_DIR) or _is_cache(path / "cache"))


def describe(path: str | Path, *, verify: bool = False) -> dict[str, Any]:
    """A JSON-able description of a cache folder, a latents .safetensors file, a prior folder (or the --out of
    a fit that has not exported yet) or a run folder ({"kind": "cache" | "latents_file" | "prior" |
    "fit_in_progress" | "run", "path", ...}). Raises LatentPriorError otherwise, and for a complete cache
    whose manifest and shards disagree or are damaged (verify: also their recorded checksums)."""
    path = Path(path)
    if not path.exists():
        raise LatentPriorError(f"{path}: no such file or folder; pass a cache, a prior folder or a run folder.")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise LatentPriorError(f"{path}: not a .safetensors latents file; pass a cache, a prior folder or a run folder.")
        return describe_latents_file(path)
    if _is_run(path):
        return describe_run(path, verify=verify)
    if _is_prior(path):
        return describe_prior(path)
    if _is_fit_in_progress(path):
        return describe_fit_in_progress(path)
    if _is_cache(path):
        return describe_cache(path, verify=verify)
    raise LatentPriorError(
        f"{path} is not a latent cache (manifest.json or plan.json), an exported prior (config.json and "
        "model.safetensors) or the folder of a fit (prior/, train/, cache/); pass one of those."
    )


def describe_cache(path: Path, *, verify: bool = False) -> dict[str, Any]:
    """A cache folder: complete (manifest.json) or partial (plan.json and some shards: resumable). A complete
    one is checked as `fit` would read it (manifest against shard headers; with verify, checksums too), so
    "complete" is never said of a cache that would fail."""
    from latent_prior.cache import check_shards, read_manifest

    out: dict[str, Any] = {"kind": "cache", "path": str(path.resolve()), "size_bytes": _size(path)}
    if (path / "manifest.json").is_file():
        m = read_manifest(path)
        check_shards(path, m, verify=verify)
        out.update(
            {
                "complete": True,
                "verified": bool(verify),
                "format_version": m.get("format_version"),
                "count": m.get("count"),
                "num_files": m.get("num_files"),
                "skipped": len(m.get("skipped") or []),
                "shards": len(m.get("shards") or []),
                "shard_size": m.get("shard_size"),
                "latent_shape": m.get("latent_shape"),
                "deterministic": m.get("deterministic"),
                "flip": m.get("flip"),
                "normalization": m.get("normalization"),
                "vae": m.get("vae"),
                "resolution": m.get("resolution"),
                "image_channels": m.get("image_channels"),
                "dtype": m.get("dtype"),
                "data": m.get("data"),
                "created": m.get("created"),
                "finished": m.get("finished"),
                "latent_prior_version": m.get("latent_prior_version"),
            }
        )
        return out
    plan = _read_json(path / "plan.json")
    identity = plan.get("identity") or {}
    done_shards, done_items = 0, 0
    for shard in sorted(path.glob("shard-*.safetensors")):
        try:
            _, _, meta = _header(shard)
        except LatentPriorError:
            continue  # a damaged shard is re-encoded on resume
        if meta.get("identity") == plan.get("identity_hash"):
            done_shards += 1
            done_items += len(_meta_json(meta, "files") or [])
    out.update(
        {
            "complete": False,
            "resumable": True,
            "format_version": plan.get("format_version"),
            "num_files": identity.get("num_files"),
            "count_so_far": done_items,
            "shards": plan.get("num_chunks"),
            "shards_done": done_shards,
            "shard_size": identity.get("shard_size"),
            "latent_shape": identity.get("latent_shape"),
            "deterministic": identity.get("deterministic"),
            "flip": identity.get("flip"),
            "vae": identity.get("vae"),
            "resolution": identity.get("resolution"),
            "image_channels": identity.get("image_channels"),
            "dtype": identity.get("dtype"),
            "created": plan.get("created"),
            "note": "incomplete (no manifest.json): rerun the same `latent-prior encode` command to resume it",
        }
    )
    return out


def describe_latents_file(path: Path) -> dict[str, Any]:
    """A bare .safetensors file: posterior moments (`mean`/`logvar`) or `latent-prior sample` output (`latents`)."""
    shapes, dtypes, meta = _header(path)
    key = "mean" if "mean" in shapes else "latents" if "latents" in shapes else None
    if key is None:
        raise LatentPriorError(
            f"{path}: holds neither `mean` nor `latents` ({', '.join(sorted(shapes)) or 'no tensors'}); it is not a latents file."
        )
    shape = shapes[key]
    out: dict[str, Any] = {
        "kind": "latents_file",
        "path": str(path.resolve()),
        "size_bytes": _size(path),
        "written_by": "latent-prior sample" if key == "latents" else "posterior moments",
        "tensors": {k: {"shape": list(v), "dtype": dtypes[k]} for k, v in shapes.items()},
        "count": shape[0] if shape else 0,
        "latent_shape": list(shape[1:]),
        "deterministic": "logvar" not in shapes,
        "space": meta.get("space", "raw"),
        "normalization": _meta_json(meta, "normalization"),
        "provenance": _meta_json(meta, "provenance"),
    }
    for k in ("method", "seed", "temperature", "prior"):
        if k in meta:
            out[k] = meta[k]
    return out


def describe_prior(path: Path) -> dict[str, Any]:
    """An exported prior folder: what `LatentPrior.from_pretrained` would load, without loading it."""
    from latent_prior.prior import validate_prior_config

    config = _read_json(path / "config.json")
    if "latent_shape" not in config or "format_version" not in config:
        raise LatentPriorError(f"{path / 'config.json'} is not the config of an exported prior (no latent_shape / format_version).")
    validate_prior_config(config, path / "config.json")
    shapes, _, _ = _header(path / "model.safetensors")
    params = {"energy": 0, "flow": 0}
    for name, shape in shapes.items():
        part = "energy" if name.startswith("energy_net.") else "flow" if name.startswith("flow.") else None
        if part:
            params[part] += math.prod(shape)
    training = config.get("training") or {}
    fit_config = training.get("config") or {}
    summary = training.get("summary") or {}
    if not summary and (path / "fit_summary.json").is_file():
        summary = _read_json(path / "fit_summary.json")
    log_z_info = config.get("log_z_info") or {}
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    # a fit's checkpoints: beside the prior in its train/ folder, or (latent-prior 0.1.0) inside it
    checkpoints = path.parent / TRAIN_DIR / "checkpoints" if path.name == PRIOR_DIR else path / "checkpoints"
    highlights = (
        "latents",
        "objective",
        "steps",
        "batch_size",
        "seed",
        "validation_fraction",
        "energy_kind",
        "flow_kind",
        "kl_weight",
        "forward_kl_weight",
        "mixed_precision",
    )
    return {
        "kind": "prior",
        "path": str(path.resolve()),
        "format_version": config.get("format_version"),
        "latent_prior_version": config.get("latent_prior_version"),
        "latent_shape": config.get("latent_shape"),
        "latent_dims": math.prod(config.get("latent_shape") or [0]),
        "normalization": config.get("normalization"),
        "provenance": config.get("provenance"),
        "log_z": config.get("log_z"),
        "log_z_ess": log_z_info.get("ess"),
        "log_z_ess_fraction": log_z_info.get("ess_fraction"),
        "log_z_samples": log_z_info.get("num_samples"),
        "heldout_gain_nats": summary.get("heldout_gain_nats"),
        "heldout_gain_bits_per_latent_dim": summary.get("heldout_gain_bits_per_latent_dim"),
        "heldout_gain_bits_per_data_dim": summary.get("heldout_gain_bits_per_data_dim"),
        "train_gain_nats": summary.get("train_gain_nats"),
        "energy": {**(config.get("energy") or {}), "parameters": params["energy"]},
        "flow": {**(config.get("flow") or {}), "parameters": params["flow"]},
        "training": {
            "steps": summary.get("steps"),
            "selected_step": summary.get("selected_step"),
            "seconds": summary.get("seconds"),
            "num_train": summary.get("num_train"),
            "num_validation": summary.get("num_validation"),
            "world_size": training.get("world_size", summary.get("world_size")),
            "device": training.get("device"),
            "torch_version": training.get("torch_version"),
            "config": {k: fit_config[k] for k in highlights if k in fit_config},
        },
        "files": files,
        "checkpoints": len([p for p in checkpoints.iterdir() if p.is_dir()]) if checkpoints.is_dir() else 0,
        "size_bytes": _size(path),
    }


def describe_fit_in_progress(path: Path) -> dict[str, Any]:
    """A fit's --out with checkpoints but no exported prior yet."""
    config = _read_json(path / TRAIN_DIR / "fit_config.json")
    steps = sorted(
        int(d.name.removeprefix("step-"))
        for d in (path / TRAIN_DIR / "checkpoints").glob("step-*")
        if d.is_dir() and d.name.removeprefix("step-").isdigit()
    )
    return {
        "kind": "fit_in_progress",
        "path": str(path.resolve()),
        "steps_planned": config.get("steps"),
        "last_checkpoint_step": steps[-1] if steps else None,
        "checkpoints": len(steps),
        "latents": config.get("latents"),
        "size_bytes": _size(path),
        "note": "no exported prior yet (killed or still running): rerun the same `latent-prior fit` command with --resume to continue it",
    }


def describe_run(path: Path, *, verify: bool = False) -> dict[str, Any]:
    """A run folder of `latent-prior fit` (prior/, train/, cache/, samples.png, report.md, ...), or a fit's --out."""
    out: dict[str, Any] = {"kind": "run", "path": str(path.resolve()), "size_bytes": _size(path)}
    out["prior"] = (
        describe_prior(path / PRIOR_DIR)
        if _is_prior(path / PRIOR_DIR)
        else describe_fit_in_progress(path)
        if _is_fit_in_progress(path)
        else None
    )
    out["cache"] = describe_cache(path / "cache", verify=verify) if _is_cache(path / "cache") else None
    out["files"] = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    return out


# ----------------------------------------------------------------------------------------------
# text


def _num(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "unknown"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def _norm_text(norm: dict[str, Any] | None) -> str:
    if not norm:
        return "identity (none recorded)"
    parts = [f"scaling {norm.get('scaling_factor', 1.0):g}", f"shift {norm.get('shift_factor') or 0.0:g}"]
    if norm.get("latents_mean") is not None:
        parts.append(f"per-channel mean/std ({len(norm['latents_mean'])} channels)")
    return ", ".join(parts)


def _vae_text(vae: dict[str, Any] | None) -> str:
    if not vae:
        return "unknown"
    text = f"{vae.get('source') or vae.get('class_name', '?')}"
    extra = [f"{k} {vae[k]}" for k in ("class_name", "revision", "subfolder", "fingerprint") if vae.get(k)]
    return text + (f" ({', '.join(extra)})" if extra else "")


def _shape(shape: Any) -> str:
    return "×".join(str(s) for s in shape) if shape else "unknown"


def _cache_lines(d: dict[str, Any]) -> list[str]:
    if d["complete"]:
        status = f"complete, {d['count']} latents from {d['num_files']} files ({d['skipped']} skipped); " + (
            "every shard matches its recorded sha256"
            if d.get("verified")
            else "headers checked (--verify also compares each shard's sha256)"
        )
    else:
        status = (
            f"PARTIAL: {d['shards_done']} of {d['shards']} shards, {d['count_so_far']} of {d['num_files']} files "
            "encoded; rerun the same `latent-prior encode` command to resume it"
        )
    lines = [
        f"latent cache {d['path']}",
        f"  status:        {status}",
        f"  shards:        {d['shards']} of up to {d['shard_size']} images",
        f"  latent shape:  {_shape(d['latent_shape'])}{' (deterministic: no logvar)' if d.get('deterministic') else ' (mean and logvar)'}"
        f"{', with flip copies' if d.get('flip') else ''}",
        f"  VAE:           {_vae_text(d.get('vae'))}",
        f"  images:        {d.get('resolution')} px, {d.get('image_channels')} channels, encoded in {d.get('dtype')}",
    ]
    if d.get("normalization") is not None:
        lines.append(f"  normalization: {_norm_text(d['normalization'])}")
    if d.get("data"):
        lines.append(f"  data:          {d['data']}")
    lines.append(f"  size on disk:  {_mb(d['size_bytes'])}; format version {d.get('format_version')}")
    return lines


def _latents_file_lines(d: dict[str, Any]) -> list[str]:
    lines = [
        f"latents file {d['path']} ({d['written_by']})",
        f"  count:         {d['count']}",
        f"  latent shape:  {_shape(d['latent_shape'])}{' (exact latents, no logvar)' if d['deterministic'] else ' (mean and logvar)'}",
        f"  space:         {d['space']}",
        f"  normalization: {_norm_text(d.get('normalization'))}",
        f"  VAE:           {_vae_text(d.get('provenance'))}",
    ]
    if "method" in d:
        lines.append(
            f"  drawn by:      method {d['method']}, seed {d.get('seed')}, temperature {d.get('temperature')} from {d.get('prior')}"
        )
    lines.append(f"  size on disk:  {_mb(d['size_bytes'])}")
    return lines


def _prior_lines(d: dict[str, Any]) -> list[str]:
    t = d["training"]
    gain = d.get("heldout_gain_nats")
    if gain is not None and isinstance(gain, float) and math.isfinite(gain):
        bits = d.get("heldout_gain_bits_per_data_dim")
        bits_text = (
            f"{bits:+.6f} bits/data-dim"
            if bits is not None
            else f"{_num(d.get('heldout_gain_bits_per_latent_dim'), '+.5f')} bits/latent-dim"
        )
        gain_text = f"{gain:+.4f} nats per item = {bits_text} (estimate, optimistic)"
    else:
        gain_text = f"unknown (train gain {_num(d.get('train_gain_nats'), '+.4f')} nats; no validation split)"
    ess = d.get("log_z_ess_fraction")
    lines = [
        f"EVaLP prior {d['path']}",
        f"  latent shape:  {_shape(d['latent_shape'])} ({d['latent_dims']} dims), normalized with {_norm_text(d.get('normalization'))}",
        f"  VAE:           {_vae_text(d.get('provenance'))}",
        f"  log Ẑ:         {_num(d.get('log_z'))} nats (importance sampling, K={d.get('log_z_samples')}, ESS "
        f"{_num(d.get('log_z_ess'), '.0f')} = {_num(None if ess is None else 100 * ess, '.1f')}%)",
        f"  ELBO gain:     {gain_text}",
        f"  networks:      energy {d['energy'].get('kind')} ({d['energy']['parameters']:,} params), flow "
        f"{d['flow'].get('kind')} ({d['flow']['parameters']:,} params)",
        f"  training:      {t.get('steps')} steps in {_num(t.get('seconds'), '.1f')} s (selected step {t.get('selected_step')}), "
        f"{t.get('num_train')} training / {t.get('num_validation')} validation latents, {t.get('world_size')} "
        f"process(es) on {t.get('device')}",
    ]
    if t.get("config"):
        lines.append("  fit config:    " + ", ".join(f"{k}={v}" for k, v in t["config"].items()))
    lines.append(
        f"  versions:      format {d.get('format_version')}, latent-prior {d.get('latent_prior_version')}, torch {t.get('torch_version')}"
    )
    lines.append(
        "  files:         "
        + ", ".join(f"{name} {_mb(size)}" for name, size in d["files"].items())
        + (f"; {d['checkpoints']} checkpoint(s)" if d["checkpoints"] else "")
        + f"; {_mb(d['size_bytes'])} in all"
    )
    return lines


def _fit_in_progress_lines(d: dict[str, Any]) -> list[str]:
    return [
        f"unfinished fit {d['path']}",
        f"  progress:      last checkpoint at step {d['last_checkpoint_step']} of {d['steps_planned']} ({d['checkpoints']} kept)",
        f"  latents:       {d['latents']}",
        f"  status:        {d['note']}",
    ]


def _lines(d: dict[str, Any]) -> list[str]:
    return {"cache": _cache_lines, "latents_file": _latents_file_lines, "prior": _prior_lines, "fit_in_progress": _fit_in_progress_lines}[
        d["kind"]
    ](d)


def render(d: dict[str, Any]) -> str:
    """The text `latent-prior info` prints for a `describe` result."""
    if d["kind"] != "run":
        return "\n".join(_lines(d))
    lines = [f"run folder {d['path']} ({_mb(d['size_bytes'])})"]
    if d["files"]:
        lines.append("  files: " + ", ".join(d["files"]))
    for part in ("prior", "cache"):
        if d.get(part):
            lines += ["", *_lines(d[part])]
        else:
            lines += ["", f"no {part}/ in this run folder"]
    return "\n".join(lines)


def run_info(config: InfoConfig) -> int:
    """`latent-prior info`: print the description (text, or JSON with --json). Returns 0."""
    if config.path is None:
        raise LatentPriorError("pass the folder or file to describe: `latent-prior info PATH`.")
    d = describe(config.path, verify=config.verify)
    if config.json:
        json.dump(d, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(render(d))
    return 0
