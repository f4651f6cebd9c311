"""`hpo`: the command group and its commands (importing the command modules registers them)."""

from hpo.cli import bench_command, model_commands, study_commands  # noqa: F401
from hpo.cli.group import cli, main

__all__ = ["cli", "main"]
