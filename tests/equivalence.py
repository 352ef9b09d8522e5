"""Helpers for the equivalence tests: pipeline runs vs the single-process model.

Spawning a group costs ~2-3 s, so one group per pipeline size runs every case of
that size in turn and returns all their losses and parameters at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from conveyor.config import ModelConfig, ParallelConfig
from conveyor.data.family_batches import mlm_batch, span_corruption_batch
from conveyor.data.mlm import BertSpecials
from conveyor.data.spans import T5Specials
from conveyor.data.task_encode import encode_records
from conveyor.data.tasks import Record
from conveyor.models import SequentialModel, Transformer
from conveyor.models.objective import IGNORE_INDEX
from conveyor.parallel.mesh import Mesh
from conveyor.runtime.launch import launch
from conveyor.runtime.pipeline import Pipeline
from conveyor.schedules import Action, Placement, Schedule

STEPS = 3
BATCH = 8
SEQ = 16
LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-4

BASE = ModelConfig(vocab_size=64, n_layers=6, d_model=32, n_heads=4, max_seq_len=SEQ)


POST_NORM_BERT = (("norm_position", "post"), ("activation", "gelu"), ("head_bias", True))
"""The model options that make Hugging Face's BERT (post-norm, erf GELU, biased MLM decoder)."""


@dataclass(frozen=True)
class Case:
    """One layout to compare against the reference."""

    schedule: str
    pp: int
    microbatches: int
    recompute: bool | str = False
    """True: every transformer block recomputed in backward; "selective": attention cores."""
    tied: bool = False
    flavour: str = "gpt2"
    virtual_stages: int | None = None
    dp: int = 1
    custom: tuple[tuple[str, ...], ...] | None = None
    """A hand-written schedule: each rank's actions as text (``schedule`` names it)."""
    nccl: bool = False
    """Run point-to-point traffic under NCCL's rules (``NcclSemantics``) and check the
    step-0 forward-only evaluation too."""
    batch: int = BATCH
    tp: int = 1
    """Tensor-parallel width; the world is pp * dp * tp ranks."""
    sp: bool = False
    """Sequence parallelism (needs tp > 1)."""
    vocab: int = BASE.vocab_size
    """Vocabulary size; one tp does not divide makes the vocabulary-parallel layers pad."""
    bucket_mb: float = ParallelConfig.dp_bucket_mb
    """MiB per data-parallel grad bucket (0: the per-parameter all-reduce after the step)."""
    zero: int = 0
    """1: ZeRO-1, the optimizer steps each dp rank's chunks and parameters are all-gathered."""
    compile: bool = False
    """``torch.compile`` every block of every stage."""
    lend: bool = False
    """``lend_cores``: actions that run alone use the idle ranks' threads (on 2 ranks, 2 cores)."""
    ragged: bool = False
    """Ignore (-100) a different number of targets in each sequence, so microbatches and
    replicas hold different target counts."""
    family: str = "gpt"
    """'bert' (masked LM + NSP) or 't5' (span corruption, 3 + 3 layers) instead of the decoder."""
    partition: str = ParallelConfig.partition
    """How blocks split into stages (``params`` puts T5's last encoder layer, bridge and
    first decoder layer on one stage)."""
    options: tuple[tuple[str, object], ...] = ()
    """Further ModelConfig fields as (name, value) pairs, e.g. ``POST_NORM_BERT``."""
    task: str = ""
    """Fine-tuning instead of pretraining: 'classify' (a 3-label head; some rows unlabelled)
    or 'seq2seq' (sources and targets of random lengths), encoded by ``data.task_encode``."""

    @property
    def world(self) -> int:
        """Ranks this case runs on."""
        return self.pp * self.dp * self.tp

    @property
    def model(self) -> ModelConfig:
        """The model config of this case."""
        extra: dict = {"n_kv_heads": 2} if self.flavour == "llama" and self.family == "gpt" else {}
        if self.family == "t5":
            extra["n_layers"] = 3
        if self.task == "classify":
            extra["num_labels"] = TASK_LABELS
        return replace(BASE, flavour=self.flavour, tie_embeddings=self.tied,
                       vocab_size=self.vocab, family=self.family, **extra, **dict(self.options))

    @property
    def parallel(self) -> ParallelConfig:
        """The parallel config of this case."""
        return ParallelConfig(  # a custom schedule replaces the config's (any valid name)
            pp=self.pp, dp=self.dp, tp=self.tp, sequence_parallel=self.sp,
            schedule="1f1b" if self.custom else self.schedule,
            microbatches=self.microbatches,
            recompute=self.recompute, virtual_stages=self.virtual_stages,
            dp_bucket_mb=self.bucket_mb, zero=self.zero, compile=self.compile,
            partition=self.partition, lend_cores=self.lend,
        )

    def built_schedule(self) -> Schedule | None:
        """The hand-written schedule of this case (None: the config's own schedule)."""
        if self.custom is None:
            return None
        place = Placement.looped(self.pp)
        acts = {r: [Action.parse(t) for t in row] for r, row in enumerate(self.custom)}
        return Schedule.build(self.schedule, self.microbatches, place, acts)

    def __str__(self) -> str:
        flags = [self.family] * (self.family != "gpt")
        flags += [self.flavour, f"pp{self.pp}", f"m{self.microbatches}"]
        flags += ["recompute" if self.recompute is True else f"recompute-{self.recompute}"
                  ] * bool(self.recompute) + ["tied"] * self.tied
        flags += [f"v{self.virtual_stages}"] * (self.virtual_stages is not None) + [f"dp{self.dp}"] * (
            self.dp > 1
        )
        flags += [f"tp{self.tp}"] * (self.tp > 1) + ["sp"] * self.sp
        flags += [f"vocab{self.vocab}"] * (self.vocab != BASE.vocab_size)
        flags += [f"bucket{self.bucket_mb:g}"] * (self.bucket_mb != ParallelConfig.dp_bucket_mb)
        flags += [f"zero{self.zero}"] * (self.zero > 0)
        flags += ["nccl"] * self.nccl + [f"b{self.batch}"] * (self.batch != BATCH)
        flags += ["compiled"] * self.compile + ["lend"] * self.lend
        flags += ["ragged"] * self.ragged
        flags += [self.partition] * (self.partition != ParallelConfig.partition)
        flags += [f"{name}={value}" for name, value in self.options]
        flags += [self.task] * bool(self.task)
        return f"{self.schedule}-" + "-".join(flags)


