"""A run's metrics as a summary table and a PNG of its loss and perplexity curves.

Evaluation rows may carry task metrics besides ``val_loss``/``val_ppl`` (MLM accuracy and
perplexity, classification accuracy and macro-F1 with the majority-class baseline, BLEU
and ROUGE-L with a baseline's): the table lists the last value of each, and the PNG
draws them in a third panel (BLEU, on 0-100, as BLEU/100).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import eval_rows, perplexity, train_rows

__all__ = ["RunSummary", "summarize", "plot_run", "task_metrics"]

_PLAIN = ("step", "val_loss", "val_ppl")


def task_metrics(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every numeric evaluation metric besides val_loss and val_ppl."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in eval_rows(rows):
        for k, v in r.items():
            if k not in _PLAIN and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, []).append((r["step"], float(v)))
    return out


@dataclass(frozen=True)
class RunSummary:
    """The figures of a run that fit on one screen."""

    steps: int
    """Last training step recorded."""
    final_loss: float | None
    """Training loss of the last step."""
    first_val: tuple[int, float] | None
    """(step, val loss) of the first evaluation."""
    last_val: tuple[int, float] | None
    """(step, val loss) of the last evaluation."""
    tokens_per_s: float | None
    """Median training throughput over the steps."""
    wall_s: float | None
    """Wall time of the run at its last step (across resumes)."""
    task: dict[str, tuple[int, float]] = field(default_factory=dict)
    """Each task metric's last (step, value) (``task_metrics``)."""

    @property
    def drop_pct(self) -> float | None:
        """How far the val loss fell from the first evaluation to the last, in percent."""
        if self.first_val is None or self.last_val is None or self.first_val[1] == 0:
            return None
        return 100.0 * (self.first_val[1] - self.last_val[1]) / self.first_val[1]

    def table(self, extra: list[tuple[str, str]] | None = None) -> str:
        """Aligned two-column text, with ``extra`` (label, value) rows at the end."""
        def num(x: float | None, fmt: str) -> str:
            return "-" if x is None else format(x, fmt)

        lines = [("steps", str(self.steps)), ("final train loss", num(self.final_loss, ".4f"))]
        for label, val in (("first", self.first_val), ("last", self.last_val)):
            if val is not None:
                lines.append((f"{label} val loss", f"{val[1]:.4f} (step {val[0]}, "
                              f"perplexity {perplexity(val[1]):.1f})"))
        drop = self.drop_pct
        lines += [
            ("val loss drop", "-" if drop is None else f"{drop:.1f}%"),
            ("tokens/s", num(self.tokens_per_s, ",.0f")),
            ("wall time", "-" if self.wall_s is None else _duration(self.wall_s)),
        ]
        lines += [(name.replace("_", " "), f"{value:.4f} (step {step})")
                  for name, (step, value) in self.task.items()]
        lines += extra or []
        width = max(len(k) for k, _ in lines)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s ({seconds:.1f} s)" if minutes else f"{seconds:.1f} s"


def summarize(rows: list[dict[str, Any]]) -> RunSummary:
    """Summary of metrics.jsonl rows (as ``read_metrics`` returns them)."""
    train, evals = train_rows(rows), eval_rows(rows)
    return RunSummary(
        steps=max((r["step"] for r in rows), default=0),
        final_loss=train[-1]["loss"] if train else None,
        first_val=(evals[0]["step"], evals[0]["val_loss"]) if evals else None,
        last_val=(evals[-1]["step"], evals[-1]["val_loss"]) if evals else None,
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in train) if train else None,
        wall_s=train[-1]["elapsed_s"] if train else None,
        task={k: points[-1] for k, points in task_metrics(rows).items()},
    )


def _smooth(values: list[float], weight: float) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else weight * avg + (1 - weight) * v
        out.append(avg)
    return out


def _plot_task(ax: Any, tasks: dict[str, list[tuple[int, float]]]) -> None:
    for name, points in tasks.items():
        scale = 100.0 if "bleu" in name else 1.0  # BLEU is 0-100, the others 0-1
        if "ppl" in name:
            continue  # perplexities live on the perplexity panel's scale, not this one
        steps, values = zip(*points, strict=True)
        style = "x--" if name.startswith(("majority", "baseline")) else "o-"
        label = name if scale == 1 else f"{name}/100"
        ax.plot(steps, [v / scale for v in values], style, ms=4, label=label)
    ax.set(xlabel="step", ylabel="score", title="task metrics (validation)")


def plot_run(rows: list[dict[str, Any]], out: Path, title: str) -> Path:
    """Draw train/val loss (left) and perplexity (right, log scale) against step to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = train_rows(rows), eval_rows(rows)
    tasks = task_metrics(rows)
    fig, axes = plt.subplots(1, 3 if tasks else 2, figsize=(18 if tasks else 12, 4.5))
    ax_loss, ax_ppl = axes[0], axes[1]
    if tasks:
        _plot_task(axes[2], tasks)
    weight = min(0.9, 1 - 10 / max(len(train), 10))  # smooth over about 1/10 of the run
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        smooth = _smooth(losses, weight)
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
        ax_loss.plot(steps, smooth, color="tab:blue", lw=1.5, label="train (smoothed)")
        ax_ppl.plot(steps, [perplexity(v) for v in smooth], color="tab:blue", lw=1.5,
                    label="train (smoothed)")
    if evals:
        steps = [r["step"] for r in evals]
        ax_loss.plot(steps, [r["val_loss"] for r in evals], "o-", color="tab:orange", ms=4,
                     label="validation")
        ppl = [r.get("val_ppl", perplexity(r["val_loss"])) for r in evals]  # none: a classifier
        ax_ppl.plot(steps, ppl, "o-", color="tab:orange", ms=4, label="validation")
    ax_loss.set(xlabel="step", ylabel="cross-entropy loss (nats/token)", title="loss")
    ax_ppl.set(xlabel="step", ylabel="perplexity", title="perplexity", yscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    summary = summarize(rows)
    drop, first, last = summary.drop_pct, summary.first_val, summary.last_val
    sub = ""
    if drop is not None and first is not None and last is not None and not math.isnan(drop):
        sub = f": val loss {first[1]:.2f} -> {last[1]:.2f} ({-drop:+.0f}%)"
    fig.suptitle(f"{title}{sub}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
