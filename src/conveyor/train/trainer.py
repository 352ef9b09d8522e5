"""The training loop: the parent checks and prepares everything, then each rank trains.

``run_training`` runs in the launching process: it validates the configs, reads and
tokenizes the data, and creates the run directory, so every user mistake ends
there in one line before any process starts. Then ``train_worker`` runs on each
rank. One step::

    sampler -> batch -> pipeline.train_step -> global-norm clip -> AdamW step (lr of step)

Every rank sees the same batches and knows the loss; rank 0 writes the metrics and
draws the progress bar. What goes in the run directory: see ``rundir``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm

from ..config import ConfigError, DataConfig, ModelConfig, ParallelConfig, RunConfig, to_dict
from ..data import DataError, PreparedData, Sampler, prepare_data
from ..data.objectives import (
    BatchMaker,
    batch_maker,
    check_objective,
    packed_seq_len,
    special_count,
)
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..log import get_logger
from ..models import block_param_counts
from ..models.objective import IGNORE_INDEX
from ..parallel.layout import Layout, resolve_layout
from ..parallel.mesh import Mesh
from ..runtime.executor import PipelineError
from ..runtime.faults import fault_point
from ..runtime.launch import launch
from ..runtime.pipeline import Pipeline
from ..runtime.preempt import StopRequest
from ..sim.render import write_chrome_trace
from ..sim.timeline_io import save_timeline
from .checkpoint import CheckpointError, read_meta, resolve_checkpoint, save_checkpoint
from .checkpoint_files import check_checkpoint, checkpoint_tokenizer, newest_intact
from .clip import clip_global_grad_norm
from .export import ModelFiles, param_shapes
from .hf_io import read_init
from .metrics import METRICS_FILE, MetricsWriter, perplexity
from .optim import build_optimizer, lr_at, set_lr
from .rundir import TIMELINE_FILE, TOKENIZER_FILE, TRACE_FILE, create_run_dir
from .state import (
    load_model_params,
    load_params,
    load_training_state,
    rank_meta,
    restore_rank_meta,
    state_tensors,
)

__all__ = ["Trainer", "run_training", "train_worker", "run_evaluation", "eval_worker", "prepare",
           "rank_device", "user_errors_of_ranks", "val_batches"]

log = get_logger(__name__)

# what a resumed run must share with its checkpoint: the weights' shape and the data stream
_FIXED_ON_RESUME = {"train": ("batch_size", "seed")}


# -- parent side -----------------------------------------------------------------------


def prepare(model: ModelConfig, data: DataConfig, *, seed: int, batch_size: int,
            run_dir: str, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Read, tokenize and split the corpus; DataError unless a batch (and a val batch) fit.

    ``tokenizer``: the one to use (a model's given by --init) instead of training one. The
    family's special ids (mask, sentinels) come after the tokenizer's, and its rows leave
    room for the tokens its examples add (``data.objectives``).
    """
    check_objective(model)
    cache = Path(data.cache_dir) if data.cache_dir else Path(run_dir) / ".cache"
    prepared = prepare_data(
        list(data.paths) if data.paths is not None else None,
        vocab_size=model.vocab_size - special_count(model), seq_len=packed_seq_len(model),
        val_fraction=data.val_fraction, cache_dir=cache, seed=seed, tokenizer=tokenizer,
    )
    Sampler(len(prepared.train), batch_size, seed, seq_len=model.max_seq_len)  # raises if too small
    if data.val_fraction > 0 and len(prepared.val) < batch_size:
        raise DataError(
            f"validation set too small: {len(prepared.val)} sequences < batch size {batch_size}; "
            "raise --val-fraction, add data or lower --batch-size (--val-fraction 0 skips "
            "evaluation)"
        )
    return prepared


