"""Configuration dataclasses, validated on construction.

Every user mistake that can be found before a process starts is found here and
raised as :class:`ConfigError` naming the field, its value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from .schedules import SCHEDULES, ScheduleError, check_virtual_stages

__all__ = [
    "ACTIVATIONS",
    "FAMILIES",
    "NORM_POSITIONS",
    "PARTITIONS",
    "RECOMPUTE_MODES",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "check_fields",
    "from_dict",
    "to_dict",
]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


RECOMPUTE_MODES: dict[str, bool | str] = {"none": False, "full": True, "selective": "selective"}
"""``ParallelConfig.recompute`` by name: off, every transformer block, the attention core."""

PARTITIONS = ("uniform", "params", "cost")
"""Ways to split blocks into stages (``parallel.layout.PARTITIONERS`` implements them):
equal layer counts, balanced parameter counts, or balanced predicted compute."""


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")


NORM_POSITIONS = ("pre", "post")
"""Where a layer's norms sit (``ModelConfig.norm_position``): before each sublayer, or after
each residual add."""

ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")
"""MLP activations by name (``ModelConfig.activation``; ``models.layers`` holds the functions)."""

FLAVOUR_ACTIVATION = {"gpt2": "gelu_tanh", "llama": "silu"}
"""Each flavour's own activation: what ``activation=None`` means."""

SPECIAL_NAMES = {"gpt": (), "bert": ("pad", "cls", "sep", "mask"), "t5": ("pad", "eos")}
"""The special ids a family's objective needs (``ModelConfig.special_ids``); t5 also takes
``sentinel_0``, ``sentinel_1``... (at least one, numbered from 0 without gaps)."""

FAMILIES = ("gpt", "bert", "t5")
"""Model families (``models.families`` lists each one's blocks, boundary and objective)."""


def _number(obj: object, name: str, *, low: float = 0.0, inclusive: bool = True) -> None:
    # inf and nan are refused too: an infinite lr or epsilon trains NaN without a word
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value < low if inclusive else value <= low):
        bound = f">= {low:g}" if inclusive else f"> {low:g}"
        raise ConfigError(f"{name}={value!r} must be a finite number {bound}")


