"""Partitioning: literal splits, brute-force optimality, properties and error messages."""

from __future__ import annotations

import ast
import itertools
import math
import random
from pathlib import Path

import pytest

from conveyor.parallel import partition as partition_module
from conveyor.parallel.partition import (
    Partition,
    PartitionError,
    balance_ranks,
    by_cost,
    by_params,
    stage_costs,
    uniform,
)


def all_partitions(num_blocks: int, num_stages: int) -> list[Partition]:
    """Every contiguous split, in lexicographic order of cut points."""
    result = []
    for cuts in itertools.combinations(range(1, num_blocks), num_stages - 1):
        edges = (0, *cuts, num_blocks)
        result.append(Partition(tuple(itertools.pairwise(edges))))
    return result


def assert_valid(part: Partition, num_blocks: int, num_stages: int) -> None:
    assert part.num_stages == num_stages
    assert part.num_blocks == num_blocks
    assert part.bounds[0][0] == 0
    assert part.bounds[-1][1] == num_blocks
    for (_, end), (start, _) in itertools.pairwise(part.bounds):
        assert end == start
    assert all(end > start for start, end in part.bounds)
    assert [b for s in range(num_stages) for b in part.blocks_of(s)] == list(range(num_blocks))


# --- Partition ---------------------------------------------------------------------------


def test_partition_helpers() -> None:
    part = Partition(((0, 3), (3, 6), (6, 10)))
    assert str(part) == "[0:3 | 3:6 | 6:10]"
    assert part.num_stages == 3
    assert part.num_blocks == 10
    assert part.sizes == (3, 3, 4)
    assert part.blocks_of(1) == range(3, 6)
    assert [part.stage_of(b) for b in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert Partition.from_sizes([3, 3, 4]) == part
    with pytest.raises(IndexError, match="block 10 .* 10 blocks"):
        part.stage_of(10)
    with pytest.raises(IndexError, match="stage 3 .* 3 stages"):
        part.blocks_of(3)


@pytest.mark.parametrize(
    "bounds",
    [(), ((1, 3),), ((0, 3), (4, 6)), ((0, 3), (3, 3), (3, 6)), ((0, 3), (2, 6))],
)
def test_partition_rejects_invalid_bounds(bounds: tuple[tuple[int, int], ...]) -> None:
    with pytest.raises(PartitionError):
        Partition(bounds)


# --- uniform -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_blocks", "num_stages", "expected"),
    [
        (10, 1, [(0, 10)]),
        (10, 2, [(0, 5), (5, 10)]),  # emb+4 | 4+head
        (10, 3, [(0, 4), (4, 7), (7, 10)]),  # emb+3 | 3 | 2+head
        (10, 4, [(0, 3), (3, 5), (5, 7), (7, 10)]),  # emb+2 | 2 | 2 | 2+head
        (10, 8, [(0, 2), *((i, i + 1) for i in range(2, 8)), (8, 10)]),  # one layer each
        (10, 9, [(0, 2), *((i, i + 1) for i in range(2, 10))]),  # head alone
        (10, 10, [(i, i + 1) for i in range(10)]),
        (3, 2, [(0, 2), (2, 3)]),
        (2, 1, [(0, 2)]),
        (2, 2, [(0, 1), (1, 2)]),
        (1, 1, [(0, 1)]),
    ],
)
def test_uniform_literal(num_blocks: int, num_stages: int, expected: list[tuple[int, int]]) -> None:
    part = uniform(num_blocks, num_stages)
    assert list(part.bounds) == expected
    assert_valid(part, num_blocks, num_stages)


@pytest.mark.parametrize("num_blocks", range(1, 40))
def test_uniform_properties(num_blocks: int) -> None:
    for num_stages in range(1, num_blocks + 1):
        part = uniform(num_blocks, num_stages)
        assert_valid(part, num_blocks, num_stages)
        sizes = list(part.sizes)
        if num_blocks - 2 >= num_stages:
            sizes[0] -= 1  # embedding
            sizes[-1] -= 1  # head
        assert max(sizes) - min(sizes) <= 1, (num_blocks, num_stages, part)


# --- by_cost -----------------------------------------------------------------------------