def _resolve_layout(run: RunConfig) -> Layout:
    """The run's Layout; with ``partition_costs='profile'`` on block costs timed here first."""
    par = run.parallel
    if par.partition_costs != "profile" or par.partition != "cost":
        return resolve_layout(run.model, par, batch_size=run.train.batch_size)
    from ..sim.block_profile import profile_block_costs

    if run.model.family != "gpt":
        raise ConfigError(f"partition_costs='profile' times decoder blocks only; family="
                          f"{run.model.family!r} uses partition_costs='analytic'")
    par.check_against(run.model, run.train.batch_size)  # before spending the seconds
    t0 = time.perf_counter()
    mbs = run.train.batch_size // (par.dp * par.microbatches)
    costs = profile_block_costs(run.model, microbatch_size=mbs, seq_len=run.model.max_seq_len,
                                seed=run.train.seed)
    source = (f"forward + backward of each block timed here, microbatch {mbs} x "
              f"{run.model.max_seq_len}, {time.perf_counter() - t0:.1f}s")
    return resolve_layout(run.model, par, batch_size=run.train.batch_size, block_costs=costs,
                          cost_source=source)


def run_training(run: RunConfig) -> dict[int, dict[str, Any]]:
    """Check, prepare, create the run directory, and train on ``pp*dp*tp`` ranks.

    Returns each rank's summary (under torchrun: this process's rank only).
    """
    tokenizer = None
    if run.train.init is not None:  # read whole here, so a bad model fails before spawning
        tokenizer = _init_tokenizer(run, read_init(Path(run.train.init)))
    # decided here, once, before anything is read or spawned: every rank gets this Layout
    layout = _resolve_layout(run)
    if run.train.tensorboard:
        _tensorboard_available()
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
        _check_resumable(run, ckpt, meta)
        check_checkpoint(ckpt, param_shapes(run.model))
        if (meta.get("train") or {}).get("init"):  # the --init model's tokenizer, kept
            path = checkpoint_tokenizer(ckpt, meta)
            tokenizer = load_tokenizer(path) if path is not None else None
    data = prepare(run.model, run.data, seed=run.train.seed, batch_size=run.train.batch_size,
                   run_dir=run.train.run_dir, tokenizer=tokenizer)
    if meta is not None:
        _check_same_data(data, ckpt, meta)
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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // world)  # more threads than cores slows every rank down
    with user_errors_of_ranks():
        return launch(train_worker, world, run, layout, run_dir, data.train, data.val, ckpt,
                      _provenance(data), threads_per_rank=threads, timeout_s=run.train.timeout)


@contextlib.contextmanager
def user_errors_of_ranks() -> Iterator[None]:
    """Re-raise a rank's user error (a bad checkpoint, a full disk) here as itself, one line."""
    try:
        yield
    except mp.ProcessRaisedException as err:
        lines = str(err).strip().splitlines()
        last = lines[-1] if lines else ""
        for cls in (CheckpointError, DataError, ConfigError):
            prefix = f"{cls.__module__}.{cls.__qualname__}: "
            if last.startswith(prefix):
                raise cls(f"rank {err.error_index}: {last[len(prefix):]}") from None
        raise


def _check_resumable(run: RunConfig, ckpt: Path, meta: dict[str, Any]) -> None:
    saved = {k: dict(meta.get(k) or {}) for k in ("model", "data", "train")}
    mine = json.loads(json.dumps(run.to_dict()))  # tuples as lists, as meta.json has them
    for section in ("model", "data"):
        diff = sorted(
            k for k in mine[section]
            if k != "cache_dir" and k in saved[section] and saved[section][k] != mine[section][k]
        )
        if diff:
            raise ConfigError(
                f"--resume {ckpt}: the checkpoint's {section} config differs in "
                f"{', '.join(diff)}; a resumed run keeps its model and data, so drop those options"
            )
    for section, keys in _FIXED_ON_RESUME.items():
        for key in keys:
            old = saved[section].get(key, mine[section][key])
            if old != mine[section][key]:
                raise ConfigError(
                    f"--resume {ckpt}: {key}={mine[section][key]} differs from the checkpoint's "
                    f"{key}={old}; a resumed run keeps its batches, so drop that option"
                )
    step = int(meta["step"])
    if step >= run.train.steps:
        raise ConfigError(
            f"--resume {ckpt}: the checkpoint is at step {step} and steps={run.train.steps}; "
            f"pass --steps above {step} to train further"
        )


