"""The backend switch: which kernel module the layers and the trainer call.

Precedence: ``use_backend(name)`` blocks (innermost wins), then ``set_backend(name)``, then the
``FASTCNN_BACKEND`` environment variable (read at every call, so changing it takes effect), then
the default.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading

from . import memory, threads

# name -> module inside fastcnn.kernels
BACKENDS = {
    "naive": "naive",
    "numpy": "vectorized",
    "numba": "numba_jit",
}
DEFAULT_BACKEND = "numba"
ENV_VAR = "FASTCNN_BACKEND"

_chosen: str | None = None
_local = threading.local()  # per-thread stack of use_backend() names


def _check_name(name, source):
    if name not in BACKENDS:
        raise ValueError(
            f"Unknown backend {name!r}{source}. Expected one of {tuple(BACKENDS)}."
        )
    return name


def _stack():
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def get_backend() -> str:
    """The name of the active backend."""
    stack = _stack()
    if stack:
        return stack[-1]
    if _chosen is not None:
        return _chosen
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, f" in the {ENV_VAR} environment variable")
    return DEFAULT_BACKEND


def set_backend(name: str | None) -> None:
    """Make ``name`` the active backend for this process; ``None`` goes back to the env/default."""
    global _chosen
    _chosen = None if name is None else _check_name(name, "")


@contextlib.contextmanager
def use_backend(name: str):
    """Run a block with ``name`` as the active backend: ``with use_backend("naive"): ...``."""
    stack = _stack()
    stack.append(_check_name(name, ""))
    try:
        yield name
    finally:
        stack.pop()


_modules: dict = {}


def load(name: str):
    """The kernel module of backend ``name``; ImportError says what is missing."""
    module = _modules.get(name)
    if module is None:
        _check_name(name, "")
        memory.apply_once()
        module = _modules[name] = importlib.import_module(f"fastcnn.kernels.{BACKENDS[name]}")
        threads.apply_default_once()  # a container's CPU quota, not the host's cores
    return module


def kernels():
    """The kernel module of the active backend."""
    return load(get_backend())


def available_backends() -> tuple[str, ...]:
    """The backends that import on this machine, in order from slowest to fastest."""
    names = []
    for name in BACKENDS:
        try:
            load(name)
        except ImportError:
            continue
        names.append(name)
    return tuple(names)
