"""The training loop: the parent checks and prepares everything, then each rank trains.

``run_training`` runs in the launching process: it decides the layout (``run_layout``),
checks a checkpoint to resume or a model to start from (``resume_checks``), reads and
tokenizes the data (``corpus``), and creates the run directory, so every user mistake
ends there in one line before any process starts. Then ``train_worker`` runs a
``Trainer`` on each rank. One step::

    sampler -> batch -> pipeline.train_step -> global-norm clip -> AdamW step (lr of step)

Every rank sees the same batches and knows the loss; rank 0 writes the metrics
(``metrics_sink``) and shows the progress (``progress``). Validation: ``evaluation``.
What goes in the run directory: see ``rundir``.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import RunConfig
from ..data import Sampler
from ..data.objectives import BatchMaker, batch_maker
from ..data.tokenizer import load_tokenizer
from ..log import get_logger
from ..models import block_param_counts
from ..parallel.layout import Layout
from ..parallel.mesh import Mesh
from ..runtime.executor import PipelineError
from ..runtime.faults import fault_point
from ..runtime.launch import launch
from ..runtime.pipeline import Pipeline
from ..runtime.preempt import StopRequest
from .checkpoint import read_meta, resolve_checkpoint, save_checkpoint
from .checkpoint_files import check_checkpoint, checkpoint_tokenizer, newest_intact
from .clip import clip_global_grad_norm
from .corpus import prepare
from .evaluation import mean_loss, mlm_metrics, val_batches
from .export import param_shapes
from .hf_io import read_init
from .metrics import perplexity
from .metrics_sink import MetricsSink, tensorboard_available
from .optim import build_optimizer, lr_at, set_lr
from .progress import Progress
from .ranks import rank_device, threads_per_rank, user_errors_of_ranks
from .resume_checks import check_resumable, check_same_data, data_provenance, init_tokenizer
from .run_layout import run_layout
from .rundir import TOKENIZER_FILE, create_run_dir
from .state import (
    load_model_params,
    load_training_state,
    rank_meta,
    restore_rank_meta,
    state_tensors,
)
from .step_trace import save_step_trace

__all__ = ["Trainer", "run_training", "train_worker"]

log = get_logger(__name__)


# -- parent side -----------------------------------------------------------------------


def run_training(run: RunConfig) -> dict[int, dict[str, Any]]:
    """Check, prepare, create the run directory, and train on ``pp*dp*tp`` ranks.

    Returns each rank's summary (under torchrun: this process's rank only).
    """
    tokenizer = None
    if run.train.init is not None:  # read whole here, so a bad model fails before spawning
        tokenizer = init_tokenizer(run, read_init(Path(run.train.init)))
    # decided here, once, before anything is read or spawned: every rank gets this Layout
    layout = run_layout(run)
    if run.train.tensorboard:
        tensorboard_available()
    ckpt, meta = None, None
    auto = run.train.resume == "auto"
    if auto:  # an elastic restart: this run's own newest intact checkpoint, or a fresh start
        assert run.train.name is not None  # TrainConfig refuses 'auto' without a name
        ckpt = newest_intact(Path(run.train.run_dir) / run.train.name)
    elif run.train.resume is not None:
        ckpt = resolve_checkpoint(Path(run.train.resume))
    if ckpt is not None:
        meta = read_meta(ckpt)
        if auto and int(meta["step"]) >= run.train.steps:  # a restart of a finished run
            log.info("--resume auto: %s is at step %s of %d; the run is complete", ckpt,
                     meta["step"], run.train.steps)
            return {}
        check_resumable(run, ckpt, meta)
        check_checkpoint(ckpt, param_shapes(run.model))
        if (meta.get("train") or {}).get("init"):  # the --init model's tokenizer, kept
            path = checkpoint_tokenizer(ckpt, meta)
            tokenizer = load_tokenizer(path) if path is not None else None
    data = prepare(run.model, run.data, seed=run.train.seed, batch_size=run.train.batch_size,
                   run_dir=run.train.run_dir, tokenizer=tokenizer)
    if meta is not None:
        check_same_data(data, ckpt, meta)
    run_dir = create_run_dir(run, data.tokenizer, ckpt, int(meta["step"]) if meta else None,
                             reuse=auto)
    world = layout.world_size
    n_params = sum(block_param_counts(run.model)) - (
        run.model.vocab_size * run.model.d_model if run.model.tie_embeddings else 0
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank runs this
        log.info("training %.2fM parameters on %d ranks for %d steps -> %s",
                 n_params / 1e6, world, run.train.steps, run_dir)
        for line in layout.describe().splitlines():
            log.info("%s", line)
    with user_errors_of_ranks():
        return launch(train_worker, world, run, layout, run_dir, data.train, data.val, ckpt,
                      data_provenance(data), threads_per_rank=threads_per_rank(world),
                      timeout_s=run.train.timeout)


# -- rank side -------------------------------------------------------------------------


class Trainer:
    """One rank's pipeline, optimizer and data stream, and the bookkeeping around them."""

    def __init__(self, run: RunConfig, layout: Layout, run_dir: Path, train: Any,
                 val: Any, make_batch: BatchMaker | None = None) -> None:
        self.run, self.cfg, self.run_dir, self.rows = run, run.train, run_dir, train
        self.rank = dist.get_rank()
        torch.manual_seed(self.cfg.seed)
        device = rank_device()
        par = run.parallel
        self.mesh = Mesh.build(par.pp, par.dp, par.tp, device_type=device.type)
        self.pipe = Pipeline(run.model, par, self.mesh, layout=layout, seed=self.cfg.seed,
                             device=device, timeout_s=self.cfg.timeout,
                             autocast_dtype=torch.bfloat16 if self.cfg.bf16 else None)
        # ZeRO-1: the optimizer steps this dp rank's chunks; the rest are all-gathered
        self.zero = self.pipe.zero
        if self.zero is None:
            self.opt = build_optimizer(self.pipe.named_parameters(), lr=self.cfg.lr,
                                       weight_decay=self.cfg.weight_decay)
        else:
            self.opt = build_optimizer(self.zero.named_shards(), lr=self.cfg.lr,
                                       weight_decay=self.cfg.weight_decay, ndims=self.zero.ndims())
        self.sampler = Sampler(len(train), self.cfg.batch_size, self.cfg.seed)
        # the family's objective; its masks are seeded by (seed, step), so resumes agree
        self.make_batch = make_batch or batch_maker(run.model, self.cfg.seed)
        self.val = val_batches(val, self.cfg.batch_size, self.cfg.eval_batches, self.make_batch
                               ) if run.data.val_fraction > 0 and val is not None else []
        self.step, self.elapsed0 = 0, 0.0
        self.tokens_per_step = self.cfg.batch_size * run.model.max_seq_len
        self.sink = (MetricsSink(run_dir, tensorboard=self.cfg.tensorboard)
                     if self.rank == 0 else None)
        self.losses: list[float] = []
        self.evals: list[tuple[int, float]] = []
        self.speeds: list[float] = []
        self.last_ckpt: Path | None = None
        self.progress: Progress | None = None  # rank 0's, while fit runs
        self.t_start = time.perf_counter()
        self.stop = StopRequest()
        self.provenance: dict[str, str] = {}
        self.device = device

    def start_from(self, path: Path) -> None:
        """This rank's parameters from the model --init names (a fresh optimizer)."""
        load_model_params(self.pipe, read_init(path).tensors, f"--init {path}")
        if self.zero is not None:
            self.zero.sync_from_params()
        self._log("starting from the weights of %s", path)

    def restore(self, ckpt: Path) -> None:
        meta = read_meta(ckpt)
        load_training_state(self.pipe, self.opt, ckpt, self.zero)
        self.sampler.load_state_dict(meta["sampler"])
        self.elapsed0 = restore_rank_meta(meta)
        self.step = int(meta["step"])
        self._log("resumed from %s at step %d", ckpt, self.step)

    def _log(self, msg: str, *args: Any) -> None:
        if self.rank != 0:
            return
        with self._above_bar():
            log.info(msg, *args)

    def _above_bar(self) -> contextlib.AbstractContextManager[None]:
        return self.progress.above() if self.progress is not None else contextlib.nullcontext()

    def _write(self, row: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.write(row)

    def _progress(self, loss: float) -> None:
        if self.progress is None:
            return
        line = self.progress.update(self.step, loss, float(np.mean(self.speeds[-20:])))
        if line is not None:
            self._log("%s", line)

    def train_step(self) -> float:
        cfg = self.cfg
        lr = lr_at(self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps,
                   total=cfg.steps)
        set_lr(self.opt, lr)
        t0 = time.perf_counter()
        x, y = self.make_batch(self.rows, next(self.sampler), self.step)
        self.pipe.zero_grad()
        traced = cfg.trace and self.step + 1 == cfg.steps
        self.pipe.executor.record = traced
        try:
            loss = self.pipe.train_step(x, y)
        except PipelineError as err:  # its "action #i" is the rank's list; say which step too
            raise PipelineError(f"training step {self.step + 1}: {err}") from None
        if traced:
            save_step_trace(self.pipe, self.run_dir, self.step + 1)
        dup = self.pipe.tied_duplicate()
        dups = [dup] if dup is not None else []
        params = self.pipe.parameters()
        if self.zero is not None:  # the grads are this rank's chunks, disjoint over dp
            params, dups = self.zero.leaves(), [self.zero.leaf_of(d) for d in dups]
        norm = clip_global_grad_norm(
            params, cfg.grad_clip, group=self.mesh.pp_group, tp_group=self.mesh.tp_group,
            duplicates=dups, dp_group=None if self.zero is None else self.mesh.dp_group,
        )
        if self.zero is None:
            self.opt.step()
        else:
            self.zero.step(self.opt)
        speed = self.tokens_per_step / (time.perf_counter() - t0)
        self.step += 1
        self.losses.append(loss)
        self.speeds.append(speed)
        self._write({"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                     "tokens_per_s": round(speed, 1), "elapsed_s": round(self.elapsed(), 3)})
        return loss

    def evaluate(self) -> None:
        if not self.val:
            return
        loss = mean_loss(self.pipe, self.val)
        self.evals.append((self.step, loss))
        mlm = mlm_metrics(self.pipe, self.val)
        self._write({"step": self.step, "val_loss": loss, "val_ppl": perplexity(loss), **mlm})
        train = f"loss {self.losses[-1]:.4f}  " if self.losses else ""
        speed = f"  {np.mean(self.speeds[-50:]):.0f} tok/s" if self.speeds else ""
        extra = "".join(f"  {k} {v:.4g}" for k, v in mlm.items())
        self._log("step %d/%d  %sval_loss %.4f  val_ppl %.1f%s%s", self.step, self.cfg.steps,
                  train, loss, perplexity(loss), extra, speed)

    def save(self) -> None:
        meta = {
            **self.run.to_dict(),
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            **self.provenance,
            "ranks": {str(self.rank): rank_meta(self.elapsed())},
        }
        with self._above_bar():  # the checkpoint module logs a line
            self.last_ckpt = save_checkpoint(
                self.run_dir, self.step, tensors=state_tensors(self.pipe, self.opt, self.zero),
                meta=meta, keep=self.cfg.keep,
            )

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t_start

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        start, preempted = self.step, 0
        self.t_start = time.perf_counter()
        if self.rank == 0:
            self.progress = Progress(cfg.steps, start, self.tokens_per_step)
        if start == 0:
            self.evaluate()
        while self.step < cfg.steps:
            loss = self.train_step()
            fault_point("step")
            self._progress(loss)
            last = self.step == cfg.steps
            if last or (cfg.eval_every and self.step % cfg.eval_every == 0):
                self.evaluate()
            saved = last or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
            if saved:
                self.save()
            if not last and (signum := self.stop.agreed(self.device)):
                if not saved:
                    self.save()
                preempted = signum
                break
        if self.progress is not None:
            self.progress.close()
        if self.sink is not None:
            self.sink.close()
        return {
            "rank": self.rank, "start_step": start, "steps": self.step, "losses": self.losses,
            "evals": self.evals, "tokens_per_s": float(np.median(self.speeds)),
            "elapsed_s": self.elapsed(), "run_dir": str(self.run_dir),
            "checkpoint": str(self.last_ckpt), "preempted": preempted,
        }


def train_worker(run: RunConfig, layout: Layout, run_dir: Path, train: np.ndarray,
                 val: np.ndarray, resume: Path | None = None,
                 provenance: dict[str, str] | None = None) -> dict[str, Any]:
    """Train on this rank (inside ``launch``) laid out as ``layout``; return its summary."""
    trainer = Trainer(run, layout, run_dir, train, val)
    trainer.provenance = provenance or {"tokenizer_path": f"../../{TOKENIZER_FILE}"}
    if resume is not None:
        trainer.restore(resume)
    elif run.train.init is not None:
        trainer.start_from(Path(run.train.init))
    return trainer.fit()
