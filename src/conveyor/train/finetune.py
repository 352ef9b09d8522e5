"""Fine-tuning: a pretrained model, a task, and the trainer's own loop.

``run_finetune`` runs in the launching process, like ``run_training``: it reads the
model to start from (a Conveyor checkpoint or export, or a Hugging Face directory, via
``read_init``) or the fine-tuning checkpoint to resume, reads and encodes the task with
that model's tokenizer, gives a classifier its head (``num_labels``; a new head is
initialised, and said so), and creates the run directory, so every user mistake ends
there in one line. Each rank then runs the ``Trainer`` with the task's batches (no
second loop); ``FineTuner`` only evaluates differently and records the task (its kind,
labels and options) in every checkpoint's meta, which ``--resume`` and ``predict`` read.

Evaluation logs ``val_loss`` and, for classification, ``val_accuracy``, ``val_macro_f1``
and the majority-class baseline's; for seq2seq ``val_ppl`` and ``val_token_accuracy``
(teacher-forced), and at the last evaluation ``val_bleu``/``val_rouge_l`` of generated
outputs (``generate_outputs``: greedy decoding through the pipeline) beside the task's
baseline where it has one (docstring: the function's name).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, DataConfig, ModelConfig, RunConfig, to_dict
from ..data import DataError, Sampler
from ..data.atomic import atomic_write
from ..data.task_encode import TaskRows, decoder_prompt, encode_records, encoder_source
from ..data.tasks import Record, TaskData, load_task
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..log import get_logger
from ..models.families import family_of
from ..parallel.layout import Layout
from ..runtime.launch import launch
from ..runtime.pipeline import Pipeline
from .checkpoint import read_meta, resolve_checkpoint
from .checkpoint_files import check_checkpoint, checkpoint_tokenizer
from .evaluation import mean_loss
from .export import param_shapes
from .hf_io import read_init
from .metrics import perplexity
from .ranks import threads_per_rank, user_errors_of_ranks
from .run_layout import run_layout
from .rundir import TOKENIZER_FILE, create_run_dir
from .state import load_fitting_params
from .task_metrics import (
    UNKNOWN_LABEL,
    classification_metrics,
    function_name_baseline,
    masked_accuracy,
    seq2seq_metrics,
)
from .trainer import Trainer

__all__ = ["FineTuner", "TaskConfig", "finetune_model", "finetune_worker", "generate_outputs",
           "run_finetune", "text_to_text"]

log = get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """What to fine-tune on, and how its examples are laid out."""

    task: str
    """A built-in task (stdlib-package, docstring) or a .jsonl file of records."""
    val_task: str | None = None
    """A .jsonl file of validation records; None: a val_fraction of the task's."""
    val_fraction: float = 0.1
    """Share held out for validation: of the documents (built-in tasks) or records (a file)."""
    target_len: int = 32
    """Tokens of a seq2seq target, end token included (the decoder's static length)."""
    truncate: bool = False
    """Keep the first tokens of an input longer than the context instead of refusing it."""
    generate: int = 64
    """Validation examples whose outputs are generated for BLEU/ROUGE-L at the end (seq2seq)."""

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise ConfigError("--task is empty; pass stdlib-package, docstring or a .jsonl file")
        if not (0 <= self.val_fraction < 1):
            raise ConfigError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.target_len < 2:
            raise ConfigError(f"target_len={self.target_len} must be >= 2 (a token and the end)")
        if self.generate < 0:
            raise ConfigError(f"generate={self.generate} must be >= 0")


@dataclass(frozen=True)
class TaskJob:
    """What every rank needs beyond the rows: the task's record, and the seq2seq prompts."""

    meta: dict[str, Any]
    source: str | None
    prompts: list[list[int]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)


def text_to_text(model: ModelConfig, kind: str) -> bool:
    """Whether ``model`` learns a classification task as seq2seq (an encoder-decoder, like T5:
    the target is the label's text, read back from its greedy output)."""
    return kind == "classification" and family_of(model).seq2seq


