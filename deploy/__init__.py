"""Deciding whether a candidate may serve (gates) and hot-swapping it into serving.

Depends on ``everlearn.learners`` (and through it ``everlearn.buffers``). Names are imported
from their modules on first use, so reading a configuration does not load Ray Serve.
"""

import importlib
from typing import TYPE_CHECKING

_WHERE = {  # name -> the module that defines it, imported when the name is first used
    "AuditLog": "audit",
    "Evidence": "gates",
    "Gate": "gates",
    "GateConfig": "gates",
    "GateResult": "gates",
    "LanguageModelServer": "serving",
    "LossGate": "gates",
    "ServeConfig": "serve_config",
    "Server": "deployment",
}
__all__ = [
    "AuditLog", "Evidence", "Gate", "GateConfig", "GateResult", "LanguageModelServer", "LossGate",
    "ServeConfig", "Server",
]


def __getattr__(name: str):
    """PEP 562: a part (torch, Ray Serve) is imported only when one of its names is used."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # what type checkers and editors see
    from everlearn.deploy.audit import AuditLog
    from everlearn.deploy.deployment import Server
    from everlearn.deploy.gates import Evidence, Gate, GateConfig, GateResult, LossGate
    from everlearn.deploy.serve_config import ServeConfig
    from everlearn.deploy.serving import LanguageModelServer
