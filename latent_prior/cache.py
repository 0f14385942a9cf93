"""The on-disk latent cache: safetensors shards of posterior moments plus a JSON manifest.

A cache directory (full description in docs/cache-format.md):

    plan.json                 identity of the run (VAE fingerprint, resolution, dtype, flip, file list
                              hash, shard size), written once when an encode starts
    shard-00000.safetensors   chunk 0 of the sorted file list: `mean` (n, C, H, W) float32, `logvar`
    shard-00001.safetensors   (absent for deterministic VAEs), optional `mean_flip` / `logvar_flip`,
    ...                       and metadata (source files, skipped files, identity hash, writer rank)
    manifest.json             written last, by one process: its presence means "complete"

The plan is fixed: the sorted file list is cut into chunks of `shard_size` files and shard k holds
chunk k, whoever writes it. A resumed run or another rank can therefore never write the same images
twice, and a finished shard is simply skipped on resume. Every file is written to a hidden temporary
name and moved into place with `os.replace`, so a killed run leaves either a whole shard or none.

`CacheWriter` writes caches (used by `latent_prior.encode`); `open_latents` reads a cache directory
or a bare `.safetensors` file into a `LatentSource`, which streams float32 batches from memory-mapped
files without ever loading the whole cache. `EncodedLatents` holds moments in memory behind the same
interface (the API's encodes, a tensor given to `fit`, `eval --data`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open

from latent_prior.errors import LatentPriorError, read_json_object
from latent_prior.files import atomic_save_safetensors, atomic_write_json, is_temporary_of
from latent_prior.vae import LatentNormalization

#: Bumped whenever a reader of the previous version could misread a new cache.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
#: Default memory budget of a `LatentSource` for one read-ahead window (shuffle buffer) and for scans.
DEFAULT_BUFFER_BYTES = 256 * 2**20

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:05d}.safetensors"


#: The names `encode` itself writes into a cache folder (besides plan.json and manifest.json).
_SHARD_NAME = re.compile(r"shard-\d{5}\.safetensors")
#: The files whose leftover temporaries (`files.is_temporary_of`) are the only hidden files a cache's writer deletes.
_OURS = re.compile(r"shard-\d{5}\.safetensors|plan\.json|manifest\.json")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own `checksum` key: an edit by hand shows."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def files_digest(files: Sequence[str]) -> str:
    """sha256 of the newline-joined relative paths: identifies the exact (ordered) file list.

    A name that is not valid UTF-8 (Python holds its bytes as surrogates) hashes as its raw bytes, so such a
    file is listed, and skipped with a reason, instead of stopping the encode of the whole folder."""
    return hashlib.sha256("\n".join(files).encode("utf-8", "surrogateescape")).hexdigest()


def _hash_identity(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    return read_json_object(path, what, "delete the cache folder and encode again")


# --------------------------------------------------------------------------------------------------
# Writing


class CacheWriter:
    """Writes one cache directory following a fixed plan; safe to share between ranks and resumes.

    Args:
        out: the cache directory (created if needed).
        files: the sorted relative paths of all images; chunk k is files[k*shard_size:(k+1)*shard_size].
        shard_size: images per shard (the last shard may hold fewer).
        identity: what must match for a resume to reuse shards, e.g. {"vae": {...}, "resolution": 256,
            "dtype": "fp32"}; the writer adds the file list digest, shard size, latent shape, flip and
            determinism.
        latent_shape: shape of one latent, e.g. (4, 32, 32).
        deterministic: True when the VAE has no posterior variance (no `logvar` is stored).
        flip: whether shards also hold the moments of horizontally flipped images.

    Typical use (one process or many):
        writer.check_compatible()            # every rank: refuse a cache started differently
        if main: writer.prepare()            # one rank: clean tmp leftovers, write plan.json
        barrier()
        for k in writer.pending_chunks(rank, world_size): ... writer.write_shard(k, ...)
        barrier()
        if main: writer.finalize({...})      # one rank: write manifest.json
    """

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        files: Sequence[str],
        shard_size: int,
        identity: dict[str, Any],
        latent_shape: Sequence[int],
        deterministic: bool,
        flip: bool = False,
    ):
        if int(shard_size) < 1:
            raise LatentPriorError(f"--shard-size {shard_size}: must be at least 1.")
        self.out = Path(out)
        self.files = list(files)
        self.shard_size = int(shard_size)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.deterministic = bool(deterministic)
        self.flip = bool(flip)
        self.identity = {
            **identity,
            "format_version": FORMAT_VERSION,
            "num_files": len(self.files),
            "files_sha256": files_digest(self.files),
            "shard_size": self.shard_size,
            "latent_shape": list(self.latent_shape),
            "deterministic": self.deterministic,
            "flip": self.flip,
        }
        self.identity_hash = _hash_identity(self.identity)

    # -- the plan ---------------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return math.ceil(len(self.files) / self.shard_size)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """[start, end) indices into `files` of chunk `chunk`."""
        start = chunk * self.shard_size
        return start, min(start + self.shard_size, len(self.files))

    def chunk_files(self, chunk: int) -> list[str]:
        start, end = self.chunk_range(chunk)
        return self.files[start:end]

    def shard_path(self, chunk: int) -> Path:
        return self.out / shard_name(chunk)

    # -- start / resume ---------------------------------------------------------------------------
    def _describe_mismatch(self, old: dict[str, Any]) -> str:
        new = self.identity
        parts = []
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key), new.get(key)
            if a == b or key == "num_files":
                continue
            if key == "files_sha256":
                parts.append(f"the image list changed ({old.get('num_files')} files then, {new.get('num_files')} now)")
            elif key == "vae":
                a_fp = (a or {}).get("fingerprint") if isinstance(a, dict) else a
                b_fp = (b or {}).get("fingerprint") if isinstance(b, dict) else b
                parts.append(f"another VAE (fingerprint {a_fp} then, {b_fp} now)")
            else:
                parts.append(f"{key} {a!r} then, {b!r} now")
        return "; ".join(parts) or "its identity differs"

    def check_compatible(self) -> None:
        """Refuse to mix runs: raise LatentPriorError when `out` holds a cache started with another
        VAE, resolution, dtype, flip setting, shard size or image list. Reads only; safe on every rank."""
        if self.out.exists() and not self.out.is_dir():
            raise LatentPriorError(f"--out {self.out}: exists and is not a folder; choose another --out.")
        plan_path = self.out / PLAN
        if plan_path.exists():
            plan = _read_json(plan_path, "cache plan")
            old = plan.get("identity", {})
            if plan.get("identity_hash") != self.identity_hash or old != self.identity:
                raise LatentPriorError(
                    f"--out {self.out} holds a cache started with different settings ({self._describe_mismatch(old)}); "
                    "rerun with the same settings to resume it, or choose a new --out (or delete that folder) to start over."
                )
        elif self.out.is_dir() and any(self.out.glob("shard-*.safetensors")):
            raise LatentPriorError(
                f"--out {self.out} holds shards but no {PLAN}, so they cannot be checked; choose a new --out or delete that folder."
            )
        elif self.out.is_dir():
            # Not a cache of ours: a folder we would write manifest.json and shards into must be empty, so
            # that nothing of the user's is replaced or deleted (our own tmp leftovers do not count).
            foreign = sorted(p.name for p in self.out.iterdir() if not is_temporary_of(p.name, _OURS))
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise LatentPriorError(
                    f"--out {self.out} already holds {shown} and is not a latent cache (no {PLAN}); choose a new or "
                    "empty --out, so that nothing in that folder is overwritten."
                )

    def prepare(self) -> list[int]:
        """Main process only, before any shard is written: create `out`, drop temporary files left by a
        killed run, record plan.json, and drop a manifest that no longer describes complete shards.
        Returns the chunks still to encode (all ranks together)."""
        self.check_compatible()
        self.out.mkdir(parents=True, exist_ok=True)
        for leftover in self.out.iterdir():
            if is_temporary_of(leftover.name, _OURS):
                leftover.unlink(missing_ok=True)
        self._drop_damaged_shards()
        plan_path = self.out / PLAN
        if not plan_path.exists():
            atomic_write_json(
                plan_path,
                {
                    "format_version": FORMAT_VERSION,
                    "identity_hash": self.identity_hash,
                    "identity": self.identity,
                    "num_chunks": self.num_chunks,
                    "created": _utc_now(),
                },
            )
        pending = self.pending_chunks()
        if pending and (self.out / MANIFEST).exists():
            (self.out / MANIFEST).unlink()
        return pending

    def _discard(self) -> None:
        """Delete what this writer wrote (plan.json, its shards), and the folder when nothing else is left."""
        for path in [self.out / PLAN, *(self.shard_path(k) for k in range(self.num_chunks))]:
            path.unlink(missing_ok=True)
        if not any(self.out.iterdir()):
            self.out.rmdir()

    def _drop_damaged_shards(self) -> None:
        """Delete the shards whose bytes no longer match the checksum the manifest recorded for them (a bit
        flip passes every header check), so that this run encodes them again. A manifest that fails its own
        checksum is not trusted for this: its shards are then judged by their headers alone."""
        manifest_path = self.out / MANIFEST
        if not manifest_path.is_file():
            return
        try:
            manifest = json.loads(manifest_path.read_text())
            entries = manifest["shards"] if manifest.get("checksum") == manifest_checksum(manifest) else []
            recorded = {str(e["file"]): str(e["sha256"]) for e in entries if isinstance(e, dict) and "sha256" in e}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return  # an unreadable manifest is rewritten by finalize anyway
        for chunk in range(self.num_chunks):
            path = self.shard_path(chunk)
            if path.name in recorded and path.is_file() and file_sha256(path) != recorded[path.name]:
                path.unlink()

    def shard_problem(self, chunk: int) -> str | None:
        """None when shard `chunk` exists and matches the plan, else why it must be (re)written."""
        path = self.shard_path(chunk)
        if not path.exists():
            return "missing"
        if path.is_symlink():
            return "a link, not a shard file"  # never followed: it could point outside the cache; replaced, not read
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        except Exception as exc:  # noqa: BLE001 - any unreadable shard is simply re-encoded
            return f"unreadable ({type(exc).__name__}: {exc})"
        if meta.get("identity") != self.identity_hash or meta.get("chunk") != str(chunk):
            return "written by another plan"
        try:
            files = json.loads(meta.get("files", "null"))
            skipped = [s["path"] for s in json.loads(meta.get("skipped", "[]"))]
        except (ValueError, TypeError, KeyError):
            return "bad metadata"
        if not isinstance(files, list) or sorted(files + skipped) != sorted(self.chunk_files(chunk)):
            return "file list does not match the plan"
        expected = {"mean"} | ({"logvar"} if not self.deterministic else set())
        if self.flip:
            expected |= {k + "_flip" for k in expected}
        if keys != expected:
            return f"tensors {sorted(keys)} instead of {sorted(expected)}"
        if any(shape != (len(files), *self.latent_shape) for shape in shapes.values()):
            return "tensor shapes do not match the plan"
        return None

    def pending_chunks(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Chunks k with k % world_size == rank whose shard is missing or invalid."""
        return [k for k in range(rank, self.num_chunks, world_size) if self.shard_problem(k) is not None]

    # -- writing ----------------------------------------------------------------------------------
    def write_shard(
        self,
        chunk: int,
        *,
        files: Sequence[str],
        mean: torch.Tensor,
        logvar: torch.Tensor | None = None,
        mean_flip: torch.Tensor | None = None,
        logvar_flip: torch.Tensor | None = None,
        skipped: Sequence[dict[str, str]] = (),
        rank: int = 0,
        world_size: int = 1,
    ) -> Path:
        """Atomically write shard `chunk`: rows follow `files` (its decodable images, in plan order).

        mean, logvar, mean_flip, logvar_flip: (len(files), *latent_shape) float32 raw-space moments.
        skipped: [{"path": ..., "reason": ...}] for the chunk's files that could not be decoded.
        """
        shape = (len(files), *self.latent_shape)
        tensors = {"mean": mean}
        if not self.deterministic:
            tensors["logvar"] = logvar
        if self.flip:
            tensors["mean_flip"] = mean_flip
            if not self.deterministic:
                tensors["logvar_flip"] = logvar_flip
        for key, value in tensors.items():
            if value is None or tuple(value.shape) != shape:
                got = None if value is None else tuple(value.shape)
                raise ValueError(f"write_shard({chunk}): `{key}` has shape {got}, expected {shape}")
        tensors = {k: v.to(torch.float32) for k, v in tensors.items()}
        metadata = {
            "format_version": str(FORMAT_VERSION),
            "identity": self.identity_hash,
            "chunk": str(chunk),
            "files": json.dumps(list(files)),
            "skipped": json.dumps([{"path": s["path"], "reason": s["reason"]} for s in skipped]),
            "rank": str(rank),
            "world_size": str(world_size),
        }
        path = self.shard_path(chunk)
        atomic_save_safetensors(tensors, path, metadata)
        return path

    def finalize(self, info: dict[str, Any]) -> dict[str, Any]:
        """Main process, after every rank finished: check all shards and write manifest.json.

        `info` adds the fields only the encoder knows (vae provenance, normalization, resolution, dtype,
        data folder, ...). Returns the manifest.
        """
        problems = {k: p for k in range(self.num_chunks) if (p := self.shard_problem(k)) is not None}
        if problems:
            first = next(iter(problems))
            raise LatentPriorError(
                f"cache {self.out} is incomplete ({len(problems)} of {self.num_chunks} shards not done, e.g. "
                f"{shard_name(first)}: {problems[first]}); rerun `latent-prior encode` with the same arguments to resume."
            )
        shards, skipped = [], []
        for k in range(self.num_chunks):
            with safe_open(str(self.shard_path(k)), framework="pt") as f:
                meta = f.metadata()
            count = len(json.loads(meta["files"]))
            skipped.extend(json.loads(meta["skipped"]))
            shards.append(
                {
                    "file": shard_name(k),
                    "count": count,
                    "rank": int(meta["rank"]),
                    "world_size": int(meta["world_size"]),
                    "sha256": file_sha256(self.shard_path(k)),
                }
            )
        if not sum(s["count"] for s in shards):
            # An empty cache marked complete would only fail later, in `fit`, far from the cause; and kept
            # incomplete, its shards (all "skipped") would be reused after the images are fixed. So it goes.
            self._discard()
            shown = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3]) + (
                f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
            )
            raise LatentPriorError(
                f"{'--data ' + str(info['data']) if 'data' in info else 'the images'}: none of the {len(self.files)} image "
                f"files could be read ({shown}), so no cache was written; fix or remove those files and run the same "
                "command again."
            )
        plan = _read_json(self.out / PLAN, "cache plan")
        manifest = {
            "format_version": FORMAT_VERSION,
            **info,
            "latent_shape": list(self.latent_shape),
            "deterministic": self.deterministic,
            "flip": self.flip,
            "count": sum(s["count"] for s in shards),
            "num_files": len(self.files),
            "shard_size": self.shard_size,
            "files_sha256": self.identity["files_sha256"],
            "identity_hash": self.identity_hash,
            "shards": shards,
            "skipped": skipped,
            "created": plan.get("created", _utc_now()),
            "finished": _utc_now(),
        }
        manifest["checksum"] = manifest_checksum(manifest)
        atomic_write_json(self.out / MANIFEST, manifest)
        return manifest


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class _Segment:
    """A run of consecutive items stored as rows of one tensor pair in one file."""

    path: Path
    mean_key: str
    logvar_key: str | None
    start: int  # global index of row 0
    rows: int