def brute_force_key(costs: list[float], num_stages: int) -> tuple[float, float, Partition]:
    """The documented objective: min max, then min sum of squares, then earliest cuts."""
    best = None
    for part in all_partitions(len(costs), num_stages):  # lexicographic order
        per_stage = stage_costs(part, costs)
        key = (max(per_stage), sum(c * c for c in per_stage))
        if best is None or key < best[:2]:
            best = (*key, part)
    assert best is not None
    return best


def test_by_cost_matches_brute_force_integers() -> None:
    rng = random.Random(0)
    for num_blocks in range(1, 9):
        for num_stages in range(1, num_blocks + 1):
            for _ in range(20):
                costs = [float(rng.randint(0, 9)) for _ in range(num_blocks)]
                part = by_cost(costs, num_stages)
                assert_valid(part, num_blocks, num_stages)
                best_max, best_sq, best_part = brute_force_key(costs, num_stages)
                got = stage_costs(part, costs)
                assert max(got) == best_max, (costs, num_stages, part)
                # Integer costs: sums are exact, so the tie-break is checked exactly too.
                assert part == best_part, (costs, num_stages, part, best_part)


def test_by_cost_matches_brute_force_floats() -> None:
    rng = random.Random(1)
    cases = [[0.1, 0.2, 0.3, 0.4, 0.5], [1e-9, 3.5, 1e3, 2.25, 0.0, 7.125, 1e-3]]
    cases += [[rng.uniform(0.0, 5.0) for _ in range(n)] for n in (3, 6, 8, 8)]
    cases += [[rng.lognormvariate(0.0, 2.0) for _ in range(8)] for _ in range(3)]
    for costs in cases:
        for num_stages in range(1, len(costs) + 1):
            part = by_cost(costs, num_stages)
            assert_valid(part, len(costs), num_stages)
            best_max, best_sq, _ = brute_force_key(costs, num_stages)
            got = stage_costs(part, costs)
            assert max(got) == best_max, (costs, num_stages, part)
            assert math.isclose(sum(c * c for c in got), best_sq, rel_tol=1e-12)


def test_by_cost_literal() -> None:
    # Embedding cheap, head expensive: the head gets a stage nearly to itself.
    costs = [1, 4, 4, 4, 4, 4, 4, 4, 4, 12]
    assert str(by_cost(costs, 2)) == "[0:6 | 6:10]"  # 21 | 24
    assert str(by_cost(costs, 4)) == "[0:3 | 3:6 | 6:9 | 9:10]"  # 9 | 12 | 12 | 12
    # Tie on the max (10): the sum of squares balances the other stages.
    assert str(by_cost([10, 1, 1, 1, 1], 3)) == "[0:1 | 1:3 | 3:5]"
    # Tie on both: the earliest cuts win.
    assert str(by_cost([1, 1, 1, 10], 3)) == "[0:1 | 1:3 | 3:4]"
    # All zero: every split is optimal; earliest cuts.
    assert str(by_cost([0, 0, 0, 0], 2)) == "[0:1 | 1:4]"
    assert str(by_cost([5.0], 1)) == "[0:1]"


def test_by_cost_deterministic_and_large() -> None:
    rng = random.Random(2)
    costs = [rng.uniform(1.0, 2.0) for _ in range(200)]
    part = by_cost(costs, 16)
    assert_valid(part, 200, 16)
    assert by_cost(list(costs), 16) == part
    # Uniform costs split into equal counts.
    assert by_cost([1.0] * 12, 4) == Partition.from_sizes([3, 3, 3, 3])


def test_by_params() -> None:
    params = [1000, 500, 500, 500, 500, 1000]
    part = by_params(params, 2)
    assert str(part) == "[0:3 | 3:6]"
    assert stage_costs(part, params) == [2000.0, 2000.0]


# --- errors ------------------------------------------------------------------------------


def test_too_many_stages_message() -> None:
    with pytest.raises(PartitionError) as info:
        uniform(10, 12)
    message = str(info.value)
    assert "10 blocks (8 layers + embedding + head)" in message
    assert "12 stages" in message
    assert "at most 10 stages" in message
    with pytest.raises(PartitionError, match=r"3 blocks .* 4 stages.*at most 3 stages"):
        by_cost([1.0, 2.0, 3.0], 4)


