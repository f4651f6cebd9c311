"""`hpo` commands: each parses its options, calls one library function and prints the result.

Errors a user can cause are `HpoError`s; they print as one line and exit 1 (`--debug` re-raises).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click

from hpo import config, storage as storage_mod
from hpo.errors import HpoError, StudyFileNotFound

log = logging.getLogger("hpo")


class HpoGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HpoError as e:
            if (ctx.obj or {}).get("debug"):
                raise
            raise click.ClickException(str(e)) from e


def _setup_logging(verbose: bool) -> None:
    import optuna

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s[%(process)d] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    # Route Optuna's messages through the same handler instead of its own coloured one.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@click.group(cls=HpoGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(package_name="hpo")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Hyperparameter search for a DynamicCNN on Fashion-MNIST, shared by many workers."""
    ctx.obj = {"debug": debug}
    _setup_logging(verbose)


study_option = click.option("--study", "study_arg", required=True, metavar="NAME|PATH",
                            help="Study name (finds studies/NAME.toml) or a path to a study file.")
storage_option = click.option("--storage", envvar="HPO_STORAGE", metavar="URL",
                              help=f"Storage URL [env HPO_STORAGE; default {storage_mod.default_url()}].")
data_option = click.option("--data-dir", envvar="HPO_DATA_DIR", type=click.Path(file_okay=False),
                           help="Directory with the Fashion-MNIST IDX files [env HPO_DATA_DIR].")
device_option = click.option("--device", envvar="HPO_DEVICE", help="cpu, cuda or cuda:N [default: cuda if present].")


def _open(storage: str | None):
    url = storage_mod.resolve_url(storage)
    return url, storage_mod.open_storage(url)


def _study_name(study_arg: str) -> str:
    """A name is used as is; a path to a study file gives the name inside it."""
    if study_arg.endswith(".toml") or os.sep in study_arg:
        return config.load(study_arg).name
    return study_arg


def _load_existing(study_arg: str, storage: str | None):
    from hpo import study as study_mod

    url, store = _open(storage)
    study, cfg = study_mod.load(store, _study_name(study_arg))
    return url, store, study, cfg


def _config_for_worker(study_arg: str, storage: str | None):
    """The study file, or, on a host without it, the settings stored in the existing study.

    The file is read before the storage is opened, so an invalid file writes nothing.
    """
    from hpo import study as study_mod

    try:
        cfg = config.load(study_arg)
    except StudyFileNotFound as missing:
        url, store = _open(storage)
        try:
            return study_mod.load(store, study_arg)[1], url, store
        except HpoError:
            raise missing from None
    return (cfg, *_open(storage))


@cli.command()
@study_option
@storage_option
def create(study_arg: str, storage: str | None) -> None:
    """Create the tables and the study if missing (safe to repeat), then exit."""
    from hpo import study as study_mod

    cfg = config.load(study_arg)
    url, store = _open(storage)
    study, cfg = study_mod.create_or_load(store, cfg)
    click.echo(f"study {cfg.name!r} is ready in {storage_mod.mask(url)} with {len(study.trials)} trials so far "
               f"(budget {cfg.budget.n_trials})")


@cli.command()
@study_option
@storage_option
@data_option
@device_option
@click.option("--threads", type=int, envvar="HPO_THREADS", help="CPU threads for this worker [default: all cores].")
@click.option("--sampler-seed", type=int, envvar="HPO_SAMPLER_SEED",
              help="Seed this worker's sampler (distinct per worker) [default: random].")
def worker(study_arg: str, storage: str | None, data_dir: str | None, device: str | None, threads: int | None,
           sampler_seed: int | None) -> None:
    """Run trials of a shared study until its budget is met."""
    from hpo import data, study as study_mod, worker as worker_mod
    from hpo.devices import place

    cfg, url, store = _config_for_worker(study_arg, storage)
    worker_mod.install_signal_handlers()
    try:
        placement = place(device, threads)
        # Data problems surface before the study is touched.
        directory = data.find_data_dir(data_dir)
        images, labels = data.load_split(directory, "train")
        study, cfg = study_mod.create_or_load(store, cfg, sampler_seed=sampler_seed)
        trial_data = data.trial_data(images, labels, cfg.budget.val_fraction, cfg.seed, placement.device,
                                     cfg.budget.train_subset)
        log.info("worker on %s joins study %r at %s (data %s)", placement.name, cfg.name, storage_mod.mask(url),
                 directory)
        result = worker_mod.run(study, cfg, trial_data, placement, store)
    except worker_mod.Shutdown as e:
        log.warning("stopping: %s; a running trial was failed and re-queued", e)
        sys.exit(128 + (signal.SIGINT if "SIGINT" in str(e) else signal.SIGTERM))
    log.info("worker done after %d trials: %s", result.trials_run, result.reason)


