"""Task metrics with well-kept libraries: scikit-learn, sacrebleu, rouge-score.

Classification: accuracy, macro-F1 (scikit-learn's ``f1_score``, classes absent from
both predictions and references left out, as it does by default), and the
majority-class baseline (always the most frequent training label). Seq2seq: corpus
BLEU (sacrebleu, its default 13a tokenisation) and mean ROUGE-L F-measure (rouge-score,
stemmed) of predicted against reference texts, plus the copy-the-function-name
baseline of the docstring task. Masked LM: accuracy over the masked positions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = ["UNKNOWN_LABEL", "classification_metrics", "function_name_baseline",
           "masked_accuracy", "seq2seq_metrics"]

UNKNOWN_LABEL = -1
"""A prediction that names no label (a generated text that is none): wrong for accuracy, a
miss of its reference's class for F1, and no class of its own."""


def classification_metrics(predicted: Sequence[int], reference: Sequence[int],
                           majority: int) -> dict[str, float]:
    """accuracy, macro_f1 and the majority-class baseline's accuracy and macro-F1."""
    from sklearn.metrics import f1_score

    pred, ref = np.asarray(predicted), np.asarray(reference)
    base = np.full_like(ref, majority)

    def macro_f1(guess: np.ndarray) -> float:
        classes = sorted((set(ref.tolist()) | set(guess.tolist())) - {UNKNOWN_LABEL})
        return float(f1_score(ref, guess, labels=classes, average="macro", zero_division=0))

    return {
        "accuracy": float((pred == ref).mean()),
        "macro_f1": macro_f1(pred),
        "majority_accuracy": float((base == ref).mean()),
        "majority_macro_f1": macro_f1(base),
    }


def seq2seq_metrics(predicted: Sequence[str], reference: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (0-100) and mean ROUGE-L F-measure (0-1) of predictions against references."""
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(list(predicted), [list(reference)]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure
             for pred, ref in zip(predicted, reference, strict=True)]
    return {"bleu": float(bleu), "rouge_l": float(np.mean(rouge)) if rouge else 0.0}


_DEF = re.compile(r"^\s*(?:async\s+)?def\s+(\w+)", re.MULTILINE)


def function_name_baseline(source: str) -> str:
    """The docstring baseline's guess: the function's name with underscores as spaces."""
    found = _DEF.search(source)
    return found.group(1).replace("_", " ").strip() if found else ""


def masked_accuracy(predicted: np.ndarray, targets: np.ndarray, ignore: int = -100) -> float:
    """Share of counted targets (not ``ignore``) that the argmax predictions get right."""
    counted = targets != ignore
    n = int(counted.sum())
    return float((predicted[counted] == targets[counted]).sum() / n) if n else 0.0
