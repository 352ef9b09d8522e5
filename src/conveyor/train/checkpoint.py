"""Checkpoints: each rank's tensors in a safetensors shard, one meta.json, all or nothing.

Layout::

    run_dir/checkpoints/
      step-00000100/
        shard-0.safetensors   the tensors rank 0 owns
        shard-1.safetensors   ...
        meta.json             the caller's meta, plus step, format_version, world_size,
                              files ({file: sha256}) and index ({tensor name: file})
      .tmp-step-00000200/     a save in progress, or one a crash cut short: never read

Nothing lost (design invariant 5): the ranks write into ``.tmp-step-N``; when every
shard is there, rank 0 writes meta.json and renames the directory. So a ``step-N``
directory with a meta.json is complete, and loads check each shard's sha256 before
reading a tensor from it.

A name held by several ranks (data-parallel replicas) is stored once, by the lowest
of those ranks, after checking that every copy is bitwise equal. Loads go by name,
not by rank, so a checkpoint saved with one layout loads into any other. With tied
embeddings (``meta["model"]["tie_embeddings"]``) the embedding's and the head's
names stand in for each other, optimizer state included: a rank holding the head's
copy can load from a checkpoint saved where only the embedding's name existed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
from torch import Tensor

from ..data.atomic import atomic_write
from ..log import get_logger
from ..runtime.faults import fault_point
from .checkpoint_files import (
    FORMAT_VERSION,
    META,
    CheckpointError,
    _complete,
    latest_checkpoint,
    load_tensors,
    read_meta,
    resolve_checkpoint,
)

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "save_checkpoint",
    "latest_checkpoint",
    "read_meta",
    "load_tensors",
    "resolve_checkpoint",
]

log = get_logger(__name__)

_RESERVED = ("format_version", "world_size", "files", "index")


# -- saving ----------------------------------------------------------------------------


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    keep: int = 3,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Save every rank's ``tensors`` and the shared ``meta`` as checkpoint ``step``; collective.

    Call on all ranks of ``group`` (the default group when one is initialised; a
    single process needs none). ``meta`` must be JSON-serialisable and equal on all
    ranks except ``meta["ranks"]``, whose per-rank entries are merged. ``step`` is
    written as ``meta["step"]``. Afterwards at most ``keep`` complete checkpoints
    remain: this one and the newest others (``keep=0`` keeps all). Every rank returns
    the final directory, or every rank raises CheckpointError.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step={step!r} must be a non-negative integer")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise CheckpointError(f"keep={keep!r} must be a non-negative integer (0 keeps all)")
    rank, world = _rank_world(group)
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}"
    what = f"cannot save checkpoint {final}"

    # 1. Check inputs locally; rank 0 clears what an interrupted save left. Errors travel
    #    with the gather so that every rank raises together instead of one hanging.
    error, cpu, common, ranks_meta = None, {}, {}, {}
    try:
        cpu = _to_cpu(tensors)
        common, ranks_meta = _split_meta(meta, step)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except Exception as err:  # reported to every rank below
        error = _describe(err)
    specs = {n: (str(t.dtype), tuple(t.shape)) for n, t in cpu.items()}
    infos = _gather({"error": error, "specs": specs, "meta": common, "ranks": ranks_meta},
                    group, world)
    _raise_first(what, [i["error"] for i in infos], world)
    merged_meta = _merge_meta(what, infos)

    # 2. Each name is written by the lowest rank holding it; other copies must be equal.
    owners: dict[str, int] = {}
    holders: dict[str, list[int]] = {}
    for r, info in enumerate(infos):
        for name in info["specs"]:
            owners.setdefault(name, r)
            holders.setdefault(name, []).append(r)
    dups = sorted(n for n, rs in holders.items() if len(rs) > 1)
    if dups:
        digests = _gather({n: _tensor_digest(cpu[n]) for n in dups if n in cpu}, group, world)
        for name in dups:
            rs = holders[name]
            if len({digests[r][name] for r in rs}) > 1:
                raise CheckpointError(
                    f"{what}: tensor {name!r} is held by ranks {rs} with different values; "
                    "a name on several ranks must be one replicated value, so give "
                    "rank-specific tensors rank-unique names (e.g. f'rng.rank{rank}')"
                )

    # 3. Write this rank's shard; the gather of the results doubles as the barrier.
    mine = {n: t for n, t in cpu.items() if owners[n] == rank}
    file = f"shard-{rank}.safetensors"
    status: dict[str, Any] = {"error": None, "file": None, "names": sorted(mine)}
    if mine:
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            data = safetensors.torch.save(mine)
            atomic_write(tmp / file, lambda f: f.write(data))
            _fsync_dir(tmp)
            status.update(file=file, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        except Exception as err:  # reported to every rank below
            status["error"] = f"writing {tmp / file} failed: {_describe(err)}"
    fault_point("save.shard")
    statuses = _gather(status, group, world)
    _raise_first(what, [s["error"] for s in statuses], world)

    # 4. Rank 0 publishes: meta.json, then the one rename that makes it a checkpoint.
    error = None
    if rank == 0:
        try:
            _publish(root, tmp, final, world, merged_meta, statuses)
        except Exception as err:  # reported to every rank below
            error = _describe(err)
        else:
            try:
                _prune(root, keep, final)
            except OSError as err:  # the new checkpoint is safe; pruning can wait for the next
                log.warning("could not prune old checkpoints in %s: %s", root, err)
    _raise_first(what, _gather(error, group, world), world)
    if rank == 0:
        size = sum(s["size"] for s in statuses if s["file"])
        log.info("saved checkpoint %s (%d tensors, %.1f MB)", final, len(owners), size / 1e6)
    return final


def _rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _gather(obj: Any, group: dist.ProcessGroup | None, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    try:
        dist.all_gather_object(out, obj, group=group)
    except RuntimeError as err:  # gloo's timeout or a closed connection: a peer is stuck or gone
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"saving a checkpoint: rank {dist.get_rank()} waited for the other ranks and gave up "
            f"({first[:200]}); a rank stalled or died (raise --timeout if saves are slow); "
            "earlier checkpoints are untouched"
        ) from None
    return out


def _describe(err: BaseException) -> str:
    if isinstance(err, CheckpointError):
        return str(err)
    fix = " (check that run_dir is writable and has free space)" if isinstance(err, OSError) else ""
    return f"{type(err).__name__}: {err}{fix}; earlier checkpoints are untouched"


def _raise_first(what: str, errors: list[str | None], world: int) -> None:
    for r, err in enumerate(errors):
        if err:
            raise CheckpointError(f"{what}: {err}" if world == 1 else f"{what}: rank {r}: {err}")


def _to_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached contiguous CPU tensors; no two share memory (safetensors refuses that)."""
    if not isinstance(tensors, dict):
        raise CheckpointError(f"tensors must be a dict of name -> Tensor, not {type(tensors)}")
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"tensor name {name!r} must be a non-empty string")
        if not isinstance(t, Tensor):
            raise CheckpointError(
                f"tensors[{name!r}] is a {type(t).__name__}, not a Tensor; "
                "put non-tensor state in meta"
            )
        c = t.detach().to("cpu").contiguous()
        ptr = c.untyped_storage().data_ptr()
        if ptr in storages and c.numel():  # e.g. a tied weight passed under both names
            c = c.clone()
        storages.add(c.untyped_storage().data_ptr())
        out[name] = c
    return out


