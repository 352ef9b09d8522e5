"""Validation: the fixed validation batches, their mean loss (and a masked LM's own
figures) through a pipeline, during training or of a saved checkpoint.

``run_evaluation`` runs in the launching process (``conveyor eval``): it reads the
checkpoint's configs and tokenizer, rebuilds its validation set exactly as training
did, and launches ``eval_worker`` on a pipeline of any layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, DataConfig, ModelConfig, ParallelConfig, to_dict
from ..data.objectives import BatchMaker, batch_maker
from ..data.tokenizer import load_tokenizer
from ..models.objective import IGNORE_INDEX
from ..parallel.layout import Layout, resolve_layout
from ..parallel.mesh import Mesh
from ..runtime.launch import launch
from ..runtime.pipeline import Pipeline
from .checkpoint import read_meta, resolve_checkpoint
from .checkpoint_files import check_checkpoint, checkpoint_tokenizer
from .corpus import prepare
from .export import param_shapes
from .metrics import perplexity
from .ranks import rank_device, user_errors_of_ranks
from .state import load_params

__all__ = ["eval_worker", "mean_loss", "mlm_metrics", "run_evaluation", "val_batches"]

_VAL_SALT = 1 << 40  # validation masks never coincide with a training step's

Batches = list[tuple[Any, Any]]


def val_batches(val: np.ndarray, batch_size: int, n: int, make: BatchMaker) -> Batches:
    """The first ``n`` whole batches of the validation rows: the same set at every evaluation."""
    count = min(n, len(val) // batch_size)
    return [make(val, np.arange(i * batch_size, (i + 1) * batch_size), _VAL_SALT + i)
            for i in range(count)]


def mean_loss(pipe: Pipeline, batches: Batches) -> float:
    """The mean of the batches' losses through ``pipe`` (forward only)."""
    return sum(pipe.eval_step(x, y) for x, y in batches) / len(batches)


def mlm_metrics(pipe: Pipeline, batches: Batches) -> dict[str, float]:
    """A masked LM's own figures: accuracy over the masked positions, the MLM term's
    perplexity (without next-sentence prediction); nothing for other objectives."""
    if not all(isinstance(y, dict) and "mlm" in y for _, y in batches):
        return {}
    right = counted = 0
    mlm_loss = 0.0
    for x, y in batches:
        pred = pipe.predict_step(x, reduce=lambda out: out["logits"].argmax(-1))
        mask = y["mlm"] != IGNORE_INDEX
        right += int((pred[mask] == y["mlm"][mask]).sum())
        counted += int(mask.sum())
        mlm_loss += pipe.eval_step(x, {"mlm": y["mlm"]})
    mlm_loss /= len(batches)
    return {"val_mlm_accuracy": right / max(counted, 1), "val_mlm_ppl": perplexity(mlm_loss)}


def run_evaluation(ckpt_path: Path, par: ParallelConfig, *, batch_size: int | None = None,
                   batches: int | None = None, timeout_s: float = 300.0) -> dict[str, Any]:
    """Validation loss of a checkpoint through a pipeline of any layout (parent side)."""
    ckpt = resolve_checkpoint(Path(ckpt_path))
    meta = read_meta(ckpt)
    try:
        model = ModelConfig(**meta["model"])
        data = DataConfig(**meta["data"])
        train = meta["train"]
    except (KeyError, TypeError) as err:
        raise ConfigError(f"checkpoint {ckpt} has no usable model/data/train config ({err}); "
                          "evaluate a checkpoint written by `conveyor train`") from None
    if isinstance(meta.get("task"), dict):
        raise ConfigError(f"checkpoint {ckpt} is fine-tuned on task {meta['task'].get('name')!r}; "
                          "its validation metrics are in its run's metrics.jsonl (`conveyor "
                          "report`), and `conveyor predict` runs a classifier")
    check_checkpoint(ckpt, param_shapes(model))
    batch = batch_size or int(train["batch_size"])
    layout = resolve_layout(model, par, batch_size=batch)
    if data.val_fraction == 0:
        raise ConfigError(f"checkpoint {ckpt} was trained with val_fraction=0, so it has no "
                          "validation set; nothing to evaluate")
    # the checkpoint's own tokenizer (an --init model's is not the corpus's)
    path = checkpoint_tokenizer(ckpt, meta)
    tokenizer = load_tokenizer(path) if path is not None and path.is_file() else None
    prepared = prepare(model, data, seed=int(train["seed"]), batch_size=batch,
                       run_dir=str(train["run_dir"]), tokenizer=tokenizer)
    n = batches or int(train["eval_batches"])
    with user_errors_of_ranks():
        results = launch(eval_worker, par.world_size, model, par, layout, ckpt, prepared.val,
                         batch, n, int(train["seed"]), timeout_s, timeout_s=timeout_s)
    loss = results[min(results)]
    return {"checkpoint": str(ckpt), "step": int(meta["step"]), "val_loss": loss,
            "val_ppl": perplexity(loss), "batches": min(n, len(prepared.val) // batch),
            "batch_size": batch, "parallel": to_dict(par)}


def eval_worker(model: ModelConfig, par: ParallelConfig, layout: Layout, ckpt: Path,
                val: np.ndarray, batch_size: int, n: int, seed: int = 0,
                timeout_s: float = 300.0) -> float:
    """Mean validation loss of ``ckpt`` on this rank's share of the pipeline.

    ``seed`` is the run's: masked objectives draw the validation masks from it.
    """
    device = rank_device()
    mesh = Mesh.build(par.pp, par.dp, par.tp, device_type=device.type)
    pipe = Pipeline(model, par, mesh, layout=layout, device=device, timeout_s=timeout_s)
    load_params(pipe, ckpt)
    return mean_loss(pipe, val_batches(val, batch_size, n, batch_maker(model, seed)))
