"""Tests for conveyor.models: per-block determinism, tying, causality, KV cache, costs."""

from __future__ import annotations

import math

import pytest
import torch

from conveyor.config import ModelConfig
from conveyor.models import (
    EmbeddingBlock,
    HeadBlock,
    KVCache,
    Transformer,
    block_activation_bytes,
    block_forward_flops,
    block_param_counts,
    build_block,
    build_blocks,
    lm_loss,
    tie_weights,
)

VOCAB, SEQ = 64, 16
TINY = dict(vocab_size=VOCAB, n_layers=2, d_model=32, n_heads=4, max_seq_len=SEQ)

CONFIGS = {
    "gpt2": ModelConfig(flavour="gpt2", **TINY),
    "llama": ModelConfig(flavour="llama", **TINY),
    "llama-gqa": ModelConfig(flavour="llama", n_kv_heads=2, **TINY),
    "gpt2-tied": ModelConfig(flavour="gpt2", tie_embeddings=True, **TINY),
    "llama-gqa-tied": ModelConfig(flavour="llama", n_kv_heads=2, tie_embeddings=True, **TINY),
    "gpt2-post-bias": ModelConfig(flavour="gpt2", norm_position="post", activation="gelu",
                                  head_bias=True, **TINY),
}
UNTIED = ["gpt2", "llama", "llama-gqa"]
ALL = list(CONFIGS)


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    """Random token ids (batch, seq) from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=gen)


@pytest.mark.parametrize("name", ALL)
def test_blocks_built_alone_equal_reference(name: str) -> None:
    cfg = CONFIGS[name]
    reference = Transformer(cfg, seed=7).state_dict()
    # Reverse order and a disturbed global RNG: only (seed, index) may matter
    for index in reversed(range(cfg.num_blocks)):
        torch.manual_seed(1000 + index)
        block = build_block(cfg, index, seed=7)
        for key, value in block.state_dict().items():
            assert torch.equal(value, reference[f"blocks.{index}.{key}"]), (index, key)
    assert len(reference) == sum(
        len(build_block(cfg, i, 7).state_dict()) for i in range(cfg.num_blocks)
    )


def test_seed_and_index_change_weights() -> None:
    cfg = CONFIGS["llama-gqa"]
    a, b = build_block(cfg, 1, seed=0), build_block(cfg, 1, seed=1)
    c = build_block(cfg, 2, seed=0)
    assert not torch.equal(a.attn.qkv.weight, b.attn.qkv.weight)
    assert not torch.equal(a.attn.qkv.weight, c.attn.qkv.weight)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_init_distribution(name: str) -> None:
    cfg = CONFIGS[name]
    block = build_block(cfg, 1, seed=0)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    down = block.mlp.down if cfg.flavour == "gpt2" else block.mlp.w2
    for weight, std in [
        (block.attn.qkv.weight, cfg.init_std),
        (block.attn.out.weight, residual_std),
        (down.weight, residual_std),
    ]:
        assert weight.std().item() == pytest.approx(std, rel=0.15)
    assert torch.equal(block.norm1.weight, torch.ones(cfg.d_model))
    if cfg.flavour == "gpt2":
        assert torch.equal(block.attn.qkv.bias, torch.zeros_like(block.attn.qkv.bias))
    else:
        assert all(not n.endswith("bias") for n, _ in block.named_parameters())
    assert all(p.dtype == torch.float32 for p in block.parameters())


def test_rotary_tables_not_in_state_dict() -> None:
    block = build_block(CONFIGS["llama"], 1, seed=0)
    buffers = dict(block.named_buffers())
    assert "attn.rotary.cos" in buffers and "attn.rotary.sin" in buffers
    assert not any("rotary" in key for key in block.state_dict())


@pytest.mark.parametrize("name", ["gpt2-tied", "llama-gqa-tied"])
def test_tied_head_equals_embedding_when_built_apart(name: str) -> None:
    cfg = CONFIGS[name]
    head = build_block(cfg, cfg.num_blocks - 1, seed=3)
    embedding = build_block(cfg, 0, seed=3)
    assert isinstance(embedding, EmbeddingBlock) and isinstance(head, HeadBlock)
    head_weight = head.get_parameter(HeadBlock.tied_param_name)
    embedding_weight = embedding.get_parameter(EmbeddingBlock.tied_param_name)
    assert head_weight is not embedding_weight
    assert torch.equal(head_weight, embedding_weight)

    tie_weights(embedding, head)
    assert head.get_parameter(HeadBlock.tied_param_name) is embedding_weight


def test_untied_head_differs_from_embedding() -> None:
    cfg = CONFIGS["gpt2"]
    embedding, head = build_block(cfg, 0, 3), build_block(cfg, cfg.num_blocks - 1, 3)
    assert not torch.equal(embedding.tok.weight, head.proj.weight)


def test_tied_transformer_shares_one_parameter() -> None:
    tied, untied = Transformer(CONFIGS["gpt2-tied"], 0), Transformer(CONFIGS["gpt2"], 0)
    assert tied.blocks[0].tok.weight is tied.blocks[-1].proj.weight
    assert len(list(tied.parameters())) == len(list(untied.parameters())) - 1
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == VOCAB * 32


def test_build_blocks_subset_ties_only_when_both_present() -> None:
    cfg = CONFIGS["gpt2-tied"]
    last = cfg.num_blocks - 1
    embedding, head = build_blocks(cfg, 0, [0, last])
    assert head.proj.weight is embedding.tok.weight
    embedding, layer = build_blocks(cfg, 0, [0, 1])
    assert isinstance(layer, torch.nn.Module) and not isinstance(layer, HeadBlock)
    with pytest.raises(ValueError, match="out of range"):
        build_block(cfg, cfg.num_blocks, 0)


@pytest.mark.parametrize("name", UNTIED)
def test_shapes_and_initial_loss(name: str) -> None:
    cfg = CONFIGS[name]
    model = Transformer(cfg, seed=0)
    x = tokens(batch=4)
    logits = model(x)
    assert logits.shape == (4, SEQ, VOCAB)
    assert model.blocks[0](x).shape == (4, SEQ, cfg.d_model)
    loss = model.loss(x, tokens(batch=4, seed=1))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(VOCAB), abs=0.1)


def test_lm_loss_matches_manual_cross_entropy() -> None:
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[0, 1, 2], [3, 4, 0]])
    manual = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    assert lm_loss(logits, targets).item() == pytest.approx(manual.item(), abs=1e-6)


def test_too_long_sequence_raises() -> None:
    model = Transformer(CONFIGS["llama"], seed=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(seq=SEQ + 1))


@pytest.mark.parametrize("name", ALL)
def test_causality(name: str) -> None:
    model = Transformer(CONFIGS[name], seed=0)
    x = tokens()
    t = 9
    changed = x.clone()
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(x), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, t:], before[:, t:], atol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_kv_cache_decoding_matches_full_forward(name: str) -> None:
    cfg = CONFIGS[name]
    model = Transformer(cfg, seed=0)
    x = tokens(batch=3)
    prompt = 5
    with torch.no_grad():
        full = model(x)
        caches = model.new_kv_caches(batch_size=3)
        pieces = [model(x[:, :prompt], caches, start_pos=0)]
        for pos in range(prompt, SEQ):
            pieces.append(model(x[:, pos : pos + 1], caches, start_pos=pos))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_chunked_prefill_and_overflow() -> None:
    cfg = CONFIGS["llama-gqa"]
    model = Transformer(cfg, seed=0)
    x = tokens(batch=2)
    with torch.no_grad():
        full = model(x)
        caches = model.new_kv_caches(batch_size=2)
        # Chunks of several new tokens exercise the masked path (start_pos > 0, T > 1)
        pieces = [model(x[:, s : s + 4], caches, start_pos=s) for s in range(0, SEQ, 4)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)

    cache = KVCache.from_config(cfg, batch_size=1, max_len=4)
    kv = torch.zeros(1, cfg.kv_heads, 3, cfg.head_dim)
    cache.update(kv, kv, start_pos=0)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        cache.update(kv, kv, start_pos=3)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-tied"])
def test_adamw_reduces_loss(name: str) -> None:
    torch.manual_seed(0)
    model = Transformer(CONFIGS[name], seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = tokens(batch=4)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    losses = []
    for _ in range(10):
        loss = model.loss(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("name", ALL)
def test_block_param_counts(name: str) -> None:
    cfg = CONFIGS[name]
    counts = block_param_counts(cfg)
    assert counts == [
        sum(p.numel() for p in build_block(cfg, i, 0).parameters()) for i in range(cfg.num_blocks)
    ]
    unique = sum(p.numel() for p in Transformer(cfg, 0).parameters())
    duplicated = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    assert sum(counts) == unique + duplicated


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_flops_and_activation_estimates(name: str) -> None:
    cfg = CONFIGS[name]
    flops = block_forward_flops(cfg, SEQ)
    params = block_param_counts(cfg)
    assert len(flops) == cfg.num_blocks and flops[0] == 0.0
    assert flops[-1] == 2 * SEQ * cfg.d_model * VOCAB
    # Matmul part of a layer is 2 FLOPs per weight per token; attention adds 2*T*T*D
    layer_weights = sum(p.numel() for p in build_block(cfg, 1, 0).parameters() if p.ndim == 2)
    assert flops[1] == 2 * SEQ * layer_weights + 2 * SEQ * SEQ * cfg.d_model
    assert flops[1] > 2 * SEQ * params[1] * 0.9

    acts = block_activation_bytes(cfg, batch=2, seq_len=SEQ)
    assert len(acts) == cfg.num_blocks and all(a > 0 for a in acts)
    assert block_activation_bytes(cfg, batch=4, seq_len=SEQ) == [2 * a for a in acts]


def test_gqa_query_head_reads_kv_head_h_div_groups() -> None:
    # Pins the Llama convention: equal to full MHA whose kv heads are repeated in place
    gqa_cfg = CONFIGS["llama-gqa"]
    mha_cfg = CONFIGS["llama"]
    gqa, mha = build_block(gqa_cfg, 1, 0), build_block(mha_cfg, 1, 0)
    D, hd, groups = gqa_cfg.d_model, gqa_cfg.head_dim, gqa_cfg.n_heads // gqa_cfg.kv_heads
    q, k, v = gqa.attn.qkv.weight.split([D, D // groups, D // groups])

    def repeat(w: torch.Tensor) -> torch.Tensor:
        return w.view(-1, hd, D).repeat_interleave(groups, dim=0).reshape(-1, D)

    with torch.no_grad():
        mha.attn.qkv.weight.copy_(torch.cat([q, repeat(k), repeat(v)]))
        for name, param in mha.named_parameters():
            if name != "attn.qkv.weight":
                param.copy_(gqa.get_parameter(name))
        x = torch.randn(2, SEQ, D)
        torch.testing.assert_close(gqa(x), mha(x), atol=1e-6, rtol=0)


def test_deferred_weight_grads_record_no_graph() -> None:
    from conveyor.models.linear import Linear, WeightGradStore, attach_weight_grad_store

    layer = Linear(4, 3)
    store = WeightGradStore()
    attach_weight_grad_store(layer, store)
    x = torch.randn(2, 4, requires_grad=True)
    with store.collect(0):
        layer(x).sum().backward()
    assert layer.weight.grad is None and len(store) == 1  # deferred to W
    store.flush(0)
    assert layer.weight.grad is not None and not layer.weight.grad.requires_grad
    expected = torch.ones(2, 3).t() @ x.detach()
    assert torch.allclose(layer.weight.grad, expected)