def batches(
    size: int = BATCH, vocab: int = BASE.vocab_size, ragged: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed sequence of (inputs, targets) global batches, one per step.

    ``ragged``: sequence i of step k ignores its first (3i + 5k) % SEQ targets, so every
    microbatch counts a different number of targets (the first sequence all of them).
    """
    g = torch.Generator().manual_seed(1234)
    out = []
    for step in range(STEPS):
        t = torch.randint(0, vocab, (size, SEQ + 1), generator=g)
        x, y = t[:, :-1], t[:, 1:].clone()
        if ragged:
            for i in range(size):
                y[i, : (3 * i + 5 * step) % SEQ] = IGNORE_INDEX
        out.append((x, y))
    return out


def family_batches(family: str, size: int, vocab: int) -> list[tuple[dict, dict]]:
    """Fixed (inputs, targets) batches of the encoder or encoder-decoder objective, one per step.

    Rows of random ids; T5's rows are cut to random lengths, so both families' batches
    hold padding and a different number of targets in every microbatch.
    """
    rng = np.random.default_rng(1234)
    out = []
    for step in range(STEPS):
        idx = np.arange(step * size, (step + 1) * size)
        if family == "bert":
            specials = BertSpecials(vocab - 4)
            rows = rng.integers(0, specials.base, (STEPS * size, SEQ))
            out.append(mlm_batch(rows, idx, SEQ, specials, seed=1234, salt=step))
        else:
            t5 = T5Specials(vocab - 6, sentinels=4)
            rows = rng.integers(0, t5.base, (STEPS * size, SEQ - 3))
            for r, length in enumerate(rng.integers(6, SEQ - 3, STEPS * size)):
                rows[r, length:] = t5.pad
            out.append(span_corruption_batch(rows, idx, SEQ, SEQ // 2, t5, seed=1234, salt=step))
    return out


class _IdsTokenizer:
    """Texts of space-separated ids, as a tokenizer: the task encoder's only needs."""

    eot_id = 1

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[int(t) for t in text.split()] for text in texts]


