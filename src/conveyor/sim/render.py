"""Timelines as pictures: Chrome/Perfetto trace JSON and PNG Gantt charts.

A timeline is ``rank -> [TimedAction]`` in seconds, simulated (from
:func:`conveyor.sim.simulate`) or measured (the runtime records the same form).
Times are shifted so that each run starts at 0.

Waiting is drawn from RECV actions: a measured RECV's start..end is the time the
rank blocked on it; a simulated RECV takes no time and is placed when its message
arrives, so the idle time since the rank's previous action is the wait. A timeline
with no RECV at all (an unlowered simulation) waits from the previous action until
each action's ``ready`` time.

Rendering uses matplotlib's Agg canvas directly (no pyplot), so it works headless
and leaves the caller's backend alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from conveyor.schedules import Action, Kind
from conveyor.schedules.validate import TimedAction

__all__ = [
    "Timeline",
    "timeline_stats",
    "wait_slices",
    "chrome_trace",
    "write_chrome_trace",
    "render_gantt",
    "render_comparison",
]

Timeline = Mapping[int, Sequence[TimedAction]]

# Okabe-Ito palette: distinguishable under the common colour-vision deficiencies
_COLOURS = {
    "F": "#0072B2", "B": "#E69F00", "I": "#D55E00", "W": "#009E73", "SEND": "#CC79A7",
    "wait": "#D4D4D4",
}
_TEXT = {"F": "white", "B": "black", "I": "white", "W": "white", "SEND": "black"}
_LEGEND = {
    "F": "forward", "B": "full backward", "I": "input grad", "W": "weight grad",
    "pair": "overlapped F+B", "SEND": "send", "wait": "waiting",
}


def _origin(timeline: Timeline) -> float:
    return min((t.start for row in timeline.values() for t in row), default=0.0)


def timeline_stats(timeline: Timeline) -> tuple[float, float]:
    """(step time in seconds, bubble fraction) counting only compute actions as busy."""
    t0 = _origin(timeline)
    span = max((t.end for row in timeline.values() for t in row), default=t0) - t0
    if span <= 0 or not timeline:
        return 0.0, 0.0
    busy = sum(
        t.end - t.start for row in timeline.values() for t in row if t.action.kind.is_compute
    )
    return span, 1.0 - busy / (len(timeline) * span)


def _name(t: TimedAction) -> str:
    a = t.action
    return "+".join(f"{p.kind.value}{p.microbatch} s{p.stage}" for p in a.parts)


def wait_slices(timeline: Timeline) -> dict[int, list[tuple[float, float, TimedAction]]]:
    """Per rank, ``(start, end, action waited for)`` spans in the timeline's own clock."""
    recv = (Kind.RECV_F, Kind.RECV_B)
    has_recv = any(t.action.kind in recv for row in timeline.values() for t in row)
    t0 = _origin(timeline)
    out: dict[int, list[tuple[float, float, TimedAction]]] = {}
    for rank, row in timeline.items():
        spans = []
        prev_end = t0
        for t in row:
            if t.action.kind in recv:
                begin = t.start if t.end > t.start else prev_end
                end = t.end
            elif not has_recv:
                begin, end = prev_end, min(t.ready, t.start)
            else:
                begin = end = 0.0
            if end > begin:
                spans.append((begin, end, t))
            prev_end = max(prev_end, t.end)
        out[rank] = spans
    return out


