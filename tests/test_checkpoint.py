"""Tests for conveyor.train.checkpoint and export: invariant 5, nothing lost.

Round trips are bitwise; a crash at any point of a save leaves the previous checkpoint
the latest; a corrupt shard is named, never loaded; loads go by name, so a checkpoint
saved by 2 ranks loads under any other split; an export rebuilds the same model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from pathlib import Path

import pytest
import torch

from conveyor.cli import main
from conveyor.config import ModelConfig, ParallelConfig
from conveyor.models import Transformer
from conveyor.parallel.mesh import Mesh
from conveyor.runtime.launch import launch
from conveyor.runtime.pipeline import Pipeline
from conveyor.train import checkpoint as ckpt_mod
from conveyor.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_tensors,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from conveyor.train.export import export_model, load_exported

TINY = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, max_seq_len=16)


def _value(name: str, shape: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    """A tensor determined by its name alone, so every process can rebuild it."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g)


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "blocks.0.tok.weight": _value("blocks.0.tok.weight"),
        "blocks.1.attn.qkv.weight": _value("qkv").to(torch.bfloat16),
        "optim.blocks.0.tok.weight.exp_avg": _value("exp_avg"),
        "optim.blocks.0.tok.weight.step": torch.tensor(7.0),
        "sampler.order": torch.randperm(10, generator=torch.Generator().manual_seed(1)),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "view": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
    }


def _save(run: Path, step: int, **kw: object) -> Path:
    kw.setdefault("meta", {"run": "test"})
    return save_checkpoint(run, step, tensors=kw.pop("tensors", _tensors()), **kw)  # type: ignore[arg-type]


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# -- single process --------------------------------------------------------------------


def test_round_trip_is_bitwise_and_meta_is_complete(tmp_path: Path) -> None:
    src = _tensors()
    meta = {"model": {"n_layers": 2}, "ranks": {"0": {"rng": [1, 2]}}}
    path = _save(tmp_path, 100, meta=meta)
    assert path == tmp_path / "checkpoints" / "step-00000100"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "shard-0.safetensors"]
    got = load_tensors(path, src)
    for name, t in src.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    saved = read_meta(path)
    assert saved["model"] == {"n_layers": 2} and saved["ranks"] == {"0": {"rng": [1, 2]}}
    assert saved["step"] == 100 and saved["world_size"] == 1 and saved["format_version"] == 1
    assert saved["index"] == dict.fromkeys(sorted(src), "shard-0.safetensors")
    assert list(saved["files"]) == ["shard-0.safetensors"]


