"""Where hpo writes on disk, relative to the working directory (as studies/ is): one layout.

runs/hpo.db                 the embedded storage (SQLite), unless --storage or HPO_STORAGE
runs/artifacts/             the artifact store, unless --artifacts or HPO_ARTIFACTS
runs/NAME/final/            the finalizer's model.pt, metrics.json and plots, unless --out
runs/NAME/logs/             `hpo optimize`'s worker logs, on a terminal
runs/bench-search/          `hpo bench --search`: its own storage, outputs and figures
runs/bench-pruners/         `hpo bench --search T --pruners A,B`
"""

from __future__ import annotations

from pathlib import Path

RUNS_DIR = Path("runs")


def default_database() -> Path:
    return RUNS_DIR / "hpo.db"


def default_artifacts() -> Path:
    return RUNS_DIR / "artifacts"


def final_dir(study: str, runs: Path = RUNS_DIR) -> Path:
    """Where the finalizer writes a study's model, metrics and plots unless told otherwise."""
    return runs / study / "final"


def log_dir(study: str) -> Path:
    return RUNS_DIR / study / "logs"


def bench_dir(kind: str) -> Path:
    """`hpo bench --search` ("search") and `--pruners` ("pruners") work here."""
    return RUNS_DIR / f"bench-{kind}"