def _split_meta(meta: dict[str, Any], step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the part every rank shares, the per-rank entries), both checked to be JSON."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"meta must be a dict, not {type(meta).__name__}")
    reserved = [k for k in _RESERVED if k in meta]
    if reserved:
        raise CheckpointError(f"meta keys {reserved} are written by the checkpoint; rename them")
    if "step" in meta and meta["step"] != step:
        raise CheckpointError(f"meta['step']={meta['step']!r} differs from step={step}")
    ranks = meta.get("ranks", {})
    if not isinstance(ranks, dict):
        raise CheckpointError(f"meta['ranks'] must be a dict keyed by str(rank), not {ranks!r}")
    common = {k: v for k, v in meta.items() if k != "ranks"}
    common["step"] = step
    try:
        json.dumps(common)
        json.dumps(ranks)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"meta is not JSON-serialisable ({err}); convert tensors and arrays to lists "
            "(or save them in `tensors`)"
        ) from None
    return common, {str(k): v for k, v in ranks.items()}


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def _merge_meta(what: str, infos: list[dict[str, Any]]) -> dict[str, Any]:
    common = infos[0]["meta"]
    ranks: dict[str, Any] = {}
    for r, info in enumerate(infos):
        if _canon(info["meta"]) != _canon(common):
            keys = sorted(
                k for k in set(common) | set(info["meta"])
                if _canon(common.get(k)) != _canon(info["meta"].get(k))
            )
            raise CheckpointError(
                f"{what}: meta differs between rank 0 and rank {r} in {keys}; meta must be "
                "equal on all ranks, with rank-specific values under meta['ranks'][str(rank)]"
            )
        for key, value in info["ranks"].items():
            if key in ranks and _canon(ranks[key]) != _canon(value):
                raise CheckpointError(
                    f"{what}: meta['ranks'][{key!r}] differs between ranks; "
                    "each rank should fill only its own entry"
                )
            ranks[key] = value
    merged = dict(common)
    if ranks:
        merged["ranks"] = dict(sorted(ranks.items(), key=lambda kv: _rank_key(kv[0])))
    return merged


def _rank_key(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdigit() else (1 << 62, key)


def _tensor_digest(t: Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot sync a directory; the data is synced
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _publish(
    root: Path, tmp: Path, final: Path, world: int,
    meta: dict[str, Any], statuses: list[dict[str, Any]],
) -> None:
    files: dict[str, str] = {}
    index: dict[str, str] = {}
    for r, s in enumerate(statuses):
        if not s["file"]:
            continue
        path = tmp / s["file"]
        if not path.is_file() or path.stat().st_size != s["size"]:
            raise CheckpointError(
                f"rank 0 cannot see {path} that rank {r} wrote; run_dir must be on a "
                "filesystem that every rank shares"
            )
        files[s["file"]] = s["sha256"]
        index.update(dict.fromkeys(s["names"], s["file"]))
    saved = {**meta, "format_version": FORMAT_VERSION, "world_size": world,
             "files": files, "index": dict(sorted(index.items()))}
    text = json.dumps(saved, indent=1).encode()
    atomic_write(tmp / META, lambda f: f.write(text))
    _fsync_dir(tmp)
    fault_point("save.publish")
    if final.exists():  # saving a step again (a resumed run): the new one wins
        log.warning("replacing existing checkpoint %s", final)
        os.replace(final, root / f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
    os.replace(tmp, final)
    _fsync_dir(root)


def _prune(root: Path, keep: int, current: Path) -> None:
    """Keep ``current`` and the newest others up to ``keep``; drop leftovers of crashes."""
    doomed: list[Path] = []
    if keep:
        others = [p for _, p in reversed(_complete(root)) if p != current]
        doomed = others[keep - 1:]
    for path in doomed:  # rename first: a half-deleted directory is never seen as a checkpoint
        trash = root / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
        os.replace(path, trash)
        log.info("pruned checkpoint %s", path)
    for stale in root.iterdir():
        if stale.name.startswith((".tmp-step-", ".trash-")):
            shutil.rmtree(stale, ignore_errors=True)
