"""Model families as composition: blocks, boundaries, objectives and their data.

Pipelined equivalence of BERT and T5 is in test_equivalence.py (``_family_cases``);
here: what each piece promises on its own, in one process.
"""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conveyor.config import ConfigError, ModelConfig, ParallelConfig
from conveyor.data.family_batches import mlm_batch, span_corruption_batch
from conveyor.data.mlm import IGNORE, BertSpecials, mask_tokens
from conveyor.data.spans import T5Specials, corrupt_spans
from conveyor.models import SequentialModel, Transformer, build_blocks
from conveyor.models.attention import MaskedAttention
from conveyor.models.families import FAMILY_MODULES, family_of
from conveyor.parallel.layout import resolve_layout

SRC = Path(__file__).resolve().parents[1] / "src" / "conveyor"
TINY = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, max_seq_len=16)


def _cfg(family: str, **kw: object) -> ModelConfig:
    flavour = "llama" if family == "t5" else "gpt2"
    return replace(TINY, family=family, flavour=flavour, **kw)


def _bert_batch(n: int = 4, salt: int = 0) -> tuple[dict, dict]:
    specials = BertSpecials(60)
    rows = np.random.default_rng(0).integers(0, 60, (16, 16))
    return mlm_batch(rows, np.arange(n), 16, specials, seed=3, salt=salt)


def _t5_batch(n: int = 4) -> tuple[dict, dict]:
    specials = T5Specials(58, sentinels=4)
    rows = np.random.default_rng(0).integers(0, 58, (16, 13))
    return span_corruption_batch(rows, np.arange(n), 16, 8, specials, seed=3, salt=0)


def test_blocks_never_branch_on_a_family_name() -> None:
    # the families' own modules name themselves; no block module or runtime code does
    names = set(FAMILY_MODULES)
    for path in [*(SRC / "models").glob("*.py"), *(SRC / "runtime").glob("*.py")]:
        if path.name in {"family.py", "build.py"} or path.name.startswith("hf"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}
                assert not consts & names, f"{path.name} compares against a family name"


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_every_family_lists_flat_blocks_with_roles(family: str) -> None:
    cfg = _cfg(family)
    blocks = build_blocks(cfg, seed=0)
    assert len(blocks) == cfg.num_blocks
    roles = [getattr(b, "role", None) for b in blocks]
    assert roles[0] == "embedding" and roles[-1] == "head"
    assert set(roles[1:-1]) == {"layer"}
    costs = family_of(cfg)
    assert len(costs.param_counts(cfg)) == len(costs.forward_flops(cfg, 16)) == cfg.num_blocks
    assert costs.param_counts(cfg) == [sum(p.numel() for p in b.parameters()) for b in blocks]


def test_a_block_subset_equals_the_full_models_slice() -> None:
    cfg = _cfg("t5", tie_embeddings=True)
    full = SequentialModel(cfg, seed=5).state_dict()
    for i, block in zip([2, 3, 4, 6], build_blocks(cfg, 5, [2, 3, 4, 6]), strict=True):
        for name, t in block.state_dict().items():
            assert torch.equal(t, full[f"blocks.{i}.{name}"]), f"blocks.{i}.{name}"


def test_decoder_reference_models_agree() -> None:
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    y[0, :5] = IGNORE
    a, b = Transformer(TINY, seed=1), SequentialModel(TINY, seed=1)
    assert torch.allclose(a.loss(x, y), b.loss(x, y))


def test_bert_padding_and_masked_positions_do_not_leak() -> None:
    model = SequentialModel(_cfg("bert"), seed=0).eval()
    x, _ = _bert_batch()
    x["attention_mask"][:, 12:] = 0
    changed = {k: v.clone() for k, v in x.items()}
    changed["tokens"][:, 12:] = 7  # what padding holds must not matter to real tokens
    a, b = model(x)["logits"][:, :12], model(changed)["logits"][:, :12]
    assert torch.allclose(a, b, atol=1e-6)


def test_decoder_cross_attention_sees_the_whole_encoder_but_no_future_target() -> None:
    model = SequentialModel(_cfg("t5"), seed=0).eval()
    x, _ = _t5_batch()
    later = {k: v.clone() for k, v in x.items()}
    later["decoder_tokens"][:, 4:] = 3
    assert torch.allclose(model(x)[:, :4], model(later)[:, :4], atol=1e-6)
    source = {k: v.clone() for k, v in x.items()}
    source["tokens"][:, 5] = (source["tokens"][:, 5] + 1) % 58
    assert not torch.allclose(model(x)[:, 0], model(source)[:, 0])


def test_relative_bias_depends_on_distance_only() -> None:
    attn = MaskedAttention(_cfg("t5"), causal=False, relative_bias=True)
    assert attn.relative is not None
    bias = attn.relative(6, 6, torch.device("cpu"))[0, 0]  # (q, k)
    for d in range(-5, 6):
        diagonal = torch.diagonal(bias, offset=d)
        assert torch.all(diagonal == diagonal[0])


def test_masking_is_80_10_10_of_15_percent_and_deterministic() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, (200, 100))
    inputs, labels = mask_tokens(tokens, tokens >= 0, np.random.default_rng(1), mask_id=1000,
                                 random_below=1000)
    chosen = labels != IGNORE
    assert abs(chosen.mean() - 0.15) < 0.01
    assert (labels[chosen] == tokens[chosen]).all()
    masked = (inputs == 1000)[chosen].mean()
    kept = (inputs == tokens)[chosen].mean()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02  # random ids rarely equal
    again = mask_tokens(tokens, tokens >= 0, np.random.default_rng(1), mask_id=1000,
                        random_below=1000)
    assert (again[0] == inputs).all() and (again[1] == labels).all()
    x1, y1 = _bert_batch(salt=4)
    x2, y2 = _bert_batch(salt=4)
    assert all(torch.equal(x1[k], x2[k]) for k in x1) and torch.equal(y1["mlm"], y2["mlm"])


