"""Deciding whether a candidate may serve (gates) and hot-swapping it into serving.

Depends on ``everlearn.learners`` (and through it ``everlearn.buffers``). Names are imported
from their modules on first use, so reading a configuration does not load Ray Serve.
"""

from typing import TYPE_CHECKING

from everlearn.lazy import lazy_names

_WHERE = {  # name -> the module that defines it, imported when the name is first used
    "AuditLog": "audit",
    "ConfidenceGate": "verdict",
    "Evidence": "gates",
    "Gate": "gates",
    "GateConfig": "gates",
    "GateResult": "gates",
    "LanguageModelServer": "serving",
    "Measurements": "gates",
    "ServeConfig": "serve_config",
    "Server": "deployment",
}
__all__ = [
    "AuditLog", "ConfidenceGate", "Evidence", "Gate", "GateConfig", "GateResult", "LanguageModelServer", "Measurements",
    "ServeConfig", "Server",
]


__getattr__ = lazy_names(__name__, _WHERE, globals())  # PEP 562: torch / Ray Serve load on first use


if TYPE_CHECKING:  # what type checkers and editors see
    from everlearn.deploy.audit import AuditLog
    from everlearn.deploy.deployment import Server
    from everlearn.deploy.gates import Evidence, Gate, GateConfig, GateResult, Measurements
    from everlearn.deploy.serve_config import ServeConfig
    from everlearn.deploy.serving import LanguageModelServer
    from everlearn.deploy.verdict import ConfidenceGate
