"""Rank 0's progress through a run: a tqdm bar in a terminal; elsewhere (a log file, CI),
a line every tenth of the run for the trainer to log."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """The bar of a run of ``steps`` steps that starts at ``start``."""

    def __init__(self, steps: int, start: int, tokens_per_step: int) -> None:
        # tqdm's default lock is a multiprocessing semaphore, which a rank leaving through
        # os._exit never releases: the resource tracker then warns at the end of every run
        tqdm.set_lock(threading.RLock())
        self.bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True,
                        disable=None, desc="train")
        self.steps, self.tokens_per_step = steps, tokens_per_step

    @contextlib.contextmanager
    def above(self) -> Iterator[None]:
        """Lines logged inside go above the bar instead of through it."""
        self.bar.clear()
        yield
        self.bar.refresh()

    def update(self, step: int, loss: float, speed: float) -> str | None:
        """Advance the bar to ``step``; without a terminal, the line due at this step, if any."""
        if not self.bar.disable:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:.0f}", refresh=False)
            self.bar.update(1)
            return None
        every = max(1, self.steps // 10)
        if step % every or step >= self.steps:
            return None
        left = (self.steps - step) * self.tokens_per_step / max(speed, 1e-9)
        return f"step {step}/{self.steps}  loss {loss:.4f}  {speed:.0f} tok/s  eta {left:.0f}s"

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()
