"""Start the ranks: spawn them locally, or join the group that ``torchrun`` set up.

Locally, one process per rank is spawned with one compute thread each (two
threads per rank on a 2-core machine oversubscribe and run ~35% slower). If any
rank raises, ``torch.multiprocessing`` terminates the others and re-raises the
failure here, so no peer is left waiting.

Signals: the ranks run in a process group of their own, so a terminal's Ctrl-C
reaches the launcher alone, which forwards SIGINT/SIGTERM to every rank once (they
stop at the next step boundary, see ``preempt``); a second signal kills the ranks
and raises ``Preempted`` at once. A rank whose launcher dies is killed by the
kernel (``PR_SET_PDEATHSIG``), so no rank outlives its parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import os
import pickle
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing import connection as mp_connection
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..log import get_logger, setup_logging
from .faults import fault_point

__all__ = ["Preempted", "RankDied", "launch", "default_backend", "under_torchrun", "free_port"]

log = get_logger(__name__)

Worker = Callable[..., Any]


def default_backend() -> str:
    """NCCL when CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def under_torchrun() -> bool:
    """True when the environment already describes this process's rank (torchrun)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LOOPBACK = "127.0.0.1"
_STOP_GRACE_S = 2.0


def _loopback_store(rank: int, world_size: int, port: int,
                    timeout: datetime.timedelta) -> dist.TCPStore:
    """The rendezvous store of a local run, listening on loopback only.

    torch's TCPStore server listens on every address of the host; here rank 0 binds
    the socket to 127.0.0.1 itself and hands it over, so nothing off this machine
    can reach the (unauthenticated) store.
    """
    if rank != 0:
        return dist.TCPStore(LOOPBACK, port, world_size, False, timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, port))
    sock.listen(world_size * 4)
    return dist.TCPStore(LOOPBACK, port, world_size, True, timeout, master_listen_fd=sock.detach())


def _init(rank: int, world_size: int, backend: str, timeout_s: float, threads: int,
          local_port: int | None = None) -> None:
    torch.set_num_threads(threads)
    setup_logging(os.environ.get("CONVEYOR_LOG_LEVEL", "INFO"))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=timeout_s)
    if local_port is not None:  # a local run: every socket on loopback
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(var, _loopback_interface())
        store: dist.Store = _loopback_store(rank, world_size, local_port, timeout)
    else:  # torchrun's store: it may outlive a restart, so each attempt gets its own keys
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"conveyor/attempt-{attempt}", store)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                            store=store)


def _loopback_interface() -> str:
    """The name of the loopback network interface ('lo' on Linux)."""
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((n for n in names if n.startswith("lo")), "lo")


def _worker(
    rank: int,
    fn: Worker,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    threads: int,
    results: Any,
    parent: int,
    args: tuple[Any, ...],
) -> None:
    _detach_from_terminal(parent)
    os.environ.update(
        MASTER_ADDR=LOOPBACK,
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),  # as torchrun says it: every rank is on this host
    )
    fault_point("start")  # a rank lost before the process group forms (the fault suite)
    _init(rank, world_size, backend, timeout_s, threads, local_port=port)
    try:
        out = fn(*args)
        # Plain pickle bytes: torch's queue would pass tensors as shared-memory handles
        # that vanish when this process exits.
        results.put(pickle.dumps((rank, out)))
    finally:
        dist.destroy_process_group()
    # The result is in the pipe. Leave without the interpreter's shutdown: a gloo worker
    # thread still freeing a finished work's tensor then aborts the process (about one
    # run in 25-100 was seen to die with "terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _detach_from_terminal(parent: int) -> None:
    """Own process group (Ctrl-C goes to the launcher, which forwards it); die with the parent."""
    os.setpgrp()
    _die_with(parent)


def _die_with(parent: int) -> None:
    """SIGKILL this process when ``parent`` ends, so a killed launcher leaves no rank behind."""
    # Linux sends it when the thread that started us ends: our launcher and torchrun's
    # agent both start ranks from their main thread
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


@contextlib.contextmanager
def _forward_signals(pids: list[int]) -> Iterator[list[int]]:
    """While spawned ranks run: SIGINT/SIGTERM go on to them once; a second one kills them.

    Yields the list of signals received (empty if none).
    """
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handle(signum: int, _frame: Any) -> None:
        got.append(signum)
        name = signal.Signals(signum).name
        if len(got) == 1:
            log.warning("%s: asking the ranks to stop after this step and save a checkpoint; "
                        "signal again to abort without one", name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum if len(got) == 1 else signal.SIGKILL)
        if len(got) > 1:
            raise Preempted(f"aborted by a second {name}: the ranks were killed without "
                            "saving; resume from the last checkpoint", signum)

    old = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def _killed_peer(ended: dict[int, int], processes: list[Any],
                 reported: int) -> tuple[int, int, str] | None:
    """(rank, pid, signal) of a rank other than ``reported`` that a signal had killed, if any.

    When a rank is killed, a peer waiting on it may raise first ("connection closed");
    the killed one is what the user must hear about. ``ended`` holds the exit codes seen
    before the failure was reported, so ranks torch stopped afterwards do not count.
    """
    for rank, code in sorted(ended.items()):
        if rank != reported and code < 0:
            return rank, processes[rank].pid, signal.Signals(-code).name
    return None


def launch(
    fn: Worker,
    world_size: int,
    *args: Any,
    backend: str | None = None,
    timeout_s: float = 300.0,
    threads_per_rank: int = 1,
) -> dict[int, Any]:
    """Run ``fn(*args)`` on ``world_size`` ranks with a process group; return each rank's result.

    Under torchrun the current process is one of the ranks: the group is joined and
    only this rank's result is returned. Otherwise ranks are spawned locally.
    """
    backend = backend or default_backend()
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != world_size:
            raise RuntimeError(
                f"torchrun started {world} processes but the layout needs {world_size} "
                f"(pp*dp*tp); run torchrun with --nproc-per-node/--nnodes giving {world_size}"
            )
        if os.getppid() == 1:  # the agent is already gone: nobody will collect this rank
            os._exit(1)
        _die_with(os.getppid())  # a SIGKILLed torchrun agent must not leave ranks waiting
        _init(rank, world, backend, timeout_s, threads_per_rank)
        try:
            return {rank: fn(*args)}
        finally:
            dist.destroy_process_group()
    # torch logs each rank it stops after a failure; the one line the CLI prints says it
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    try:
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, port, backend, timeout_s, threads_per_rank, results, os.getpid(),
                  args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
    except (BrokenPipeError, EOFError) as err:  # it closed its pipe before reading its arguments
        raise RankDied(f"a rank died while starting, before it read its arguments ({err}); "
                       "the ranks started so far die with this process") from err
    out: dict[int, Any] = {}

    def drain() -> None:
        while not results.empty():
            rank, value = pickle.loads(results.get())
            out[rank] = value

    # Drain while joining: a large result would otherwise fill the pipe and block its rank.
    # How each rank ended, noted before torch's join stops the others after a failure
    # (with SIGTERM, then SIGKILL): those later deaths are not causes.
    ended: dict[int, int] = {}
    sentinels = [p.sentinel for p in context.processes]
    with _forward_signals(context.pids()) as got:
        try:
            while True:
                mp_connection.wait(sentinels, timeout=0.05)
                drain()
                ended.update({r: p.exitcode for r, p in enumerate(context.processes)
                              if p.exitcode is not None})
                # after a failure: 2 s for the others to end, SIGTERM, 2 s more, SIGKILL (a rank
                # stuck in C++ or ignoring SIGTERM would otherwise hold the exit for 30 s)
                if context.join(timeout=0, grace_period=_STOP_GRACE_S):
                    break
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as err:
            if got:  # a rank without a stop handler ended on the forwarded signal
                name = signal.Signals(got[0]).name
                raise Preempted(f"stopped by {name} before a step boundary; nothing was "
                                "saved since the last checkpoint", got[0]) from err
            dead = _killed_peer(ended, context.processes, err.error_index)
            if dead is not None:  # the death is the cause; the raised error its echo
                raise RankDied(f"rank {dead[0]} (pid {dead[1]}) died: signal {dead[2]}; the "
                               "other ranks were stopped") from err
            if isinstance(err, mp.ProcessRaisedException):
                raise
            how = f"signal {err.signal_name}" if err.signal_name else f"exit code {err.exit_code}"
            raise RankDied(
                f"rank {err.error_index} (pid {err.error_pid}) died: {how}; the other ranks "
                "were stopped"
            ) from err
    drain()
    return out


class RankDied(RuntimeError):
    """A rank process ended without reporting an error (killed by a signal, or exited)."""


class Preempted(RuntimeError):
    """The run stopped on SIGTERM/SIGINT (after saving what it could); exits 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
