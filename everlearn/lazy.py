"""Packages whose names are imported from their modules on first use (PEP 562).

``everlearn.learners`` and ``everlearn.deploy`` re-export names from modules that
load torch, transformers and Ray Serve; importing them lazily lets the CLI read a
configuration (``everlearn status``, ``validate``) without loading any of that.
"""

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, where: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: name -> the module (relative to it) that defines it, cached in ``namespace``."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    return __getattr__
