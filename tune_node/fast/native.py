"""The C++ loops of :mod:`tune_node.dense_solve`, built on first use.

:func:`dense_loops` compiles ``tune_node/csrc/dense_solve.cpp`` with
:func:`torch.utils.cpp_extension.load` (about 30-40 s on 2 cores, once per machine and
torch version: the build is cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and returns the module, or ``None`` where it cannot be
built (no C++ compiler, no ninja), after one warning that names the reason. The loops
make the same ATen calls in the same order as the Python loops of
:mod:`~tune_node.dense_solve`, so results are identical either way; only the Python
interpreter's cost per call goes (about a quarter of a Sphere2 evaluation).

The build is CPU-only C++ (no CUDA compiler needed), yet the loops serve CUDA tensors too:
ATen calls dispatch on their tensors' device and launch on the current CUDA stream, so a
solve on the GPU runs them, and a CUDA graph captures them, like the Python loops
(:data:`~tune_node.fast.dense_solve.CUDA_LOOPS` makes the choice).

Set ``TUNE_NODE_NATIVE=0`` to keep the Python loops without trying to build.
:func:`build_pending` says beforehand whether the next :func:`dense_loops` call compiles
(about :data:`BUILD_SECONDS` seconds) or loads a cached build (about a second).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

__all__ = ["dense_loops", "native_enabled", "build_pending", "SOURCE", "BUILD_SECONDS"]

SOURCE = Path(__file__).parent / "csrc" / "dense_solve.cpp"
#: About what a build takes on 2 CPU cores, in seconds (measured: 25 s alone, 38 s beside other work).
BUILD_SECONDS = 30
_EXTENSION_NAME = "tune_node_dense_loops"
_UNSET = object()
_loaded = _UNSET


def native_enabled() -> bool:
    """Whether ``TUNE_NODE_NATIVE`` allows the C++ loops (anything but ``0``, ``false``, ``no``, ``off``)."""
    return os.environ.get("TUNE_NODE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its CUDA_HOME notice (irrelevant to a CPU build)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def build_pending() -> bool:
    """Whether the next :func:`dense_loops` call in this process compiles the loops: they are
    enabled, not loaded yet, and torch's extension cache holds no build newer than :data:`SOURCE`.

    The cache is looked up the way torch names it (its ``_get_build_directory``); where that
    fails, a build is assumed, so a slow first call is never unannounced.
    """
    return _loaded is _UNSET and extension_build_pending(_EXTENSION_NAME, SOURCE)


def extension_build_pending(name: str, source: Path) -> bool:
    """Whether loading the extension ``name`` of ``source`` compiles it: the C++ loops are enabled and
    torch's extension cache holds no build of it newer than ``source`` (a build is assumed where the
    cache cannot be looked up)."""
    if not native_enabled():
        return False
    try:
        directory = Path(_cpp_extension()._get_build_directory(name, verbose=False))
        built = [p for p in (directory / f"{name}.so", directory / f"{name}.pyd") if p.is_file()]
        return not built or built[0].stat().st_mtime < source.stat().st_mtime
    except Exception:  # a private torch helper: gone or changed in some torch version
        return True


def dense_loops():
    """The compiled loops module, or ``None`` where disabled or not buildable (warned once).

    Builds on the first call in a process (or loads the cached build); later calls
    return the same module. Concurrent first calls from several processes (Ray
    workers) wait on torch's build lock rather than building twice.
    """
    global _loaded
    if _loaded is _UNSET:
        _loaded = load_extension(_EXTENSION_NAME, SOURCE, "the dense sphere field")
    return _loaded


def load_extension(name: str, source: Path, serves: str):
    """The extension ``name`` compiled from ``source`` (or its cached build), or None where the C++
    loops are disabled or cannot be built (a RuntimeWarning naming what they serve and why)."""
    if not native_enabled():
        return None
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its CUDA_HOME notice: irrelevant to these CPU/ATen builds
    try:
        return _cpp_extension().load(name=name, sources=[str(source)], extra_cflags=["-O2"], verbose=False)
    except Exception as error:  # no compiler, no ninja, a failed build: all fall back alike
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        warnings.warn(f"tune_node: C++ loops for {serves} not available ({reason}); using the Python loops (same "
                      "results, slower). Set TUNE_NODE_NATIVE=0 to skip the build attempt.", RuntimeWarning, stacklevel=3)
        return None
    finally:
        logger.setLevel(level)
