"""`hpo bench`: the engine against the notebook pipeline, the search against the fixed CNN, and the pruners."""

from __future__ import annotations

import json
from typing import Any

import click

from hpo.cli.group import cli, count_option, data_option, device_option, parse_time, storage_option
from hpo.errors import HpoError
from hpo.paths import bench_dir
from hpo.results import report
from hpo.search import session
from hpo.settings import config


@cli.command()
@click.option(
    "--study",
    "study_arg",
    metavar="NAME|PATH",
    help="Benchmark this study's best trial [default: the notebook CNN, 32/64 filters, 512-unit head].",
)
@storage_option
@click.option("--params", "params_json", metavar="JSON", help="Parameter overrides, e.g. '{\"fc_size\": 256}'.")
@count_option("--images", 256, 20000, "Training images timed per pipeline.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--crop-padding",
    type=click.IntRange(0, 8),
    default=4,
    show_default=True,
    help="Pixels of padding for the random crop (plus a random flip), in both pipelines.",
)
@data_option
@device_option
@click.option("--threads", type=int, envvar="HPO_THREADS", help="CPU threads [default: all cores].")
@count_option(
    "--epochs", 0, 0, "Also train this many epochs both ways on the trial split and compare validation accuracy."
)
@count_option("--repeats", 1, 3, "Seeds: of the --epochs accuracy check, or per pruner with --pruners.")
@count_option("--num-workers", 0, 0, "DataLoader workers of the seed pipeline.")
@count_option(
    "--workers", 0, 0, "Also run this many engine processes at once (cores/N threads each, then all cores each)."
)
@count_option(
    "--rounds",
    1,
    3,
    "Interleaved rounds of both pipelines; the medians are compared (a noisy machine's slow spells hit both).",
)
@click.option(
    "--compile",
    "use_compile",
    is_flag=True,
    help="torch.compile the engine's model (the warm-up pass absorbs the compile time, which is reported separately).",
)
@click.option(
    "--search",
    "search_time",
    metavar="DURATION",
    help="Instead: run `hpo optimize --time DURATION --final` on --study (default cnn-quick, with --workers "
    "or 2) and train the notebook CNN for the same DURATION; score both on the test split.",
)
@click.option(
    "--fidelity",
    "fidelity_top",
    type=click.IntRange(0, 20),
    default=5,
    show_default=True,
    help="With --search: retrain this many finalists with another seed and score them on validation (0: skip).",
)
@click.option(
    "--pruners",
    metavar="A,B",
    help="With --search: instead, run the search for DURATION once per pruner and seed (--repeats), at one "
    "horizon, and compare their best validation values, e.g. median,successive_halving,hyperband; options "
    "after a colon: successive_halving,successive_halving:min_resource=3.",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def bench(
    study_arg: str | None,
    storage: str | None,
    params_json: str | None,
    workers: int,
    rounds: int,
    search_time: str | None,
    fidelity_top: int,
    pruners: str | None,
    as_json: bool,
    **spec_options: Any,
) -> None:
    """Images/s of our training engine against the seed-style notebook pipeline, same model and batch
    (or, with --search, the searched ensemble against the fixed notebook CNN at the same time budget)."""
    from hpo.bench import pipelines

    if pruners and not search_time:
        raise HpoError("--pruners needs --search DURATION, the time each pruner's search gets, e.g. --search 10m.")
    if search_time:
        kind = "pruners" if pruners else "search"
        setup = _bench_setup(study_arg or "cnn-quick", search_time, workers, spec_options, kind)
        if pruners:
            return _bench_pruners(setup, pruners, spec_options["repeats"], as_json)
        return _bench_search(setup, fidelity_top, as_json)
    best = session.open_study(study_arg, storage).study.best_trial.params if study_arg else {}
    spec = pipelines.BenchSpec.from_options(pipelines.params_for(best, params_json), **spec_options)
    result = pipelines.measure(spec, workers, rounds)
    click.echo(json.dumps(result, indent=2) if as_json else pipelines.describe(result))


def _bench_setup(study_arg: str, search_time: str, workers: int, spec_options: dict[str, Any], kind: str) -> Any:
    from hpo.bench.search import Setup
    from hpo.learn.data import find_data_dir
    from hpo.learn.devices import cpu_count

    where = find_data_dir(spec_options["data_dir"]), spec_options["device"], spec_options["threads"] or cpu_count()
    return Setup(config.resolve_path(study_arg), parse_time(search_time), workers or 2, *where, bench_dir(kind))


def _bench_search(setup: Any, fidelity_top: int, as_json: bool) -> None:
    from hpo.bench import search
    from hpo.learn.devices import describe_cpu

    click.echo(report.bench_search_banner(setup.time_s, fidelity_top, setup.work_dir), err=True)
    result = {**search.search_against_fixed(setup, fidelity_top), "cpu": describe_cpu()}
    click.echo(
        json.dumps(result, indent=2)
        if as_json
        else report.bench_search_text(result, setup.time_s, setup.threads, setup.device)
    )


def _bench_pruners(setup: Any, pruners_text: str, seeds: int, as_json: bool) -> None:
    from hpo.bench import pruners as pruner_bench
    from hpo.learn.devices import describe_cpu
    from hpo.settings.durations import format_duration

    pruners = pruner_bench.parse_pruners(pruners_text)
    click.echo(report.bench_pruners_banner(setup.time_s, len(pruners), seeds, setup.work_dir), err=True)
    result = {**pruner_bench.compare(setup, pruners, seeds), "cpu": describe_cpu()}
    text = report.bench_pruners_text(result, setup.workers, setup.device, format_duration(setup.time_s))
    click.echo(json.dumps(result, indent=2) if as_json else text)