def finetune_model(base: ModelConfig, data: TaskData) -> ModelConfig:
    """The model fine-tuned on ``data``: a classifier head of its labels, or the base as is."""
    if text_to_text(base, data.kind):
        return base
    if data.kind == "classification":
        return dataclasses.replace(base, num_labels=len(data.labels), tie_embeddings=False)
    if base.family == "bert":
        raise ConfigError(f"--task {data.name} is seq2seq, but family 'bert' has no decoder; "
                          "fine-tune a gpt or t5 model on it, or bert on a classification task")
    if base.num_labels:
        raise ConfigError(f"--task {data.name} is seq2seq, but the model is a classifier "
                          f"({base.num_labels} labels); start from a pretrained model")
    return base


def _rows(data: TaskData, model: ModelConfig, tokenizer: Tokenizer, task: TaskConfig
          ) -> tuple[TaskRows, TaskRows | None]:
    kind = "seq2seq" if text_to_text(model, data.kind) else data.kind

    def encode(records: list[Record]) -> TaskRows:
        return encode_records(records, model, tokenizer, kind=kind, labels=data.labels,
                              target_len=task.target_len, truncate=task.truncate or data.truncate)

    try:
        train = encode(data.train)
        val = encode(data.val) if data.val else None
    except DataError as err:
        raise DataError(f"--task {task.task}: {err}") from None
    return train, val


def _job(data: TaskData, model: ModelConfig, tokenizer: Tokenizer, task: TaskConfig,
         source: str | None) -> TaskJob:
    meta = {**to_dict(task), "kind": data.kind, "name": data.name, "labels": list(data.labels),
            "truncate": task.truncate or data.truncate}
    if data.kind == "classification":
        counts = {label: 0 for label in data.labels}
        for r in data.train:
            counts[r.output] += 1
        meta["majority"] = data.labels.index(max(data.labels, key=lambda lb: counts[lb]))
    meta["text_to_text"] = text_to_text(model, data.kind)
    if (data.kind != "seq2seq" and not meta["text_to_text"]) or not data.val:
        return TaskJob(meta, source)
    picked = data.val[: task.generate]
    room = model.max_seq_len + 1 - task.target_len
    sources = enumerate(tokenizer.encode_batch([r.text for r in picked]))
    if family_of(model).seq2seq:  # the encoder reads the source; the decoder starts empty
        prompts = [encoder_source(ids, model, True, i) for i, ids in sources]
    else:
        prompts = [decoder_prompt(ids, room, True, i, tokenizer.eot_id) for i, ids in sources]
    return TaskJob(meta, source, prompts, [r.text for r in picked], [r.output for r in picked])


def run_finetune(run: RunConfig, task: TaskConfig, source: Path | None = None
                 ) -> dict[int, dict[str, Any]]:
    """Check, read, encode, create the run directory, and fine-tune on ``pp*dp*tp`` ranks.

    ``source``: the model to start from; None when ``run.train.resume`` continues a
    fine-tuning run (whose model, task and tokenizer come from its checkpoint).
    """
    ckpt, step, tensors = None, None, None
    if run.train.resume is not None:
        ckpt = resolve_checkpoint(Path(run.train.resume))
        meta = read_meta(ckpt)
        base = run.model
        check_checkpoint(ckpt, param_shapes(base))
        tok_path = checkpoint_tokenizer(ckpt, meta)
        step = int(meta["step"])
    else:
        assert source is not None, "a new fine-tuning run starts from a model"
        files = read_init(source)
        base, tensors, tok_path = files.cfg, files.tensors, files.tokenizer
    if tok_path is None or not Path(tok_path).is_file():
        raise ConfigError(f"{ckpt or source} has no tokenizer.json; fine-tuning encodes the task "
                          "with the model's own tokenizer, so add it beside the weights")
    tokenizer = load_tokenizer(Path(tok_path))
    data = load_task(task.task, val_task=task.val_task, val_fraction=task.val_fraction,
                     seed=run.train.seed)
    model = finetune_model(base, data) if ckpt is None else base
    if model.num_labels and run.parallel.sequence_parallel:
        raise ConfigError("--sequence-parallel hands the head a shard of the sequence, but a "
                          "classifier reads whole rows; drop --sequence-parallel")
    run = dataclasses.replace(run, model=model, data=DataConfig(val_fraction=task.val_fraction))
    train, val = _rows(data, model, tokenizer, task)
    batch = run.train.batch_size
    Sampler(len(train), batch, run.train.seed)  # DataError if the task has too few records
    if val is not None and len(val) < batch:
        raise DataError(f"--task {task.task}: {len(val)} validation records < batch size "
                        f"{batch}; raise --val-fraction or lower --batch-size")
    layout = run_layout(run)  # after the task checks: profiling costs seconds
    job = _job(data, model, tokenizer, task, str(source) if source else None)
    run_dir = create_run_dir(run, tokenizer, ckpt, step)
    if int(os.environ.get("RANK", "0")) == 0:
        task_json = (json.dumps(job.meta, indent=2) + "\n").encode()
        atomic_write(run_dir / "task.json", lambda f: f.write(task_json))
        log.info("fine-tuning on %s (%s): %d train, %d val examples%s -> %s", data.name,
                 data.kind, len(train), 0 if val is None else len(val),
                 f", {len(data.labels)} labels" if data.labels else "", run_dir)
        if tensors is not None:
            _log_loaded(model, tensors, source)
        for line in layout.describe().splitlines():
            log.info("%s", line)
    with user_errors_of_ranks():
        return launch(finetune_worker, layout.world_size, run, layout, run_dir, train, val, job,
                      ckpt, threads_per_rank=threads_per_rank(layout.world_size),
                      timeout_s=run.train.timeout)


