"""Atomic file writes: a run killed mid-write leaves the old file or the new one whole, never half of one.

Every writer fills a hidden temporary beside its target (`.NAME.tmp-PID`: two processes never share one),
flushes it to disk, then renames it over the target with `os.replace`, which is atomic on POSIX and Windows.
The one implementation behind every JSON, text, CSV, PNG and safetensors file the package writes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_save_safetensors", "is_temporary_of", "temporary_path"]

_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp(-\d+)?")  # without a PID: written before 0.x


def temporary_path(path: Path) -> Path:
    """The hidden temporary that `atomic_write` fills before renaming it to `path`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temporary_of(name: str, target: re.Pattern[str]) -> bool:
    """Whether file `name` is a leftover temporary (of a killed writer) of a target whose name matches `target`."""
    match = _TEMPORARY.fullmatch(name)
    return bool(match and target.fullmatch(match["name"]))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` to fill a temporary file, fsync it and move it to `path`; on failure the target is
    untouched and the temporary removed. Returns `path`."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, *, default: Callable[[Any], Any] | None = str) -> Path:
    """Write JSON (indented, a trailing newline) atomically; `default` turns what JSON cannot hold into text."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=default) + "\n")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file` atomically, from CPU copies; the file gets the umask's usual permissions."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates files 0600

    return atomic_write(path, write)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
