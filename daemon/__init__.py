"""Runs everything: ingests streams, owns the run, its checkpoints, metrics and CLI."""

from everlearn.daemon.config import Config, load_config

__all__ = ["Config", "load_config"]