TASK_LABELS = 3


def task_batches(case: Case) -> list[tuple]:
    """Fine-tuning batches encoded as ``conveyor finetune`` encodes them, one per step.

    Texts of random lengths (so padding varies); classification leaves every third row
    of a step unlabelled (-100) in turn, and seq2seq targets vary in length, so
    microbatches count different numbers of targets.
    """
    rng = np.random.default_rng(99)
    model = case.model
    kind = "classification" if case.task == "classify" else "seq2seq"
    labels = [str(i) for i in range(TASK_LABELS)]
    top = model.vocab_size - (4 if case.family == "bert" else 18 if case.family == "t5" else 0)
    records = []
    for _ in range(STEPS * case.batch):
        n = int(rng.integers(2, SEQ // 2 if kind == "seq2seq" else SEQ - 2))
        text = " ".join(str(i) for i in rng.integers(2, top, n))
        out = (labels[int(rng.integers(TASK_LABELS))] if kind == "classification" else
               " ".join(str(i) for i in rng.integers(2, top, int(rng.integers(1, SEQ // 2 - 2)))))
        records.append(Record(text, out))
    rows = encode_records(records, model, _IdsTokenizer(), kind=kind,  # type: ignore[arg-type]
                          labels=labels, target_len=SEQ // 2)
    out = []
    for step in range(STEPS):
        x, y = rows.batch(np.arange(step * case.batch, (step + 1) * case.batch))
        if kind == "classification":
            for i in range(step % 3, case.batch, 3):
                if isinstance(y, dict):
                    y["label"][i] = IGNORE_INDEX
                else:
                    y[i] = IGNORE_INDEX
        out.append((x, y))
    return out


def case_batches(case: Case) -> list:
    """The batches ``case`` trains on: its fine-tuning task, or its family's objective."""
    if case.task:
        return task_batches(case)
    if case.family == "gpt":
        return batches(case.batch, case.vocab, case.ragged)
    return family_batches(case.family, case.batch, case.vocab)


def make_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum: linear in the grads, so parameters check the grads themselves.

    (AdamW divides by sqrt of the second moment, which turns rounding noise on
    grads that are mathematically zero, such as the key bias, into lr-sized steps.)
    """
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


Result = tuple[list[float], dict[str, torch.Tensor], float, tuple[int, int]]
"""Training losses, final parameters, the forward-only loss of batch 0 before training
(NaN where a case does not evaluate; fine-tuning cases compute it from
``Pipeline.predict_step``'s outputs), and the rank's peak held activations in
stage-microbatches as (measured by the runtime meter, predicted by the validator)."""


def reference(case: Case) -> Result:
    """Losses and final parameters of the single-process model on the same batches."""
    torch.manual_seed(0)
    model = Transformer(case.model, seed=0) if case.family == "gpt" and not case.task else SequentialModel(
        case.model, seed=0)
    opt = make_optimizer(list(model.parameters()))
    losses = []
    data = case_batches(case)
    with torch.no_grad():
        eval_loss = model.loss(*data[0]).item()
    for x, y in data:
        opt.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    clones: dict[int, torch.Tensor] = {}  # keep tied names sharing one tensor
    params = {
        k: clones.setdefault(v.untyped_storage().data_ptr(), v.detach().clone())
        for k, v in model.state_dict().items()
    }
    return losses, params, eval_loss, (0, 0)


def reference_of(case: Case) -> Case:
    """The single-process case whose run ``case`` must reproduce (same model and batches)."""
    return Case("1f1b", 1, 1, tied=case.tied, flavour=case.flavour, batch=case.batch,
                vocab=case.vocab, ragged=case.ragged, family=case.family, options=case.options,
                task=case.task)


def _predicted_loss(outputs: torch.Tensor, targets: torch.Tensor | dict) -> float:
    """Mean cross-entropy of a head's outputs over the counted targets."""
    y = next(iter(targets.values())) if isinstance(targets, dict) else targets
    return torch.nn.functional.cross_entropy(outputs.flatten(0, -2), y.flatten(),
                                             ignore_index=IGNORE_INDEX).item()


def _run_cases(cases: list[Case]) -> dict[str, Result]:
    out: dict[str, Result] = {}
    meshes: dict[tuple[int, int, int], Mesh] = {}
    for case in cases:
        key = (case.pp, case.dp, case.tp)
        if key not in meshes:
            meshes[key] = Mesh.build(case.pp, case.dp, case.tp)
        pipe = Pipeline(case.model, case.parallel, meshes[key], seed=0, timeout_s=60,
                        emulate_nccl=case.nccl, schedule=case.built_schedule())
        zero = pipe.zero  # ZeRO-1 chunks (case.zero), their grads reduce-scattered
        opt = make_optimizer(pipe.parameters() if zero is None
                             else [p for _, p in zero.named_shards()])
        data = case_batches(case)
        eval_loss = pipe.eval_step(*data[0]) if case.nccl else float("nan")
        if case.task:  # the head's outputs through predict_step give the reference's loss
            eval_loss = _predicted_loss(pipe.predict_step(data[0][0]), data[0][1])
        losses = []
        for x, y in data:
            opt.zero_grad()
            pipe.zero_grad()  # under ZeRO-1 the optimizer's leaves are the chunks, not these
            losses.append(pipe.train_step(x, y))
            if zero is None:
                opt.step()
            else:
                zero.step(opt)
        params = dict(pipe.full_named_parameters())  # logical tensors, gathered over tp
        peaks = (pipe.meter.peak_units, pipe.stats.peak_activations[pipe.mesh.pp_rank])
        out[str(case)] = (losses, params, eval_loss, peaks)
    return out


def run_pipeline_cases(cases: list[Case], world: int) -> dict[str, dict[int, Result]]:
    """Run every case in one spawned group of ``world`` ranks; results by case and rank."""
    per_rank = launch(_run_cases, world, cases, timeout_s=120)
    return {str(c): {r: per_rank[r][str(c)] for r in per_rank} for c in cases}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (absolute when b is zero)."""
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def assert_equivalent(case: Case, got: dict[int, Result], ref: Result) -> None:
    """Every rank's losses equal the reference's; together they hold every parameter."""
    ref_losses, ref_params, ref_eval, _ = ref
    for rank, (losses, _, eval_loss, (measured, predicted)) in got.items():
        assert measured == predicted, (
            f"{case}: rank {rank} held {measured} stage-microbatches at most, the validator "
            f"predicts {predicted}"
        )
        if not math.isnan(eval_loss):
            assert abs(eval_loss - ref_eval) <= LOSS_RTOL * abs(ref_eval), (
                f"{case}: rank {rank} step-0 eval loss {eval_loss!r} != reference {ref_eval!r}"
            )
        for step, (a, b) in enumerate(zip(losses, ref_losses, strict=True)):
            assert abs(a - b) <= LOSS_RTOL * abs(b), (
                f"{case}: rank {rank} step {step} loss {a!r} != reference {b!r}"
            )
    assert_params(case, {rank: r[1] for rank, r in got.items()}, ref_params, PARAM_RTOL)


def assert_params(
    case: Case, got: dict[int, dict[str, torch.Tensor]], ref_params: dict[str, torch.Tensor],
    rtol: float,
) -> None:
    """Every rank's parameters are within ``rtol`` of the reference; together they hold all."""
    seen: set[str] = set()
    for rank, params in got.items():
        for name, value in params.items():
            assert name in ref_params, f"{case}: rank {rank} has unknown parameter {name}"
            d = rel_diff(value, ref_params[name])
            assert d <= rtol, f"{case}: rank {rank} {name} differs by {d:.2e} (relative)"
            seen.add(name)
    # a tied weight is one tensor under two names; holding either name covers it
    by_storage: dict[int, set[str]] = {}
    for name, t in ref_params.items():
        by_storage.setdefault(t.untyped_storage().data_ptr(), set()).add(name)
    missing = [sorted(names) for names in by_storage.values() if not names & seen]
    assert not missing, f"{case}: no rank holds {missing}"