class LatentSource:
    """Posterior moments on disk, read lazily. Build it with `open_latents`.

    Items are numbered 0..len-1 in cache order (sorted source paths, skipped files left out). With
    `include_flips=True` on a cache that stores flips, items len/2..len-1 are the horizontal-flip
    copies: item N + i is the flip of item i (N = number of images).

    Attributes:
        latent_shape: shape of one latent, e.g. (4, 32, 32).
        normalization: `LatentNormalization` of the VAE (identity for a bare file without metadata).
        provenance: the VAE's provenance dict, or None for a bare file.
        deterministic: True when there is no `logvar` (moments are exact latents).
        manifest: the cache's manifest dict, or None for a bare file.
    """

    def __init__(
        self,
        path: Path,
        segments: list[_Segment],
        latent_shape: tuple[int, ...],
        normalization: LatentNormalization,
        provenance: dict[str, Any] | None,
        deterministic: bool,
        manifest: dict[str, Any] | None = None,
        has_flips: bool = False,
        include_flips: bool = False,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ):
        self.path = path
        self._segments = segments
        self._starts = np.array([s.start for s in segments], dtype=np.int64)
        self._length = sum(s.rows for s in segments)
        self.latent_shape = latent_shape
        self.normalization = normalization
        self.provenance = provenance
        self.deterministic = deterministic
        self.manifest = manifest
        self.has_flips = has_flips
        self.include_flips = include_flips
        self.buffer_bytes = int(buffer_bytes)

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return (
            f"LatentSource({str(self.path)!r}, items={len(self)}, latent_shape={self.latent_shape}, "
            f"deterministic={self.deterministic}, include_flips={self.include_flips})"
        )

    @property
    def item_bytes(self) -> int:
        """Bytes of one item's float32 moments (mean, plus logvar when present)."""
        return math.prod(self.latent_shape) * 4 * (1 if self.deterministic else 2)

    def _rows_per_read(self) -> int:
        return max(1, self.buffer_bytes // self.item_bytes)

    # -- random access ----------------------------------------------------------------------------
    def _read_rows(self, segment: _Segment, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows (sorted, unique, segment-local) of one segment -> float32 (len(rows), *shape) tensors.

        Nearby rows are read as one contiguous slice of the memory-mapped file (gaps up to 16 rows are
        read and dropped) so sequential access costs one read per run, not one per row.
        """
        breaks = np.nonzero(np.diff(rows) > 16)[0] + 1
        means, logvars = [], []
        with safe_open(str(segment.path), framework="pt") as f:
            mean_slice = f.get_slice(segment.mean_key)
            logvar_slice = f.get_slice(segment.logvar_key) if segment.logvar_key else None
            for run in np.split(rows, breaks):
                a, b = int(run[0]), int(run[-1]) + 1
                keep = torch.from_numpy(run - a)
                means.append(mean_slice[a:b].to(torch.float32)[keep])
                if logvar_slice is not None:
                    logvars.append(logvar_slice[a:b].to(torch.float32)[keep])
        mean = torch.cat(means) if means else torch.empty(0, *self.latent_shape)
        logvar = (torch.cat(logvars) if logvars else torch.empty(0, *self.latent_shape)) if segment.logvar_key else None
        return mean, logvar

    def _check_indices(self, indices: Any) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = int(idx[(idx < 0) | (idx >= len(self))][0])
            raise LatentPriorError(f"index {bad} is out of range for {self.path} ({len(self)} items); use 0..{len(self) - 1}.")
        return idx

    def read(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Moments of the given items, in the given order: (mean, logvar | None), each (n, *latent_shape)
        float32 in raw latent space. Reads only the rows asked for."""
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        idx = self._check_indices(indices)
        mean = torch.empty(len(idx), *self.latent_shape)
        logvar = None if self.deterministic else torch.empty(len(idx), *self.latent_shape)
        seg_of = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(seg_of):
            where = np.nonzero(seg_of == s)[0]
            segment = self._segments[s]
            rows = idx[where] - segment.start
            unique_rows = np.unique(rows)
            m, lv = self._read_rows(segment, unique_rows)
            pick = torch.from_numpy(np.searchsorted(unique_rows, rows))
            target = torch.from_numpy(where)
            mean[target] = m[pick]
            if logvar is not None:
                logvar[target] = lv[pick]
        return mean, logvar

    def sources(self, indices: Sequence[int] | None = None) -> list[str] | None:
        """Relative source path of each item (a flip copy reports its original's path), or None when the
        file does not record them (bare files without a `files` metadata entry)."""
        per_file: dict[Path, list[str] | None] = {}
        all_sources: list[str] = []
        for segment in self._segments:
            if segment.path not in per_file:
                with safe_open(str(segment.path), framework="pt") as f:
                    raw = (f.metadata() or {}).get("files")
                per_file[segment.path] = json.loads(raw) if raw else None
            names = per_file[segment.path]
            if names is None or len(names) != segment.rows:
                return None
            all_sources.extend(names)
        if indices is None:
            return all_sources
        return [all_sources[int(i)] for i in self._check_indices(indices)]

    # -- streaming --------------------------------------------------------------------------------
    def iter_moments(
        self,
        batch_size: int,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        with_indices: bool = False,
    ) -> Iterator[tuple]:
        """Stream one epoch as (mean, logvar | None) batches, float32 raw space, (b, *latent_shape).

        Memory stays near `buffer_bytes` (default 256 MiB) whatever the cache size: items are read one
        window at a time (a window is as many whole or partial shards as fit the budget, read as
        contiguous slices). With `shuffle`, the window order and the order inside each window are
        permuted by a generator seeded from (seed, epoch), so every rank computes the same global order;
        a small cache fits one window and is fully shuffled.

        Ranks: the global order is cut into global batches of batch_size * world_size items and rank r
        takes items [r*batch_size, (r+1)*batch_size) of each, so ranks see disjoint items and together
        see every item exactly once per epoch. The last, partial global batch is dropped with
        `drop_last`, otherwise split as evenly as possible across ranks (a rank may then get one batch
        fewer than another when fewer than world_size items remain; use drop_last=True for
        distributed training, where every rank must take the same number of steps).

        indices: restrict the epoch to these items (duplicates are ignored; unshuffled order is
            increasing index). with_indices: yield (indices, mean, logvar) with an int64 tensor of the
            items' indices first.
        """
        if int(batch_size) < 1:
            raise LatentPriorError(f"batch_size {batch_size}: must be at least 1.")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise LatentPriorError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size.")
        items = np.arange(len(self), dtype=np.int64) if indices is None else np.unique(self._check_indices(indices))
        global_batch = batch_size * world_size
        window_rows = max(global_batch, self._rows_per_read())
        rng = np.random.default_rng([int(seed), int(epoch)])

        # Blocks: pieces of one segment, at most window_rows rows, holding at least one wanted item.
        blocks = []  # (segment index, wanted global items)
        for s, segment in enumerate(self._segments):
            for a in range(0, segment.rows, window_rows):
                lo, hi = np.searchsorted(items, [segment.start + a, segment.start + min(a + window_rows, segment.rows)])
                if hi > lo:
                    blocks.append((s, items[lo:hi]))
        if shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        windows, current, filled = [], [], 0
        for block in blocks:
            if current and filled + len(block[1]) > window_rows:
                windows.append(current)
                current, filled = [], 0
            current.append(block)
            filled += len(block[1])
        if current:
            windows.append(current)

        def emit(ids: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor | None):
            out = (mean, logvar)
            return (ids, *out) if with_indices else out

        carry_ids = torch.empty(0, dtype=torch.int64)
        carry_mean = torch.empty(0, *self.latent_shape)
        carry_logvar = None if self.deterministic else torch.empty(0, *self.latent_shape)
        for window in windows:
            ids = [torch.from_numpy(b[1]) for b in window]
            parts = [self._read_rows(self._segments[s], wanted - self._segments[s].start) for s, wanted in window]
            w_ids = torch.cat([carry_ids, *ids])
            w_mean = torch.cat([carry_mean, *[p[0] for p in parts]])
            w_logvar = None if self.deterministic else torch.cat([carry_logvar, *[p[1] for p in parts]])
            if shuffle:
                # Only the new rows are permuted: the carried rows already have their place in the order.
                n_carry = len(carry_ids)
                perm = torch.cat([torch.arange(n_carry), n_carry + torch.from_numpy(rng.permutation(len(w_ids) - n_carry))])
                w_ids, w_mean = w_ids[perm], w_mean[perm]
                w_logvar = None if w_logvar is None else w_logvar[perm]
            full = len(w_ids) // global_batch * global_batch
            for share in rank_shares(np.arange(full), batch_size, rank, world_size, drop_last=True):
                sl = slice(int(share[0]), int(share[-1]) + 1)  # a share is a run of consecutive rows
                yield emit(w_ids[sl], w_mean[sl], None if w_logvar is None else w_logvar[sl])
            carry_ids, carry_mean = w_ids[full:], w_mean[full:]
            carry_logvar = None if w_logvar is None else w_logvar[full:]
        for share in rank_shares(np.arange(len(carry_ids)), batch_size, rank, world_size, drop_last):
            sl = slice(int(share[0]), int(share[-1]) + 1)
            yield emit(carry_ids[sl], carry_mean[sl], None if carry_logvar is None else carry_logvar[sl])

    # -- validation -------------------------------------------------------------------------------
    def check_finite(self) -> None:
        """Scan every stored value, a bounded number of rows at a time; raise LatentPriorError with the
        count of NaN/inf values and the first item holding one."""
        step = self._rows_per_read()
        for segment in self._segments:
            with safe_open(str(segment.path), framework="pt") as f:
                for key in filter(None, (segment.mean_key, segment.logvar_key)):
                    tensor_slice = f.get_slice(key)
                    count, first = 0, None
                    for a in range(0, segment.rows, step):
                        block = tensor_slice[a : min(a + step, segment.rows)]
                        bad = ~torch.isfinite(block.reshape(len(block), -1))
                        n_bad = int(bad.sum())
                        if n_bad:
                            count += n_bad
                            if first is None:
                                first = segment.start + a + int(torch.nonzero(bad.any(dim=1))[0, 0])
                    if count:
                        raise LatentPriorError(
                            f"{segment.path}: {count} non-finite values (NaN or inf) in `{key}`, first at item "
                            f"{first}; re-encode those images (in fp32 or bf16 if they came from an fp16 encode) or remove them."
                        )


# ----------------------------------------------------------------------------------------------
# posterior moments held in memory


class EncodedLatents:
    """Posterior moments held in memory, with the VAE's normalization and provenance: a `LatentSource`
    that `fit` and `latent_prior.train.fit` accept like a cache folder.

    mean:   (N, *latent_shape) float32, raw latent space (what the encoder emits)
    logvar: (N, *latent_shape) float32, or None for a deterministic encoder (then `deterministic`)
    normalization: the VAE's `LatentNormalization` (identity when None)
    provenance: the VAE's `VAEProvenance.to_dict()`, or None when unknown
    manifest: facts about the images ({"count", "image_channels", "image_size", "resolution" when square})

    `save(path)` writes one .safetensors file (`mean`, `logvar`, normalization and provenance in its
    metadata) that `latent_prior.open_latents` and `latent-prior fit --latents` read back.
    """

    def __init__(
        self,
        mean: torch.Tensor,
        logvar: torch.Tensor | None = None,
        *,
        normalization: LatentNormalization | None = None,
        provenance: dict[str, Any] | None = None,
        manifest: dict[str, Any] | None = None,
        description: str | None = None,
    ) -> None:
        if not isinstance(mean, torch.Tensor) or mean.dim() < 2 or mean.shape[0] < 1:
            got = tuple(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__
            raise LatentPriorError(f"EncodedLatents: mean has shape {got}; pass posterior means as (N, *latent_shape).")
        if logvar is not None and tuple(logvar.shape) != tuple(mean.shape):
            raise LatentPriorError(f"EncodedLatents: logvar {tuple(logvar.shape)} and mean {tuple(mean.shape)} must have the same shape.")
        self.mean = mean.detach().to("cpu", torch.float32).contiguous()
        self.logvar = None if logvar is None else logvar.detach().to("cpu", torch.float32).contiguous()
        for key, values in (("mean", self.mean), ("logvar", self.logvar)):
            bad = None if values is None else ~torch.isfinite(values.reshape(len(values), -1))
            if bad is not None and bad.any():
                first = int(torch.nonzero(bad.any(dim=1))[0, 0])
                raise LatentPriorError(
                    f"{description or 'EncodedLatents'}: {int(bad.sum())} non-finite values (NaN or inf) in "
                    f"`{key}`, first at item {first}; drop or fix those items."
                )
        self.latent_shape: tuple[int, ...] = tuple(self.mean.shape[1:])
        self.normalization = normalization or LatentNormalization()
        self.provenance = provenance
        self.deterministic = self.logvar is None
        self.manifest = dict(manifest or {})
        self.path = description or f"<{len(self.mean)} latents {self.latent_shape} in memory>"

    def __len__(self) -> int:
        return len(self.mean)

    def __repr__(self) -> str:
        source = (self.provenance or {}).get("source")
        return (
            f"EncodedLatents(items={len(self)}, latent_shape={self.latent_shape}, deterministic={self.deterministic}"
            + (f", vae={source!r}" if source else "")
            + ")"
        )

    def read(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Items `indices` -> (mean, logvar | None), each (len(indices), *latent_shape) float32."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise LatentPriorError(f"EncodedLatents.read: indices must lie in [0, {len(self)}); got {int(idx.min())}..{int(idx.max())}.")
        return self.mean[idx], None if self.logvar is None else self.logvar[idx]

    def iter_moments(
        self,
        batch_size: int,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        with_indices: bool = False,
    ) -> Iterator[tuple]:
        """One epoch of (mean, logvar | None) batches, with the semantics of `LatentSource.iter_moments`:
        the order is a permutation seeded by (seed, epoch), cut into global batches of
        batch_size * world_size of which rank r takes the r-th slice; the last partial global batch is
        dropped with `drop_last`, otherwise split across ranks. with_indices: yield (indices, mean, logvar)."""
        items = np.arange(len(self)) if indices is None else np.unique(np.asarray(indices, dtype=np.int64))
        if shuffle:
            items = items[np.random.default_rng([int(seed), int(epoch)]).permutation(len(items))]
        for share in rank_shares(items, batch_size, rank, world_size, drop_last):
            mean, logvar = self.read(share)
            yield (torch.from_numpy(share.copy()), mean, logvar) if with_indices else (mean, logvar)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `mean` (and `logvar`) to one .safetensors file, with the normalization and provenance as
        JSON metadata, so `open_latents(path)` / `latent-prior fit --latents path` see the same latents."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise LatentPriorError(f"EncodedLatents.save({str(path)!r}): the file name must end in .safetensors.")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean} if self.logvar is None else {"mean": self.mean, "logvar": self.logvar}
        metadata = {"normalization": json.dumps(self.normalization.to_dict()), "manifest": json.dumps(self.manifest)}
        if self.provenance:
            metadata["provenance"] = json.dumps(self.provenance)
        return atomic_save_safetensors(tensors, path, metadata)


def rank_shares(items: np.ndarray, batch_size: int, rank: int, world_size: int, drop_last: bool) -> list[np.ndarray]:
    """Rank `rank`'s batches of one epoch in the order `items`: global batches of batch_size * world_size items,
    of which the rank takes its slice; the last partial global batch is dropped with `drop_last`, otherwise split
    as evenly as possible across the ranks. `EncodedLatents` cuts its whole epoch with it, `LatentSource` each
    streamed window and the rows carried past the last one."""
    global_batch = batch_size * world_size
    full = len(items) // global_batch * global_batch
    shares = [items[g + rank * batch_size : g + (rank + 1) * batch_size] for g in range(0, full, global_batch)]
    if full < len(items) and not drop_last:
        share = np.array_split(items[full:], world_size)[rank]
        if len(share):
            shares.append(share)
    return shares


def data_dims(source: Any) -> int | None:
    """Pixels × channels of the images behind a source's latents, when its manifest records them (the D_x of
    bits per data dim); None otherwise."""
    manifest = getattr(source, "manifest", None) or {}
    if manifest.get("resolution") and manifest.get("image_channels"):
        return int(manifest["image_channels"]) * int(manifest["resolution"]) ** 2
    return None


def _open_bare_file(path: Path, include_flips: bool, buffer_bytes: int) -> LatentSource:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - a broken file becomes one clear sentence
        raise LatentPriorError(f"{path}: not a readable .safetensors file ({exc}); check the path or re-create the file.") from None
    if "mean" not in keys and "latents" in keys and meta.get("space") == "raw" and "latent_shape" in meta:
        # A file written by `latent-prior sample` (its metadata says so): exact raw-space latents, read
        # like deterministic means. A bare `latents` tensor without that metadata is still refused.
        keys = ["mean"]
        shapes, dtypes = {"mean": shapes["latents"]}, {"mean": dtypes["latents"]}
        mean_key = "latents"
    else:
        mean_key = "mean"
    if "mean" not in keys:
        raise LatentPriorError(
            f"{path}: no `mean` tensor (it holds {', '.join(sorted(keys)) or 'no tensors'}); save the latents as "
            "`mean` (N, C, H, W) float32, with an optional `logvar` of the same shape."
        )
    for key in keys:
        if key in ("mean", "logvar", "mean_flip", "logvar_flip") and dtypes[key] not in _DTYPES:
            raise LatentPriorError(f"{path}: `{key}` has dtype {dtypes[key]}; store latents as float32.")
    shape = shapes["mean"]
    if len(shape) < 2 or shape[0] < 1:
        raise LatentPriorError(f"{path}: `mean` has shape {shape}; expected (N, *latent_shape) with N >= 1.")
    for key in ("logvar", "mean_flip", "logvar_flip"):
        if key in shapes and shapes[key] != shape:
            raise LatentPriorError(f"{path}: `{key}` has shape {shapes[key]} but `mean` has {shape}; they must match.")
    deterministic = "logvar" not in keys
    has_flips = "mean_flip" in keys and (deterministic or "logvar_flip" in keys)
    if include_flips and not has_flips:
        raise LatentPriorError(f"{path}: include_flips=True but the file has no `mean_flip`; encode with --flip or drop include_flips.")

    def meta_json(key: str) -> Any:
        try:
            return json.loads(meta[key]) if key in meta else None
        except ValueError:
            raise LatentPriorError(f"{path}: metadata `{key}` is not valid JSON; fix or remove it.") from None

    norm = LatentNormalization.from_recorded(meta_json("normalization") or None, f"{path} (metadata)", channels=shape[1])
    provenance = meta_json("provenance")
    if provenance is not None and not isinstance(provenance, dict):
        raise LatentPriorError(f"{path}: metadata `provenance` is {provenance!r}, not a JSON object; fix or remove it.")
    segments = [_Segment(path, mean_key, None if deterministic else "logvar", 0, shape[0])]
    if include_flips:
        segments.append(_Segment(path, "mean_flip", None if deterministic else "logvar_flip", shape[0], shape[0]))
    return LatentSource(
        path,
        segments,
        tuple(shape[1:]),
        norm,
        provenance,
        deterministic,
        None,
        has_flips,
        include_flips,
        buffer_bytes,
    )


_REPAIR = "rerun the same `latent-prior encode` command to repair it (or delete the cache folder and encode again)"


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the complete cache in folder `path`, checked for what a reader relies on: its format
    version, its own checksum (an edit by hand), the types of its fields, and a shard list that is exactly
    shard-00000 … of the plan, each a plain file inside `path`. Raises LatentPriorError naming the file."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        if (path / PLAN).exists():
            raise LatentPriorError(
                f"cache {path} is incomplete (no {MANIFEST} yet: the encode was interrupted or is still running); "
                "rerun `latent-prior encode` with the same arguments to resume it."
            )
        raise LatentPriorError(
            f"{path}: not a latent cache (no {MANIFEST}); point at a folder made by `latent-prior encode` or a .safetensors file."
        )
    manifest = _read_json(manifest_path, "cache manifest")
    version = manifest.get("format_version")
    if not _is_int(version) or version < 1:
        raise LatentPriorError(
            f"{manifest_path}: missing or unknown format_version {version!r}; it was not written by `latent-prior encode`."
        )
    if version > FORMAT_VERSION:
        raise LatentPriorError(
            f"{manifest_path}: cache format {version} is newer than this latent-prior reads ({FORMAT_VERSION}); "
            "upgrade latent-prior (pip install -U latent-prior)."
        )
    # Caches written before the checksum existed have none; everything below is still checked for them.
    if "checksum" in manifest and manifest["checksum"] != manifest_checksum(manifest):
        raise LatentPriorError(
            f"{manifest_path}: was edited after `latent-prior encode` wrote it (its checksum does not match); {_REPAIR}."
        )

    def malformed(what: str) -> LatentPriorError:
        return LatentPriorError(f"{manifest_path}: malformed manifest ({what}); {_REPAIR}.")

    shape = manifest.get("latent_shape")
    if not isinstance(shape, list) or not shape or not all(_is_int(s) and s >= 1 for s in shape):
        raise malformed(f"latent_shape {shape!r} is not a list of positive integers")
    for key in ("deterministic", "flip"):
        if not isinstance(manifest.get(key, False), bool):
            raise malformed(f"{key} {manifest.get(key)!r} is not true or false")
    for key, least in (("count", 0), ("num_files", 1), ("shard_size", 1)):
        if not _is_int(manifest.get(key)) or manifest[key] < least:
            raise malformed(f"{key} {manifest.get(key)!r} is not an integer of at least {least}")
    if manifest["count"] == 0:
        raise LatentPriorError(f"cache {path} holds no latents (every image was skipped); check the skipped list in {manifest_path}.")
    shards, skipped = manifest.get("shards"), manifest.get("skipped", [])
    if not isinstance(shards, list) or not all(
        isinstance(e, dict) and isinstance(e.get("file"), str) and _is_int(e.get("count")) and e["count"] >= 0 for e in shards
    ):
        raise malformed('shards is not a list of {"file", "count"} entries')
    if not isinstance(skipped, list):
        raise malformed("skipped is not a list")
    # The plan fixes the shard list: chunk k of the sorted files is shard-0000k, once each, in order. So a
    # duplicated, dropped or renamed entry, or a path that leaves the folder, is a tampered manifest.
    expected = [shard_name(k) for k in range(math.ceil(manifest["num_files"] / manifest["shard_size"]))]
    listed = [e["file"] for e in shards]
    if listed != expected:
        odd = next((name for name in listed if name not in expected or listed.count(name) > 1), None)
        what = (
            f"it lists {odd!r}, which is not one of this cache's own shard files"
            if odd is not None and odd not in expected
            else f"it lists {odd} twice"
            if odd is not None
            else f"it lists {len(listed)} shards instead of {expected[0]} … {expected[-1]}"
        )
        raise malformed(what)
    if sum(e["count"] for e in shards) != manifest["count"] or manifest["count"] + len(skipped) != manifest["num_files"]:
        raise malformed(f"count {manifest['count']} does not add up with the shards' counts and the skipped files")
    LatentNormalization.from_recorded(manifest.get("normalization"), str(manifest_path), channels=shape[0])
    return manifest


def _shard_header(shard: Path) -> tuple[set[str], dict[str, tuple[int, ...]], dict[str, str]]:
    try:
        with safe_open(str(shard), framework="pt") as f:
            keys = set(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            meta = dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - a truncated or garbled shard becomes one clear sentence
        raise LatentPriorError(f"{shard}: the shard is damaged ({type(exc).__name__}: {exc}); {_REPAIR}.") from None
    return keys, shapes, meta


def check_shards(path: Path, manifest: dict[str, Any], *, verify: bool = False) -> None:
    """Cross-check each shard listed by a `read_manifest` manifest against the shard's own header: it is
    a plain file inside `path` (no link out of the folder), readable, written by this cache's plan
    (identity, chunk), with as many rows as the manifest says and exactly the tensors its
    `deterministic` / `flip` flags imply, of the recorded shape. verify: also compare each shard's sha256
    with the one recorded at encode time (reads every byte). Raises LatentPriorError naming the shard."""
    root = path.resolve()
    latent_shape = tuple(manifest["latent_shape"])
    wanted = {"mean"} | (set() if manifest.get("deterministic") else {"logvar"})
    if manifest.get("flip"):
        wanted |= {k + "_flip" for k in wanted}
    for chunk, entry in enumerate(manifest["shards"]):
        shard = path / entry["file"]
        if not shard.is_file():
            raise LatentPriorError(
                f"cache {path} is missing {entry['file']}, listed in its manifest; rerun `latent-prior encode` with "
                "the same arguments to re-create it."
            )
        if shard.is_symlink() or shard.resolve().parent != root:
            # encode never writes links: one would let a cache read (and train on) a file outside its folder.
            raise LatentPriorError(
                f"{shard}: is a link to {shard.resolve()}, but a cache reads only the shard files in its own folder; {_REPAIR}."
            )
        keys, shapes, meta = _shard_header(shard)

        def mismatch(what: str) -> LatentPriorError:
            return LatentPriorError(f"{shard}: {what}, which does not match {path / MANIFEST}; {_REPAIR}.")

        if meta.get("identity") != manifest.get("identity_hash") or meta.get("chunk") != str(chunk):
            raise mismatch(f"the shard was written for chunk {meta.get('chunk')} of plan {meta.get('identity')}")
        try:
            rows = len(json.loads(meta.get("files", "null")))
        except (ValueError, TypeError):
            raise mismatch("its metadata lists no source files") from None
        if rows != entry["count"]:
            raise mismatch(f"it holds {rows} latents where the manifest says {entry['count']}")
        if keys != wanted:
            raise mismatch(f"it holds the tensors {', '.join(sorted(keys))} where the manifest implies {', '.join(sorted(wanted))}")
        for key in sorted(keys):
            if shapes[key] != (rows, *latent_shape):
                raise mismatch(f"`{key}` has shape {shapes[key]} where the manifest implies {(rows, *latent_shape)}")
        if verify and "sha256" in entry and file_sha256(shard) != entry["sha256"]:
            raise LatentPriorError(
                f"{shard}: its bytes changed since `latent-prior encode` wrote it (sha256 does not match the manifest); {_REPAIR}."
            )


def _open_cache_dir(path: Path, include_flips: bool, buffer_bytes: int, verify: bool) -> LatentSource:
    manifest = read_manifest(path)
    check_shards(path, manifest, verify=verify)
    latent_shape = tuple(manifest["latent_shape"])
    deterministic = bool(manifest["deterministic"])
    has_flips = bool(manifest.get("flip", False))
    if include_flips and not has_flips:
        raise LatentPriorError(f"cache {path} has no flip copies; encode with --flip or drop include_flips.")
    keys = [("mean", None if deterministic else "logvar")]
    if include_flips:
        keys.append(("mean_flip", None if deterministic else "logvar_flip"))
    segments, start = [], 0
    for mean_key, logvar_key in keys:
        for entry in manifest["shards"]:
            if entry["count"]:
                segments.append(_Segment(path / entry["file"], mean_key, logvar_key, start, entry["count"]))
                start += entry["count"]
    return LatentSource(
        path,
        segments,
        latent_shape,
        LatentNormalization.from_recorded(manifest.get("normalization"), str(path / MANIFEST), channels=latent_shape[0]),
        manifest.get("vae"),
        deterministic,
        manifest,
        has_flips,
        include_flips,
        buffer_bytes,
    )


def open_latents(
    path: str | os.PathLike,
    *,
    include_flips: bool = False,
    check_finite: bool = True,
    verify: bool | None = None,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> LatentSource:
    """Open a cache directory (from `latent-prior encode`) or one `.safetensors` file holding `mean`
    (N, *latent_shape) and optional `logvar` / `mean_flip` / `logvar_flip` of the same shape, or a file
    written by `latent-prior sample` (tensor `latents`, read as exact latents: `deterministic`, with the
    normalization and provenance recorded in its metadata).

    include_flips: expose the stored horizontal-flip copies as extra items N..2N-1.
    check_finite: scan all values once for NaN/inf (bounded memory); turn off for huge caches you trust.
    verify: compare each shard of a cache folder with the sha256 its manifest recorded (reads every byte
        once, as the NaN scan does); by default on exactly when `check_finite` is.
    buffer_bytes: memory budget for streaming windows and scans.
    Raises LatentPriorError for a missing path, an incomplete, damaged or edited cache, a newer format,
    missing `mean`, mismatched shapes or non-finite values.
    """
    path = Path(path)
    if not path.exists():
        raise LatentPriorError(f"{path}: no such cache folder or .safetensors file; check the path or run `latent-prior encode` first.")
    if path.is_dir():
        source = _open_cache_dir(path, include_flips, buffer_bytes, check_finite if verify is None else verify)
    else:
        source = _open_bare_file(path, include_flips, buffer_bytes)
    if check_finite:
        source.check_finite()
    return source
