"""Predictions of a fine-tuned classifier: forward-only through the pipeline's executor.

``run_predict`` (parent) reads the checkpoint, its task (labels, truncation) and its
tokenizer, encodes the texts exactly as fine-tuning did, and launches ``predict_worker``
on ``pp`` ranks. Each rank builds its stages of the same ``Pipeline`` as training and
calls ``Pipeline.predict_step`` on fixed-size chunks (static shapes: the last chunk is
filled with copies of its first row, whose outputs are dropped); the class
probabilities come back to every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, ModelConfig, ParallelConfig
from ..data.task_encode import TaskRows, encode_records
from ..data.tasks import Record, check_labels
from ..data.tokenizer import load_tokenizer
from ..parallel.layout import Layout, resolve_layout
from ..parallel.mesh import Mesh
from ..runtime.launch import launch
from ..runtime.pipeline import Pipeline
from .checkpoint import read_meta, resolve_checkpoint
from .checkpoint_files import check_checkpoint, checkpoint_tokenizer
from .export import model_config_from, param_shapes
from .ranks import rank_device, user_errors_of_ranks
from .state import load_params

__all__ = ["CHUNK_PER_STAGE", "predict_worker", "run_predict"]

CHUNK_PER_STAGE = 8
"""Texts per microbatch: a chunk is pp microbatches of this many."""


def run_predict(checkpoint: Path, records: list[Record], *, pp: int = 1,
                truncate: bool | None = None, timeout_s: float = 300.0) -> list[dict[str, Any]]:
    """One row per record: index, text, label, probabilities (by label), in input order."""
    ckpt = resolve_checkpoint(Path(checkpoint))
    meta = read_meta(ckpt)
    task = meta.get("task")
    if not isinstance(task, dict) or task.get("kind") != "classification":
        raise ConfigError(f"checkpoint {ckpt} is no fine-tuned classifier (its meta names no "
                          "classification task); fine-tune one with `conveyor finetune`, or "
                          "continue text with `conveyor generate`")
    if task.get("text_to_text"):
        raise ConfigError(f"checkpoint {ckpt} classifies text-to-text (an encoder-decoder writes "
                          "the label's name): run `conveyor generate --checkpoint ... "
                          "--prompts-file texts.txt`; its outputs are the labels")
    model = model_config_from(meta.get("model"), f"checkpoint {ckpt}/meta.json ('model')")
    check_checkpoint(ckpt, param_shapes(model))
    labels = tuple(task["labels"])
    check_labels(labels, [r for r in records if r.output], "--input")
    tok_path = checkpoint_tokenizer(ckpt, meta)
    if tok_path is None or not tok_path.is_file():
        raise ConfigError(f"checkpoint {ckpt} has no tokenizer; predict from the run directory "
                          "that holds its tokenizer.json")
    rows = encode_records([Record(r.text, labels[0]) for r in records], model,
                          load_tokenizer(tok_path), kind="classification", labels=labels,
                          truncate=bool(task.get("truncate")) if truncate is None else truncate)
    par = ParallelConfig(pp=pp, microbatches=pp, schedule="gpipe")
    layout = resolve_layout(model, par, batch_size=pp * CHUNK_PER_STAGE)
    with user_errors_of_ranks():
        results = launch(predict_worker, pp, model, par, layout, ckpt, rows, timeout_s,
                         timeout_s=timeout_s)
    probs = results[min(results)]
    return [{"index": i, "text": r.text, "label": labels[int(p.argmax())],
             "probabilities": {lb: round(float(x), 6) for lb, x in zip(labels, p, strict=True)}}
            for i, (r, p) in enumerate(zip(records, probs, strict=True))]


def predict_worker(model: ModelConfig, par: ParallelConfig, layout: Layout, ckpt: Path, rows: TaskRows,
                   timeout_s: float) -> torch.Tensor:
    """Class probabilities (N, labels) of every row, on every rank."""
    device = rank_device()
    mesh = Mesh.build(par.pp, 1, 1, device_type=device.type)
    pipe = Pipeline(model, par, mesh, layout=layout, device=device, timeout_s=timeout_s)
    load_params(pipe, ckpt)
    n, chunk = len(rows), par.pp * CHUNK_PER_STAGE
    out = []
    for start in range(0, n, chunk):
        idx = np.arange(start, start + chunk)
        idx[idx >= n] = start  # static shapes: fill with the chunk's first row
        x, _ = rows.batch(idx)
        probs = pipe.predict_step(x, reduce=lambda t: t.float().softmax(-1))
        if probs.dim() == 3:  # a decoder's per-position logits: each row's last real token
            probs = probs[torch.arange(chunk), torch.from_numpy(rows.last[idx])]
        out.append(probs[: min(chunk, n - start)])
    return torch.cat(out)
