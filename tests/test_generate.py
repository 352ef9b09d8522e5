"""Text generation: sampling, KV-cached decoding, the pipelined version, the CLI."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp

from conveyor.cli import main
from conveyor.config import ModelConfig, to_dict
from conveyor.data.corpus import Corpus
from conveyor.data.tokenizer import Tokenizer, train_tokenizer
from conveyor.generation import (
    GenerationError,
    TextStream,
    context_budget,
    generate,
    sample_next,
)
from conveyor.generation.batch import Sampling
from conveyor.models import HeadBlock, Transformer
from conveyor.parallel.mesh import Mesh
from conveyor.parallel.partition import uniform
from conveyor.runtime.generate import PipelinedGenerator, build_stage, generate_pipelined
from conveyor.runtime.launch import launch
from conveyor.train.checkpoint import save_checkpoint

# init_std well above the default gives peaked logits: greedy picks are far from
# ties, so float noise between equivalent paths cannot flip a token
GPT2 = ModelConfig(vocab_size=64, n_layers=3, d_model=32, n_heads=4, max_seq_len=24, init_std=0.5)
LLAMA = replace(GPT2, flavour="llama", n_kv_heads=2, tie_embeddings=True)
PROMPT = [5, 17, 3, 42, 8]
SAMPLING = dict(temperature=1.0, top_k=20, top_p=0.9)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- sampling ------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    logits = torch.randn(8, 50, generator=_gen(0))
    out = sample_next(logits, temperature=0, top_k=50, top_p=0.95, generator=_gen(1))
    assert torch.equal(out, logits.argmax(-1))


@pytest.mark.parametrize("filters", [dict(top_k=1, top_p=None), dict(top_k=None, top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_are_greedy(filters: dict) -> None:
    logits = torch.randn(16, 50, generator=_gen(0))
    for seed in range(5):
        out = sample_next(logits, temperature=1.5, generator=_gen(seed), **filters)
        assert torch.equal(out, logits.argmax(-1))


def test_sampling_is_seeded_and_stays_in_the_filters() -> None:
    logits = torch.randn(256, 40, generator=_gen(0))
    a = sample_next(logits, temperature=1.0, top_k=5, top_p=None, generator=_gen(3))
    b = sample_next(logits, temperature=1.0, top_k=5, top_p=None, generator=_gen(3))
    c = sample_next(logits, temperature=1.0, top_k=5, top_p=None, generator=_gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    top5 = logits.topk(5).indices
    assert (top5 == a[:, None]).any(-1).all()
    assert len(set(a.tolist())) > 5  # really sampled, not greedy
    # nucleus: the chosen token's more likely rivals hold less than top_p of the mass
    p = 0.5
    out = sample_next(logits, temperature=1.0, top_k=None, top_p=p, generator=_gen(5))
    probs = logits.softmax(-1)
    chosen = probs.gather(-1, out[:, None])
    assert (torch.where(probs > chosen, probs, 0).sum(-1) < p).all()


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_bad_sampling_settings_are_named(bad: dict) -> None:
    settings = dict(temperature=1.0, top_k=None, top_p=None) | bad
    name = next(iter(bad))
    with pytest.raises(GenerationError, match=name):
        sample_next(torch.zeros(1, 4), generator=None, **settings)


# -- single-process decoding -----------------------------------------------------------


def _recompute_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Reference: the whole sequence through the model for every token, no cache."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama-gqa-tied"])
def test_kv_cache_matches_recomputation(cfg: ModelConfig) -> None:
    model = Transformer(cfg, seed=1)
    streamed: list[int] = []
    out = generate(model, PROMPT, 12, temperature=0, on_token=streamed.append)
    assert out == _recompute_greedy(model, PROMPT, 12)
    assert streamed == out


def test_seeded_generation_is_deterministic() -> None:
    model = Transformer(GPT2, seed=1)
    a = generate(model, PROMPT, 12, seed=7, **SAMPLING)
    assert a == generate(model, PROMPT, 12, seed=7, **SAMPLING)
    assert a != generate(model, PROMPT, 12, seed=8, **SAMPLING)


def test_stops_at_eot_without_returning_it() -> None:
    model = Transformer(GPT2, seed=1)
    greedy = generate(model, PROMPT, 6, temperature=0)
    eot = greedy[2]
    first = greedy.index(eot)
    assert generate(model, PROMPT, 6, temperature=0, eot_id=eot) == greedy[:first]
    assert generate(model, PROMPT, 6, temperature=0, eot_id=eot, stop_at_eot=False) == greedy


def test_context_full_stops_and_too_long_prompt_errors() -> None:
    model = Transformer(GPT2, seed=1)
    L = GPT2.max_seq_len
    # the last new token is never fed back, so L - P + 1 fit
    assert context_budget(len(PROMPT), 100, L) == L - len(PROMPT) + 1
    assert len(generate(model, PROMPT, 100, temperature=0)) == L - len(PROMPT) + 1
    assert len(generate(model, [1] * L, 5, temperature=0)) == 1
    with pytest.raises(GenerationError, match=f"max_seq_len is {L}"):
        generate(model, [1] * (L + 1), 5)
    with pytest.raises(GenerationError, match="empty"):
        generate(model, [], 5)


# -- text streaming --------------------------------------------------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Pipelines pass activations from stage to stage, café à la crème, 東京 🚀. " * 3,
    "def generate(model, prompt):\n    return model(prompt)\n" * 3,
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    corpus = Corpus(documents=TEXTS, fingerprint="test-generate")
    return train_tokenizer(corpus, 300, tmp_path_factory.mktemp("tok"))


def test_text_stream_emits_whole_characters(tokenizer: Tokenizer) -> None:
    text = "café 東京 🚀 fox"
    ids = tokenizer.encode(text)
    prompt, rest = ids[:1], ids[1:]
    stream = TextStream(tokenizer.decode, prompt)
    pieces = [stream.push(t) for t in rest] + [stream.flush()]
    assert tokenizer.decode(prompt) + "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(p == "" for p in pieces) > 0  # multi-byte characters were held back


# -- pipelined (pp=2) ------------------------------------------------------------------


def _tensors_without_tied_head(model: Transformer) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        del state[f"blocks.{model.cfg.num_blocks - 1}.{HeadBlock.tied_param_name}"]
    return state


def _pipelined_cases() -> list[tuple[str, list[int], list[int]]]:
    mesh = Mesh.build(2)
    results = []
    for cfg, settings in [(GPT2, dict(temperature=0)), (GPT2, SAMPLING), (LLAMA, SAMPLING)]:
        reference = Transformer(cfg, seed=3)
        expected = generate(reference, PROMPT, 10, seed=11, **settings)
        part = uniform(cfg.num_blocks, 2)
        # seed 0 blocks, then weights by name: equal to the reference only if loading works
        state = _tensors_without_tied_head(reference)
        blocks = build_stage(cfg, part, mesh.pp_rank, load=lambda names, s=state: {
            n: s[n] for n in names})
        streamed: list[int] = []
        got = generate_pipelined(blocks, cfg, mesh, PROMPT, 10, seed=11, timeout_s=60,
                                 on_token=streamed.append, **settings)
        assert streamed == got
        results.append((f"{cfg.flavour} {settings}", got, expected))
    return results


@pytest.mark.multiprocess
def test_pipelined_matches_single_process() -> None:
    # the reference runs inside the ranks too, so both use the same thread settings
    out = launch(_pipelined_cases, 2, timeout_s=60)
    assert sorted(out) == [0, 1]
    for rank, cases in out.items():
        for name, got, expected in cases:
            assert len(expected) == 10, name
            assert got == expected, f"rank {rank}, {name}"


def _rank0_stalls() -> None:
    mesh = Mesh.build(2)
    blocks = build_stage(GPT2, uniform(GPT2.num_blocks, 2), mesh.pp_rank)
    gen = PipelinedGenerator(blocks, GPT2, mesh, timeout_s=2.0)
    if mesh.pp_rank == 0:
        time.sleep(120)  # a stuck first stage: never sends the prompt's hidden states
    gen.generate([PROMPT], 4, Sampling(temperature=0))


@pytest.mark.multiprocess
def test_stalled_peer_times_out_with_a_message() -> None:
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException) as err:
        launch(_rank0_stalls, 2, timeout_s=30)
    # the executor names the receive it waited on, as in training
    assert "rank 1 failed at its action #0, 1RECV_F0 (stage 1, microbatch 0)" in str(err.value)
    assert "receiving activations of stage 1, microbatch 0" in str(err.value)
    assert time.monotonic() - start < 60


# -- CLI -------------------------------------------------------------------------------


def _export_dir(tmp_path: Path, tokenizer: Tokenizer, cfg: ModelConfig) -> Path:
    """A tiny exported model as `conveyor export` writes it."""
    model = Transformer(cfg, seed=2)
    out = tmp_path / "export"
    out.mkdir()
    safetensors.torch.save_file(
        {n: p.detach().clone() for n, p in model.named_parameters()}, out / "model.safetensors"
    )
    (out / "config.json").write_text(json.dumps(to_dict(cfg)))
    tokenizer.save(out / "tokenizer.json")
    return out


def _cli_cfg(tokenizer: Tokenizer) -> ModelConfig:
    return replace(GPT2, vocab_size=tokenizer.vocab_size, max_seq_len=48, tie_embeddings=True)


def test_cli_generates_from_an_export(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cli_cfg(tokenizer)
    out = _export_dir(tmp_path, tokenizer, cfg)
    args = ["generate", "--checkpoint", str(out), "--prompt", "The quick", "--seed", "3",
            "--max-new-tokens", "8"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("The quick") and first.endswith("\n")
    assert len(first.strip()) > len("The quick")
    model = Transformer(cfg, seed=2)
    ids = tokenizer.encode("The quick")
    expected = generate(model, ids, 8, seed=3, eot_id=tokenizer.eot_id)
    assert first == "The quick" + tokenizer.decode(ids + expected)[len("The quick"):] + "\n"


def test_cli_generates_from_a_checkpoint(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cli_cfg(tokenizer)
    model = Transformer(cfg, seed=2)
    tok_path = tmp_path / "tokenizer.json"
    tokenizer.save(tok_path)
    save_checkpoint(tmp_path / "run", 5, tensors=_tensors_without_tied_head(model),
                    meta={"model": to_dict(cfg), "tokenizer_path": str(tok_path)})
    export = _export_dir(tmp_path, tokenizer, cfg)
    common = ["--prompt", "café", "--temperature", "0", "--max-new-tokens", "6"]
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), *common]) == 0
    from_ckpt = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(export), *common]) == 0
    assert capsys.readouterr().out == from_ckpt


def test_cli_errors_are_one_line(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and len(err.strip().splitlines()) == 1
    out = _export_dir(tmp_path, tokenizer, _cli_cfg(tokenizer))
    long_prompt = "The quick brown fox " * 40
    assert main(["generate", "--checkpoint", str(out), "--prompt", long_prompt]) == 2
    err = capsys.readouterr().err
    assert "max_seq_len is 48" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--checkpoint", str(out), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p=2.0" in capsys.readouterr().err


def test_cli_notes_a_full_context(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _export_dir(tmp_path, tokenizer, _cli_cfg(tokenizer))
    args = ["generate", "--checkpoint", str(out), "--prompt", "The quick brown fox jumps",
            "--temperature", "0", "--max-new-tokens", "500"]
    assert main(args) == 0
    assert "fill max_seq_len=48" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_cli_pipelined_prints_the_same_text(
    tmp_path: Path, tokenizer: Tokenizer, capfd: pytest.CaptureFixture[str]
) -> None:
    out = _export_dir(tmp_path, tokenizer, _cli_cfg(tokenizer))
    args = ["generate", "--checkpoint", str(out), "--prompt", "The quick", "--seed", "4",
            "--max-new-tokens", "8", "--timeout", "60"]
    assert main(args) == 0
    single = capfd.readouterr().out
    assert main([*args, "--pp", "2"]) == 0
    assert capfd.readouterr().out == single


def test_cli_prompts_file_writes_json_lines(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cli_cfg(tokenizer)
    out = _export_dir(tmp_path, tokenizer, cfg)
    prompts = ["The quick", "café à", "def generate(model", "Pipelines pass activations"]
    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(prompts[:2]) + "\n\n" + "\n".join(prompts[2:]) + "\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    common = ["generate", "--checkpoint", str(out), "--temperature", "0", "--max-new-tokens", "6",
              "--batch-size", "3", "--microbatches", "2"]
    assert main([*common, "--prompts-file", str(txt), "--output", str(tmp_path / "a.jsonl")]) == 0
    assert main([*common, "--prompts-file", str(jsonl)]) == 0
    from_stdout = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert from_stdout.splitlines() == (tmp_path / "a.jsonl").read_text().splitlines()
    model = Transformer(cfg, seed=2)
    for i, (record, prompt) in enumerate(zip(records, prompts, strict=True)):
        ids = tokenizer.encode(prompt)
        new = generate(model, ids, 6, temperature=0, eot_id=tokenizer.eot_id)
        assert record == {"index": i, "prompt": prompt, "new_tokens": len(new),
                          "completion": tokenizer.decode(ids + new)[len(tokenizer.decode(ids)):]}


@pytest.mark.parametrize(("name", "text", "message"), [
    ("p.csv", "x\n", "must end in .txt"),
    ("p.txt", "\n\n", "holds no prompt"),
    ("p.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', 'p.jsonl:2 has no "prompt" string'),
    ("p.jsonl", "{nope\n", "p.jsonl:1 is not JSON"),
])
def test_cli_bad_prompts_file_is_one_line(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str],
    name: str, text: str, message: str,
) -> None:
    out = _export_dir(tmp_path, tokenizer, _cli_cfg(tokenizer))
    (tmp_path / name).write_text(text)
    args = ["generate", "--checkpoint", str(out), "--prompts-file", str(tmp_path / name)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.multiprocess
def test_cli_pipelined_prompts_file_matches_one_process_and_traces(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    out = _export_dir(tmp_path, tokenizer, _cli_cfg(tokenizer))
    names = assert_pp2_file_matches_one_process(tmp_path, out, ["The quick", "café à la", "fox"])
    assert {"F0 s0", "F0 s1", "F0 s2"} <= names  # stage 2 is round 1 on rank 0: the ring


def assert_pp2_file_matches_one_process(tmp_path: Path, model: Path, prompts: list[str]) -> set[str]:
    """`conveyor generate --prompts-file` writes the same at pp 2 as at pp 1; the trace's names."""
    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(prompts) + "\n")
    common = ["generate", "--checkpoint", str(model), "--prompts-file", str(txt), "--seed", "5",
              "--max-new-tokens", "5", "--timeout", "60"]
    assert main([*common, "--output", str(tmp_path / "one.jsonl")]) == 0
    trace = tmp_path / "trace.json"
    assert main([*common, "--pp", "2", "--output", str(tmp_path / "two.jsonl"),
                 "--trace", str(trace)]) == 0
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    return {e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"}