def test_keep_prunes_older_checkpoints(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert _steps(tmp_path) == ["step-00000003", "step-00000004"]
    _save(tmp_path, 5, keep=0)
    assert len(_steps(tmp_path)) == 3


def test_latest_ignores_tmp_and_incomplete_dirs(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    done = _save(tmp_path, 5)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000009").mkdir()
    (root / ".tmp-step-00000009" / "meta.json").write_text("{}")
    (root / "step-00000008").mkdir()
    assert latest_checkpoint(tmp_path) == done
    assert resolve_checkpoint(tmp_path) == done
    assert resolve_checkpoint(root) == done
    assert resolve_checkpoint(done) == done
    with pytest.raises(CheckpointError, match="save never finished"):
        resolve_checkpoint(root / "step-00000008")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty")


def test_flipped_byte_is_named_and_nothing_loads(tmp_path: Path) -> None:
    path = _save(tmp_path, 100)
    shard = path / "shard-0.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # in the tensor data, so the header still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_tensors(path, ["mask"])
    msg = str(err.value)
    assert f"checkpoint {shard} is corrupt (checksum mismatch)" in msg
    assert "delete that checkpoint directory" in msg and "--resume" in msg
    assert load_tensors(path, ["mask"], verify=False)["mask"].shape == (3,)


def test_deleted_meta_hides_the_checkpoint(tmp_path: Path) -> None:
    first = _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    (second / "meta.json").unlink()
    assert latest_checkpoint(tmp_path) == first
    with pytest.raises(CheckpointError, match="has no meta.json.*delete that checkpoint"):
        read_meta(second)
    (first / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is corrupt"):
        load_tensors(first, ["mask"])


def _fail_dir_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.replace

    def replace(src: object, dst: object) -> None:
        if Path(str(src)).name.startswith(".tmp-step-"):
            raise OSError("simulated crash before the rename")
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)


def _fail_shard_write(monkeypatch: pytest.MonkeyPatch) -> None:
    def atomic_write(path: Path, write: object) -> None:
        raise OSError("simulated crash while writing a shard")

    monkeypatch.setattr(ckpt_mod, "atomic_write", atomic_write)


@pytest.mark.parametrize("crash", [_fail_shard_write, _fail_dir_rename])
def test_crash_during_save_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: object
) -> None:
    before = _save(tmp_path, 1)
    with monkeypatch.context() as m:
        crash(m)  # type: ignore[operator]
        with pytest.raises(CheckpointError, match="simulated crash"):
            _save(tmp_path, 2, tensors={"mask": torch.ones(2)})
    assert latest_checkpoint(tmp_path) == before
    assert torch.equal(load_tensors(before, ["mask"])["mask"], _tensors()["mask"])
    assert not (tmp_path / "checkpoints" / "step-00000002").exists()
    _save(tmp_path, 2)  # the next save succeeds and clears the leftovers
    assert _steps(tmp_path) == ["step-00000001", "step-00000002"]


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    _save(tmp_path, 3, tensors={"x": torch.zeros(2)})
    path = _save(tmp_path, 3, tensors={"x": torch.ones(2)})
    assert torch.equal(load_tensors(path, ["x"])["x"], torch.ones(2))
    assert _steps(tmp_path) == ["step-00000003"]


def test_missing_name_names_it_and_the_layout(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    with pytest.raises(CheckpointError) as err:
        load_tensors(path, ["mask", "blocks.0.tok.wieght"])
    msg = str(err.value)
    assert "'blocks.0.tok.wieght'" in msg and "nearest stored name: 'blocks.0.tok.weight'" in msg
    assert "world_size=1" in msg and "shard-0.safetensors: 8 tensors (blocks 0-1)" in msg


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"rng": torch.zeros(2)}, "not JSON-serialisable"),
        ({"index": {}}, "written by the checkpoint"),
        ({"step": 4}, "differs from step=1"),
    ],
)
def test_bad_meta_fails_before_writing(tmp_path: Path, meta: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        _save(tmp_path, 1, meta=meta)
    assert latest_checkpoint(tmp_path) is None


def test_tied_names_stand_in_for_each_other(tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, tie_embeddings=True)
    emb, head = "blocks.0.tok.weight", f"blocks.{cfg.n_layers + 1}.proj.weight"
    w, m = _value(emb), _value("m")
    meta = {"model": dataclasses.asdict(cfg)}
    path = _save(tmp_path, 1, tensors={emb: w, f"optim.{emb}.exp_avg": m}, meta=meta)
    got = load_tensors(path, [head, f"optim.{head}.exp_avg"])
    assert torch.equal(got[head], w) and torch.equal(got[f"optim.{head}.exp_avg"], m)
    untied = _save(tmp_path / "untied", 1, tensors={emb: w}, meta={"model": dataclasses.asdict(TINY)})
    with pytest.raises(CheckpointError, match="holds no tensor"):
        load_tensors(untied, [head])


# -- export ----------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_rebuilds_the_same_model(tmp_path: Path, tied: bool) -> None:
    cfg = dataclasses.replace(TINY, tie_embeddings=tied)
    model = Transformer(cfg, seed=3)  # not load_exported's seed 0: the weights must be copied
    tok = tmp_path / "tok.json"
    tok.write_text('{"fake": "tokenizer"}')
    meta = {"model": dataclasses.asdict(cfg), "tokenizer_path": str(tok)}
    # state_dict lists a tied weight under both names, sharing memory
    _save(tmp_path / "run", 7, tensors=model.state_dict(), meta=meta)
    out = export_model(tmp_path / "run", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer.json"]
    assert (out / "tokenizer.json").read_bytes() == tok.read_bytes()
    assert json.loads((out / "config.json").read_text()) == dataclasses.asdict(cfg)
    loaded, loaded_cfg = load_exported(out)
    assert loaded_cfg == cfg
    x = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_export_errors_are_clear(tmp_path: Path) -> None:
    meta = {"model": dataclasses.asdict(TINY), "tokenizer_path": str(tmp_path / "gone.json")}
    model = Transformer(TINY, seed=0)
    _save(tmp_path / "run", 1, tensors=dict(model.named_parameters()), meta=meta)
    with pytest.raises(CheckpointError, match="pass --tokenizer PATH"):
        export_model(tmp_path / "run", tmp_path / "out")
    _save(tmp_path / "partial", 1, tensors={"blocks.0.tok.weight": torch.zeros(64, 32)},
          meta={"model": dataclasses.asdict(TINY)})
    with pytest.raises(CheckpointError, match="holds no tensor 'blocks.0.pos.weight'"):
        export_model(tmp_path / "partial", tmp_path / "out")
    with pytest.raises(CheckpointError, match="not an exported model"):
        load_exported(tmp_path / "out")


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = Transformer(TINY, seed=0)
    _save(tmp_path / "run", 2, tensors=dict(model.named_parameters()),
          meta={"model": dataclasses.asdict(TINY)})
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 0
    assert "exported step 2" in capsys.readouterr().out
    assert load_exported(tmp_path / "o")[1] == TINY
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- several ranks ---------------------------------------------------------------------

SHARED = "optim.shared.step"  # a replicated name: stored once


def _rank_names(rank: int) -> list[str]:
    return [f"blocks.{3 * rank + i}.mlp.up.weight" for i in range(3)] + [f"rng.rank{rank}"]


def _two_ranks(run: Path, tied_run: Path) -> dict[str, object]:
    import torch.distributed as dist

    rank = dist.get_rank()
    tensors = {n: _value(n) for n in _rank_names(rank)}
    tensors[SHARED] = torch.tensor(5.0)
    meta = {"run": "mp", "ranks": {str(rank): {"sampler": rank * 10}}}
    out: dict[str, object] = {"path": save_checkpoint(run, 10, tensors=tensors, meta=meta)}
    try:  # the same name with different values on the two ranks: every rank refuses
        save_checkpoint(run, 20, tensors={"clash": torch.tensor(float(rank))}, meta={})
    except CheckpointError as err:
        out["clash"] = str(err)
    # one rank's bad input: every rank raises, naming that rank, and none waits forever
    for key, meta in (("bad_meta", {"x": rank}), ("bad_tensor", {})):
        bad = {"t": "not a tensor" if key == "bad_tensor" and rank == 1 else torch.zeros(1)}
        try:
            save_checkpoint(run, 30, tensors=bad, meta=meta)  # type: ignore[dict-item]
        except CheckpointError as err:
            out[key] = str(err)
    # a real pipeline with tied embeddings split over the two ranks
    cfg = dataclasses.replace(TINY, tie_embeddings=True)
    pipe = Pipeline(cfg, ParallelConfig(pp=2, microbatches=2), Mesh.build(2), seed=0)
    save_checkpoint(tied_run, 1, tensors=dict(pipe.named_parameters()),
                    meta={"model": dataclasses.asdict(cfg)})
    return out


@pytest.mark.multiprocess
def test_two_ranks_save_and_any_split_loads(tmp_path: Path) -> None:
    results = launch(
        _two_ranks, 2, tmp_path / "run", tmp_path / "tied", backend="gloo", timeout_s=60
    )
    assert results[0]["path"] == results[1]["path"] == tmp_path / "run/checkpoints/step-00000010"
    for r in (0, 1):
        assert "tensor 'clash' is held by ranks [0, 1] with different values" in results[r]["clash"]
        assert "meta differs between rank 0 and rank 1 in ['x']" in results[r]["bad_meta"]
        assert "rank 1: tensors['t'] is a str, not a Tensor" in results[r]["bad_tensor"]
    path = latest_checkpoint(tmp_path / "run")
    assert path == results[0]["path"]
    meta = read_meta(path)
    assert meta["world_size"] == 2 and meta["run"] == "mp"
    assert meta["ranks"] == {"0": {"sampler": 0}, "1": {"sampler": 10}}
    assert meta["index"][SHARED] == "shard-0.safetensors"
    assert meta["index"]["rng.rank1"] == "shard-1.safetensors"
    expected = {n: _value(n) for r in (0, 1) for n in _rank_names(r)}
    expected[SHARED] = torch.tensor(5.0)
    names = sorted(expected)
    for readers in (1, 4):  # relayout: the 2 ranks' names, read by 1 or by 4 readers
        got: dict[str, torch.Tensor] = {}
        for i in range(readers):
            got.update(load_tensors(path, names[i::readers]))
        assert sorted(got) == names
        assert all(torch.equal(got[n], expected[n]) for n in names)

    # tied: each rank saved its own copy; the export keeps the embedding's only
    tied = latest_checkpoint(tmp_path / "tied")
    index = read_meta(tied)["index"]
    assert index["blocks.0.tok.weight"] == "shard-0.safetensors"
    assert index[f"blocks.{TINY.n_layers + 1}.proj.weight"] == "shard-1.safetensors"
    model, cfg = load_exported(export_model(tied, tmp_path / "export"))
    reference = Transformer(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
