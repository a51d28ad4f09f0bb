"""Deciding whether a candidate may serve (gates) and hot-swapping it into serving.

Depends on ``everlearn.learners`` (and through it ``everlearn.buffers``).
"""

from everlearn.deploy.audit import AuditLog
from everlearn.deploy.deployment import Server
from everlearn.deploy.gates import Evidence, Gate, GateConfig, GateResult, LossGate
from everlearn.deploy.serving import LanguageModelServer, ServeConfig

__all__ = ["AuditLog", "Evidence", "Gate", "GateConfig", "GateResult", "LanguageModelServer", "LossGate", "ServeConfig", "Server"]
