"""Loads the compiled extension optimas_fast._C with an error that says how to fix a missing build."""

from __future__ import annotations

import importlib
from types import ModuleType

_mod: ModuleType | None = None
_err: BaseException | None = None


def native() -> ModuleType:
    """The optimas_fast._C module; raises ImportError with build instructions when it is missing."""
    global _mod, _err
    if _mod is None and _err is None:
        try:
            _mod = importlib.import_module("optimas_fast._C")
        except ImportError as e:  # keep the cause: a missing .so and an ABI mismatch read differently
            _err = e
    if _mod is None:
        raise ImportError(
            "optimas_fast._C (the C++ extension) is not built or failed to load: "
            f"{_err}. Reinstall with `pip install -c constraints-cpu.txt -e .` from the source tree "
            "(needs a C++17 compiler)."
        ) from _err
    return _mod


def native_available() -> bool:
    try:
        native()
        return True
    except ImportError:
        return False
