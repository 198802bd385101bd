"""The C++ loops of :mod:`tune_node.fast.adaptive_solve`, built on first use.

:func:`adaptive_loops` compiles ``csrc/adaptive_loops.cpp`` with
:func:`torch.utils.cpp_extension.load` (a build of about half a minute on 2 cores, cached under
``TORCH_EXTENSIONS_DIR`` like :mod:`tune_node.fast.native`'s) and returns the module, or None
where it cannot be built (warned once) or ``TUNE_NODE_NATIVE=0`` says not to try. The loops make
the same ATen calls in the same order as :class:`~tune_node.fast.adaptive_solve.PythonAttemptLoops`,
or plain loops doing the same IEEE operations in the same order as the calls they replace, so the
results are identical either way. Where that order is not the loops' own (ATen's summation order
for the stage sums, the BLAS's for the field's narrow products), a loop runs only after a check on
first use found it equal to ATen's call: once per process per number of terms for the sums, per
kind, shape, operand layout and alignment for the products. ``TUNE_NODE_NARROW_PRODUCTS=0`` in the
environment when the module loads (or its ``set_narrow_products(False)`` at any time) keeps ATen's
calls for the narrow products; ``narrow_product_outcomes()`` counts which ran. Its
``solve_forward`` runs a whole solve (IController's step control included) and returns an object
whose ``gradients`` runs its backward pass (to the dense or the conv weights; ``dense_from_conv``
builds the dense matrices from the conv weights).
"""

from __future__ import annotations

from pathlib import Path

from .native import extension_build_pending, load_extension

__all__ = ["adaptive_loops", "build_pending", "SOURCE"]

SOURCE = Path(__file__).parent / "csrc" / "adaptive_loops.cpp"
_EXTENSION_NAME = "tune_node_adaptive_loops"
#: About how long a build takes on 2 CPU cores (seconds), for the announcement of one.
BUILD_SECONDS = 40
_UNSET = object()
_loaded = _UNSET


def build_pending() -> bool:
    """Whether the next :func:`adaptive_loops` call in this process compiles the loops."""
    return _loaded is _UNSET and extension_build_pending(_EXTENSION_NAME, SOURCE)


def adaptive_loops():
    """The compiled loops module, or None where disabled or not buildable (warned once)."""
    global _loaded
    if _loaded is _UNSET:
        _loaded = load_extension(_EXTENSION_NAME, SOURCE, "the adaptive dense solve")
    return _loaded
