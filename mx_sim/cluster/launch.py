"""Real rank processes: a launcher with deadlines, gloo process groups and a TCPStore.

Every rank is its own OS process forked from a ``forkserver`` that has already imported torch and
transformers, so a rank starts in tens of milliseconds instead of the ~2 s a fresh interpreter
needs to import torch. Fresh processes per run (rather than long-lived workers) keep runs
independent: a rank killed on purpose by a fault scenario takes nothing with it.

Groups are ``ProcessGroupGloo`` objects built directly on a ``PrefixStore`` of the run's store,
without ``init_process_group``: a process can hold several runs' groups, and the same code runs
under ``torchrun`` (see :func:`store_from_env`).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroupGloo

# What every rank needs, imported once in the forkserver (transformers' model modules are lazy
# and cost seconds on first use).
PRELOAD = (
    "torch",
    "megatron.core.models.gpt",  # where installed: the Megatron trainer ranks
    "transformers",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.qwen3.modeling_qwen3",
    "transformers.models.mixtral.modeling_mixtral",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.phi3.modeling_phi3",
    "transformers.models.qwen2_moe.modeling_qwen2_moe",
    "transformers.models.qwen3_moe.modeling_qwen3_moe",
    "transformers.models.deepseek_v3.modeling_deepseek_v3",
    "transformers.models.olmo2.modeling_olmo2",
    "transformers.models.gemma.modeling_gemma",
    "transformers.models.gemma2.modeling_gemma2",
    "transformers.models.gemma3.modeling_gemma3",
    "mx_sim.refit.multiprocess",
)
POLL_S = 0.02


@dataclass(frozen=True)
class StoreAddress:
    """How a rank reaches the run's store: ``host:port`` and the run's key prefix."""

    host: str
    port: int
    prefix: str
    timeout_s: float = 30.0

    def connect(self) -> dist.Store:
        """A client connection, scoped to ``prefix``."""
        store = dist.TCPStore(
            self.host,
            self.port,
            is_master=False,
            timeout=datetime.timedelta(seconds=self.timeout_s),
        )
        return dist.PrefixStore(self.prefix, store)


def host_store(
    prefix: str, timeout_s: float = 30.0, host: str = "127.0.0.1"
) -> tuple[dist.TCPStore, StoreAddress]:
    """Host a TCPStore on a free port listening on ``host`` only (loopback unless an address
    is named); keep the returned object alive while in use.

    Given a port, torch's TCPStore listens on every interface (``[::]``) whatever host name it
    is given, so the listening socket is bound here and handed over (``master_listen_fd``).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    store = dist.TCPStore(
        host,
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        master_listen_fd=listener.detach(),  # the store owns the socket from here on
    )
    return store, StoreAddress(host, port, prefix, timeout_s)


def store_from_env(prefix: str, timeout_s: float = 60.0) -> tuple[dist.Store, int, int]:
    """``(store, rank, world_size)`` from torchrun's environment.

    torchrun's agent hosts the store at ``MASTER_ADDR:MASTER_PORT`` when it sets
    ``TORCHELASTIC_USE_AGENT_STORE``; otherwise rank 0 hosts it (as ``env://`` does).
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=world,
        is_master=rank == 0 and not agent_store,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "local")
    return dist.PrefixStore(f"{prefix}/{run_id}", store), rank, world


def gloo_group(
    store: dist.Store, name: str, members: Sequence[int], global_rank: int, timeout_s: float
) -> dist.ProcessGroup:
    """A gloo group over ``members`` (global ranks); every member must call this."""
    if global_rank not in members:
        raise ValueError(f"rank {global_rank} is not a member of group {name!r} {list(members)}")
    opts = ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    scoped = dist.PrefixStore(f"pg/{name}", store)
    return ProcessGroupGloo(scoped, list(members).index(global_rank), len(members), opts)


@dataclass
class RankOutcome:
    """How one rank ended: ``ok`` (``value`` holds its return), ``error``, ``died``, ``timeout``."""

    rank: int
    status: str
    value: Any = None
    error: str = ""
    exitcode: int | None = None
    seconds: float = 0.0


def _context() -> multiprocessing.context.ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def _child(fn: Callable[..., Any], rank: int, args: tuple, results) -> None:
    start = time.perf_counter()
    try:
        value = fn(rank, *args)
    except BaseException as exc:  # every failure goes back to the parent as text
        tb = traceback.format_exc(limit=6)
        results.put((rank, "error", None, f"{type(exc).__name__}: {exc}\n{tb}", start))
        return
    results.put((rank, "ok", value, "", start))


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    timeout_s: float,
    on_poll: Callable[[], None] | None = None,
) -> list[RankOutcome]:
    """Run ``fn(rank, *args)`` in ``world_size`` processes; every process is gone on return.

    ``fn`` must be importable (module level) and return something picklable. Ranks still
    running at the deadline are killed and reported as ``timeout``; a rank that exits without
    reporting is ``died``. ``on_poll`` runs in the parent every poll (fault scripts use it).
    """
    ctx = _context()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(fn, r, args, results), daemon=True)
        for r in range(world_size)
    ]
    outcomes: dict[int, RankOutcome] = {}
    start = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.start()
        while len(outcomes) < world_size and time.monotonic() < deadline:
            if on_poll is not None:
                on_poll()
            _drain(results, outcomes, start)
            for rank, p in enumerate(procs):
                if rank not in outcomes and not p.is_alive():
                    p.join(0.5)  # a result put just before exit may still be in the pipe
                    _drain(results, outcomes, start)
                    if rank not in outcomes:
                        outcomes[rank] = RankOutcome(
                            rank, "died", exitcode=p.exitcode, seconds=time.perf_counter() - start
                        )
            time.sleep(POLL_S)
        for rank in range(world_size):
            outcomes.setdefault(
                rank,
                RankOutcome(rank, "timeout", error=f"still running after {timeout_s:.3g} s"),
            )
    finally:
        for p in procs:
            if p.pid is not None and p.is_alive():
                p.kill()
        for p in procs:
            if p.pid is not None:
                p.join(5)
        results.close()
    return [outcomes[r] for r in range(world_size)]


def _drain(results, outcomes: dict[int, RankOutcome], start: float) -> None:
    while True:
        try:
            rank, status, value, error, _ = results.get(timeout=0.001)
        except queue.Empty:
            return
        outcomes[rank] = RankOutcome(
            rank, status, value, error, seconds=time.perf_counter() - start
        )
