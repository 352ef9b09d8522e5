"""What a run exposes and how it spans machines: a local run listens on loopback only, and
two torchrun "nodes" on one machine train exactly like a local spawn."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.cli import main
from conveyor.runtime.launch import free_port, launch
from conveyor.train.metrics import read_metrics, train_rows

pytestmark = pytest.mark.multiprocess

TINY = ["--layers", "2", "--d-model", "32", "--heads", "2", "--vocab-size", "320",
        "--seq-len", "16", "--batch-size", "8", "--microbatches", "2", "--eval-every", "0",
        "--checkpoint-every", "0", "--steps", "4", "--lr", "1e-2", "--warmup", "1", "--pp", "2"]


def _listening() -> list[tuple[str, str]]:
    """(table, local address in /proc/net hex) of every listening TCP socket this process owns."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append((table, fields[1].split(":")[0]))
    return found


def _is_loopback(table: str, hex_addr: str) -> bool:
    if table == "tcp":  # little-endian IPv4: the last byte printed is the first octet
        return hex_addr[-2:] == "7F"
    v4_mapped = hex_addr[:24] == "0000000000000000FFFF0000"
    return (v4_mapped and hex_addr[-2:] == "7F") or hex_addr == "00000000000000000000000001000000"


def _groups_then_listeners() -> list[tuple[str, str]]:
    import torch.distributed as dist

    from conveyor.parallel.mesh import Mesh

    Mesh.build(2)  # the pipeline's link groups, warmed up: every connection made
    dist.barrier()
    return _listening()


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="needs Linux /proc/net")
def test_a_local_run_listens_on_loopback_only() -> None:
    listeners = launch(_groups_then_listeners, 2, timeout_s=60)
    assert all(listeners.values()), listeners  # the store and gloo's pairs do listen
    exposed = {r: [a for a in addrs if not _is_loopback(*a)] for r, addrs in listeners.items()}
    assert not any(exposed.values()), f"listening outside 127.0.0.0/8: {exposed}"


def test_loopback_address_decoding() -> None:
    assert _is_loopback("tcp", "0100007F") and not _is_loopback("tcp", "00000000")
    assert _is_loopback("tcp6", "00000000000000000000000001000000")  # ::1
    assert not _is_loopback("tcp6", "00000000000000000000000000000000")  # ::


def test_two_torchrun_nodes_train_like_a_local_spawn(tmp_path: Path, corpus: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    runs = tmp_path / "runs"
    args = ["train", "--data", str(corpus), *TINY, "--run-dir", str(runs)]
    assert main([*args, "--name", "spawned"]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(
        [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes", "--max-restarts", "0",
         "-m", "conveyor", *args, "--name", "nodes"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    spawned = [r["loss"] for r in train_rows(read_metrics(runs / "spawned" / "metrics.jsonl"))]
    noded = [r["loss"] for r in train_rows(read_metrics(runs / "nodes" / "metrics.jsonl"))]
    assert len(spawned) == 4 and noded == spawned  # same layout, same seed: bit-identical