def _special_ids(cfg: Any) -> dict[str, int] | None:
    """``cfg.special_ids`` (a mapping, or (name, id) pairs) checked, sorted by name; None if none."""
    raw = cfg.special_ids
    if not raw:
        return None
    try:
        pairs = dict(raw.items() if isinstance(raw, Mapping) else raw)
    except (TypeError, ValueError):
        raise ConfigError(f"special_ids={raw!r} must be a table of token name = id") from None
    names = SPECIAL_NAMES[cfg.family]
    sentinels = sum(1 for n in pairs if isinstance(n, str) and n.startswith("sentinel_"))
    known = set(names) | ({f"sentinel_{k}" for k in range(sentinels)} if cfg.family == "t5"
                          else set())
    for name, value in pairs.items():
        if name not in known:
            raise ConfigError(f"special_ids: {name!r} is no special id of family="
                              f"{cfg.family!r}; use {', '.join(names) or 'none'}"
                              + (", sentinel_0, sentinel_1..." if cfg.family == "t5" else ""))
        if not isinstance(value, int) or isinstance(value, bool) or \
                not 0 <= value < cfg.vocab_size:
            raise ConfigError(f"special_ids: {name}={value!r} must be an id below "
                              f"vocab_size={cfg.vocab_size}")
    if pairs and (missing := [n for n in names if n not in pairs]
                  + (["sentinel_0"] if cfg.family == "t5" and not sentinels else [])):
        raise ConfigError(f"special_ids names no {', '.join(missing)}; give every one of "
                          f"family={cfg.family!r}'s, or none for its own")
    return dict(sorted(pairs.items()))


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of a transformer: a decoder (gpt), an encoder (bert) or an encoder-decoder (t5)."""

    family: Literal["gpt", "bert", "t5"] = "gpt"
    """'gpt': causal LM; 'bert': encoder, masked LM + next sentence; 't5': encoder-decoder,
    span corruption (n_layers encoder layers, then as many decoder layers)."""
    flavour: Literal["gpt2", "llama"] = "gpt2"
    """'gpt2': LayerNorm, GELU MLP, learned positions. 'llama': RMSNorm, SwiGLU, rotary."""
    vocab_size: int = 8192
    """Number of token ids."""
    n_layers: int = 8
    """Number of transformer blocks (the embedding and head are extra blocks)."""
    d_model: int = 256
    """Hidden width."""
    n_heads: int = 4
    """Attention heads; must divide d_model."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (llama only); None means n_heads."""
    d_ff: int | None = None
    """MLP hidden width; None means 4*d_model (gpt2) or a SwiGLU width near 8/3*d_model (llama)."""
    max_seq_len: int = 128
    """Longest sequence the model accepts (size of the learned position table)."""
    tie_embeddings: bool = False
    """Share the token embedding with the LM head (grads summed across stages when split)."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    rope_theta: float = 10000.0
    """Rotary base (llama only)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    norm_position: Literal["pre", "post"] = "pre"
    """'pre': each sublayer reads a normed input (x + f(norm(x))) and the head norms the
    stream first; 'post': each residual sum is normed (norm(x + f(x))) and the head has no
    final norm (the original transformer and BERT)."""
    activation: Literal["gelu_tanh", "gelu", "silu", "relu"] | None = None
    """The MLP's activation (the gate's in llama's gated MLP; also BERT's MLM transform);
    None: the flavour's own, 'gelu_tanh' for gpt2 and 'silu' for llama. 'gelu' is the exact
    (erf) GELU."""
    head_bias: bool = False
    """Whether the vocabulary projection of the head adds a bias (BERT's MLM decoder)."""
    special_ids: dict[str, int] | None = None
    """The objective's special token ids by name (a table in TOML), taken from
    the model's own tokenizer: an imported BERT's [PAD]/[CLS]/[SEP]/[MASK], an imported T5's
    pad, eos and <extra_id_k> sentinels (names in SPECIAL_NAMES). None: the family's own
    ids, placed after the tokenizer's."""
    num_labels: int = 0
    """Classes of a sequence-classification head (fine-tuning); 0: the pretraining head."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family={self.family!r} is unknown; use one of {', '.join(FAMILIES)}")
        if self.flavour not in ("gpt2", "llama"):
            raise ConfigError(f"flavour={self.flavour!r} is unknown; use 'gpt2' or 'llama'")
        _positive(self, "vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "choose n_heads that divides d_model"
            )
        if self.head_dim % 2 and self.flavour == "llama":
            raise ConfigError(
                f"head_dim={self.head_dim} (d_model/n_heads) must be even for rotary positions"
            )
        if self.n_kv_heads is not None:
            _positive(self, "n_kv_heads")
            if self.flavour != "llama":
                raise ConfigError("n_kv_heads (grouped-query attention) needs flavour='llama'")
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(
                    f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                    "choose n_kv_heads that divides n_heads"
                )
        if self.d_ff is not None:
            _positive(self, "d_ff")
        if not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool) \
                or self.num_labels < 0 or self.num_labels == 1:
            raise ConfigError(f"num_labels={self.num_labels!r} must be 0 (the pretraining head) "
                              "or a class count >= 2")
        if self.num_labels and self.family == "t5":
            raise ConfigError("num_labels > 0: family 't5' has no classification head; fine-tune "
                              "it as seq2seq (source -> target), or use bert or gpt")
        if self.num_labels and self.tie_embeddings:
            raise ConfigError("num_labels > 0 replaces the LM head, so there is nothing to tie "
                              "the embedding to; set tie_embeddings=False")
        for name in ("norm_eps", "rope_theta", "init_std"):  # each gives NaN from step 0 at <= 0
            _number(self, name, inclusive=False)
        if self.norm_position not in NORM_POSITIONS:
            raise ConfigError(f"norm_position={self.norm_position!r} is unknown; use 'pre' "
                              "(norm before each sublayer) or 'post' (after each residual add)")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r} is unknown; use one of "
                              f"{', '.join(ACTIVATIONS)} (or leave it out for the flavour's own)")
        if self.activation == FLAVOUR_ACTIVATION[self.flavour]:
            # one spelling of the default, so a saved config and a fresh one compare equal
            object.__setattr__(self, "activation", None)
        if not isinstance(self.head_bias, bool):
            raise ConfigError(f"head_bias={self.head_bias!r} must be true or false")
        object.__setattr__(self, "special_ids", _special_ids(self))

    def __hash__(self) -> int:
        # the one dict field hashes as its sorted items (configs key caches, plan._partition)
        return hash(tuple((f.name, tuple(v.items()) if isinstance(v := getattr(self, f.name), dict)
                           else v) for f in dataclasses.fields(self)))

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def act(self) -> str:
        """The MLP activation actually used (``activation``, else the flavour's)."""
        return self.activation or FLAVOUR_ACTIVATION[self.flavour]

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads actually used."""
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        """MLP hidden width actually used."""
        if self.d_ff is not None:
            return self.d_ff
        if self.flavour == "gpt2":
            return 4 * self.d_model
        return 64 * ((8 * self.d_model // 3 + 63) // 64)

    @property
    def num_blocks(self) -> int:
        """Length of the flat block list: embedding + layers + head.

        An encoder-decoder has n_layers encoder layers, a bridge (the encoder's final
        norm) and n_layers decoder layers between its embedding and head.
        """
        return 2 * self.n_layers + 3 if self.family == "t5" else self.n_layers + 2


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the model and batch are split over processes."""

    pp: int = 1
    """Pipeline stages (ranks in a pipeline)."""
    dp: int = 1
    """Data-parallel replicas."""
    tp: int = 1
    """Tensor-parallel width: ranks sharing every stage's layers (Megatron-style)."""
    sequence_parallel: bool = False
    """With tp > 1, split norms, residuals and stage boundaries along the sequence over tp."""
    schedule: str = "1f1b"
    """Pipeline schedule name."""
    microbatches: int = 4
    """Microbatches per step per data-parallel replica."""
    virtual_stages: int | None = None
    """Model chunks per pipeline rank; None: what the schedule needs (2 for interleaved and zb-v)."""
    recompute: bool | Literal["selective"] = False
    """Recompute activations in backward instead of stashing them: True (or "full") every
    transformer block's, "selective" only the attention core's (the linears' inputs are
    kept); False (or "none") keeps everything."""
    compile: bool = False
    """``torch.compile`` every block (split backward included); the first step pays for compiling."""
    lend_cores: bool = False
    """On CPU, run warm-up and cool-down actions that no other rank can run alongside on the
    idle ranks' cores too (only where every rank is on this machine, none is oversubscribed
    and blocks are not compiled).
    Off by default: on a machine busy with other work, a 2-thread action waits for the
    thread the other work delays, and lending costs more than it gains."""
    partition: Literal["uniform", "params", "cost"] = "cost"
    """How blocks are assigned to stages: one of PARTITIONS (default: balanced predicted compute)."""
    partition_costs: Literal["analytic", "profile"] = "analytic"
    """What 'cost' balances: analytic FLOPs, or each block's forward + backward timed here."""
    schedule_file: str | None = None
    """A hand-written CSV schedule (see `conveyor schedule show --csv`); replaces ``schedule``."""
    dp_bucket_mb: float = 25.0
    """MiB per data-parallel grad all-reduce bucket, issued as backward finishes (0: one per parameter)."""
    zero: int = 0
    """ZeRO stage: 1 shards optimizer state over the dp replicas (0: every replica keeps all)."""

    # Only what each field says on its own is checked here. What the fields decide
    # together (chunks, stages, the schedule object, the partition) is decided, and
    # checked, by parallel.layout.resolve_layout alone.
    def __post_init__(self) -> None:
        _positive(self, "pp", "dp", "tp", "microbatches")
        if not isinstance(self.dp_bucket_mb, (int, float)) or not self.dp_bucket_mb >= 0:
            raise ConfigError(f"dp_bucket_mb={self.dp_bucket_mb!r} must be a number >= 0 "
                              "(0: reduce each parameter's grad on its own)")
        if self.zero not in (0, 1):
            raise ConfigError(f"zero={self.zero!r} is not supported; use 0 (off) or 1 "
                              "(optimizer state sharded over dp)")
        if self.partition_costs not in ("analytic", "profile"):
            raise ConfigError(f"partition_costs={self.partition_costs!r} is unknown; use "
                              "analytic (FLOPs) or profile (time each block on this machine)")
        for name in ("compile", "lend_cores"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.recompute in RECOMPUTE_MODES:  # the names map onto the booleans older files hold
            object.__setattr__(self, "recompute", RECOMPUTE_MODES[self.recompute])
        elif self.recompute not in (True, False, "selective"):
            raise ConfigError(f"recompute={self.recompute!r} is unknown; use none, selective "
                              "or full (or false / true)")
        if not isinstance(self.sequence_parallel, bool):
            raise ConfigError(f"sequence_parallel={self.sequence_parallel!r} must be true or false")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("sequence_parallel=True splits the sequence over tensor-parallel "
                              "ranks, but tp=1; set tp > 1 or drop sequence_parallel")
        if self.virtual_stages is not None:
            _positive(self, "virtual_stages")
        if self.schedule_file is not None:
            if not Path(self.schedule_file).is_file():
                raise ConfigError(
                    f"schedule_file={self.schedule_file!r} does not exist; write one with "
                    "`conveyor schedule show --csv FILE` and edit it"
                )
        elif self.schedule not in SCHEDULES or self.schedule == "forward-only":
            names = ", ".join(n for n in sorted(SCHEDULES) if n != "forward-only")
            why = "cannot train (it has no backward)" if self.schedule in SCHEDULES else "is unknown"
            raise ConfigError(f"schedule={self.schedule!r} {why}; choose one of {names}")
        elif self.virtual_stages is not None:
            try:
                check_virtual_stages(self.schedule, self.virtual_stages)
            except ScheduleError as err:
                raise ConfigError(str(err)) from None
        if self.partition not in PARTITIONS:
            raise ConfigError(
                f"partition={self.partition!r} is unknown; use one of {', '.join(PARTITIONS)}"
            )

    @property
    def world_size(self) -> int:
        """Processes needed: pp * dp * tp."""
        return self.pp * self.dp * self.tp

    def check_against(self, model: ModelConfig, global_batch: int) -> None:
        """Raise ConfigError if ``model`` has fewer blocks than pp or the batch does not split.

        Stages per rank are the layout's to decide: ``resolve_layout`` checks the rest.
        """
        if self.pp > model.num_blocks:
            raise ConfigError(
                f"layers={model.n_layers} (+ embedding and head = {model.num_blocks} blocks) "
                f"cannot be split into pp={self.pp} stages; use pp*virtual_stages <= "
                f"{model.num_blocks} or more layers"
            )
        per_replica, rem = divmod(global_batch, self.dp)
        if rem:
            raise ConfigError(
                f"batch_size={global_batch} is not divisible by dp={self.dp}; "
                "use a batch size that is a multiple of dp"
            )
        if per_replica % self.microbatches:
            raise ConfigError(
                f"batch_size={global_batch} cannot be split into microbatches="
                f"{self.microbatches} (per data-parallel replica: {per_replica} sequences); "
                "use a batch size that is a multiple of dp*microbatches"
            )


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict (for logs and checkpoints)."""
    return dataclasses.asdict(cfg)


def _non_negative(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name}={value!r} must be a non-negative integer")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The optimisation loop: steps, batch, AdamW and its schedule, evaluation, checkpoints."""

    steps: int = 800
    """Optimizer steps to train for (in total, counting those before a resume)."""
    batch_size: int = 16
    """Sequences per optimizer step (the global batch, over all data-parallel replicas)."""
    lr: float = 3e-3
    """Peak learning rate, reached after the warmup."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup: int | None = None
    """Steps of linear warmup from lr/warmup to lr, fewer than steps; None: min(50, steps // 10)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay of matrices (norms and biases are not decayed)."""
    grad_clip: float = 1.0
    """Clip gradients to this global norm over all stages; 0 turns clipping off."""
    eval_every: int = 100
    """Steps between validation runs (also run at step 0 and at the end); 0: only those two."""
    eval_batches: int = 8
    """Validation batches (of batch_size sequences) averaged per evaluation; always the same ones."""
    checkpoint_every: int = 400
    """Steps between checkpoints (one is always saved at the end); 0: only at the end."""
    keep: int = 3
    """Newest checkpoints to keep; 0 keeps all."""
    seed: int = 0
    """Seed of the initial weights, the train/val split and the batch order."""
    bf16: bool = False
    """Run forward and backward under bfloat16 autocast (weights and optimizer stay fp32)."""
    trace: bool = False
    """Record every action of the last step on every rank (timeline.json, trace.json)."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard scalars under <run>/tensorboard."""
    run_dir: str = "runs"
    """Directory holding one subdirectory per run."""
    name: str | None = None
    """Name of this run's subdirectory; None: the start time (YYYYmmdd-HHMMSS)."""
    resume: str | None = None
    """Checkpoint (or run directory: its latest) to continue from, in a new run directory;
    'auto': the newest intact checkpoint of this run's directory (run_dir/name), else start."""
    init: str | None = None
    """A model to start from: a Hugging Face directory (save_pretrained), a Conveyor export or
    checkpoint. Its weights, model config and tokenizer are the run's; the optimizer starts fresh."""
    timeout: float = 300.0
    """Seconds a rank waits for a peer (pipeline messages, collectives, checkpoint saves)."""

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "eval_batches")
        _non_negative(self, "eval_every", "checkpoint_every", "keep", "seed")
        if self.warmup is not None:
            _non_negative(self, "warmup")
            if self.warmup >= self.steps and self.warmup > 0:
                raise ConfigError(
                    f"warmup={self.warmup} must be below steps={self.steps}, or the learning "
                    f"rate never reaches lr; pass --warmup below {self.steps}"
                )
        _number(self, "timeout", inclusive=False)
        _number(self, "lr", inclusive=False)
        _number(self, "min_lr")
        _number(self, "weight_decay")
        _number(self, "grad_clip")
        if self.min_lr > self.lr:
            raise ConfigError(
                f"min_lr={self.min_lr} is above lr={self.lr}; use min_lr <= lr"
            )
        if not isinstance(self.bf16, bool):
            raise ConfigError(f"bf16={self.bf16!r} must be true or false")
        if not isinstance(self.trace, bool):
            raise ConfigError(f"trace={self.trace!r} must be true or false")
        if not isinstance(self.tensorboard, bool):
            raise ConfigError(f"tensorboard={self.tensorboard!r} must be true or false")
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ConfigError(f"run_dir={self.run_dir!r} must be a non-empty path")
        if self.name is not None and (
            not isinstance(self.name, str) or not self.name.strip(" .")
            or any(c in self.name for c in "/\\")
        ):
            raise ConfigError(
                f"name={self.name!r} must be a plain directory name (no slashes); "
                "use --run-dir to choose where runs go"
            )
        if self.resume is not None and (not isinstance(self.resume, str) or not self.resume):
            raise ConfigError(f"resume={self.resume!r} must be a checkpoint or run directory")
        if self.init is not None and (not isinstance(self.init, str) or not self.init):
            raise ConfigError(f"init={self.init!r} must be a model directory or checkpoint")
        if self.init is not None and self.resume is not None:
            raise ConfigError("init and resume both given: --resume continues a run with its own "
                              "weights, --init starts a new one from a model; pass one of them")
        if self.resume == "auto" and self.name is None:
            raise ConfigError("resume='auto' continues the run named by --name; pass --name "
                              "(the same on every restart)")

    @property
    def warmup_steps(self) -> int:
        """The warmup actually used: ``warmup``, or min(50, steps // 10) when None."""
        return min(50, self.steps // 10) if self.warmup is None else self.warmup


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the text comes from and how it is split."""

    paths: tuple[str, ...] | None = None
    """Files, directories or globs (.jsonl/.json records need a "text" field); None: the stdlib."""
    val_fraction: float = 0.05
    """Share of the packed sequences held out for validation; 0 turns evaluation off."""
    cache_dir: str | None = None
    """Where the tokenizer and packed sequences are cached; None: <run_dir>/.cache."""

    def __post_init__(self) -> None:
        paths = self.paths
        if isinstance(paths, str):
            paths = (paths,)
        if paths is not None:
            if not isinstance(paths, (list, tuple)) or not all(
                isinstance(p, str) and p for p in paths
            ):
                raise ConfigError(
                    f"paths={self.paths!r} must be a list of file, directory or glob strings"
                )
            if not paths:
                raise ConfigError("paths is empty; give at least one path, or none for the stdlib")
            object.__setattr__(self, "paths", tuple(paths))
        _number(self, "val_fraction")
        if self.val_fraction >= 1:
            raise ConfigError(
                f"val_fraction={self.val_fraction} must be in [0, 1); pass e.g. 0.05"
            )
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            raise ConfigError(f"cache_dir={self.cache_dir!r} must be a non-empty path")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a training run needs, checked together before any process starts."""

    SECTIONS: ClassVar[dict[str, type]] = {
        "model": ModelConfig, "parallel": ParallelConfig, "train": TrainConfig,
        "data": DataConfig,
    }
    """Section name (in TOML files and checkpoint meta) -> config class."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The model shape; max_seq_len is also the training sequence length."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """The process layout."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """The optimisation loop."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """The corpus."""

    def __post_init__(self) -> None:
        self.parallel.check_against(self.model, self.train.batch_size)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "config") -> RunConfig:
        """Build from ``{section: {field: value}}``; unknown sections or fields raise ConfigError."""
        unknown = sorted(set(raw) - set(cls.SECTIONS))
        if unknown:
            raise ConfigError(
                f"{where}: unknown section [{unknown[0]}]; "
                f"known sections: {', '.join(f'[{s}]' for s in cls.SECTIONS)}"
            )
        parts = {
            section: from_dict(kind, raw.get(section, {}), f"{where} [{section}]")
            for section, kind in cls.SECTIONS.items()
        }
        return cls(**parts)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {field: value}}``, the inverse of ``from_dict``."""
        return {section: to_dict(getattr(self, section)) for section in self.SECTIONS}

_C = TypeVar("_C")


def check_fields(cls: type, raw: Mapping[str, Any], where: str) -> None:
    """Raise ConfigError naming the first key of ``raw`` that is no field of ``cls``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table of fields, not {raw!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(
                f"{where}: unknown key {key!r}; {hint}known keys: {', '.join(fields)}"
            )


def from_dict(cls: type[_C], raw: Mapping[str, Any], where: str) -> _C:
    """``cls(**raw)``, naming an unknown field (and the nearest known one) in a ConfigError."""
    check_fields(cls, raw, where)
    return cls(**raw)