def _log_loaded(model: ModelConfig, tensors: dict[str, torch.Tensor], source: Path | None) -> None:
    shapes = param_shapes(model)
    new = [n for n, s in shapes.items() if n not in tensors or tuple(tensors[n].shape) != s]
    unused = sorted(set(tensors) - set(shapes))
    log.info("loaded %d of %d tensors from %s", len(shapes) - len(new), len(shapes), source)
    if new:
        log.info("initialised new (the task's head): %s", ", ".join(new))
    if unused:
        log.info("not used (the pretraining head): %s", ", ".join(unused))


def generate_outputs(pipe: Pipeline, prompts: list[list[int]], max_new_tokens: int,
                     eot_id: int) -> list[list[int]]:
    """Greedy outputs of ``prompts`` through this rank's stage: the one place that picks a
    family's generator (an encoder-decoder's sources, a decoder's prompts)."""
    from ..generation.batch import Sampling
    from ..runtime.seq2seq import generator_class

    if len(pipe.stages) != 1 or pipe.mesh.tp > 1:
        raise ConfigError("generation during fine-tuning needs one stage per rank and tp=1; "
                          "score the checkpoint with `conveyor generate` instead")
    (stage,) = pipe.stages.values()
    cfg = pipe.model_cfg
    gen = generator_class(cfg)(stage.blocks, cfg, pipe.mesh if pipe.mesh.pp > 1 else None)
    # an encoder-decoder stops at its own eos (None), a decoder at the tokenizer's end token
    end = None if family_of(cfg).seq2seq else eot_id
    return gen.generate(prompts, max_new_tokens, Sampling(0.0, None, None, 0, True, end))


def _class_labels(rows: TaskRows, n: int) -> np.ndarray:
    if isinstance(rows.targets, dict):
        return rows.targets["label"][:n]
    return rows.targets[np.arange(n), rows.last[:n]]