def chrome_trace(runs: Mapping[str, Timeline]) -> dict[str, Any]:
    """A Chrome/Perfetto trace: one process per run, one thread per rank, times in us."""
    events: list[dict[str, Any]] = []
    for pid, (run, timeline) in enumerate(runs.items()):
        t0 = _origin(timeline)
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": run}})
        for rank in sorted(timeline):
            meta = {"pid": pid, "tid": rank}
            events.append(
                {"ph": "M", "name": "thread_name", **meta, "args": {"name": f"rank {rank}"}}
            )
            events.append(
                {"ph": "M", "name": "thread_sort_index", **meta, "args": {"sort_index": rank}}
            )
            for t in timeline[rank]:
                a = t.action
                events.append(
                    {
                        "ph": "X",
                        "name": _name(t),
                        **meta,
                        "cat": "compute" if a.kind.is_compute else "comm",
                        "ts": (t.start - t0) * 1e6,
                        "dur": (t.end - t.start) * 1e6,
                        "args": _args(a) | {"ready_us": (t.ready - t0) * 1e6},
                    }
                )
        for rank, spans in wait_slices(timeline).items():
            for begin, end, t in spans:
                events.append(
                    {
                        "ph": "X",
                        "name": f"wait {_name(t)}",
                        "pid": pid,
                        "tid": rank,
                        "cat": "wait",
                        "ts": (begin - t0) * 1e6,
                        "dur": (end - begin) * 1e6,
                    }
                )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _args(a: Action) -> dict[str, Any]:
    """Trace event arguments: stage, microbatch and kind, or an overlapped pair's parts."""
    if a.kind is Kind.OVERLAP_F_B:
        return {"kind": a.kind.value, "action": str(a), "parts": [str(p) for p in a.parts]}
    return {"stage": a.stage, "microbatch": a.microbatch, "kind": a.kind.value}


def write_chrome_trace(runs: Mapping[str, Timeline], path: str | Path) -> Path:
    """Write :func:`chrome_trace` to ``path`` (open it in ui.perfetto.dev or chrome://tracing)."""
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(runs)))
    return path


def _draw(ax: Axes, timeline: Timeline, renderer: Any) -> set[str]:
    """Draw one Gantt panel; return the legend keys used."""
    t0 = _origin(timeline)
    ranks = sorted(timeline)
    used: set[str] = set()
    height = 0.8
    waits = wait_slices(timeline)
    for rank in ranks:
        y = rank  # the y axis is inverted below, so rank 0 is on top
        stages = {p.stage for t in timeline[rank] for p in t.action.parts}
        chunk_of = {s: i for i, s in enumerate(sorted(stages))}
        for begin, end, _ in waits[rank]:
            ax.broken_barh(
                [((begin - t0) * 1e3, (end - begin) * 1e3)],
                (y - height / 2, height),
                facecolors=_COLOURS["wait"],
                edgecolor="none",
            )
            used.add("wait")
        for t in timeline[rank]:
            if t.end <= t.start or t.action.kind in (Kind.RECV_F, Kind.RECV_B):
                continue
            x, w = (t.start - t0) * 1e3, (t.end - t.start) * 1e3
            if not t.action.kind.is_compute:
                _bar(ax, (x, w), (y - height / 2, height), "SEND", None)
                used.add("SEND")
                continue
            # an overlapped pair runs both parts at once: F on the top half, its backward below
            parts = t.action.parts
            h = height / len(parts)
            for i, p in enumerate(parts):
                kind = p.kind.value
                # later model chunks on the same rank (virtual stages) are hatched
                hatch = "//" if chunk_of[p.stage] else None
                y0 = y - height / 2 + i * h
                _bar(ax, (x, w), (y0, h), kind, hatch)
                used.update([kind, "chunk"] if hatch else [kind])
                backing = _COLOURS[kind] if hatch else None  # keeps the digit legible over hatching
                _label(ax, renderer, (x, w, y0 + h / 2), str(p.microbatch), _TEXT[kind], backing)
            if len(parts) > 1:
                ax.broken_barh([(x, w)], (y - height / 2, height), facecolors="none",
                               edgecolor="black", linewidth=0.8)
                used.add("pair")
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.set_ylim(max(ranks, default=0) + 0.6, min(ranks, default=0) - 0.6)
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", linewidth=0.3, alpha=0.5)
    ax.set_axisbelow(True)
    return used


def _bar(
    ax: Axes, xw: tuple[float, float], y_h: tuple[float, float], kind: str, hatch: str | None
) -> None:
    """One bar of a timeline panel in ``kind``'s colour."""
    ax.broken_barh(
        [xw], y_h, facecolors=_COLOURS[kind], edgecolor="white", linewidth=0.5, hatch=hatch
    )


