"""Tensor-parallel layers against their plain torch counterparts, at tp=2 and tp=4.

One spawned 4-rank gloo world holds two tp=2 groups and one tp=4 group; each group
runs every case and returns logical (gathered) tensors, which the tests compare with
the plain layers built here from the same seeds.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from conveyor.config import ConfigError, ModelConfig
from conveyor.models import TransformerBlock, build_block
from conveyor.models.linear import WeightGradStore, attach_weight_grad_store
from conveyor.parallel.collectives import (
    Group,
    count_collectives,
    gather_last,
    gather_seq,
    reduce_scatter_seq,
    split_last,
    split_seq,
    tp_rank,
    tp_size,
)
from conveyor.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    full_state_dict,
    gather_full,
    load_full_state_dict,
    qkv_row_order,
    reduce_sequence_parallel_grads,
    shard_heads,
    to_tp_region,
    vocab_parallel_cross_entropy,
)
from conveyor.runtime.launch import launch
from equivalence import rel_diff

pytestmark = pytest.mark.multiprocess

B, T, D, FF, V = 2, 8, 16, 32, 11  # V=11: no tp divides it, so the vocabulary is padded
TOL = 1e-6
WORLD = 4  # one launch: two tp=2 groups and one tp=4 group
ALL_REDUCE_BLOCK = [("all_reduce", "fwd")] * 2 + [("all_reduce", "bwd")] * 2
BLOCKS = {
    "gpt2": ModelConfig(flavour="gpt2", vocab_size=V, n_layers=1, d_model=32, n_heads=4),
    "llama-gqa": ModelConfig(
        flavour="llama", vocab_size=V, n_layers=1, d_model=32, n_heads=8, n_kv_heads=4, d_ff=48
    ),
}


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class PlainMLP(nn.Module):
    """The reference: nn.Linear, GELU, nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)
        with torch.no_grad():  # non-zero biases, so a bias added tp times would show
            self.up.bias.normal_()
            self.down.bias.normal_()

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.down(F.gelu(self.up(x)))


class TPMLP(PlainMLP):
    """Column then row linear, built from a plain MLP's weights."""

    def __init__(self, group: Group, **kw: Any) -> None:
        super().__init__()
        plain = PlainMLP()
        self.up = ColumnParallelLinear.from_full(plain.up.weight, plain.up.bias, group, **kw)
        self.down = RowParallelLinear.from_full(plain.down.weight, plain.down.bias, group, **kw)


class TPAttention(nn.Module):
    """conveyor's Attention with its heads split: fused qkv by column, out by row."""

    def __init__(self, ref: nn.Module, group: Group) -> None:
        super().__init__()
        n, kv, hd = ref.n_heads, ref.kv_heads, ref.head_dim
        self.heads = shard_heads(n, kv, hd, tp_size(group))
        order = qkv_row_order(n, kv, hd, tp_size(group))
        self.qkv = ColumnParallelLinear.from_full(
            ref.qkv.weight, ref.qkv.bias, group, row_order=order, input_is_prepared=True
        )
        self.out = RowParallelLinear.from_full(ref.out.weight, ref.out.bias, group)
        self.rotary = ref.rotary

    def forward(self, h: Tensor) -> Tensor:
        """h (B, T, D), already in the tp region -> (B, T, D) summed over tp."""
        b, t, _ = h.shape
        hq, hkv, hd = self.heads.n_heads, self.heads.kv_heads, self.heads.head_dim
        q, k, v = self.qkv(h).split(self.heads.qkv_widths, dim=-1)
        q = q.view(b, t, hq, hd).transpose(1, 2)
        k = k.view(b, t, hkv, hd).transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
        v = v.view(b, t, hkv, hd).transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, hq * hd))