def _init_tokenizer(run: RunConfig, init: ModelFiles) -> Tokenizer:
    """The tokenizer of the --init model, after checking the run trains that very model."""
    where = f"--init {run.train.init}"
    mine, theirs = to_dict(run.model), to_dict(init.cfg)
    diff = [k for k in mine if mine[k] != theirs[k]]
    if diff:
        shown = ", ".join(f"{k}={mine[k]!r} (the model's: {theirs[k]!r})" for k in diff[:3])
        raise ConfigError(f"{where}: model options {shown} disagree with the model it names, "
                          "which the run trains as it is; drop them")
    if init.tokenizer is None:
        raise ConfigError(f"{where} has no tokenizer.json, and training needs the model's own "
                          "tokenizer; add it to the directory (tokenizer.save_pretrained)")
    tokenizer = load_tokenizer(init.tokenizer)
    if tokenizer.vocab_size > init.cfg.vocab_size:
        raise DataError(f"{where}: its tokenizer has {tokenizer.vocab_size} ids but the model "
                        f"{init.cfg.vocab_size}; pass a model directory with its own tokenizer")
    return tokenizer


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _provenance(data: PreparedData) -> dict[str, str]:
    """What a checkpoint records of its data: the tokenizer (a path relative to the
    checkpoint, and its hash) and the corpus fingerprint, checked on resume."""
    return {"tokenizer_path": f"../../{TOKENIZER_FILE}",
            "tokenizer_sha256": _sha256(data.tokenizer.to_str()),
            "corpus_fingerprint": data.fingerprint}


def _check_same_data(data: PreparedData, ckpt: Path, meta: dict[str, Any]) -> None:
    """DataError if the corpus or its tokenizer changed since ``ckpt`` was saved."""
    fix = "resume with the same --data files, or start a new run"
    saved = meta.get("corpus_fingerprint")
    if saved and data.fingerprint and saved != data.fingerprint:
        raise DataError(f"the --data files changed since checkpoint {ckpt} was saved (corpus "
                        f"fingerprint {data.fingerprint[:12]} != {saved[:12]}); {fix}")
    digest = meta.get("tokenizer_sha256")
    if digest is None:  # an older checkpoint: compare with the file it names, if still there
        path = checkpoint_tokenizer(ckpt, meta)
        digest = _sha256(load_tokenizer(path).to_str()) if path and path.is_file() else None
    if digest is not None and digest != _sha256(data.tokenizer.to_str()):
        raise DataError(f"the corpus now gives a different tokenizer than checkpoint {ckpt} "
                        f"was trained with; {fix}")


# -- rank side -------------------------------------------------------------------------

_TB_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
            "tokens_per_s": "train/tokens_per_s", "val_loss": "val/loss", "val_ppl": "val/ppl"}
"""metrics.jsonl keys -> TensorBoard scalar tags."""


def _tensorboard_available() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package; pip install "
                          "'conveyor[tensorboard]' (or tensorboard), or drop --tensorboard") from None


def _tensorboard(run_dir: Path) -> Any:
    """A SummaryWriter into ``run_dir/tensorboard`` (ConfigError if tensorboard is missing)."""
    _tensorboard_available()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def rank_device() -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_VAL_SALT = 1 << 40  # validation masks never coincide with a training step's


