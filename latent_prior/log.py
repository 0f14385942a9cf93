"""The package's messages: one `logging` logger, shown on the console and copied into a run's log.txt.

Every status line of the package goes through `logger` ("latent_prior"): progress notes and warnings to
stderr, and a command's result line (`log_result`) to stdout, where scripts read it. The console handler
writes through `tqdm.write`, as tqdm's `logging_redirect_tqdm` does, so a message never tears a progress
bar; it is installed once, on import, so that holds in the Python API and in notebooks too, and it looks
up sys.stdout / sys.stderr when it writes, so a notebook's or pytest's redirected streams receive it.

    logging.getLogger("latent_prior").setLevel(logging.WARNING)   # keep warnings, drop the progress notes

`log_file(path)` appends the same messages, and Python warnings, to a file for the length of a `with`
block; nothing of sys.stdout or sys.stderr is swapped, so output printed by anything else is left alone.
"""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger("latent_prior")


class _Console(logging.Handler):
    """Records to the current sys.stderr (sys.stdout for `result` records), through tqdm.write."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            stream = sys.stdout if getattr(record, "result", False) else sys.stderr
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: a failing handler reports, never raises
            self.handleError(record)


def _install_console() -> None:
    if not any(isinstance(h, _Console) for h in logger.handlers):
        logger.addHandler(_Console())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False  # the console handler shows each message once, whatever the root logger has


_install_console()


def log_result(message: str) -> None:
    """The line a command ends with (what it wrote, where): INFO, on stdout."""
    logger.info(message, extra={"result": True})


@contextmanager
def log_file(path: Path | None) -> Iterator[logging.Handler | None]:
    """Append every message of the package, and Python warnings, to `path` (UTF-8) inside the block; yields the
    file's handler (None for path None, which does nothing) so that a caller can record a line in the file alone."""
    if path is None:
        yield None
        return
    # backslashreplace: a file name that is not valid UTF-8 (in a "skipped" note) must not end the run.
    handler = logging.FileHandler(path, mode="a", encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(logging.Formatter("%(message)s"))
    warnings_logger = logging.getLogger("py.warnings")
    console = next(h for h in logger.handlers if isinstance(h, _Console))
    added_console = console not in warnings_logger.handlers
    logger.addHandler(handler)
    warnings_logger.addHandler(handler)
    if added_console:
        warnings_logger.addHandler(console)
    captured_already = getattr(warnings.showwarning, "__module__", None) == "logging"
    logging.captureWarnings(True)
    try:
        yield handler
    finally:
        logging.captureWarnings(captured_already)
        warnings_logger.removeHandler(handler)
        if added_console:
            warnings_logger.removeHandler(console)
        logger.removeHandler(handler)
        handler.close()


def to_file_only(handler: logging.Handler | None, message: str) -> None:
    """Write `message` to a `log_file` handler and nowhere else (a line the console shows in another form)."""
    if handler is not None:
        handler.handle(logging.makeLogRecord({"name": logger.name, "levelno": logging.INFO, "levelname": "INFO", "msg": message}))
