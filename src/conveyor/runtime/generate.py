"""Pipelined generation on the executor: prompts in microbatches, rounds around a ring.

Each rank holds one model stage's blocks and, per microbatch, their KV caches.
Generation runs as forward-only schedules of the IR
(:func:`conveyor.schedules.generation.generation_segment`): a round is one F per
stage of a microbatch, the last stage samples, and the sampled tokens cross back
to rank 0 as the input of the next round, through the same executor and
point-to-point layer as training (static boundary signatures, one group per link,
timeouts naming the action, NCCL-semantics mode, recorded timelines)::

    rank 0            rank 1                 rank pp-1
    embed + blocks ─► blocks ─► ... ─► blocks + head -> logits -> sample
         ▲                                                          │
         └──────────────── the tokens, next round's input ◄─────────┘

With several microbatches the ring is full: rank 0 runs microbatch B's round
while rank 1 runs A's. A *segment* is a number of rounds run as one schedule;
between segments every rank knows every token (the relay at a segment's end), so
all lay the unfinished sequences out again the same way (finished ones leave
their rows, the KV caches follow), and stop together.
This module only builds stages and schedules: every tensor between ranks moves
through :class:`~conveyor.runtime.executor.Executor`.

Weights arrive through a loader, ``names -> tensors`` by global name
(``blocks.3.mlp.up.weight``), so this module needs no checkpoint format.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..generation import CachedBlocks, GenerationError
from ..generation.batch import PromptBatch, Sampling, SequenceCallback, Tracker
from ..models import EmbeddingBlock, HeadBlock, build_blocks
from ..models.boundary import Signature, TensorSpec, boundary_signature
from ..parallel.mesh import Mesh
from ..parallel.partition import Partition
from ..schedules import lower
from ..schedules.generation import HIDDEN, NEXT, GenerationSegment, generation_segment
from ..schedules.validate import TimedAction
from .comm import P2P
from .executor import Executor, StepInputs
from .links import connect, nccl_semantics_requested

__all__ = ["PipelinedGenerator", "WeightLoader", "build_stage", "generate_pipelined",
           "load_block_weights", "weight_sources"]

WeightLoader = Callable[[Sequence[str]], Mapping[str, Tensor]]
"""Given global tensor names, return those tensors (e.g. a checkpoint reader)."""

SEGMENT_ROUNDS = 16
"""Rounds per schedule: between two, finished sequences leave their rows and all may stop."""


def weight_sources(cfg: ModelConfig, blocks: Mapping[int, nn.Module]) -> dict[str, str]:
    """Global name of each tensor of ``blocks`` -> the stored name to load it from.

    A tied head loads the embedding's token table: a checkpoint need store it once.
    """
    head = cfg.num_blocks - 1
    sources = {}
    for i, block in blocks.items():
        for name in block.state_dict():
            src = f"blocks.{i}.{name}"
            if cfg.tie_embeddings and i == head and name == HeadBlock.tied_param_name:
                src = f"blocks.0.{EmbeddingBlock.tied_param_name}"
            sources[f"blocks.{i}.{name}"] = src
    return sources


def load_block_weights(
    cfg: ModelConfig, blocks: Mapping[int, nn.Module], load: WeightLoader
) -> None:
    """Copy the stored weights into ``blocks`` (block index -> module), by global name."""
    sources = weight_sources(cfg, blocks)
    tensors = load(sorted(set(sources.values())))
    missing = sorted({s for s in sources.values() if s not in tensors})
    if missing:
        raise GenerationError(
            f"{len(missing)} weights are missing from the checkpoint, e.g. {missing[0]}; "
            "pass a checkpoint written for this model config"
        )
    for i, block in blocks.items():
        prefix = f"blocks.{i}."
        state = {
            name[len(prefix):]: tensors[src]
            for name, src in sources.items()
            if name.startswith(prefix)
        }
        try:
            block.load_state_dict(state, strict=True)
        except RuntimeError as err:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise GenerationError(
                f"checkpoint weights do not fit block {i} of the model config ({detail}); "
                "pass the config the checkpoint was trained with"
            ) from None


def build_stage(
    cfg: ModelConfig,
    partition: Partition,
    stage: int,
    *,
    load: WeightLoader | None = None,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict[int, nn.Module]:
    """The blocks of ``stage`` (index -> module), loaded by name, else seed-initialised."""
    indices = list(partition.blocks_of(stage))
    blocks = dict(zip(indices, build_blocks(cfg, seed, indices), strict=True))
    if load is not None:
        load_block_weights(cfg, blocks, load)
    for block in blocks.values():
        block.to(device or torch.device("cpu")).eval()
    return blocks



class PipelinedGenerator:
    """This rank's model stage, generating batches of prompts on the executor.

    Every pipeline rank builds one (a collective call: it connects the ring of
    point-to-point groups once) and calls :meth:`generate` with the same prompts
    and settings. Without a mesh the whole model is on this rank (pp = 1): the
    same schedules run with every boundary handed over locally.
    """

    def __init__(
        self,
        blocks: Mapping[int, nn.Module],
        cfg: ModelConfig,
        mesh: Mesh | None = None,
        *,
        timeout_s: float = 300.0,
        emulate_nccl: bool | None = None,
    ) -> None:
        self.cfg = cfg
        self.blocks = dict(sorted(blocks.items()))
        self.pp = 1 if mesh is None else mesh.pp
        self.stage = 0 if mesh is None else mesh.pp_rank
        if mesh is not None and mesh.tp > 1:
            raise GenerationError("generation does not run under tensor parallelism yet; "
                                  "use --pp alone")
        first, last = self.stage == 0, self.stage == self.pp - 1
        if (0 in self.blocks, cfg.num_blocks - 1 in self.blocks) != (first, last):
            raise ValueError(
                f"pipeline rank {self.stage} of {self.pp} holds blocks {sorted(self.blocks)}; "
                "the first rank must hold the embedding (block 0) and the last the head, "
                "e.g. from build_stage"
            )
        self.device = next(next(iter(self.blocks.values())).parameters()).device
        self.p2p: P2P | None = None
        if mesh is not None and self.pp > 1:
            ring = lower(generation_segment(self.pp, 2, 1))  # uses every link of any segment
            self.p2p = connect(mesh, ring, self.device, timeout_s,
                               nccl_semantics_requested(emulate_nccl))
            self._stage_ranks = list(mesh.pp_ranks)
        self.record = False  # when True, generate() keeps the executor's timelines
        self.timeline: list[TimedAction] = []

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling,
        *,
        microbatches: int | None = None,
        on_token: SequenceCallback | None = None,
        on_done: Callable[[int], None] | None = None,
        segment_rounds: int = SEGMENT_ROUNDS,
    ) -> list[list[int]]:
        """The new token ids of every prompt; ``on_token(prompt, id)`` as they arrive here.

        ``on_done(prompt)`` is called once a prompt has finished, as this rank learns it.
        ``microbatches`` defaults to the pipeline depth, the fewest that keep the ring
        full (each more costs an action per stage and round). Same
        stopping rules and errors as :func:`conveyor.generation.generate`.
        """
        m = microbatches or self.pp
        sampling = self._sampling(sampling)
        batch = self._batch(prompts, max_new_tokens, m)
        run = _Run(self, batch, Tracker(batch, sampling, on_token, on_done), sampling)
        self.timeline = []
        rounds_done, t0 = 0, time.perf_counter()
        while True:
            run.regroup(m)  # finished sequences leave their rows
            if not run.tracker.layout:
                return run.tracker.out
            rounds = min(segment_rounds, run.tracker.rounds_left())
            self._segment(run, rounds_done, rounds, t0)
            rounds_done += rounds

    # What a model family changes (runtime.seq2seq overrides these for encoder-decoders)

    def _sampling(self, sampling: Sampling) -> Sampling:
        """The sampling settings generation runs with."""
        return sampling

    def _batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               microbatches: int) -> PromptBatch:
        """The prompts split into microbatches of one shape."""
        return PromptBatch(prompts, max_new_tokens, self.cfg, microbatches)

    def _stack(self, batch: PromptBatch, rows: Sequence[int]) -> CachedBlocks:
        """This rank's blocks with the caches of one microbatch (``rows``: prompt indices)."""
        return CachedBlocks(self.blocks, self.cfg, len(rows), batch.cache_len, self.device,
                            padding=batch.padding(rows, self.device))

    def _hidden_signature(self, batch: PromptBatch, size: int, round_: int,
                          boundary: int) -> Signature:
        """What crosses a cut within round ``round_`` (``boundary``: a virtual stage)."""
        return boundary_signature(self.cfg, size, batch.slots(round_)[1], boundary)

    def _segment(self, run: _Run, first_round: int, rounds: int, t0: float) -> None:
        """Run ``rounds`` rounds of every microbatch of the current layout as one schedule."""
        layout = run.tracker.layout
        seg = GenerationSegment(self.pp, rounds)
        schedule = lower(generation_segment(self.pp, rounds, len(layout)))
        stages = {v: _VirtualStage(run, seg, v, first_round)
                  for v in schedule.placement.stages_of(self.stage)}
        if self.p2p is not None:
            # the same groups for every segment: only the virtual stages change
            self.p2p.stage_ranks = [self._stage_ranks[seg.model_stage(v)]
                                    for v in range(seg.num_stages)]
            self.p2p.num_stages = seg.num_stages
            size = len(layout[0])
            self.p2p.signature = lambda b: self._signature(run.batch, size, seg, first_round, b)
        executor = Executor(schedule, self.stage, stages, self.p2p, train=False)  # type: ignore[arg-type]
        executor.record = self.record
        inputs = [torch.empty(0)] * len(layout)  # only stage 0 reads tokens
        if self.stage == 0:
            inputs = [run.batch.tokens(rows, self.device) if first_round == 0
                      else run.tracker.newest(mb, self.device) for mb, rows in enumerate(layout)]
        start = time.perf_counter() - t0
        executor.run(StepInputs(inputs, [torch.empty(0)] * len(layout)))
        self.timeline += [TimedAction(t.rank, t.action, t.start + start, t.end + start,
                                      t.ready + start) for t in executor.timeline]

    def _signature(self, batch: PromptBatch, size: int, seg: GenerationSegment,
                   first_round: int, boundary: int) -> Signature:
        """What crosses the cut after virtual stage ``boundary`` of a segment."""
        kind = seg.crossing(boundary)
        if kind == HIDDEN:
            round_ = first_round + (seg.round_of(boundary) or 0)
            return self._hidden_signature(batch, size, round_, boundary)
        width = 1 if kind == NEXT else seg.rounds
        return {"tokens": TensorSpec((size, width), torch.long, grad=False)}