class FineTuner(Trainer):
    """The trainer on a task's rows: task metrics at evaluation, the task in the meta."""

    def __init__(self, run: RunConfig, layout: Layout, run_dir: Path, train: TaskRows,
                 val: TaskRows | None, job: TaskJob) -> None:
        super().__init__(run, layout, run_dir, train, val, make_batch=_batch)
        self.val_rows, self.job = val, job
        self.provenance = {"tokenizer_path": f"../../{TOKENIZER_FILE}", "task": job.meta}

    def start_from(self, path: Path) -> None:
        """Every parameter the model at ``path`` has in the same shape; a new head stays."""
        files = read_init(path)
        load_fitting_params(self.pipe, files.tensors, param_shapes(self.run.model),
                            f"--init {path}")
        if self.zero is not None:
            self.zero.sync_from_params()
        self._log("starting from the weights of %s", path)

    def evaluate(self) -> None:
        if not self.val or self.val_rows is None:
            return
        row: dict[str, Any] = {"step": self.step}
        if self.job.meta["kind"] == "classification" and not self.job.meta.get("text_to_text"):
            row.update(self._classification())
        else:
            row.update(self._seq2seq())
        self.evals.append((self.step, row["val_loss"]))
        self._write(row)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step")
        self._log("step %d/%d  %s", self.step, self.cfg.steps, shown)

    def _classification(self) -> dict[str, float]:
        probs = torch.cat([self.pipe.predict_step(x, reduce=lambda t: t.float().softmax(-1))
                           for x, _ in self.val])
        n = len(probs)
        assert self.val_rows is not None
        if probs.dim() == 3:  # a decoder's per-position logits: each row's last real token
            probs = probs[torch.arange(n), torch.from_numpy(self.val_rows.last[:n])]
        labels = torch.from_numpy(_class_labels(self.val_rows, n))
        loss = float(-probs[torch.arange(n), labels].clamp_min(1e-12).log().mean())
        m = classification_metrics(probs.argmax(-1).tolist(), labels.tolist(),
                                   int(self.job.meta["majority"]))
        return {"val_loss": loss, "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"],
                "majority_accuracy": m["majority_accuracy"],
                "majority_macro_f1": m["majority_macro_f1"]}

    def _seq2seq(self) -> dict[str, float]:
        loss = mean_loss(self.pipe, self.val)
        correct = total = 0.0
        for x, y in self.val:
            pred = self.pipe.predict_step(x, reduce=lambda t: t.argmax(-1)).numpy()
            target = (y["lm"] if isinstance(y, dict) else y).numpy()
            counted = int((target != -100).sum())
            correct += masked_accuracy(pred, target) * counted
            total += counted
        row = {"val_loss": loss, "val_ppl": perplexity(loss),
               "val_token_accuracy": correct / max(total, 1)}
        if self.step == self.cfg.steps and self.job.prompts:
            row.update(self._generated())
        return row

    def _generated(self) -> dict[str, float]:
        """BLEU and ROUGE-L of greedy outputs on the first validation examples."""
        tokenizer = load_tokenizer(self.run_dir / TOKENIZER_FILE)
        try:
            outs = generate_outputs(self.pipe, self.job.prompts, self.job.meta["target_len"],
                                    tokenizer.eot_id)
        except ConfigError as err:
            self._log("no BLEU/ROUGE-L: %s", err)
            return {}
        if family_of(self.run.model).seq2seq:  # sentinels are not the tokenizer's
            from ..generation.seq2seq import output_ids

            outs = [output_ids(ids, self.run.model) for ids in outs]
        texts = [tokenizer.decode(ids).strip() for ids in outs]
        if self.job.meta.get("text_to_text"):
            return self._read_labels(texts)
        for text, ref in list(zip(texts, self.job.references, strict=True))[:3]:
            self._log("generated %r  reference %r", text[:80], ref[:80])
        scores = {f"val_{k}": v for k, v in seq2seq_metrics(texts, self.job.references).items()}
        if self.job.meta["name"] == "docstring":
            base = [function_name_baseline(s) for s in self.job.sources]
            scores.update({f"baseline_{k}": v
                           for k, v in seq2seq_metrics(base, self.job.references).items()})
        return scores


    def _read_labels(self, texts: list[str]) -> dict[str, float]:
        """Classification metrics of generated label texts; one that names no label is wrong."""
        labels = self.job.meta["labels"]
        index = {label: i for i, label in enumerate(labels)}
        predicted = [index.get(text, UNKNOWN_LABEL) for text in texts]
        m = classification_metrics(predicted, [index[r] for r in self.job.references],
                                   int(self.job.meta["majority"]))
        return {"val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"],
                "val_unknown_label": predicted.count(UNKNOWN_LABEL) / max(len(predicted), 1),
                "majority_accuracy": m["majority_accuracy"],
                "majority_macro_f1": m["majority_macro_f1"]}


def _batch(rows: TaskRows, indices: np.ndarray, salt: int) -> tuple[Any, Any]:
    del salt  # task batches hold no random choices
    return rows.batch(indices)


def finetune_worker(run: RunConfig, layout: Layout, run_dir: Path, train: TaskRows,
                    val: TaskRows | None, job: TaskJob, resume: Path | None = None
                    ) -> dict[str, Any]:
    """Fine-tune on this rank (inside ``launch``); return its summary."""
    tuner = FineTuner(run, layout, run_dir, train, val, job)
    if resume is not None:
        tuner.restore(resume)
    elif job.source is not None:
        tuner.start_from(Path(job.source))
    return tuner.fit()