def test_sentence_pairs_mark_segments_and_never_mask_specials() -> None:
    x, y = _bert_batch(n=8)
    specials = BertSpecials(60)
    assert (x["tokens"][:, 0] == specials.cls).all()
    assert ((x["tokens"] == specials.sep).sum(dim=1) == 2).all()
    real = y["mlm"] != IGNORE
    assert (y["mlm"][real] < specials.base).all()  # only ordinary tokens are targets
    assert set(y["nsp"].tolist()) <= {0, 1}
    assert (x["segments"][x["attention_mask"] == 0] == 0).all()


def test_span_corruption_round_trips() -> None:
    specials = T5Specials(1000, sentinels=8)
    rng = np.random.default_rng(0)
    for length in (10, 37, 64):
        row = rng.integers(0, 1000, length)
        inp, tgt = corrupt_spans(row, rng, specials, noise=0.3)
        assert inp[-1] == tgt[-1] == specials.eos
        # put each span back where its sentinel stands
        spans: dict[int, list[int]] = {}
        current = None
        for t in tgt[:-1]:
            if t >= specials.sentinel(0):
                current = t
                spans[current] = []
            else:
                spans[current].append(t)
        rebuilt = [t for s in inp[:-1] for t in (spans[s] if s in spans else [s])]
        assert rebuilt == row.tolist()
        assert len(spans) >= 1


def test_sequence_parallel_is_refused_for_encoder_families() -> None:
    par = ParallelConfig(pp=1, tp=2, microbatches=1, sequence_parallel=True)
    with pytest.raises(ConfigError, match="family='bert'"):
        resolve_layout(_cfg("bert"), par)


@pytest.mark.parametrize("field, value, needle", [
    ("norm_position", "middle", "norm_position='middle' is unknown; use 'pre'"),
    ("activation", "swish", "activation='swish' is unknown; use one of gelu_tanh"),
    ("head_bias", "yes", "head_bias='yes' must be true or false"),
])
def test_model_options_refuse_bad_values_in_one_line(field: str, value: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig(**{field: value})  # type: ignore[arg-type]
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("family, ids, needle", [
    ("bert", {"pad": 0, "cls": 1}, "special_ids names no sep, mask"),
    ("bert", {"pad": 0, "cls": 1, "sep": 2, "mask": 8192}, "mask=8192 must be an id below"),
    ("t5", {"pad": 0, "eos": 1, "sentinel_1": 5}, "'sentinel_1' is no special id"),
    ("gpt", {"pad": 0}, "'pad' is no special id of family='gpt'"),
    ("t5", 7, "special_ids=7 must be a table"),
])
def test_special_ids_are_checked_in_one_line(family: str, ids: object, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig(family=family, special_ids=ids)  # type: ignore[arg-type]
    assert needle in str(err.value) and "\n" not in str(err.value), err.value
    t5 = ModelConfig(family="t5", special_ids={"sentinel_0": 9, "eos": 1, "pad": 0})
    assert t5.special_ids == {"eos": 1, "pad": 0, "sentinel_0": 9} and hash(t5)


def test_the_flavours_own_activation_is_the_default() -> None:
    assert ModelConfig(flavour="llama", activation="silu") == ModelConfig(flavour="llama")
    assert ModelConfig(activation="gelu_tanh").activation is None
    assert ModelConfig(flavour="llama", activation="gelu_tanh").act == "gelu_tanh"


def test_unknown_family_is_one_line() -> None:
    with pytest.raises(ConfigError, match="family='xlnet' is unknown"):
        ModelConfig(family="xlnet")  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_profiler_replays_every_family(family: str) -> None:
    from conveyor.runtime.stage import StageRunner
    from conveyor.sim.profile import profile_costs
    from conveyor.sim.simulate import simulate

    cfg = _cfg(family, n_layers=3)
    layout = resolve_layout(cfg, ParallelConfig(pp=2, schedule="zb-v", microbatches=2),
                            batch_size=4)
    for part in (layout, layout.partition):  # replayed in schedule order; each stage alone
        cost = profile_costs(cfg, part, microbatch_size=2, seq_len=16, repeats=1, warmup=0,
                             runner=StageRunner)
        assert simulate(layout.schedule, cost).step_time > 0
    assert not family_of(cfg).generates


@pytest.mark.parametrize(("argv", "message"), [
    (["--family", "bert", "--seq-len", "4"], "use --seq-len >= 5"),
    (["--family", "t5", "--vocab-size", "270"], "use --vocab-size >= 275"),
])
def test_family_flags_that_cannot_fit_fail_in_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conveyor.cli import main

    assert main(["train", *argv, "--steps", "1", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize(("pp", "schedule"), [(2, "gpipe"), (2, "zb-v"), (4, "1f1b")])
def test_equivalence_t5_split_puts_encoder_and_decoder_on_one_stage(pp: int, schedule: str) -> None:
    # the T5 cases of test_equivalence use partition=params: check they cut where meant
    cfg = _cfg("t5", n_layers=3)  # blocks: 0 embedding, 1-3 encoder, 4 bridge, 5-7 decoder, 8 head
    layout = resolve_layout(cfg, ParallelConfig(pp=pp, schedule=schedule, microbatches=4,
                                                partition="params"))
    spans = layout.partition.bounds
    if schedule == "gpipe":  # the cut right after the bridge: encoder_out crosses it
        assert any(end == 5 for _, end in spans), spans
    else:
        assert any(start <= 3 and end >= 6 for start, end in spans), spans
