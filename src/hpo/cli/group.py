"""The `hpo` command group: one-line errors, logging, the options several commands share, and `main`.

Errors a user can cause are `HpoError`s; they print as one line and exit 1 (`--debug` re-raises).
The commands live in `study_commands`, `model_commands` and `bench_command`, each parsing its
options, calling one library function and printing what `results.report` renders.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Any

import click

from hpo.errors import HpoError
from hpo.search.storage import default_url
from hpo.settings.durations import parse_duration

log = logging.getLogger("hpo")


class HpoGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HpoError as e:
            if (ctx.obj or {}).get("debug"):
                raise
            raise click.ClickException(str(e)) from e
        except click.BadParameter as e:
            # A bad HPO_* variable is not a typo on the command line: name the variable, in one line.
            source = e.ctx.get_parameter_source(e.param.name) if e.ctx and e.param and e.param.name else None
            envvar = e.param.envvar if e.param is not None else None
            if source == click.core.ParameterSource.ENVIRONMENT and isinstance(envvar, str):
                raise click.ClickException(
                    f"{envvar}={os.environ.get(envvar, '')!r}: {e.message} Fix it, or unset it."
                ) from e
            raise


def _setup_logging(verbose: bool) -> None:
    import optuna

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s[%(process)d] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # Route Optuna's messages through the same handler instead of its own coloured one.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if not verbose:  # boto3 logs where it found each setting at INFO, on every S3 client it makes
        for name in ("botocore", "boto3", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)


@click.group(cls=HpoGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(package_name="hpo-service")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Hyperparameter search for a DynamicCNN on Fashion-MNIST, shared by many workers."""
    ctx.obj = {"debug": debug}
    _setup_logging(verbose)


study_option = click.option(
    "--study",
    "study_arg",
    required=True,
    metavar="NAME|PATH",
    envvar="HPO_STUDY",
    help="Study name (finds studies/NAME.toml) or a path to a study file [env HPO_STUDY].",
)
storage_option = click.option(
    "--storage", envvar="HPO_STORAGE", metavar="URL", help=f"Storage URL [env HPO_STORAGE; default {default_url()}]."
)
data_option = click.option(
    "--data-dir",
    envvar="HPO_DATA_DIR",
    type=click.Path(file_okay=False),
    help="This host's copy of the study's data: the directory [data] path names (for Fashion-MNIST, the one "
    "with its IDX files) [env HPO_DATA_DIR].",
)
artifacts_option = click.option(
    "--artifacts",
    envvar="HPO_ARTIFACTS",
    metavar="DIR|s3://BUCKET",
    help="Artifact store shared by workers, finalizer and dashboard [env HPO_ARTIFACTS; "
    "default: artifacts/ beside the SQLite file, else runs/artifacts].",
)


def count_option(flag: str, least: int, default: int, help: str) -> Any:
    """An integer option of at least `least`, its default shown in --help."""
    return click.option(flag, type=click.IntRange(min=least), default=default, show_default=True, help=help)


device_option = click.option("--device", envvar="HPO_DEVICE", help="cpu, cuda or cuda:N [default: cuda if present].")


def parse_time(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise HpoError(f"--time: {e}.") from e


_PROCESS_STARTED_AT: float | None = None  # set by main(): `hpo` run as a command, not in-process


def started_at() -> float:
    """When the command started (unix seconds): the process's start under `hpo`, else now."""
    return _PROCESS_STARTED_AT or time.time()


def main() -> None:
    global _PROCESS_STARTED_AT
    _PROCESS_STARTED_AT = time.time()
    cli(prog_name="hpo")
