"""Background version polling that applies only while the engine is paused.

Dynamo PR #10901's poller thread called the weight update directly, so ``load_weights`` could run while
a forward pass was reading the same parameters. Here the expensive part of a cycle (discover,
plan, pull, translate, verify: :meth:`stage`) overlaps inference, and only the in-place copy
(:meth:`commit`) runs between the engine's ``pause`` and ``resume`` hooks.

:class:`EngineGate` is a ready pair of hooks for engines without their own: forwards run inside
``with gate.inference():``; ``pause`` blocks new forwards and waits for running ones to finish.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mx_reference.refit.receiver import RefitReceiver


class EngineGate:
    """Readers (forwards) and one writer (apply) over the model's parameters."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._paused = False

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Wrap one forward pass: waits while the engine is paused."""
        with self._cond:
            self._cond.wait_for(lambda: not self._paused)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def pause(self, timeout_s: float = 30.0) -> None:
        """Stop admitting forwards and wait until running ones finish."""
        with self._cond:
            if self._paused:
                raise RuntimeError("EngineGate.pause: already paused")
            self._paused = True
            if not self._cond.wait_for(lambda: self._running == 0, timeout_s):
                self._paused = False
                self._cond.notify_all()
                raise TimeoutError(f"EngineGate.pause: forwards still running after {timeout_s} s")

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._paused and self._running == 0


@dataclass
class PollerConfig:
    interval_s: float = 0.2
    pause_timeout_s: float = 30.0


class RefitPoller:
    """Polls for versions newer than the receiver's and applies each one with the engine paused.

    ``pause(timeout_s)`` must return only once no forward is running; ``resume()`` is called
    after every commit attempt, also a failed one. Errors go to ``on_error`` (default: kept in
    :attr:`errors`) and polling goes on; the model stays at its last good version.
    """

    def __init__(
        self,
        receiver: RefitReceiver,
        pause: Callable[[float], None],
        resume: Callable[[], None],
        config: PollerConfig | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ):
        self.receiver = receiver
        self.config = config or PollerConfig()
        self._pause, self._resume = pause, resume
        self.errors: list[BaseException] = []
        self._on_error = on_error or self.errors.append
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.results: list[Any] = []

    def poll_once(self) -> Any | None:
        """One poll: stage a newer version if there is one, then commit it while paused."""
        latest = self.receiver.latest_version()
        if latest is None or latest <= self.receiver.applied_version:
            return None
        staged = self.receiver.stage(latest)
        self._pause(self.config.pause_timeout_s)
        try:
            result = self.receiver.commit(staged)
        finally:
            self._resume()
        self.results.append(result)
        return result

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # keep polling; the model stays at its last good version
                self._on_error(exc)
            self._stop.wait(self.config.interval_s)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("RefitPoller.start: already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="refit-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop polling and join the thread (a cycle in progress finishes first)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"RefitPoller.stop: poller still running after {timeout_s} s")
        self._thread = None