@cli.command()
@study_option
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Local worker processes.")
@storage_option
@data_option
@device_option
def optimize(study_arg: str, workers: int, storage: str | None, data_dir: str | None, device: str | None) -> None:
    """Start N local workers on one study (embedded storage by default) and wait for them."""
    from hpo import data, study as study_mod
    from hpo.devices import threads_per_worker
    from hpo.objective import derive_seed

    cfg = config.load(study_arg)
    directory = data.find_data_dir(data_dir)
    url, store = _open(storage)
    # Create the study once here, so the workers only ever load it.
    study, cfg = study_mod.create_or_load(store, cfg)
    threads = threads_per_worker(workers)
    log.info("study %r: %d workers x %d thread(s), storage %s", cfg.name, workers, threads, storage_mod.mask(url))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HPO_THREADS": str(threads)}
    args = [sys.executable, "-m", "hpo", "worker", "--study", study_arg, "--storage", url,
            "--data-dir", str(directory)] + (["--device", device] if device else [])
    started = time.monotonic()
    # Distinct sampler seeds: identical ones would make every worker propose the same first trials.
    children = [subprocess.Popen(args + ["--sampler-seed", str(derive_seed(cfg.seed, i))], env=env)
                for i in range(workers)]

    stopped_by: list[str] = []

    def forward(signum: int, _frame: Any) -> None:
        stopped_by.append(signal.Signals(signum).name)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    # Ctrl-C and SIGTERM both stop every worker the same way: fail, re-queue, exit.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        while True:
            try:
                child.wait(timeout=30 if stopped_by else None)
                break
            except subprocess.TimeoutExpired:
                child.kill()  # a worker that ignores SIGTERM for 30 s
    codes = [child.returncode for child in children]
    summary = study_mod.summary(study, cfg, store)
    click.echo(_format_status(summary))
    click.echo(f"wall time {time.monotonic() - started:.0f}s")
    if stopped_by:
        raise HpoError(f"stopped by {stopped_by[0]}: all {workers} workers exited and their running trials were "
                       f"re-queued. Run the same command to carry on.")
    if any(codes):
        raise HpoError(f"{sum(1 for c in codes if c)} of {workers} workers exited with an error "
                       f"(exit codes {codes}); see their log lines above.")


@cli.command("final-train")
@study_option
@storage_option
@data_option
@device_option
@click.option("--out", type=click.Path(file_okay=False), help="Output directory [default: runs/STUDY/final].")
@click.option("--epochs", type=click.IntRange(min=1), help="Override the study file's final epochs.")
def final_train(study_arg: str, storage: str | None, data_dir: str | None, device: str | None,
                out: str | None, epochs: int | None) -> None:
    """Retrain the best trial on train + validation and score the test split once."""
    from hpo import data, final
    from hpo.devices import place

    _, _, study, cfg = _load_existing(study_arg, storage)
    placement = place(device)
    directory = data.find_data_dir(data_dir)
    out_dir = Path(out) if out else storage_mod.RUNS_DIR / cfg.name / "final"
    metrics = final.final_train(study, cfg, directory, placement, out_dir, epochs)
    click.echo(f"test accuracy {metrics['test_accuracy']:.4f}  (loss {metrics['test_loss']:.4f}, "
               f"{metrics['test_images']} test images, best trial {metrics['best_trial']} had val "
               f"{metrics['best_trial_value']:.4f}, {metrics['epochs']} epochs, {metrics['wall_time_s']:.0f}s)")
    click.echo(f"wrote {out_dir / 'model.pt'} and {out_dir / 'metrics.json'}")


def _format_status(s: dict[str, Any]) -> str:
    lines = [f"study {s['study']}  ({s['direction']} {s['metric']}, budget {s['n_trials']} finished trials)"]
    lines += [f"  {state:<9}{n:>5}" for state, n in s["states"].items() if n or state in ("COMPLETE", "PRUNED")]
    lines.append(f"  finished {s['finished']}/{s['n_trials']}, pruned share {s['pruned_share']:.0%}")
    if s["best"]:
        b = s["best"]
        lines.append(f"  best trial {b['number']}: {s['metric']} {b['value']:.4f}")
        lines.append("    " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in b["params"].items()))
    for r in s.get("running", []):
        age = "no heartbeat yet" if r["heartbeat_age_s"] is None else f"heartbeat {r['heartbeat_age_s']:.0f}s ago"
        lines.append(f"  running trial {r['number']}: epoch {r['epoch']}/{r['epochs']} on {r['host']} "
                     f"pid {r['pid']} {r['device']}, {age}")
    if s["final"]:
        f = s["final"]
        lines.append(f"  final-train: test accuracy {f['test_accuracy']:.4f} (trial {f['best_trial']}, "
                     f"{f['epochs']} epochs) in {f['output_dir']}")
    return "\n".join(lines)


@cli.command()
@study_option
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status(study_arg: str, storage: str | None, as_json: bool) -> None:
    """Trial counts by state, the best trial and the pruned share."""
    from hpo import study as study_mod

    _, store, study, cfg = _load_existing(study_arg, storage)
    study_mod.reap_stale(study)
    summary = study_mod.summary(study, cfg, store)
    click.echo(json.dumps(summary, indent=2) if as_json else _format_status(summary))


