"""Where rank 0 sends a run's rows: every row to metrics.jsonl and, with --tensorboard,
the known keys as TensorBoard scalars (``run_dir/tensorboard``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError
from .metrics import METRICS_FILE, MetricsWriter

__all__ = ["MetricsSink", "tensorboard_available"]

_TB_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
            "tokens_per_s": "train/tokens_per_s", "val_loss": "val/loss", "val_ppl": "val/ppl"}
"""metrics.jsonl keys -> TensorBoard scalar tags."""


def tensorboard_available() -> None:
    """ConfigError (naming the fix) unless the tensorboard package is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package; pip install "
                          "'conveyor[tensorboard]' (or tensorboard), or drop --tensorboard") from None


def _tensorboard(run_dir: Path) -> Any:
    """A SummaryWriter into ``run_dir/tensorboard`` (ConfigError if tensorboard is missing)."""
    tensorboard_available()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


class MetricsSink:
    """metrics.jsonl of ``run_dir``, and its TensorBoard event files when asked for."""

    def __init__(self, run_dir: Path, *, tensorboard: bool) -> None:
        self.writer = MetricsWriter(run_dir / METRICS_FILE)
        self.tb = _tensorboard(run_dir) if tensorboard else None

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` to metrics.jsonl; its known keys also as scalars at its step."""
        self.writer.write(row)
        if self.tb is not None:
            for key, value in row.items():
                if key in _TB_TAGS:
                    self.tb.add_scalar(_TB_TAGS[key], value, row["step"])

    def close(self) -> None:
        """Close the file and flush the event files."""
        self.writer.close()
        if self.tb is not None:
            self.tb.close()
