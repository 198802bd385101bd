"""A researcher's own code, named in a search space as ``"module:function"``.

``dataset = "crescents:load"`` and ``model = "crescents:build"`` name functions of a
module that is not part of tune-node. :func:`resolve_function` imports it from the
folder given as ``code_dir`` (the search space's folder) or from ``sys.path``
(``PYTHONPATH``); Ray workers resolve it the same way from the trial's config, so a
user sets nothing.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Callable

__all__ = ["UserCodeError", "is_reference", "resolve_function"]

_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class UserCodeError(ValueError):
    """A ``"module:function"`` that does not name an importable function, or a function
    that returned something else than it must; the message names the value and what was expected."""


def is_reference(name: object) -> bool:
    """Whether ``name`` has the form ``"module:function"`` (a user's function, not a built-in name)."""
    return isinstance(name, str) and ":" in name


def resolve_function(reference: str, *, code_dir: str | None = None, what: str = "function") -> Callable:
    """The function that ``reference`` (``"package.module:function"``) names.

    Arguments:
        reference: the module's import name and the function's name, joined by ``:``.
        code_dir: a folder searched first (put at the front of ``sys.path`` once).
        what: what the function is for, in error messages (``"dataset loader"``).

    Raises :class:`UserCodeError` naming the reference and the folder searched when
    the form is wrong, the module does not import (with the import error's own
    message: a typo inside the module surfaces as itself) or the name is missing or
    not callable.
    """
    if not isinstance(reference, str) or not _REFERENCE.match(reference):
        raise UserCodeError(f"{what} {reference!r} must be 'module:function' (e.g. 'crescents:load', a function load in "
                            f"crescents.py beside the search space or on PYTHONPATH)")
    module_name, function_name = reference.split(":")
    if code_dir is not None:
        folder = str(Path(code_dir).resolve())
        if folder not in sys.path:
            sys.path.insert(0, folder)
    where = f"in {code_dir!r} or on sys.path" if code_dir is not None else "on sys.path (PYTHONPATH)"
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a typo inside the module (SyntaxError, NameError, ...) too
        raise UserCodeError(f"{what} {reference!r}: module {module_name!r} does not import ({type(err).__name__}: {err}); "
                            f"looked {where}") from err
    function = getattr(module, function_name, None)
    if function is None:
        raise UserCodeError(f"{what} {reference!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                            f"{function_name!r}")
    if not callable(function):
        raise UserCodeError(f"{what} {reference!r}: {function_name!r} in {module_name!r} is a "
                            f"{type(function).__name__}, not a function")
    return function
