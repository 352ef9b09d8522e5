"""Tests of conveyor.data: corpus reading, tokenizer, packing, sampler, prepare_data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conveyor.data import (
    Corpus,
    DataError,
    PreparedData,
    Sampler,
    TokenDataset,
    get_batch,
    load_tokenizer,
    pack,
    prepare_data,
    read_documents,
    resolve_paths,
    split_documents,
    stdlib_corpus_paths,
    train_tokenizer,
)
from conveyor.data import prepare as prepare_mod
from conveyor.data import tokenizer as tokenizer_mod


def one_line_error(exc: pytest.ExceptionInfo[DataError], *needles: str) -> str:
    """The message, checked to be one line that contains every needle."""
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"


@pytest.fixture(scope="module")
def small_corpus() -> Corpus:
    """About 200 kB of real stdlib text: enough for a full 512-token vocabulary."""
    paths = [p for p in stdlib_corpus_paths() if p.stat().st_size > 1000][:40]
    return read_documents(paths, limit_bytes=200_000)


# ---------------------------------------------------------------- corpus


def test_missing_path_names_path_and_fix(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(DataError) as exc:
        resolve_paths([missing])
    one_line_error(exc, f"data path '{missing}' does not exist", "--data")


def test_glob_matching_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        resolve_paths([str(tmp_path / "*.txt")])
    one_line_error(exc, "matched no files", "--data")


def test_resolve_files_dirs_globs_in_deterministic_order(tmp_path: Path) -> None:
    write(tmp_path / "d" / "b.txt", "b")
    write(tmp_path / "d" / "sub" / "a.md", "a")
    write(tmp_path / "d" / ".hidden", "h")
    write(tmp_path / "d" / "x.pyc", b"\x00")
    write(tmp_path / "g1.jsonl", "{}")
    write(tmp_path / "g2.jsonl", "{}")
    paths = resolve_paths([str(tmp_path / "d"), str(tmp_path / "g*.jsonl"), str(tmp_path / "d")])
    names = [p.relative_to(tmp_path).as_posix() for p in paths]
    assert names == ["d/b.txt", "d/sub/a.md", "g1.jsonl", "g2.jsonl"]


def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    files = [write(tmp_path / f"{i}.txt", "" if i else "  \n") for i in range(3)]
    with pytest.raises(DataError) as exc:
        read_documents(files)
    one_line_error(exc, "no usable text in 3 files", str(tmp_path), "empty", "--data")


def test_all_binary_corpus_is_an_error(tmp_path: Path) -> None:
    files = [
        write(tmp_path / "nul.txt", b"abc\x00def"),
        write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1")),
        write(tmp_path / "png.dat", b"\x89PNG\r\n\x1a\n\xff\xfe"),
    ]
    with pytest.raises(DataError) as exc:
        read_documents(files)
    assert one_line_error(exc) == (
        f"no usable text in 3 files under '{tmp_path}': all were binary or not UTF-8; "
        "pass text files (UTF-8) to --data"
    )


def test_mixed_corpus_skips_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = write(tmp_path / "a_good.py", TEXT)
    bad1 = write(tmp_path / "b_bad.bin", b"\x00\x01\x02")
    bad2 = write(tmp_path / "c_bad.txt", b"\xff\xfe\xfa broken")
    good2 = write(tmp_path / "d_good.md", "# title\n\nhello world\n")
    with caplog.at_level(logging.WARNING, logger="conveyor.data"):
        corpus = read_documents([good, bad1, bad2, good2])
    assert corpus.documents == [TEXT, "# title\n\nhello world\n"]
    assert corpus.skipped == [bad1, bad2]
    warnings = [r for r in caplog.records if r.name == "conveyor.data"]
    assert len(warnings) == 1
    assert "skipped 2 of 4" in warnings[0].getMessage()
    assert "b_bad.bin" in warnings[0].getMessage() and "c_bad.txt" in warnings[0].getMessage()


def test_jsonl_and_json_list_records(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": "second"})]
    jl = write(tmp_path / "a.jsonl", "\n".join(lines) + "\n")
    js = write(tmp_path / "b.json", json.dumps([{"text": "third"}, {"text": ""}]))
    corpus = read_documents([jl, js])
    assert corpus.documents == ["first", "second", "third"]


def test_jsonl_without_text_field_names_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path / "data.jsonl", '{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError) as exc:
        read_documents([path])
    one_line_error(exc, str(path), "line 2", '"text" field', "body")


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "hello")
    first = read_documents([path]).fingerprint
    assert read_documents([path]).fingerprint == first
    write(path, "hellp")
    assert read_documents([path]).fingerprint != first


def test_limit_bytes_stops_reading(tmp_path: Path) -> None:
    files = [write(tmp_path / f"{i}.txt", "x" * 100) for i in range(5)]
    assert len(read_documents(files, limit_bytes=250).documents) == 3


def test_stdlib_corpus_paths_exist_and_exclude_tests() -> None:
    paths = stdlib_corpus_paths()
    assert len(paths) > 100
    assert all(p.is_file() and p.suffix == ".py" for p in paths)
    assert not any({"test", "tests", "site-packages"} & set(p.parts) for p in paths)
    assert paths == stdlib_corpus_paths()  # deterministic
    corpus = read_documents(paths[:10])
    assert corpus.documents and not corpus.skipped


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_vocab_size(small_corpus: Corpus, tmp_path: Path) -> None:
    tok = train_tokenizer(small_corpus, 512, tmp_path)
    assert tok.vocab_size == 512
    text = "def main(argv):\n    print('héllo ✓', argv)  \t# comment\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < 512 for i in ids)
    assert len(ids) < len(text.encode())  # merges were learned
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert list(tok.encode_batch([text, "x"])) == [ids, tok.encode("x")]


def test_tokenizer_cache_hit_does_not_retrain(small_corpus: Corpus, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    first = train_tokenizer(small_corpus, 300, tmp_path)
    (cached,) = tmp_path.glob("tokenizer-*-300.json")

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained despite a cached tokenizer")

    monkeypatch.setattr(tokenizer_mod.trainers, "BpeTrainer", no_training)
    mtime = cached.stat().st_mtime_ns
    second = train_tokenizer(small_corpus, 300, tmp_path)
    assert cached.stat().st_mtime_ns == mtime
    assert second.to_str() == first.to_str()
    with pytest.raises(AssertionError):  # a different vocab size is a different cache entry
        train_tokenizer(small_corpus, 301, tmp_path)


def test_tokenizer_save_load_and_bad_files(small_corpus: Corpus, tmp_path: Path) -> None:
    tok = train_tokenizer(small_corpus, 300, tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(TEXT) == tok.encode(TEXT) and again.eot_id == tok.eot_id
    with pytest.raises(DataError) as exc:
        load_tokenizer(tmp_path / "missing.json")
    one_line_error(exc, "missing.json", "does not exist")
    bad = write(tmp_path / "bad.json", '{"version": "1.0", "model": ')
    with pytest.raises(DataError) as exc:
        load_tokenizer(bad)
    one_line_error(exc, "bad.json", "corrupt", "delete it")
    with pytest.raises(DataError) as exc:
        train_tokenizer(small_corpus, 100, tmp_path)
    one_line_error(exc, "vocab_size=100", "--vocab-size >= 257")


# ---------------------------------------------------------------- packing


def test_pack_hand_example() -> None:
    rows = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=3, eot_id=0)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 -> rows of 4, nothing left over
    np.testing.assert_array_equal(rows, [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]])
    assert rows.dtype == np.uint16
    rows = pack([[1, 2, 3], [4, 5]], seq_len=2, eot_id=70_000)
    np.testing.assert_array_equal(rows, [[1, 2, 3], [70_000, 4, 5]])  # trailing EOT dropped
    assert rows.dtype == np.int32
    assert pack([[1]], seq_len=4, eot_id=0).shape == (0, 5)


def test_get_batch_targets_are_inputs_shifted() -> None:
    rows = pack([list(range(1, 40))], seq_len=4, eot_id=0)
    inputs, targets = get_batch(rows, np.array([3, 0]))
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.shape == targets.shape == (2, 4)
    assert inputs.tolist() == [[16, 17, 18, 19], [1, 2, 3, 4]]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert targets[:, -1].tolist() == [20, 5]


def test_split_documents_deterministic_and_by_tokens() -> None:
    lengths = [10] * 20
    held = split_documents(lengths, 0.1, seed=3)
    assert held.sum() == 2
    np.testing.assert_array_equal(split_documents(lengths, 0.1, seed=3), held)
    assert not np.array_equal(split_documents(lengths, 0.1, seed=4), held)
    assert split_documents([5, 5], 0.01, seed=0).sum() == 1  # at least one held out
    assert split_documents([100, 1], 0.9, seed=0).sum() == 1  # and at least one kept
    assert split_documents(lengths, 0.0, seed=0).sum() == 0
    with pytest.raises(DataError, match="at least 2"):
        split_documents([10], 0.1, seed=0)
    with pytest.raises(DataError):
        split_documents(lengths, 1.0, seed=0)


def test_validation_holds_whole_documents(tmp_path: Path) -> None:
    """Every document is wholly on one side: no character of a held-out one is in training."""
    letters = "abcdefghijklmnopqrst"
    for ch in letters:
        write(tmp_path / "docs" / f"{ch}.txt", " ".join(ch * (i % 5 + 1) for i in range(60)))
    data = prepare_data([str(tmp_path / "docs")], vocab_size=300, seq_len=16, val_fraction=0.2,
                        cache_dir=tmp_path / "cache", seed=0)
    tok = data.tokenizer

    def chars(rows: np.ndarray) -> set[str]:
        text = "".join(tok.decode([int(t) for t in row if t != tok.eot_id]) for row in rows)
        return set(text) - {" "}

    held, kept = chars(data.val), chars(data.train)
    assert held and kept and not held & kept
    assert 2 <= len(held) <= 6  # about 20% of the 20 equally long documents


def test_literal_end_token_in_text_is_text(small_corpus: Corpus, tmp_path: Path) -> None:
    tok = train_tokenizer(small_corpus, 300, tmp_path)
    ids = tok.encode("a <|endoftext|> b")
    assert tok.eot_id not in ids and tok.decode(ids) == "a <|endoftext|> b"
    assert tok.eot_id not in next(tok.encode_batch(["x<|endoftext|>"]))


def test_token_dataset_save_load_and_corruption(tmp_path: Path) -> None:
    ds = TokenDataset(train=np.arange(12, dtype=np.uint16).reshape(4, 3),
                      val=np.ones((1, 3), dtype=np.uint16))
    path = tmp_path / "ds.npz"
    ds.save(path)
    loaded = TokenDataset.load(path)
    np.testing.assert_array_equal(loaded.train, ds.train)
    np.testing.assert_array_equal(loaded.val, ds.val)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError) as exc:
        TokenDataset.load(path)
    one_line_error(exc, "ds.npz", "corrupt", "delete it")


# ---------------------------------------------------------------- sampler


def take(sampler: Sampler, n: int) -> list[list[int]]:
    return [next(sampler).tolist() for _ in range(n)]


def test_sampler_resume_mid_epoch_matches_unbroken_run() -> None:
    unbroken = take(Sampler(23, 4, seed=7), 12)  # 5 batches per epoch, crosses 2 boundaries
    first = Sampler(23, 4, seed=7)
    head = take(first, 3)
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 3}
    resumed = Sampler(23, 4, seed=7)
    resumed.load_state_dict(dict(state))
    assert head + take(resumed, 9) == unbroken


def test_sampler_epochs_and_seeds() -> None:
    sampler = Sampler(10, 3, seed=1)
    epoch0, epoch1 = take(sampler, 3), take(sampler, 3)
    for epoch in (epoch0, epoch1):
        flat = [i for batch in epoch for i in batch]
        assert len(set(flat)) == 9 and all(0 <= i < 10 for i in flat)  # one row dropped
    assert epoch0 != epoch1  # a fresh permutation per epoch
    assert sampler.state_dict() == {"epoch": 1, "position": 3}
    epoch2 = take(sampler, 1)
    assert sampler.state_dict() == {"epoch": 2, "position": 1}
    assert epoch2[0] == Sampler(10, 3, seed=1).permutation(2)[:3].tolist()
    assert take(Sampler(10, 3, seed=1), 6) == epoch0 + epoch1
    assert take(Sampler(10, 3, seed=2), 3) != epoch0


def test_sampler_errors() -> None:
    with pytest.raises(DataError) as exc:
        Sampler(5, 8, seed=0, seq_len=128)
    assert one_line_error(exc) == (
        "corpus too small: 5 training sequences of 129 tokens < batch size 8; "
        "add data, lower --batch-size or --seq-len"
    )
    with pytest.raises(DataError) as exc:
        Sampler(10, 3, seed=0).load_state_dict({"epoch": 0, "position": 4})
    one_line_error(exc, "position=4", "same data")


# ---------------------------------------------------------------- prepare_data


def test_prepare_data_end_to_end_and_cache(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    src = stdlib_corpus_paths()[0].parent  # the stdlib root; real text, copied into tmp_path
    data = tmp_path / "data"
    for i, path in enumerate(p for p in sorted(src.glob("*.py")) if p.stat().st_size > 2000):
        if i == 8:
            break
        write(data / path.name, path.read_text(encoding="utf-8"))
    write(data / "junk.bin.txt", b"\x00\x00")

    def prepare() -> PreparedData:
        return prepare_data([str(data)], vocab_size=300, seq_len=32, val_fraction=0.1,
                            cache_dir=tmp_path / "cache", seed=0)

    first = prepare()
    assert first.skipped == 1
    assert first.train.shape[1] == first.val.shape[1] == 33
    n_rows = len(first.train) + len(first.val)
    assert n_rows > 100 and 0 < len(first.val) < 0.5 * n_rows
    assert first.tokenizer.vocab_size <= 300

    def no_packing(*args: object, **kw: object) -> None:
        raise AssertionError("re-tokenized despite a cached dataset")

    monkeypatch.setattr(prepare_mod, "pack", no_packing)
    second = prepare()
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.val, first.val)


def test_prepare_data_too_small_for_one_sequence(tmp_path: Path) -> None:
    write(tmp_path / "tiny.txt", "hi there")
    with pytest.raises(DataError) as exc:
        prepare_data([str(tmp_path / "tiny.txt")], vocab_size=300, seq_len=128,
                     val_fraction=0.0, cache_dir=tmp_path / "cache", seed=0)
    one_line_error(exc, "corpus too small", "129 tokens", "--seq-len")
