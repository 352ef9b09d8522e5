"""Optimizer, LR schedule and single-process clipping: pure functions, no processes."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conveyor.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from conveyor.models import Transformer
from conveyor.train.clip import clip_global_grad_norm
from conveyor.train.optim import (
    build_optimizer,
    load_optimizer_state,
    lr_at,
    optimizer_state,
    set_lr,
)

TINY = ModelConfig(vocab_size=64, n_layers=2, d_model=16, n_heads=2, max_seq_len=8)


def test_lr_warmup_is_linear_from_the_first_step() -> None:
    kw = {"lr": 1.0, "min_lr": 0.1, "warmup": 4, "total": 20}
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_lr_cosine_reaches_min_lr_at_the_last_step() -> None:
    kw = {"lr": 1.0, "min_lr": 0.1, "warmup": 4, "total": 24}
    assert lr_at(4, **kw) == 1.0
    assert lr_at(23, **kw) == pytest.approx(0.1)
    # halfway through the cosine (steps 4..23): the mean of lr and min_lr
    assert lr_at(4 + 19 / 2, **kw) == pytest.approx(0.55)
    values = [lr_at(s, **kw) for s in range(4, 24)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert lr_at(100, **kw) == pytest.approx(0.1)  # past the end it stays at min_lr


def test_lr_without_warmup_and_degenerate_lengths() -> None:
    assert lr_at(0, lr=2.0, min_lr=0.0, warmup=0, total=10) == 2.0
    assert lr_at(0, lr=2.0, min_lr=0.0, warmup=0, total=1) == 2.0
    assert lr_at(5, lr=2.0, min_lr=0.5, warmup=10, total=3) == pytest.approx(1.2)
    cos = 0.5 + 0.5 * 1.5 * (1 + math.cos(math.pi * 1 / 3))
    assert lr_at(1, lr=2.0, min_lr=0.5, warmup=0, total=4) == pytest.approx(cos)


def test_norms_and_biases_are_not_decayed() -> None:
    model = Transformer(TINY, seed=0)
    opt = build_optimizer(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.1.attn.qkv.weight" in decayed and "blocks.0.tok.weight" in decayed
    assert all(n.endswith("bias") or ".norm" in n for n in kept), kept
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def _train(model: Transformer, opt: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, TINY.vocab_size, (2, 8), generator=g)
        opt.zero_grad()
        model.loss(x, x).backward()
        opt.step()


def test_adamw_is_torchs_fused_kernel_and_steps_like_the_plain_one() -> None:
    model, twin = Transformer(TINY, seed=0), Transformer(TINY, seed=0)
    opt = build_optimizer(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"] is True  # CPU float32 parameters
    plain = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                               for g in build_optimizer(twin.named_parameters(), lr=1e-2,
                                                        weight_decay=0.1).param_groups],
                              lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    _train(model, opt, 3)
    _train(twin, plain, 3)
    # an update moves a weight by ~lr = 1e-2; rounding differs where Adam divides noise by
    # noise (the key bias, whose grad is zero up to rounding), never by a whole step
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
    ints = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))  # no fused kernel: plain AdamW
    assert not build_optimizer([("w", ints)], lr=1e-3, weight_decay=0.0).defaults["fused"]


def test_adamw_state_round_trips_by_name() -> None:
    model = Transformer(TINY, seed=0)
    opt = build_optimizer(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt, 2)
    tensors = optimizer_state(opt, model.named_parameters())
    assert "optim.blocks.1.attn.qkv.weight.exp_avg_sq" in tensors
    twin = copy.deepcopy(model)
    opt2 = build_optimizer(twin.named_parameters(), lr=1e-2, weight_decay=0.1)
    load_optimizer_state(opt2, twin.named_parameters(), tensors)
    set_lr(opt, 3e-3)
    set_lr(opt2, 3e-3)
    _train(model, opt, 2)
    _train(twin, opt2, 2)
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_clip_matches_torch_in_one_process() -> None:
    model = Transformer(TINY, seed=0)
    x = torch.randint(0, TINY.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    model.loss(x, x).backward()
    ref = Transformer(TINY, seed=0)
    ref.loss(x, x).backward()
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    got = clip_global_grad_norm(model.parameters(), 0.05)
    assert got == pytest.approx(float(want), rel=1e-6)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    assert clip_global_grad_norm(model.parameters(), 0.0) == pytest.approx(0.05, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"steps": 0}, "steps=0 must be a positive integer"),
        ({"lr": -1.0}, "lr=-1.0 must be a finite number > 0"),
        ({"lr": 1e-3, "min_lr": 1e-2}, "min_lr=0.01 is above lr=0.001"),
        ({"name": "a/b"}, "plain directory name"),
        ({"grad_clip": float("nan")}, "grad_clip=nan"),
    ],
)
def test_train_config_rejects(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**kwargs)


def test_run_config_round_trips_and_names_unknown_keys() -> None:
    run = RunConfig(model=TINY)
    assert RunConfig.from_dict(run.to_dict()) == run
    with pytest.raises(ConfigError, match="unknown key 'layers'; did you mean 'n_layers'"):
        RunConfig.from_dict({"model": {"layers": 2}})
