"""What a conformance run needs besides its checks: the adapter factory, the expected failures
and writable output paths.

:func:`prepare_run` checks all of them before the first check runs and raises one
``ValueError`` naming what is wrong; the pytest plugin turns it into a usage error and
``mx-sim conformance`` into one line on stderr, both with exit code 2 (pytest's own code 4
under plain pytest).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mx_sim.report import check_writable

AdapterFactory = Callable[[], object]


@dataclass(frozen=True)
class RunInputs:
    """A checked adapter and expected-failures file: ``name`` is what the report calls the
    adapter (its ``pkg.module:factory`` spec), ``capabilities`` what it declares."""

    name: str
    factory: AdapterFactory
    capabilities: tuple[str, ...]
    xfails: dict[str, str] = field(default_factory=dict)
    xfails_path: str | None = None


def prepare_run(
    adapter: str | AdapterFactory,
    *,
    name: str = "",
    xfails: Path | None = None,
    outputs: Iterable[tuple[Path, str]] = (),
) -> RunInputs:
    """Load and probe the adapter (a spec or a factory), read ``xfails`` and check that each
    ``(path, option name)`` in ``outputs`` is writable: ``ValueError`` at the first problem."""
    factory = load_factory(adapter) if isinstance(adapter, str) else adapter
    name = name or (adapter if isinstance(adapter, str) else _callable_name(factory))
    capabilities = probe_adapter(name, factory)
    for path, option in outputs:
        check_writable(path, option)
    entries = load_xfails(xfails) if xfails else {}
    return RunInputs(name, factory, capabilities, entries, str(xfails) if xfails else None)


def load_factory(spec: str) -> AdapterFactory:
    """``pkg.module:factory`` -> the factory callable; ``ValueError`` naming the spec otherwise."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"adapter spec {spec!r} must look like pkg.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"adapter spec {spec!r}: cannot import {module_name!r} ({exc})") from exc
    except Exception as exc:  # the adapter's own module failed: a usage error, not a check
        raise ValueError(
            f"adapter spec {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"adapter spec {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def probe_adapter(name: str, factory: AdapterFactory) -> tuple[str, ...]:
    """Call ``factory`` once and return the sorted capabilities of what it built: a broken
    factory is one ``ValueError``, not a failure per check."""
    try:
        adapter = factory()
    except Exception as exc:
        raise ValueError(
            f"adapter spec {name!r}: the factory raised {type(exc).__name__}: {exc}"
        ) from exc
    if not hasattr(adapter, "capabilities"):
        raise ValueError(
            f"adapter spec {name!r}: the factory returned {type(adapter).__name__}, "
            "not an engine adapter (no 'capabilities')"
        )
    return tuple(sorted(adapter.capabilities))


def load_xfails(path: Path) -> dict[str, str]:
    """Expected failures as data: one ``check.id: reason`` per line; lines starting with ``#``
    are comments (a ``#`` inside a reason, as in "vLLM #32104", is kept). An entry names a
    check id or a prefix of ids (``refit.moe``). A missing, unreadable or malformed file is a
    ``ValueError`` naming it (and the line)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"expected-failures file {str(path)!r}: {exc.strerror}") from exc
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        check_id, sep, reason = line.partition(":")
        if not sep or not check_id.strip():
            raise ValueError(f"{path}:{number}: expected 'check.id: reason', got {raw!r}")
        entries[check_id.strip()] = reason.strip() or "expected failure"
    return entries


def xfail_reason(xfails: dict[str, str], check_id: str) -> str | None:
    """The reason of the first entry naming ``check_id`` or a prefix of it, else ``None``."""
    return next((r for e, r in xfails.items() if _matches(e, check_id)), None)


def stale_entries(xfails: dict[str, str], check_ids: Iterable[str]) -> list[str]:
    """Entries that match no check id: stale, so the run warns about them."""
    ids = list(check_ids)
    return sorted(e for e in xfails if not any(_matches(e, i) for i in ids))


def _matches(entry: str, check_id: str) -> bool:
    return check_id == entry or check_id.startswith(entry + ".")


def _callable_name(factory: AdapterFactory) -> str:
    module = getattr(factory, "__module__", None) or "?"
    return f"{module}:{getattr(factory, '__qualname__', type(factory).__name__)}"
