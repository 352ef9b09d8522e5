"""Deterministic shuffled batches of row indices that resume exactly mid-epoch.

Epoch ``e`` visits the rows in ``default_rng([seed, e]).permutation(num_rows)`` order,
cut into ``num_rows // batch_size`` batches (the tail is dropped), so the batch at any
(epoch, position) is a pure function of the seed: resuming needs only those two numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from conveyor.data.errors import DataError

__all__ = ["Sampler"]


class Sampler:
    """An endless stream of index batches over shuffled epochs; numpy only."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, *, seq_len: int | None = None):
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be positive; pass --batch-size >= 1")
        if seed < 0:
            raise DataError(f"seed={seed} must be non-negative; pass --seed >= 0")
        if num_rows < batch_size:
            tokens = f" of {seq_len + 1} tokens" if seq_len is not None else ""
            raise DataError(
                f"corpus too small: {num_rows} training sequences{tokens} < batch size "
                f"{batch_size}; add data, lower --batch-size or --seq-len"
            )
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # batches already taken from the current epoch
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    @property
    def batches_per_epoch(self) -> int:
        """Full batches in one epoch (the last num_rows % batch_size rows are dropped)."""
        return self.num_rows // self.batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        """Row order of ``epoch``."""
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        """The next batch of ``batch_size`` row indices (int64)."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        start = self.position * self.batch_size
        batch = self.permutation(self.epoch)[start : start + self.batch_size].copy()
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands: epoch and batches taken from it."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a ``state_dict``; the batches that follow equal an unbroken run's."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"sampler state {dict(state)!r} needs integer 'epoch' and 'position'; "
                            "pass a dict saved by Sampler.state_dict") from None
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise DataError(
                f"sampler state epoch={epoch} position={position} is out of range for "
                f"{self.batches_per_epoch} batches per epoch; resume with the same data, "
                "batch size and seq len"
            )
        self.epoch, self.position = epoch, position
