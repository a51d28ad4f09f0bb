"""everlearn: a streaming continual-learning daemon.

The subpackages are the architecture (see DESIGN.md); imports flow one way:
``daemon`` -> ``deploy`` -> ``learners`` -> ``buffers``.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
