"""The command line: ``residency-planner`` and ``python -m planner``."""

from planner.cli.main import main

__all__ = ["main"]
