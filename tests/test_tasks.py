"""Fine-tuning task data: reading and splitting records, the local tasks, encoding per family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conveyor.config import ModelConfig
from conveyor.data import DataError
from conveyor.data.task_encode import encode_records
from conveyor.data.task_local import docstring_examples, package_chunks
from conveyor.data.tasks import Record, load_task, read_inputs, read_records, split_documents

IGNORE = -100


class _Ids:
    """A tokenizer over texts of space-separated ids (eot 1)."""

    eot_id = 1

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[int(t) for t in text.split()] for text in texts]


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_file_splits_by_record_deterministically_and_checks_labels(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(20)]
    path = _write(tmp_path / "cls.jsonl", rows)
    a, b = (load_task(str(path), val_fraction=0.25, seed=3) for _ in range(2))
    assert a == b and a.kind == "classification" and a.labels == ("a", "b")
    assert len(a.train) == 15 and len(a.val) == 5
    assert {r.text for r in a.train}.isdisjoint(r.text for r in a.val)
    val = _write(tmp_path / "val.jsonl", [{"text": "x", "label": "c"}])
    with pytest.raises(DataError, match="label 'c', unseen in training"):
        load_task(str(path), val_task=str(val))


@pytest.mark.parametrize(("record", "message"), [
    ({"text": "x"}, "missing field 'label'"),
    ({"source": "x"}, "missing field 'target'"),
    ({"source": "x", "target": "  "}, "an empty target"),
    ({"text": 3, "label": "a"}, "field 'text' must be a string"),
    ({"text": "", "label": "a"}, "an empty 'text'"),
    ({"body": "x"}, "needs \"text\" and \"label\""),
])
def test_bad_records_are_one_line_errors(tmp_path: Path, record: dict, message: str) -> None:
    path = _write(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match=message) as err:
        read_records(path)
    assert "\n" not in str(err.value) and "bad.jsonl:1" in str(err.value)
    with pytest.raises(DataError, match="no task name"):
        load_task("nope")


def test_predict_inputs_need_text(tmp_path: Path) -> None:
    assert read_inputs(_write(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b", "label": 2}])
                       ) == [Record("a", ""), Record("b", "2")]
    with pytest.raises(DataError, match="missing field 'text'"):
        read_inputs(_write(tmp_path / "bad.jsonl", [{"label": "a"}]))


def test_documents_never_straddle_the_split() -> None:
    docs = [f"f{i // 3}" for i in range(30)]
    held = split_documents(docs, 0.2, seed=1)
    assert len(held) == 2 and held == split_documents(docs, 0.2, seed=1)
    assert held != split_documents(docs, 0.2, seed=2)


def test_stdlib_package_labels_are_the_top_directory(tmp_path: Path) -> None:
    for rel in ("email/a.py", "email/mime/b.py", "json/c.py", "json/d.py", "os.py", "csv/e.py"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(f"x{i} = {i}" for i in range(30)))
    rows = package_chunks(sorted(tmp_path.rglob("*.py")), tmp_path, packages=2)
    assert {label for _, label, _ in rows} == {"email", "json"}  # the two with most files
    assert ("email", "email/mime/b.py") in {(label, doc) for _, label, doc in rows}
    assert all(len(text.splitlines()) == 12 for text, _, _ in rows)


def test_docstring_examples_drop_the_docstring() -> None:
    source = (
        "def add_two(a, b):\n"
        "    \"\"\"Add two numbers.\n\n    More.\n    \"\"\"\n"
        "    return a + b\n\n"
        "def bare(x):\n    return x\n\n"
        "class K:\n    @property\n    def name(self):\n        'The name.'\n        return 1\n"
    )
    assert docstring_examples(source) == [
        ("def add_two(a, b):\n    return a + b", "Add two numbers."),
        ("@property\ndef name(self):\n    return 1", "The name."),
    ]


def _model(family: str, **kw: object) -> ModelConfig:
    return ModelConfig(family=family, vocab_size=300, n_layers=1, d_model=16, n_heads=2,
                       max_seq_len=8, **kw)  # type: ignore[arg-type]


def test_bert_classification_places_cls_and_sep() -> None:
    rows = encode_records([Record("5 6 7", "b"), Record("9", "a")], _model("bert", num_labels=2),
                          _Ids(), kind="classification", labels=("a", "b"))
    x, y = rows.batch(np.arange(2))
    pad, cls, sep = 296, 297, 298
    assert x["tokens"].tolist() == [[cls, 5, 6, 7, sep, pad, pad, pad],
                                    [cls, 9, sep, pad, pad, pad, pad, pad]]
    assert x["attention_mask"].sum(1).tolist() == [5, 3]
    assert y["label"].tolist() == [1, 0]


def test_gpt_classification_labels_the_last_real_token() -> None:
    rows = encode_records([Record("5 6", "b")], _model("gpt", num_labels=2), _Ids(),
                          kind="classification", labels=("a", "b"))
    x, y = rows.batch(np.arange(1))
    assert x.tolist() == [[5, 6, 1, 1, 1, 1, 1, 1]]
    assert y.tolist() == [[IGNORE, IGNORE, 1, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert rows.last.tolist() == [2]


def test_seq2seq_layouts_teacher_force_and_ignore_the_prompt() -> None:
    rec = [Record("5 6", "7 8")]
    x, y = encode_records(rec, _model("gpt"), _Ids(), kind="seq2seq", target_len=4).batch(
        np.arange(1))
    # source <eot> target <eot>: the targets are the completion's next tokens only
    assert x.tolist() == [[5, 6, 1, 7, 8, 1, 1, 1]]
    assert y.tolist() == [[IGNORE, IGNORE, 7, 8, 1, IGNORE, IGNORE, IGNORE]]
    x, y = encode_records(rec, _model("t5"), _Ids(), kind="seq2seq", target_len=4).batch(
        np.arange(1))
    pad, eos = 282, 283
    assert x["tokens"].tolist() == [[5, 6, eos, pad, pad, pad, pad, pad]]
    assert x["decoder_tokens"].tolist() == [[pad, 7, 8, pad]]
    assert y["lm"].tolist() == [[7, 8, eos, IGNORE]]
    assert x["decoder_mask"].tolist() == [[1, 1, 1, 0]]


def test_a_source_longer_than_the_context_needs_truncate() -> None:
    rec = [Record(" ".join(["5"] * 12), "a"), Record("6", "b")]
    with pytest.raises(DataError, match=r"record 0: its text is 12 tokens, more than the 6 .*"
                       "--truncate"):
        encode_records(rec, _model("bert", num_labels=2), _Ids(), kind="classification",
                       labels=("a", "b"))
    rows = encode_records(rec, _model("bert", num_labels=2), _Ids(), kind="classification",
                          labels=("a", "b"), truncate=True)
    assert rows.batch(np.arange(1))[0]["tokens"].tolist()[0] == [297, *[5] * 6, 298]
    with pytest.raises(DataError, match="its target is 5 tokens"):
        encode_records([Record("5", "7 7 7 7 7")], _model("t5"), _Ids(), kind="seq2seq",
                       target_len=4)
