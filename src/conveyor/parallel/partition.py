"""Partitioning: which contiguous run of blocks each pipeline stage holds.

A model is a flat list of blocks: index 0 is the embedding, the last index is
the LM head, and the transformer layers lie in between. A :class:`Partition`
splits it into contiguous, non-empty stages, given as half-open ranges::

    uniform(10, 3)  ->  [0:4 | 4:7 | 7:10]     emb+3 layers | 3 layers | 2 layers+head

Costs, when given, include the embedding and the head. Pure algorithms, no torch:
the runtime measures or counts costs and hands plain numbers in.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "PartitionError",
    "Partition",
    "uniform",
    "by_cost",
    "by_params",
    "balance_ranks",
    "stage_costs",
]


class PartitionError(ValueError):
    """Blocks cannot be split as asked; the message names the values and the fix."""


def _describe(num_blocks: int) -> str:
    if num_blocks >= 2:
        return f"{num_blocks} blocks ({num_blocks - 2} layers + embedding + head)"
    return f"{num_blocks} block" if num_blocks == 1 else f"{num_blocks} blocks"


def _check_split(num_blocks: int, num_stages: int) -> None:
    if num_stages < 1:
        raise PartitionError(
            f"num_stages={num_stages} must be at least 1; "
            "pass pp * virtual_stages (1 for no pipeline)"
        )
    if num_stages > num_blocks:
        raise PartitionError(
            f"cannot split {_describe(num_blocks)} into {num_stages} stages: every stage "
            f"needs a block; use at most {num_blocks} stages (pp * virtual_stages) "
            "or more layers"
        )


@dataclass(frozen=True)
class Partition:
    """Contiguous, non-empty half-open block ranges, one per stage, covering 0..num_blocks."""

    bounds: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        bounds = tuple((int(start), int(end)) for start, end in self.bounds)
        object.__setattr__(self, "bounds", bounds)
        if not bounds:
            raise PartitionError("a partition needs at least one stage; got no bounds")
        expected = 0
        for stage, (start, end) in enumerate(bounds):
            if start != expected or end <= start:
                raise PartitionError(
                    f"stage {stage} has bounds {start}:{end} in {self}; stages must be "
                    f"non-empty and contiguous, so stage {stage} must start at {expected} "
                    "and end after it"
                )
            expected = end

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> Partition:
        """Build a partition from the number of blocks of each stage, e.g. ``[4, 3, 3]``."""
        bounds = []
        start = 0
        for size in sizes:
            bounds.append((start, start + size))
            start += size
        return cls(tuple(bounds))

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.bounds)

    @property
    def num_blocks(self) -> int:
        """Number of blocks covered (embedding and head included)."""
        return self.bounds[-1][1]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of blocks of each stage."""
        return tuple(end - start for start, end in self.bounds)

    def blocks_of(self, stage: int) -> range:
        """Indices of the blocks held by ``stage``."""
        if not 0 <= stage < self.num_stages:
            raise IndexError(f"stage {stage} is out of range for {self.num_stages} stages")
        return range(*self.bounds[stage])

    def stage_of(self, block: int) -> int:
        """Index of the stage that holds ``block``."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} is out of range for {self.num_blocks} blocks")
        return bisect.bisect_right([end for _, end in self.bounds], block)

    def __str__(self) -> str:
        return "[" + " | ".join(f"{start}:{end}" for start, end in self.bounds) + "]"


def _even(total: int, parts: int) -> list[int]:
    # The remainder goes to the earliest parts: the head (vocab-sized matmul and
    # the loss) is usually the heaviest block, so the last stage gets fewer layers.
    q, r = divmod(total, parts)
    return [q + 1 if i < r else q for i in range(parts)]


def uniform(num_blocks: int, num_stages: int) -> Partition:
    """Split by count: layers as even as possible, embedding and head joined to the end stages."""
    if num_blocks < 1:
        raise PartitionError(
            f"num_blocks={num_blocks} must be at least 1; a model has an embedding, "
            "its layers and a head"
        )
    _check_split(num_blocks, num_stages)
    num_layers = num_blocks - 2
    if num_layers >= num_stages:
        sizes = _even(num_layers, num_stages)
        sizes[0] += 1
        sizes[-1] += 1
    else:
        # Too few layers to give every stage one: the embedding and head may stand
        # alone, and stages are balanced by block count instead.
        sizes = _even(num_blocks, num_stages)
    return Partition.from_sizes(sizes)


def _check_costs(costs: Sequence[float], what: str) -> list[float]:
    if len(costs) == 0:
        raise PartitionError(
            f"{what} is empty; pass one value per block: embedding, each layer, head"
        )
    values = [float(c) for c in costs]
    for block, value in enumerate(values):
        if not math.isfinite(value) or value < 0:
            raise PartitionError(
                f"{what}[{block}] = {costs[block]!r}; every block's value must be finite "
                "and >= 0 (e.g. measured seconds or parameter counts)"
            )
    return values


def stage_costs(partition: Partition, costs: Sequence[float]) -> list[float]:
    """Total cost of each stage (exactly rounded sum of its blocks' costs)."""
    if len(costs) != partition.num_blocks:
        raise PartitionError(
            f"got {len(costs)} costs for partition {partition} of {partition.num_blocks} "
            f"blocks; pass one cost per block: embedding, each layer, head"
        )
    return [math.fsum(costs[start:end]) for start, end in partition.bounds]


def _min_stages(seg: list[list[float]], limit: float) -> int:
    # Greedy packing: fill each stage while it stays within `limit`. Optimal because
    # costs are non-negative and fsum is monotone in both ends of a range.
    n = len(seg) - 1
    count, start = 0, 0
    while start < n:
        if seg[start][start + 1] > limit:
            return n + 1
        end = start + 1
        while end < n and seg[start][end + 1] <= limit:
            end += 1
        count, start = count + 1, end
    return count


def by_cost(costs: Sequence[float], num_stages: int) -> Partition:
    """Optimal contiguous split minimising the cost of the slowest stage.

    Exact. Among splits with the optimal maximum, the one with the smallest sum of
    squared stage costs is chosen (the other stages are balanced too); remaining
    ties go to the lexicographically smallest cut points (earlier stages smaller).
    Stage costs are exactly rounded sums (``math.fsum``), as in :func:`stage_costs`.
    """
    values = _check_costs(costs, "costs")
    n = len(values)
    _check_split(n, num_stages)

    # seg[i][j] = cost of blocks i..j-1 (O(n^2) table; fine for a few hundred blocks).
    seg = [[0.0] * (n + 1) for _ in range(n + 1)]
    for i in range(n):
        for j in range(i + 1, n + 1):
            seg[i][j] = math.fsum(values[i:j])

    # 1. The optimal maximum is some stage cost: binary search over the sorted
    #    candidates for the smallest one that greedy packing fits in num_stages.
    #    Fewer greedy stages are fine: splitting a stage never raises its cost.
    candidates = sorted({seg[i][j] for i in range(n) for j in range(i + 1, n + 1)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _min_stages(seg, candidates[mid]) <= num_stages:
            hi = mid
        else:
            lo = mid + 1
    limit = candidates[lo]

    # 2. Among splits with every stage <= limit, minimise the sum of squares.
    #    best[k][i]: blocks i..n-1 in k stages; cut[k][i]: end of the first of them.
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[-1] * (n + 1) for _ in range(num_stages + 1)]
    for i in range(n):
        if seg[i][n] <= limit:
            best[1][i] = seg[i][n] ** 2
            cut[1][i] = n
    for k in range(2, num_stages + 1):
        for i in range(n - k + 1):
            for j in range(i + 1, n - k + 2):
                if seg[i][j] > limit:
                    break
                value = seg[i][j] ** 2 + best[k - 1][j]
                if value < best[k][i]:  # strict: the earliest cut wins ties
                    best[k][i] = value
                    cut[k][i] = j
    assert best[num_stages][0] < inf, "greedy found a split the DP missed"

    bounds = []
    start = 0
    for k in range(num_stages, 0, -1):
        end = cut[k][start]
        bounds.append((start, end))
        start = end
    return Partition(tuple(bounds))


def _neighbours(cuts: list[int], n: int) -> Iterator[list[int]]:
    """Every cut moved alone to each other place, then every two cuts moved one each."""
    def valid(c: list[int]) -> bool:
        return all(a < b for a, b in zip([0, *c], [*c, n], strict=True))

    for i in range(len(cuts)):
        for pos in range(1, n):
            trial = cuts[:i] + [pos] + cuts[i + 1:]
            if pos != cuts[i] and valid(trial):
                yield trial
    for i, j in itertools.combinations(range(len(cuts)), 2):
        for di, dj in itertools.product((-1, 1), repeat=2):
            trial = list(cuts)
            trial[i] += di
            trial[j] += dj
            if valid(trial):
                yield trial


def balance_ranks(costs: Sequence[float], partition: Partition,
                  ranks: Sequence[int]) -> Partition:
    """Move ``partition``'s cuts until the busiest rank's sum is as small as they can make it.

    ``ranks[s]`` is the rank that runs stage ``s``. With one stage per rank this is
    :func:`by_cost`'s problem and its split is kept. With several (interleaved, V
    placements) the ranks' sums, not the stages', bound the step, and a split that
    balances stages can load one rank with both the embedding and the head. A local
    search scored by (busiest rank, sum of squared rank sums, costliest stage), so among
    rank-balanced splits the stages stay balanced too: moves of one cut anywhere and of
    two cuts by one block each, taken while they improve, from the stage-balanced
    ``partition`` and from the uniform split; the better end wins. On analytic costs of
    GPT-2/Llama shapes it finds the exhaustive optimum (``tests/test_partition.py``).
    """
    values = _check_costs(costs, "costs")
    if len(ranks) != partition.num_stages:
        raise PartitionError(f"got {len(ranks)} stage ranks for {partition.num_stages} stages; "
                             "pass the rank of every stage")
    if len(set(ranks)) == len(ranks):
        return partition
    n = len(values)

    def score(cuts: list[int]) -> tuple[float, float, float]:
        edges = [0, *cuts, n]
        stage = [math.fsum(values[a:b]) for a, b in zip(edges, edges[1:], strict=False)]
        by_rank: dict[int, list[float]] = {}
        for r, c in zip(ranks, stage, strict=True):
            by_rank.setdefault(r, []).append(c)
        sums = [math.fsum(v) for v in by_rank.values()]
        return max(sums), math.fsum(x * x for x in sums), max(stage)

    def descend(cuts: list[int]) -> tuple[tuple[float, float, float], list[int]]:
        best = score(cuts)
        moved = True
        while moved:
            moved = False
            for trial in _neighbours(cuts, n):
                value = score(trial)
                if value < best:
                    best, cuts, moved = value, trial, True
                    break  # search around the new split
        return best, cuts

    starts = [partition, uniform(n, partition.num_stages)]
    cuts = min((descend([e for _, e in p.bounds[:-1]]) for p in starts), key=lambda r: r[0])[1]
    return Partition.from_sizes([b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)])


def by_params(param_counts: Sequence[int], num_stages: int) -> Partition:
    """Optimal contiguous split minimising the largest per-stage parameter count."""
    _check_costs(param_counts, "param_counts")
    return by_cost([float(c) for c in param_counts], num_stages)
