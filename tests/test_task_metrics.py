"""Task metrics against hand-computed values, and `conveyor report` drawing them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from conveyor.train.report import plot_run, summarize
from conveyor.train.task_metrics import (
    UNKNOWN_LABEL,
    classification_metrics,
    function_name_baseline,
    masked_accuracy,
    seq2seq_metrics,
)


def test_classification_metrics_by_hand() -> None:
    m = classification_metrics([0, 1, 1, 2], [0, 1, 2, 2], majority=2)
    # per class F1: 0 -> 1, 1 -> 2/3 (p 1/2, r 1), 2 -> 2/3 (p 1, r 1/2)
    assert m["accuracy"] == 0.75 and m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # always 2: right twice; F1 of class 2 = 2/3, of 0 and 1 zero
    assert m["majority_accuracy"] == 0.5 and m["majority_macro_f1"] == pytest.approx(2 / 9)


def test_a_prediction_naming_no_label_is_a_miss_not_a_class() -> None:
    m = classification_metrics([0, UNKNOWN_LABEL, 1, 1], [0, 1, 1, 1], majority=1)
    # class 0: F1 1; class 1: p 1, r 2/3 -> F1 0.8; the unknown output is no third class
    assert m["accuracy"] == 0.75 and m["macro_f1"] == pytest.approx((1 + 0.8) / 2)


def test_seq2seq_metrics_and_the_name_baseline() -> None:
    same = seq2seq_metrics(["open the file now", "a b c d"], ["open the file now", "a b c d"])
    assert same == {"bleu": pytest.approx(100.0), "rouge_l": pytest.approx(1.0)}
    # LCS "open file" of 3 and 2 words: P 2/2, R 2/3 -> F 0.8; no 4-gram shared -> BLEU 0
    part = seq2seq_metrics(["open file"], ["open the file"])
    assert part["rouge_l"] == pytest.approx(0.8) and part["bleu"] == pytest.approx(0.0)
    assert function_name_baseline("@cache\nasync def _read_all_rows(self):\n  pass") == "read all rows"
    assert function_name_baseline("x = 1") == ""


def test_masked_accuracy_counts_only_targets() -> None:
    pred = np.array([[1, 2, 3], [4, 5, 6]])
    tgt = np.array([[1, -100, 0], [-100, 5, -100]])
    assert masked_accuracy(pred, tgt) == pytest.approx(2 / 3)


def test_report_lists_and_draws_task_metrics(tmp_path: Path) -> None:
    # a classifier's rows have no val_ppl; the perplexity panel draws exp(val_loss)
    rows = [{"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0,
             "elapsed_s": 1.0},
            {"step": 0, "val_loss": 2.1, "val_accuracy": 0.2, "majority_accuracy": 0.3},
            {"step": 1, "val_loss": 1.9, "val_accuracy": 0.6, "majority_accuracy": 0.3,
             "val_bleu": 12.5, "val_mlm_ppl": 40.0}]
    summary = summarize(rows)
    assert summary.task["val_accuracy"] == (1, 0.6) and summary.task["val_bleu"] == (1, 12.5)
    table = summary.table()
    assert re.search(r"val accuracy +0.6000 \(step 1\)", table) and "majority accuracy" in table
    png = plot_run(rows, tmp_path / "r.png", "t")
    assert png.read_bytes()[:4] == b"\x89PNG"
