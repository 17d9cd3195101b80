"""The optional imports of the nn extra, with an error that says how to install it."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "pip install 'jax_ep[nn]'"


def require(module: str, user: str) -> ModuleType:
    """Imports `module` or raises ImportError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{user} needs {module.split('.')[0]}, which is not installed; "
                          f"install the nn extra: {INSTALL_HINT}") from e