class TPBlockMLP(nn.Module):
    """conveyor's GeluMLP or SwiGLU with column up/gate and row down projections."""

    def __init__(self, ref: nn.Module, group: Group) -> None:
        super().__init__()
        for name, lin in ref.named_children():
            if name in ("down", "w2"):
                layer: nn.Module = RowParallelLinear.from_full(lin.weight, lin.bias, group)
            else:  # the block enters the tp region once for gate and up
                layer = ColumnParallelLinear.from_full(
                    lin.weight, lin.bias, group, input_is_prepared=True
                )
            self.add_module(name, layer)

    def forward(self, h: Tensor) -> Tensor:
        """h (B, T, D), already in the tp region -> (B, T, D) summed over tp."""
        if hasattr(self, "up"):
            return self.down(F.gelu(self.up(h), approximate="tanh"))
        return self.w2(F.silu(self.w1(h)) * self.w3(h))


class TPBlock(nn.Module):
    """A pre-norm transformer block from tp layers, with the reference block's weights."""

    def __init__(self, ref: TransformerBlock, group: Group) -> None:
        super().__init__()
        self.group = group
        self.norm1, self.norm2 = copy.deepcopy(ref.norm1), copy.deepcopy(ref.norm2)
        self.attn = TPAttention(ref.attn, group)
        self.mlp = TPBlockMLP(ref.mlp, group)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D), replicated on every tp rank."""
        x = x + self.attn(to_tp_region(self.norm1(x), self.group))
        return x + self.mlp(to_tp_region(self.norm2(x), self.group))


def _full_grads(module: nn.Module) -> dict[str, Tensor]:
    out = {}
    for prefix, m in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(m, TensorParallel):
            out.update({dot + n: g for n, g in m.full_grads().items()})
        else:
            params = m.named_parameters(recurse=False)
            out.update({dot + n: p.grad for n, p in params if p.grad is not None})
    return out


def _run_mlp(mlp: nn.Module, x: Tensor, grad_out: Tensor) -> dict[str, Any]:
    x = x.clone().requires_grad_()
    y = mlp(x)
    y.backward(grad_out)
    return {"y": y.detach(), "x_grad": x.grad, "grads": _full_grads(mlp)}


def _mlp_cases(group: Group) -> dict[str, Any]:
    x, gy = _randn(1, B, T, D), _randn(2, B, T, D)
    out = {"mlp": _run_mlp(TPMLP(group), x, gy)}
    out["state"] = full_state_dict(TPMLP(group))
    fresh = TPMLP(group)  # overwrite it, then load the logical tensors back
    for p in fresh.parameters():
        p.data.zero_()
    load_full_state_dict(fresh, PlainMLP().state_dict())
    out["reloaded_y"] = fresh(x).detach()

    deferred, store = TPMLP(group), WeightGradStore()
    attach_weight_grad_store(deferred, store)
    xd = x.clone().requires_grad_()
    y = deferred(xd)
    with count_collectives() as b_log, store.collect(0):
        y.backward(gy)
    out["split"] = {
        "pending": len(store),
        "before_flush": {n: p.grad is not None for n, p in deferred.named_parameters()},
        "x_grad": xd.grad,
        "b_log": list(b_log),
    }
    with count_collectives() as w_log:
        store.flush(0)
    out["split"].update(grads=_full_grads(deferred), w_log=list(w_log))

    # sequence parallel: each rank holds T/tp positions of input and output
    sp = TPMLP(group, sequence_parallel=True)
    chunk = slice(tp_rank(group) * T // tp_size(group), (tp_rank(group) + 1) * T // tp_size(group))
    xs = x[:, chunk].clone().requires_grad_()
    with count_collectives() as log:
        ys = sp(xs)
        ys.backward(gy[:, chunk])
    reduce_sequence_parallel_grads(sp, group)
    out["sp_mlp"] = {"y": ys.detach(), "x_grad": xs.grad, "grads": _full_grads(sp), "log": log}
    return out


def _vocab_cases(group: Group) -> dict[str, Any]:
    torch.manual_seed(3)
    ids = torch.randint(0, V, (B, T))
    emb = VocabParallelEmbedding.from_full(nn.Embedding(V, D).weight, group)
    y = emb(ids)
    y.backward(_randn(4, B, T, D))
    out: dict[str, Any] = {
        "emb": {"y": y.detach(), "grad": emb.full_grads()["weight"], "weight": emb.full_weight()},
        "emb_pad_grad": emb.weight.grad[max(0, V - emb.start) :].abs().sum().item(),
    }
    logits, targets = _ce_inputs()
    cols = emb.padded_num_embeddings // tp_size(group)
    # padded columns hold large logits: they must stay out of the softmax
    padded = torch.cat([logits, torch.full((B, T, emb.padded_num_embeddings - V), 50.0)], -1)
    mine = padded[..., tp_rank(group) * cols : (tp_rank(group) + 1) * cols].clone()
    mine.requires_grad_()
    with count_collectives() as log:
        loss_sum, count = vocab_parallel_cross_entropy(mine, targets, group, V)
        (loss_sum / count).backward()
    grad = gather_full(mine.grad, 2, group)
    out["ce"] = {
        "sum": loss_sum.detach(),
        "count": count,
        "grad": grad[..., :V],
        "pad_grad": grad[..., V:].abs().sum().item(),
        "log": log,
    }
    return out


def _ce_inputs() -> tuple[Tensor, Tensor]:
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    targets[0, :3] = -100
    targets[1, -1] = V - 1  # the last real id, next to the padding
    return _randn(6, B, T, V) * 3, targets


def _seq_cases(group: Group) -> dict[str, Any]:
    rank, tp = tp_rank(group), tp_size(group)
    chunk = slice(rank * T // tp, (rank + 1) * T // tp)
    partial = _randn(10 + rank, B, T, D).requires_grad_()  # a rank's partial sum
    scattered = reduce_scatter_seq(partial, group)
    scattered.backward(_randn(20, B, T, D)[:, chunk])
    piece = _randn(30, B, T, D)[:, chunk].clone().requires_grad_()
    gathered = gather_seq(piece, group)
    gathered.backward(_randn(40 + rank, B, T, D))
    whole = _randn(50, B, T, D).requires_grad_()
    round_trip = gather_seq(split_seq(whole, group), group)
    lasts = gather_last(split_last(whole, group), group)
    return {
        "rs": (scattered.detach(), partial.grad),
        "ag": (gathered.detach(), piece.grad),
        "round_trips": (round_trip.detach(), lasts.detach()),
    }


def _block_cases(group: Group) -> dict[str, Any]:
    out = {}
    for name, cfg in BLOCKS.items():
        block = TPBlock(build_block(cfg, 1, seed=0), group)
        x = _randn(60, B, T, cfg.d_model).requires_grad_()
        with count_collectives() as log:
            y = block(x)
            y.backward(_randn(61, B, T, cfg.d_model))
        out[name] = {"y": y.detach(), "x_grad": x.grad, "grads": _full_grads(block), "log": log}
    return out


def _errors(group: Group) -> list[str]:
    tp, msgs = tp_size(group), []
    for bad in (
        lambda: ColumnParallelLinear(4, 4 * tp + 1, group=group),
        lambda: RowParallelLinear(4 * tp + 1, 4, group=group),
        lambda: vocab_parallel_cross_entropy(
            torch.zeros(1, 2), torch.zeros(1).long(), group, 4 * tp
        ),
    ):
        try:
            bad()
            msgs.append("accepted")
        except ValueError as err:
            msgs.append(str(err))
    return msgs


def _cases(group: Group) -> dict[str, Any]:
    return {
        **_mlp_cases(group),
        **_vocab_cases(group),
        "seq": _seq_cases(group),
        "blocks": _block_cases(group),
        "errors": _errors(group),
    }


def _run() -> dict[int, dict[str, Any]]:
    """Every case at tp=2 (ranks 0-1 and 2-3) and at tp=4 (all ranks)."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # new_group: every rank, in order
    groups = {2: pairs[dist.get_rank() // 2], 4: dist.new_group(list(range(WORLD)))}
    return {tp: _cases(group) for tp, group in groups.items()}


@cache
def _launched() -> dict[int, dict[int, dict[str, Any]]]:
    # one launch for both sizes: starting the ranks costs far more than the cases
    return launch(_run, WORLD, backend="gloo", timeout_s=120)


def _results(tp: int) -> list[tuple[int, dict[str, Any]]]:
    """(tp rank, results) of every rank, for groups of ``tp`` ranks."""
    return [(rank % tp, out[tp]) for rank, out in sorted(_launched().items())]


def _plain_mlp() -> dict[str, Any]:
    return _run_mlp(PlainMLP(), _randn(1, B, T, D), _randn(2, B, T, D))


def _assert_close(got: dict[str, Any], ref: dict[str, Any], where: str) -> None:
    for key in ("y", "x_grad"):
        assert rel_diff(got[key], ref[key]) <= TOL, f"{where}: {key}"
    assert got["grads"].keys() == ref["grads"].keys(), where
    for name, grad in ref["grads"].items():
        assert rel_diff(got["grads"][name], grad) <= TOL, f"{where}: grad of {name}"


TPS = pytest.mark.parametrize("tp", [2, 4])


@TPS
def test_column_row_mlp_equals_plain_mlp(tp: int) -> None:
    ref = _plain_mlp()
    for rank, res in _results(tp):
        _assert_close(res["mlp"], ref, f"rank {rank}")


@TPS
def test_logical_state_round_trips_by_plain_names(tp: int) -> None:
    plain = PlainMLP()
    expected = plain.state_dict()
    x = _randn(1, B, T, D)
    for _, res in _results(tp):
        assert res["state"].keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(res["state"][name], tensor), name
        assert rel_diff(res["reloaded_y"], plain(x).detach()) <= TOL


@TPS
def test_split_backward_defers_only_the_local_weight_grads(tp: int) -> None:
    for rank, res in _results(tp):
        split = res["split"]
        assert split["pending"] == 2  # one per linear
        # the row bias is added after the reduce, outside the deferred matmul: its grad is B's
        assert split["before_flush"] == {
            "up.weight": False,
            "up.bias": False,
            "down.weight": False,
            "down.bias": True,
        }
        assert torch.equal(split["x_grad"], res["mlp"]["x_grad"]), f"rank {rank}"
        assert split["b_log"] == [("all_reduce", "bwd")]  # the input grad's, in B
        assert split["w_log"] == []  # W is local
        for name, grad in res["mlp"]["grads"].items():
            assert rel_diff(split["grads"][name], grad) <= TOL, f"rank {rank}: {name}"


@TPS
def test_sequence_parallel_mlp_equals_plain_mlp_on_its_chunk(tp: int) -> None:
    ref = _plain_mlp()
    for rank, res in _results(tp):
        chunk = slice(rank * T // tp, (rank + 1) * T // tp)
        sp = res["sp_mlp"]
        local_ref = {
            "y": ref["y"][:, chunk],
            "x_grad": ref["x_grad"][:, chunk],
            "grads": ref["grads"],
        }
        _assert_close(sp, local_ref, f"rank {rank}")
        assert sp["log"] == [
            ("all_gather", "fwd"),
            ("reduce_scatter", "fwd"),
            ("all_gather", "bwd"),
            ("reduce_scatter", "bwd"),
        ]


@TPS
def test_vocab_parallel_embedding_equals_nn_embedding_with_padding(tp: int) -> None:
    torch.manual_seed(3)
    ids = torch.randint(0, V, (B, T))
    plain = nn.Embedding(V, D)
    y = plain(ids)
    y.backward(_randn(4, B, T, D))
    for rank, res in _results(tp):
        emb = res["emb"]
        assert torch.equal(emb["weight"], plain.weight.detach()), f"rank {rank}"
        assert torch.equal(emb["y"], y.detach()), f"rank {rank}"
        assert rel_diff(emb["grad"], plain.weight.grad) <= TOL, f"rank {rank}"
        assert res["emb_pad_grad"] == 0.0


@TPS
def test_vocab_parallel_cross_entropy_equals_f_cross_entropy(tp: int) -> None:
    logits, targets = _ce_inputs()
    logits.requires_grad_()
    mean = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    mean.backward()
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    for rank, res in _results(tp):
        ce = res["ce"]
        assert ce["count"].item() == int((targets != -100).sum())
        assert rel_diff(ce["sum"], total.detach()) <= TOL, f"rank {rank}"
        assert rel_diff(ce["sum"] / ce["count"], mean.detach()) <= TOL, f"rank {rank}"
        assert rel_diff(ce["grad"], logits.grad) <= TOL, f"rank {rank}"
        assert ce["pad_grad"] == 0.0
        assert ce["log"] == [("all_reduce", "fwd")] * 2  # max, then both sums at once


@TPS
def test_sequence_collectives_are_each_others_mirror(tp: int) -> None:
    partial_sum = sum(_randn(10 + r, B, T, D) for r in range(tp))
    grad_sum = sum(_randn(40 + r, B, T, D) for r in range(tp))
    for rank, res in _results(tp):
        chunk = slice(rank * T // tp, (rank + 1) * T // tp)
        scattered, partial_grad = res["seq"]["rs"]
        assert rel_diff(scattered, partial_sum[:, chunk]) <= TOL
        assert torch.equal(partial_grad, _randn(20, B, T, D))
        gathered, piece_grad = res["seq"]["ag"]
        assert torch.equal(gathered, _randn(30, B, T, D))
        assert rel_diff(piece_grad, grad_sum[:, chunk]) <= TOL
        for round_trip in res["seq"]["round_trips"]:
            assert torch.equal(round_trip, _randn(50, B, T, D))


@TPS
@pytest.mark.parametrize("flavour", sorted(BLOCKS))
def test_block_from_tp_layers_equals_block_with_two_all_reduces_each_way(
    tp: int, flavour: str
) -> None:
    ref_block = build_block(BLOCKS[flavour], 1, seed=0)
    x = _randn(60, B, T, BLOCKS[flavour].d_model).requires_grad_()
    y = ref_block(x)
    y.backward(_randn(61, B, T, BLOCKS[flavour].d_model))
    ref = {
        "y": y.detach(),
        "x_grad": x.grad,
        "grads": {n: p.grad for n, p in ref_block.named_parameters()},
    }
    for rank, res in _results(tp):
        got = res["blocks"][flavour]
        _assert_close(got, ref, f"rank {rank}")
        assert got["log"] == ALL_REDUCE_BLOCK


@TPS
def test_bad_sizes_are_named_errors(tp: int) -> None:
    col, row, ce = _results(tp)[0][1]["errors"]
    assert f"out_features={4 * tp + 1} is not divisible by tp={tp}" in col and "pad" in col
    assert f"in_features={4 * tp + 1} is not divisible by tp={tp}" in row
    assert f"logits shard of 2 columns x tp={tp} cannot hold vocab_size={4 * tp}" in ce


def test_heads_split_by_blocks_of_q_k_and_v() -> None:
    # 4 query heads, 2 kv heads, head_dim 1: rows q0 q1 q2 q3 k0 k1 v0 v1
    assert qkv_row_order(4, 2, 1, 2).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    heads = shard_heads(8, 4, 2, 4)
    assert (heads.n_heads, heads.kv_heads, heads.qkv_widths) == (2, 1, [4, 2, 2])
    with pytest.raises(ConfigError, match="n_heads=6 is not divisible by tp=4"):
        shard_heads(6, 6, 2, 4)
    with pytest.raises(ConfigError, match="n_kv_heads=2 is not divisible by tp=4"):
        shard_heads(8, 2, 2, 4)


def test_without_a_group_the_layers_are_the_plain_layers() -> None:
    with count_collectives() as log:
        got = _run_mlp(TPMLP(None), _randn(1, B, T, D), _randn(2, B, T, D))
    ref = _plain_mlp()
    assert torch.equal(got["y"], ref["y"]) and torch.equal(got["x_grad"], ref["x_grad"])
    assert log == []