class _Run:
    """What one generate() call keeps on this rank: caches, generators, the tracker."""

    def __init__(self, gen: PipelinedGenerator, batch: PromptBatch, tracker: Tracker,
                 sampling: Sampling) -> None:
        self.gen, self.batch, self.tracker, self.sampling = gen, batch, tracker, sampling
        self.stacks = [gen._stack(batch, rows) for rows in tracker.layout]
        # one generator per sequence, on the rank that samples (none for greedy)
        self.generators: dict[int, torch.Generator] = {}
        if gen.stage == gen.pp - 1 and sampling.temperature > 0:
            self.generators = {i: torch.Generator(device=gen.device).manual_seed(sampling.seed)
                               for i in range(len(batch.prompts))}
        self.segment_tokens: dict[int, Tensor] = {}  # microbatch -> (size, rounds), last rank

    def regroup(self, max_microbatches: int) -> None:
        """Drop finished sequences' rows; the others' caches follow them to their new rows."""
        picks = self.tracker.regroup(max_microbatches)
        if picks is not None:
            self.stacks = [type(self.stacks[0]).gather(self.stacks, rows) for rows in picks]

    def generators_of(self, mb: int) -> list[torch.Generator | None]:
        """Each row's generator (None: greedy, or an idle row)."""
        return [self.generators.get(i) for i in self.tracker.layout[mb]]