def _label(
    ax: Axes,
    renderer: Any,
    box_xwy: tuple[float, float, float],
    text: str,
    colour: str,
    backing: str | None,
) -> None:
    """Write ``text`` centred in a box, or nothing if it would not fit inside it."""
    x, w, y = box_xwy
    bbox = {"facecolor": backing, "edgecolor": "none", "pad": 1.5} if backing else None
    label = ax.text(
        x + w / 2, y, text, ha="center", va="center", fontsize=7, color=colour, bbox=bbox
    )
    box = ax.transData.transform([(x, y), (x + w, y)])
    if label.get_window_extent(renderer).width + 2 > box[1][0] - box[0][0]:
        label.remove()


def _title(name: str, timeline: Timeline) -> str:
    step, bubble = timeline_stats(timeline)
    return f"{name}: step {step * 1e3:.2f} ms, bubble {bubble:.1%}"


def _legend(fig: Figure, used: set[str]) -> None:
    order = [k for k in ("F", "B", "I", "W", "SEND", "wait") if k in used]
    handles = [Patch(facecolor=_COLOURS[k], label=_LEGEND[k]) for k in order]
    if "pair" in used:
        handles.append(Patch(facecolor="white", edgecolor="black", label=_LEGEND["pair"]))
    if "chunk" in used:
        handles.append(Patch(facecolor="white", edgecolor="grey", hatch="//", label="later chunk"))
    fig.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=len(handles),
        frameon=False,
        fontsize=8,
    )


def _figure(rows: int, panels: int) -> tuple[Figure, list[Axes], Any]:
    """A figure with fixed margins in inches, so label fitting sees the final layout."""
    top, bottom, gap, row = 0.45, 0.8, 0.55, 0.32
    axes_h = 0.3 + row * rows
    height = top + bottom + panels * axes_h + (panels - 1) * gap
    fig = Figure(figsize=(11, height), dpi=150)
    grid = fig.add_gridspec(
        panels,
        1,
        left=0.07,
        right=0.99,
        top=1 - top / height,
        bottom=bottom / height,
        hspace=gap / axes_h,
    )
    axes = [fig.add_subplot(grid[i, 0]) for i in range(panels)]
    for ax in axes[1:]:
        ax.sharex(axes[0])
    return fig, axes, FigureCanvasAgg(fig).get_renderer()


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path)
    return path


def render_gantt(timeline: Timeline, path: str | Path, *, title: str = "simulated") -> Path:
    """Write a PNG Gantt chart: one row per rank, F/B/I/W and waiting in distinct colours."""
    fig, (ax,), renderer = _figure(len(timeline), 1)
    step, _ = timeline_stats(timeline)
    ax.set_xlim(0, step * 1e3 * 1.005 or 1.0)  # limits first: label fitting reads the transform
    used = _draw(ax, timeline, renderer)
    ax.set_title(_title(title, timeline), fontsize=10)
    _legend(fig, used)
    return _save(fig, path)


def render_comparison(
    measured: Timeline,
    simulated: Timeline,
    path: str | Path,
    *,
    title: str | None = None,
    labels: tuple[str, str] = ("measured", "simulated"),
) -> Path:
    """Write a PNG with the measured timeline above the simulated one on the same time axis."""
    fig, (top, bottom), renderer = _figure(max(len(measured), len(simulated)), 2)
    span = max(timeline_stats(measured)[0], timeline_stats(simulated)[0])
    top.set_xlim(0, span * 1e3 * 1.005 or 1.0)
    used = _draw(top, measured, renderer) | _draw(bottom, simulated, renderer)
    top.set_xlabel("")  # the shared axis is labelled once, under the bottom panel
    prefix = f"{title} - " if title else ""
    top.set_title(prefix + _title(labels[0], measured), fontsize=10)
    bottom.set_title(prefix + _title(labels[1], simulated), fontsize=10)
    _legend(fig, used)
    return _save(fig, path)
