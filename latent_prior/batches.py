"""The items a fit trains and validates on, and the stream of training batches each rank reads.

train, val = validation_split(len(source), 0.1, seed)      # index arrays, the same on every rank
stream = BatchStream(source, train, 256, seed=0, rank=0, world_size=1, num_workers=0)
mean, logvar = stream.next()                                # (256, *latent_shape) each; logvar None if exact
"""

from __future__ import annotations

import queue
import threading
from itertools import islice
from typing import Any, Iterator

import numpy as np
import torch


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index-based train / validation split: a seeded permutation, the first ⌊n·fraction⌋ held out."""
    n_val = int(n * fraction)
    perm = np.random.default_rng([int(seed), 0x5EED]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def recorded_split(training_info: dict[str, Any] | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of the n latents a prior was fitted on, as its config.json recorded them
    (`training.validation_items`); a prior of latent-prior 0.1.0, which did not record them, gets
    `validation_split` rebuilt from its recorded validation_fraction and seed."""
    info = training_info or {}
    items = info.get("validation_items")
    if isinstance(items, list) and all(isinstance(i, int) and 0 <= i < n for i in items):
        val = np.array(sorted(set(items)), dtype=np.int64)
        return np.setdiff1d(np.arange(n), val), val
    config = info.get("config") or {}
    return validation_split(n, float(config.get("validation_fraction", 0.0)), int(config.get("seed", 0)))


def subset(indices: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """A fixed random subset of at most `limit` of `indices`, sorted."""
    if len(indices) <= limit:
        return indices
    return np.sort(np.random.default_rng([int(seed), 0xE7A1]).choice(indices, size=limit, replace=False))


class Prefetcher:
    """Runs an iterator in a background thread, `depth` items ahead (for --num-workers > 0)."""

    _DONE = object()

    def __init__(self, iterator: Iterator, depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterator,), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterator: Iterator) -> None:
        try:
            for item in iterator:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            self._put(exc)

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()


class BatchStream:
    """Endless stream of this rank's (mean, logvar) training batches, epoch after epoch.

    Every epoch has exactly `batches_per_epoch` batches on every rank (so all ranks step together).
    The position (epoch, batch_in_epoch) is saved in checkpoints; reopening at a position replays
    the epoch's deterministic order and skips the batches already used.
    """

    def __init__(
        self,
        source: Any,
        indices: np.ndarray,
        batch_size: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        epoch: int = 0,
        batch_in_epoch: int = 0,
    ) -> None:
        self.source, self.indices, self.batch_size = source, indices, batch_size
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self.batches_per_epoch = len(indices) // (batch_size * world_size)
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self._it: Iterator | None = None

    def _open(self) -> None:
        self.close()
        it: Iterator = islice(
            self.source.iter_moments(
                self.batch_size,
                indices=self.indices,
                shuffle=True,
                seed=self.seed,
                epoch=self.epoch,
                rank=self.rank,
                world_size=self.world_size,
                drop_last=True,
            ),
            self.batches_per_epoch,
        )
        if self.num_workers > 0:
            it = Prefetcher(it, 2 * self.num_workers)
        for _ in range(self.batch_in_epoch):
            next(it)
        self._it = it

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._open()
        elif self._it is None:
            self._open()
        batch = next(self._it)
        self.batch_in_epoch += 1
        return batch

    def close(self) -> None:
        if isinstance(self._it, Prefetcher):
            self._it.close()
        self._it = None