class _VirtualStage:
    """Virtual stage ``v`` of a segment: one model stage in one round, or a relay.

    Duck-types the executor's StageRunner for forward-only steps.
    """

    def __init__(self, run: _Run, seg: GenerationSegment, v: int, first_round: int) -> None:
        self.run, self.seg, self.v = run, seg, v
        self.first_round = first_round
        self.local_round = seg.round_of(v)
        self.is_last_model_stage = seg.model_stage(v) == seg.num_ranks - 1

    def forward(self, mb: int, inputs: Tensor | dict[str, Tensor], targets: object, *,
                train: bool = False) -> dict[str, Tensor]:
        """Run this round (or relay) on microbatch ``mb`` of the current layout."""
        del targets, train
        tracker = self.run.tracker
        if self.local_round is None:  # relay: learn the segment's tokens, pass them on
            self._learn(mb, inputs["tokens"])  # type: ignore[index]
            return {"tokens": inputs["tokens"]}  # type: ignore[index]
        round_ = self.first_round + self.local_round
        x: Tensor | dict[str, Tensor]
        if self.v == 0:  # the segment's first input on rank 0: prompts or newest tokens
            x = inputs
        elif "tokens" in inputs:  # the previous round's tokens, back from the last rank
            tracker.add(mb, round_ - 1, inputs["tokens"].view(-1))  # type: ignore[index]
            x = inputs["tokens"]  # type: ignore[index]
        else:  # hidden states (an encoder-decoder's first round: named tensors)
            x = inputs["hidden"] if len(inputs) == 1 else inputs  # type: ignore[index,arg-type]
        start, _ = self.run.batch.slots(round_)
        y = self.run.stacks[mb](x, start)
        if not self.is_last_model_stage:
            return y if isinstance(y, dict) else {"hidden": y}
        tokens = self.run.sampling.sample(y, self.run.generators_of(mb))  # (size,)
        tracker.add(mb, round_, tokens)
        if self.local_round == 0:
            self.run.segment_tokens[mb] = torch.empty(len(tokens), self.seg.rounds,
                                                      dtype=torch.long, device=tokens.device)
        self.run.segment_tokens[mb][:, self.local_round] = tokens
        if self.local_round < self.seg.rounds - 1:
            return {"tokens": tokens.view(-1, 1)}
        return {"tokens": self.run.segment_tokens.pop(mb)}

    def _learn(self, mb: int, tokens: Tensor) -> None:
        for k in range(tokens.shape[1]):
            self.run.tracker.add(mb, self.first_round + k, tokens[:, k])

    def reset(self) -> None:
        """Nothing is stashed between actions of a forward-only step."""


@torch.no_grad()
def generate_pipelined(
    blocks: Mapping[int, nn.Module],
    cfg: ModelConfig,
    mesh: Mesh,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
    stop_at_eot: bool = True,
    eot_id: int | None = None,
    on_token: Callable[[int], None] | None = None,
    timeout_s: float = 300.0,
) -> list[int]:
    """Continue one prompt with this rank's ``blocks`` as stage ``mesh.pp_rank`` (collective).

    Every pipeline rank calls this with the same prompt and settings and gets the
    new token ids; ``on_token`` sees each token as this rank learns it (rank 0 and
    the last rank at once, the others at the end of each segment).
    """
    sampling = Sampling(temperature, top_k, top_p, seed, stop_at_eot, eot_id)
    gen = PipelinedGenerator(blocks, cfg, mesh, timeout_s=timeout_s)
    stream = None if on_token is None else (lambda _i, t: on_token(t))
    return gen.generate([list(map(int, prompt_ids))], max_new_tokens, sampling,
                        microbatches=1, on_token=stream)[0]
