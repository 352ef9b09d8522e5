"""Turning packed rows and sampled indices into torch input/target tensors."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["get_batch"]


def get_batch(rows: np.ndarray, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each int64 of shape (batch, seq_len); targets are inputs shifted by 1."""
    block = torch.from_numpy(np.asarray(rows[indices], dtype=np.int64))  # (B, seq_len + 1)
    return block[:, :-1].contiguous(), block[:, 1:].contiguous()
