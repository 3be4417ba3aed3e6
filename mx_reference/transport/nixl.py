"""NixlTransport: the protocol over real NIXL (``nixl._api``), UCX backend.

DRAM on CPU, VRAM on GPU (the memory type comes from the accelerator backend). The NIXL wheel
runs without CUDA, so CPU CI exercises this class for real, cross-process.

NIXL reports some bad input by logging and returning ``None`` (descriptor lists) and the rest
through typed binding exceptions or an ``"ERR"`` state; every one of those becomes a
:class:`~mx_reference.transport.base.TransportError` subclass (or ``ValueError``) here.

UCX reads its environment when the first agent is created, so :func:`apply_ucx_env` runs
before nixl is imported (lazily, on first use) and only fills variables the user left unset.
NIXL's own log level is set the same way (``NIXL_LOG_LEVEL=WARN`` unless set): its INFO lines
for every agent created would otherwise go to stdout.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mx_reference.backends import AcceleratorBackend, resolve_backend
from mx_reference.transport.base import (
    HandleBusy,
    MemDesc,
    PreppedList,
    RegionNotFound,
    Registration,
    RemoteGone,
    TransferFailed,
    Transport,
    TransportError,
    XferHandle,
)

log = logging.getLogger(__name__)

# Filled in only when unset. The two UCX_MEM/RCACHE settings are what vLLM applies before
# importing nixl (no mmap hooks into the host allocator, a bounded registration cache).
# UCX_TLS stays unset: UCX then picks cma (cross-memory attach) for DRAM gets and tcp/lo for
# wire-up and notifications on a CPU host, and adds cuda_copy/cuda_ipc/rc on GPU hosts.
DEFAULT_UCX_ENV = {
    "UCX_MEM_MMAP_HOOK_MODE": "none",
    "UCX_RCACHE_MAX_UNRELEASED": "1024",
}
# Read once, when nixl is first imported; filled in only when unset, like the UCX settings.
DEFAULT_NIXL_ENV = {"NIXL_LOG_LEVEL": "WARN"}


@dataclass(frozen=True)
class NixlConfig:
    """How a :class:`NixlTransport` creates its agent.

    ``ucx_env`` is applied (without overriding the user's environment) before nixl is imported.
    ``error_handling_mode`` is the UCX plugin parameter: keep the default ("peer") unless
    ``UCX_TLS`` restricts UCX to transports without peer-failure support (``sm,self`` needs
    "none").

    ``progress``: who drives the agent's progress when it is not inside a call of its own.
    An agent that serves reads or sends standalone notifications (a publisher, a replica)
    needs someone to; a pull-only agent progresses inside ``wait``.

    - ``"poll"`` (default): a thread of this transport drives progress every
      ``poll_interval_s`` and sleeps in between: reads are served, and an idle agent costs
      under 1 % of a core (0.4-0.6 % measured at 50 ms).
    - ``"thread"``: NIXL's own progress thread. Its Python API starts it with no delay
      between rounds, so it spins a whole core even when idle (0.88 CPU-s a second here).
    - ``"none"``: only this agent's own calls progress it: a pull-only agent (notifications
      then ride on its reads: ``pull(..., notif=)``).
    """

    backend: str = "UCX"
    num_threads: int = 0
    progress: Literal["poll", "thread", "none"] = "poll"
    poll_interval_s: float = 0.05
    error_handling_mode: str | None = None
    ucx_env: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_UCX_ENV))

    def __post_init__(self) -> None:
        if self.progress not in ("poll", "thread", "none"):
            raise ValueError(
                f"NixlConfig: field 'progress': {self.progress!r} is not poll|thread|none"
            )
        if self.poll_interval_s <= 0:
            raise ValueError(f"NixlConfig: field 'poll_interval_s': {self.poll_interval_s} <= 0")


def apply_ucx_env(env: dict[str, str]) -> dict[str, str]:
    """Set each variable that is unset; returns the ones set. Warns nothing, overrides nothing."""
    applied = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(applied)
    return applied


def nixl_available() -> bool:
    """True when the nixl wheel imports here (the protocol does not need it)."""
    try:
        _import_nixl("nixl._api")
    except ImportError:
        return False
    return True


def _import_nixl(module: str) -> Any:
    apply_ucx_env(DEFAULT_NIXL_ENV)
    return importlib.import_module(module)


class NixlTransport(Transport):
    """A :class:`~mx_reference.transport.base.Transport` backed by one ``nixl_agent``.

    ``backend`` picks the memory type (``None`` means CUDA, i.e. VRAM; the simulator passes
    its CPU mock for DRAM).
    """

    def __init__(
        self,
        name: str,
        backend: AcceleratorBackend | None = None,
        config: NixlConfig | None = None,
    ):
        accel = resolve_backend(backend)
        super().__init__(name, accel.nixl_mem_type)
        self.config = config or NixlConfig()
        apply_ucx_env(self.config.ucx_env)
        api = _import_nixl("nixl._api")
        self._bindings = _import_nixl("nixl._bindings")
        polled = self.config.progress == "poll"
        cfg = api.nixl_agent_config(
            enable_prog_thread=self.config.progress == "thread",
            backends=[],
            num_threads=self.config.num_threads,
            # the poller calls into the agent beside the caller's thread: NIXL must lock
            sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT if polled else None,
        )
        with self._nixl_errors("create agent"):
            self._agent = api.nixl_agent(name, cfg)
            params = self._agent.get_plugin_params(self.config.backend)
            if self.config.error_handling_mode is not None:
                params["ucx_error_handling_mode"] = self.config.error_handling_mode
            if self.config.num_threads:
                params["num_threads"] = str(self.config.num_threads)
            self._agent.create_backend(self.config.backend, params)
        self._notifs: dict[str, list[bytes]] = {}  # what the poller's progress collected
        self._notifs_lock = threading.Lock()
        self._stop_polling = threading.Event()
        self._poller: threading.Thread | None = None
        if polled:
            self._poller = threading.Thread(target=self._poll, name=f"nixl-{name}", daemon=True)
            self._poller.start()

    def _poll(self) -> None:
        """Drive the agent's progress every ``poll_interval_s`` (fetching notifications is what
        progresses a NIXL agent from Python); keep what arrives for :meth:`_poll_notifs`. A
        failed round (a peer gone) is logged and polling goes on: the other peers still read."""
        while not self._stop_polling.wait(self.config.poll_interval_s):
            try:
                with self._nixl_errors("progress"):
                    self._gather_notifs()
            except TransportError as exc:
                log.warning("%s: %s", self.name, exc)

    def _gather_notifs(self) -> None:
        with self._notifs_lock:
            for agent, msgs in self._agent.get_new_notifs().items():
                self._notifs.setdefault(agent, []).extend(msgs)

    # -- primitives ------------------------------------------------------------------------

    def _register(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple[MemDesc, ...], Any]:
        descs = self._agent.get_reg_descs(list(tensors), self.mem_type)
        if descs is None:  # NIXL logged why (mixed devices, wrong mem type, ...)
            raise ValueError(
                f"register: NIXL rejected the tensors as {self.mem_type} registration descriptors"
            )
        with self._nixl_errors("register"):
            self._agent.register_memory(descs)
        regions = tuple(
            MemDesc(t.data_ptr(), t.numel() * t.element_size(), max(t.get_device(), 0))
            for t in tensors
        )
        return regions, descs

    def _deregister(self, reg: Registration) -> None:
        with self._nixl_errors("deregister"):
            self._agent.deregister_memory(reg.impl)

    def _metadata(self) -> bytes:
        return self._agent.get_agent_metadata()

    def _add_remote(self, metadata: bytes) -> str:
        with self._nixl_errors("add_remote"):
            name = self._agent.add_remote_agent(metadata)
        return name.decode() if isinstance(name, bytes) else name

    def _remove_remote(self, agent: str) -> None:
        with self._nixl_errors("remove_remote"):
            self._agent.remove_remote_agent(agent)

    def _prep(self, plist: PreppedList) -> Any:
        with self._nixl_errors("prep"):
            return self._agent.prep_xfer_dlist(
                plist.agent or "", self._xfer_descs(plist.descs), self.mem_type
            )

    def _release_list(self, plist: PreppedList) -> None:
        with self._nixl_errors("release_list"):
            self._agent.release_dlist_handle(plist.impl)

    def _make_read(self, h: XferHandle) -> Any:
        local, remote = self._xfer_descs(h.local), self._xfer_descs(h.remote)
        with self._nixl_errors("make_read"):
            return self._agent.initialize_xfer("READ", local, remote, h.agent, h.notif)

    def _make_prepped_read(
        self, h: XferHandle, local: PreppedList, li: list[int], remote: PreppedList, ri: list[int]
    ) -> Any:
        with self._nixl_errors("make_prepped_read"):
            return self._agent.make_prepped_xfer("READ", local.impl, li, remote.impl, ri, h.notif)

    def _post(self, h: XferHandle) -> None:
        with self._nixl_errors("post"):
            status = self._agent.transfer(h.impl, h.notif)
        if status == "ERR":
            raise TransferFailed(f"{self.name}: posting a READ from {h.agent!r} failed")

    def _check(self, h: XferHandle) -> str:
        with self._nixl_errors("check"):
            status = self._agent.check_xfer_state(h.impl)
        if status == "ERR":
            raise TransferFailed(f"{self.name}: READ of {h.nbytes} bytes from {h.agent!r} failed")
        return status

    def _release_xfer(self, h: XferHandle, cancel: bool) -> None:
        with self._nixl_errors("release"):
            self._agent.release_xfer_handle(h.impl)

    def _send_notif(self, agent: str, msg: bytes) -> None:
        if self.config.progress == "none":
            raise ValueError(
                f"{self.name}: send_notif needs progress driven beside the caller "
                "(progress='none' leaves a standalone notification unsent); attach it to a "
                "pull with notif="
            )
        with self._nixl_errors("send_notif"):
            self._agent.send_notif(agent, msg)

    def _poll_notifs(self) -> dict[str, list[bytes]]:
        with self._nixl_errors("notifications"):
            self._gather_notifs()
        with self._notifs_lock:
            collected, self._notifs = self._notifs, {}
        return collected

    def _close(self) -> None:
        if self._poller is not None:
            self._stop_polling.set()
            self._poller.join()
        del self._agent  # the agent's destructor tears down UCX

    # -- helpers ---------------------------------------------------------------------------

    def _xfer_descs(self, descs: Sequence[MemDesc]) -> Any:
        out = self._agent.get_xfer_descs(
            [(d.addr, d.length, d.device_id) for d in descs], self.mem_type
        )
        assert out is not None, "3-tuples with a mem type are always accepted"
        return out

    @contextlib.contextmanager
    def _nixl_errors(self, what: str) -> Iterator[None]:
        """Re-raise NIXL binding exceptions as transport errors naming the operation."""
        b = self._bindings
        try:
            yield
        except TransportError:
            raise
        except b.nixlNotFoundError as exc:
            raise RegionNotFound(
                f"{self.name}: {what}: NIXL found no registration (or agent) covering the "
                f"descriptors ({exc}); was the memory registered before the metadata was taken?"
            ) from exc
        except b.nixlRemoteDisconnectError as exc:
            raise RemoteGone(f"{self.name}: {what}: remote agent disconnected ({exc})") from exc
        except b.nixlRepostActiveError as exc:
            raise HandleBusy(f"{self.name}: {what}: transfer still active ({exc})") from exc
        except (b.nixlInvalidParamError, b.nixlMismatchError) as exc:
            raise ValueError(f"{self.name}: {what}: NIXL rejected the arguments ({exc})") from exc
        except Exception as exc:
            if type(exc).__module__.startswith("nixl"):
                raise TransferFailed(f"{self.name}: {what}: {type(exc).__name__}: {exc}") from exc
            raise