@cli.command()
@click.option("--study", "study_arg", metavar="NAME|PATH", help="Open this study's page [default: the study list].")
@storage_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (no authentication!).")
@click.option("--port", default=8080, show_default=True, type=int)
def dashboard(study_arg: str | None, storage: str | None, host: str, port: int) -> None:
    """Serve optuna-dashboard on the storage the workers use."""
    from optuna_dashboard import run_server

    if study_arg:
        url, store, study, _ = _load_existing(study_arg, storage)
        page = f"dashboard/studies/{study._study_id}"
    else:
        url, store = _open(storage)
        page = "dashboard"
    click.echo(f"optuna-dashboard on {storage_mod.mask(url)}: http://{host}:{port}/{page}  (Ctrl-C to stop)")
    run_server(store, host=host, port=port)


@cli.command()
@click.option("--study", "study_arg", metavar="NAME|PATH", help="Benchmark this study's best trial [default: the "
              "notebook CNN, 32/64 filters, 512-unit head].")
@storage_option
@click.option("--params", "params_json", metavar="JSON", help='Parameter overrides, e.g. \'{"fc_size": 256}\'.')
@click.option("--images", type=click.IntRange(min=256), default=20000, show_default=True,
              help="Training images timed per pipeline.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--crop-padding", type=click.IntRange(0, 8), default=4, show_default=True,
              help="Pixels of padding for the random crop (plus a random flip), in both pipelines.")
@data_option
@device_option
@click.option("--threads", type=int, envvar="HPO_THREADS", help="CPU threads [default: all cores].")
@click.option("--epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also train this many epochs both ways on the trial split and compare validation accuracy.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Seeds for the --epochs accuracy check; the mean is compared.")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader workers of the seed pipeline.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also run this many engine processes at once (cores/N threads each, then all cores each).")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the engine's model (the warm-up "
              "pass absorbs the compile time, which is reported separately).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def bench(study_arg: str | None, storage: str | None, params_json: str | None, images: int, batch_size: int,
          crop_padding: int, data_dir: str | None, device: str | None, threads: int | None, epochs: int,
          repeats: int, num_workers: int, workers: int, use_compile: bool, as_json: bool) -> None:
    """Images/s of our training engine against the seed-style notebook pipeline, same model and batch."""
    import datetime
    import platform

    import torch

    from hpo import bench as bench_mod, data
    from hpo.devices import cpu_count
    from hpo.model import build, count_parameters

    params = dict(bench_mod.DEFAULT_PARAMS)
    if study_arg:
        params.update(_load_existing(study_arg, storage)[2].best_trial.params)
    if params_json:
        try:
            params.update(json.loads(params_json))
        except json.JSONDecodeError as e:
            raise HpoError(f"--params is not valid JSON ({e}). Example: --params '{{\"fc_size\": 256}}'") from e
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = bench_mod.BenchSpec(params=params, data_dir=str(data.find_data_dir(data_dir)), images=images,
                               batch_size=batch_size, crop_padding=crop_padding, device=wanted,
                               threads=threads or cpu_count(), epochs=epochs, repeats=repeats, num_workers=num_workers,
                               compile=use_compile)
    result = bench_mod.run(spec, workers)
    result["model_parameters"] = count_parameters(build(params))
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": cpu_count(),
                         "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                         "gpu": torch.cuda.get_device_name(0) if wanted.startswith("cuda") else None}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"hpo bench: DynamicCNN with {result['model_parameters']:,} parameters, batch {batch_size}, "
               f"crop (padding {crop_padding}) + flip, {images:,} images, {wanted} ({spec.threads} threads), "
               f"torch {torch.__version__}")
    for kind in ("engine", "seed"):
        r = result[kind]
        accs = r["val_accuracies"]
        acc = (f"   val acc after {epochs} epochs: mean {sum(accs) / len(accs):.4f} over seeds "
               f"{', '.join(f'{a:.4f}' for a in accs)}") if accs else ""
        warm = f"   warm-up {r['warmup_s']:.1f}s" if kind == "engine" and use_compile else ""
        click.echo(f"  {kind:<7}{r['images_per_s']:>9,.0f} img/s  ({r['seconds']:.1f}s)   peak RSS "
                   f"{r['peak_rss_mib']:,.0f} MiB{acc}{warm}")
    click.echo(f"  speedup {result['speedup']:.2f}x")
    if epochs:
        gap = (sum(result["engine"]["val_accuracies"]) / repeats - sum(result["seed"]["val_accuracies"]) / repeats)
        click.echo(f"  validation accuracy, engine minus seed: {gap * 100:+.2f} points (mean of {repeats} seeds)")
    if workers:
        p = result["parallel"]
        click.echo(f"  {workers} engine workers at once, {p['split_threads']} thread(s) each: "
                   f"{p['split_images_per_s']:,.0f} img/s in total "
                   f"({p['split_images_per_s'] / p['single_worker_images_per_s']:.2f}x one worker on "
                   f"{spec.threads} threads); each on all {spec.threads} threads (oversubscribed): "
                   f"{p['oversubscribed_images_per_s']:,.0f} img/s")


def main() -> None:
    cli(prog_name="hpo")
