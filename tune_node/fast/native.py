"""The C++ loops of :mod:`tune_node.dense_solve`, built on first use.

:func:`dense_loops` compiles ``tune_node/csrc/dense_solve.cpp`` with
:func:`torch.utils.cpp_extension.load` (about 30 s on 2 cores, once per machine and
torch version: the build is cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and returns the module, or ``None`` where it cannot be
built (no C++ compiler, no ninja), after one warning that names the reason. The loops
make the same ATen calls in the same order as the Python loops of
:mod:`~tune_node.dense_solve`, so results are identical either way; only the Python
interpreter's cost per call goes (about a quarter of a Sphere2 evaluation).

Set ``TUNE_NODE_NATIVE=0`` to keep the Python loops without trying to build.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

__all__ = ["dense_loops", "native_enabled", "SOURCE"]

SOURCE = Path(__file__).parent / "csrc" / "dense_solve.cpp"
_EXTENSION_NAME = "tune_node_dense_loops"
_UNSET = object()
_loaded = _UNSET


def native_enabled() -> bool:
    """Whether ``TUNE_NODE_NATIVE`` allows the C++ loops (anything but ``0``, ``false``, ``no``, ``off``)."""
    return os.environ.get("TUNE_NODE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def dense_loops():
    """The compiled loops module, or ``None`` where disabled or not buildable (warned once).

    Builds on the first call in a process (or loads the cached build); later calls
    return the same module. Concurrent first calls from several processes (Ray
    workers) wait on torch's build lock rather than building twice.
    """
    global _loaded
    if _loaded is not _UNSET:
        return _loaded
    _loaded = None
    if not native_enabled():
        return None
    try:
        # cpp_extension logs a CUDA_HOME notice at import on CPU-only machines; it is
        # irrelevant to a CPU build.
        logger = logging.getLogger("torch.utils.cpp_extension")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            logger.setLevel(level)
        _loaded = cpp_extension.load(name=_EXTENSION_NAME, sources=[str(SOURCE)], extra_cflags=["-O2"],
                                     verbose=False)
    except Exception as error:  # no compiler, no ninja, a failed build: all fall back alike
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        warnings.warn(f"tune_node: C++ loops for the dense sphere field not available ({reason}); "
                      "using the Python loops (same results, slower). Set TUNE_NODE_NATIVE=0 to skip "
                      "the build attempt.", RuntimeWarning, stacklevel=2)
    return _loaded
