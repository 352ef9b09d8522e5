"""Bad input to `conveyor train` ends in one line naming the problem and the fix, exit 2,
no traceback, and (for config mistakes) before any process is spawned."""

from __future__ import annotations

from pathlib import Path

import pytest

import conveyor.train.trainer  # noqa: F401  (imported before patching: it binds `launch` at import)
from conveyor.cli import main

TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--vocab-size", "320",
        "--seq-len", "16", "--batch-size", "8", "--microbatches", "2"]


@pytest.fixture(autouse=True)
def _no_spawn(monkeypatch: pytest.MonkeyPatch) -> None:
    def spawn(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was spawned for input that should have been rejected")

    monkeypatch.setattr("conveyor.runtime.launch.launch", spawn)
    monkeypatch.setattr("conveyor.train.trainer.launch", spawn)
    monkeypatch.setattr("torch.multiprocessing.start_processes", spawn)


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str,
           log_lines: bool = False) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if log_lines:  # data errors may follow the data package's own log lines
        lines = [ln for ln in lines if not ln.startswith("[rank")]
    assert len(lines) == 1, err
    assert lines[0].startswith("conveyor train: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _train(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", *TINY, "--run-dir", str(tmp_path / "runs"), *extra]


def test_missing_data_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.txt"
    _fails(_train(tmp_path, "--data", str(missing)), capsys, f"'{missing}' does not exist",
           "--data", log_lines=True)


def test_empty_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.txt").write_text("  \n\n")
    _fails(_train(tmp_path, "--data", str(tmp_path / "empty.txt")), capsys,
           "no usable text", "empty", "--data", log_lines=True)


def test_all_binary_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "blob.dat").write_bytes(bytes(range(256)) * 4)
    _fails(_train(tmp_path, "--data", str(tmp_path / "blob.dat")), capsys,
           "no usable text", "binary", "pass text files", log_lines=True)


def test_corpus_smaller_than_one_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "small.txt").write_text("the pipeline sends activations forward. " * 30)
    (tmp_path / "other.txt").write_text("gradients flow back. " * 5)
    _fails(_train(tmp_path, "--data", str(tmp_path / "small.txt"), str(tmp_path / "other.txt"),
                  "--batch-size", "64",
                  "--microbatches", "4"), capsys, "corpus too small", "--batch-size",
           log_lines=True)


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--layers", "1", "--pp", "4"],
         ["layers=1", "cannot be split into pp=4", "pp*virtual_stages <= 3"]),
        (["--batch-size", "6", "--microbatches", "4"],
         ["batch_size=6 cannot be split into microbatches=4", "multiple of dp*microbatches"]),
        (["--schedule", "bogus"], ["schedule='bogus' is unknown", "1f1b"]),
        (["--schedule", "forward-only"], ["cannot train"]),
        (["--partition", "even"], ["partition='even' is unknown", "uniform, params, cost"]),
        (["--heads", "3"], ["d_model=32 is not divisible by n_heads=3"]),
        (["--lr", "0"], ["lr=0.0 must be a finite number > 0"]),
        (["--val-fraction", "1.5"], ["val_fraction=1.5 must be in [0, 1)"]),
        (["--name", "a/b"], ["plain directory name"]),
    ],
)
def test_config_errors(flags: list[str], needles: list[str], tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_train(tmp_path, *flags), capsys, *needles)


def test_unknown_toml_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text("[model]\nlayers = 4\n")
    _fails(_train(tmp_path, "--config", str(cfg)), capsys, "unknown key 'layers'",
           "did you mean 'n_layers'", str(cfg))


def test_unknown_toml_section_and_bad_syntax(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text("[optimizer]\nlr = 1\n")
    _fails(_train(tmp_path, "--config", str(cfg)), capsys, "unknown key 'optimizer'", "[train]")
    cfg.write_text("[model\n")
    _fails(_train(tmp_path, "--config", str(cfg)), capsys, "is not valid TOML")
    _fails(_train(tmp_path, "--config", str(tmp_path / "none.toml")), capsys, "does not exist")


def test_resume_from_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_train(tmp_path, "--resume", str(tmp_path / "runs" / "gone")), capsys,
           "does not exist", "checkpoint")


def test_existing_run_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = "the pipeline sends activations forward while gradients flow back.\n" * 400
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text(text)
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    _fails(_train(tmp_path, "--data", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
                  "--name", "taken"), capsys,
           "already exists", "--name", log_lines=True)


def test_report_of_a_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("conveyor report: error: ") and "does not exist" in err
    assert len(err.splitlines()) == 1