def val_batches(val: np.ndarray, batch_size: int, n: int, make: BatchMaker) -> list[tuple[Any, Any]]:
    """The first ``n`` whole batches of the validation rows: the same set at every evaluation."""
    count = min(n, len(val) // batch_size)
    return [make(val, np.arange(i * batch_size, (i + 1) * batch_size), _VAL_SALT + i)
            for i in range(count)]


def _evaluate(pipe: Pipeline, batches: list[tuple[Any, Any]]) -> float:
    return sum(pipe.eval_step(x, y) for x, y in batches) / len(batches)


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
        self.metrics = MetricsWriter(run_dir / METRICS_FILE) if self.rank == 0 else None
        self.tb = _tensorboard(run_dir) if self.rank == 0 and self.cfg.tensorboard else None
        self.losses: list[float] = []
        self.evals: list[tuple[int, float]] = []
        self.speeds: list[float] = []
        self.last_ckpt: Path | None = None
        self.bar: tqdm | None = None
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
        if self.bar is not None:
            self.bar.clear()
        log.info(msg, *args)
        if self.bar is not None:
            self.bar.refresh()

    def _write(self, row: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(row)
        if self.tb is not None:
            for key, value in row.items():
                if key in _TB_TAGS:
                    self.tb.add_scalar(_TB_TAGS[key], value, row["step"])

    def _progress(self, loss: float) -> None:
        """The bar in a terminal; elsewhere (a log file, CI) a log line every tenth of the run."""
        if self.bar is None:
            return
        speed = np.mean(self.speeds[-20:])
        if not self.bar.disable:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:.0f}", refresh=False)
            self.bar.update(1)
            return
        every = max(1, self.cfg.steps // 10)
        if self.step % every == 0 and self.step < self.cfg.steps:
            left = (self.cfg.steps - self.step) * self.tokens_per_step / max(speed, 1e-9)
            self._log("step %d/%d  loss %.4f  %.0f tok/s  eta %.0fs", self.step, self.cfg.steps,
                      loss, speed, left)

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
            self._save_trace()
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

    def _save_trace(self) -> None:
        """Gather the recorded step of every rank; rank 0 writes it (first dp replica's pipeline)."""
        # tp ranks of a stage run the same actions: the first one's stand for them
        first = self.mesh.dp_rank == 0 and self.mesh.tp_rank == 0
        mine = (first, self.mesh.pp_rank, self.pipe.executor.timeline)
        gathered: list[Any] | None = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        self.pipe.executor.record = False
        if gathered is None:
            return
        timeline = {pp: acts for first, pp, acts in gathered if first}
        meta = {"step": self.step + 1, "schedule": self.pipe.schedule.name}
        save_timeline(timeline, self.run_dir / TIMELINE_FILE, meta)
        write_chrome_trace({f"measured step {self.step + 1}": timeline},
                           self.run_dir / TRACE_FILE)

    def _mlm_metrics(self) -> dict[str, float]:
        """A masked LM's own figures: accuracy over the masked positions, the MLM term's
        perplexity (without next-sentence prediction); nothing for other objectives."""
        if not all(isinstance(y, dict) and "mlm" in y for _, y in self.val):
            return {}
        right = counted = 0
        mlm_loss = 0.0
        for x, y in self.val:
            pred = self.pipe.predict_step(x, reduce=lambda out: out["logits"].argmax(-1))
            mask = y["mlm"] != IGNORE_INDEX
            right += int((pred[mask] == y["mlm"][mask]).sum())
            counted += int(mask.sum())
            mlm_loss += self.pipe.eval_step(x, {"mlm": y["mlm"]})
        mlm_loss /= len(self.val)
        return {"val_mlm_accuracy": right / max(counted, 1), "val_mlm_ppl": perplexity(mlm_loss)}

    def evaluate(self) -> None:
        if not self.val:
            return
        loss = _evaluate(self.pipe, self.val)
        self.evals.append((self.step, loss))
        mlm = self._mlm_metrics()
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
        if self.bar is not None:  # the checkpoint module logs a line: keep it off the bar
            self.bar.clear()
        self.last_ckpt = save_checkpoint(
            self.run_dir, self.step, tensors=state_tensors(self.pipe, self.opt, self.zero),
            meta=meta,
            keep=self.cfg.keep,
        )
        if self.bar is not None:
            self.bar.refresh()

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t_start

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        start, preempted = self.step, 0
        self.t_start = time.perf_counter()
        if self.rank == 0:
            # tqdm's default lock is a multiprocessing semaphore, which a rank leaving through
            # os._exit never releases: the resource tracker then warns at the end of every run
            tqdm.set_lock(threading.RLock())
            self.bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
                            disable=None, desc="train")
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
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.tb is not None:
            self.tb.close()
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


# -- evaluation of a checkpoint --------------------------------------------------------


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
    return _evaluate(pipe, val_batches(val, batch_size, n, batch_maker(model, seed)))