@pytest.mark.parametrize("num_stages", [0, -2])
def test_too_few_stages_message(num_stages: int) -> None:
    for call in (lambda: uniform(10, num_stages), lambda: by_cost([1.0] * 4, num_stages)):
        with pytest.raises(PartitionError, match=rf"num_stages={num_stages} must be at least 1"):
            call()


def test_bad_costs_messages() -> None:
    with pytest.raises(PartitionError, match="costs is empty; pass one value per block"):
        by_cost([], 1)
    with pytest.raises(PartitionError, match=r"costs\[2\] = -1.5; .* >= 0"):
        by_cost([1.0, 2.0, -1.5], 2)
    with pytest.raises(PartitionError, match=r"costs\[0\] = nan; .* finite"):
        by_cost([math.nan, 1.0], 1)
    with pytest.raises(PartitionError, match=r"param_counts\[1\] = -3"):
        by_params([1, -3], 1)
    with pytest.raises(PartitionError, match="num_blocks=0 must be at least 1"):
        uniform(0, 1)
    with pytest.raises(PartitionError, match=r"got 3 costs for partition \[0:2 \| 2:4\] of 4"):
        stage_costs(Partition.from_sizes([2, 2]), [1.0, 2.0, 3.0])


def test_errors_are_value_errors() -> None:
    assert issubclass(PartitionError, ValueError)


def test_no_torch_import() -> None:
    tree = ast.parse(Path(partition_module.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert "torch" not in imported


def _rank_max(costs: list[float], part: Partition, ranks: list[int]) -> float:
    sums: dict[int, float] = {}
    for r, c in zip(ranks, stage_costs(part, costs), strict=True):
        sums[r] = sums.get(r, 0.0) + c
    return max(sums.values())


def _placements(pp: int) -> dict[str, list[int]]:
    return {"v": [*range(pp), *reversed(range(pp))], "looped": [s % pp for s in range(2 * pp)]}


@pytest.mark.parametrize("layers,vocab,d_model", [(6, 8192, 256), (8, 8192, 256), (12, 50257, 768),
                                                 (12, 2048, 512), (10, 128256, 2048)])
def test_rank_balance_is_the_exhaustive_optimum_on_transformer_costs(
    layers: int, vocab: int, d_model: int
) -> None:
    from conveyor.config import ModelConfig
    from conveyor.models import block_forward_flops

    cfg = ModelConfig(n_layers=layers, vocab_size=vocab, d_model=d_model, n_heads=4)
    costs = block_forward_flops(cfg, 128)
    for pp in (2, 3, 4):
        for name, ranks in _placements(pp).items():
            if len(ranks) > len(costs):
                continue
            got = balance_ranks(costs, by_cost(costs, len(ranks)), ranks)
            best = min(_rank_max(costs, p, ranks) for p in all_partitions(len(costs), len(ranks)))
            assert _rank_max(costs, got, ranks) <= best * (1 + 1e-12), (name, pp, got)


def test_rank_balance_unloads_the_rank_holding_embedding_and_head() -> None:
    # V placement: rank 0 runs the first and the last stage; balancing stages alone
    # leaves it the embedding, the head and their layers
    costs = [0.0] + [1.0] * 8 + [2.5]
    ranks = [0, 1, 1, 0]
    stage_split = by_cost(costs, 4)
    got = balance_ranks(costs, stage_split, ranks)
    assert _rank_max(costs, got, ranks) == 5.5  # 11.0 over 2 ranks, as even as blocks allow
    assert _rank_max(costs, stage_split, ranks) > 5.5


def test_one_stage_per_rank_keeps_the_stage_balanced_split() -> None:
    costs = [0.0, 1.0, 1.0, 1.0, 3.0]
    split = by_cost(costs, 2)
    assert balance_ranks(costs, split, [0, 1]) == split


def test_rank_balance_needs_a_rank_per_stage() -> None:
    with pytest.raises(PartitionError, match="got 3 stage ranks for 4 stages"):
        balance_ranks([1.0] * 6, uniform(6, 4), [0, 1, 0])
