"""`hpo bench --search T --pruners A,B`: each pruner's study variant, the bad-input lines, the summary."""

from __future__ import annotations

import tomllib

import pytest

from hpo.bench import pruners as pruner_bench
from hpo.errors import HpoError
from hpo.results import report
from hpo.search.study import make_pruner
from hpo.settings import config
from hpo.settings.components import PRUNERS
from hpo.settings.writer import to_toml


@pytest.mark.parametrize("pruner", list(PRUNERS))
def test_each_pruners_variant_is_a_study_file_optuna_accepts(pruner):
    cfg = config.load("cnn-quick")
    study_cfg = pruner_bench.variant(cfg, pruner, 1)
    # Written out and read back with the options checked against Optuna's real constructor.
    again = config.parse(tomllib.loads(to_toml(study_cfg)))
    assert again.name == f"cnn-quick-{pruner.replace('_', '-')}-2" and again.seed == cfg.seed + 1
    assert again.pruner.name == pruner and again.space == cfg.space
    assert again.budget.n_trials == pruner_bench.UNCAPPED_TRIALS  # the clock ends each run
    assert again.budget.epochs == cfg.budget.epochs and again.budget.time_s == cfg.budget.time_s
    assert again.warm_start == cfg.warm_start and again.final == cfg.final
    built = make_pruner(again)
    assert type(built).__name__ == PRUNERS[pruner]


def test_the_study_files_own_pruner_keeps_its_options_and_others_fit_its_horizon():
    cfg = config.load("cnn-quick")  # successive halving, 6 epochs
    assert pruner_bench.horizon_options("successive_halving", cfg) == cfg.pruner.options
    assert pruner_bench.horizon_options("hyperband", cfg)["max_resource"] == 6
    assert pruner_bench.horizon_options("median", cfg)["n_warmup_steps"] == 2
    tiny = config.load("tiny")  # median in its file, 3 epochs
    assert pruner_bench.horizon_options("median", tiny) == tiny.pruner.options
    assert pruner_bench.horizon_options("percentile", tiny)["n_warmup_steps"] == 2


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("median,bogus", "'bogus' is not a pruner"),
        ("median", "at least two different pruners"),
        ("median,median", "at least two different pruners"),
        (" , ", "at least two different pruners"),
    ],
)
def test_bad_pruner_lists_get_one_line_naming_the_fix(text, says):
    with pytest.raises(HpoError) as caught:
        pruner_bench.parse_pruners(text)
    message = str(caught.value)
    assert says in message and "--pruners median,successive_halving" in message and "\n" not in message


def test_pruners_parse_in_order():
    arms = pruner_bench.parse_pruners("successive_halving, median,hyperband")
    assert [(a.label, a.name, a.given) for a in arms] == [
        ("successive_halving", "successive_halving", {}),
        ("median", "median", {}),
        ("hyperband", "hyperband", {}),
    ]


def test_one_pruner_twice_with_options_after_a_colon():
    same, scaled = pruner_bench.parse_pruners(
        "successive_halving, successive_halving:min_resource=3:reduction_factor=2"
    )
    assert same.given == {} and scaled.name == "successive_halving"
    assert scaled.given == {"min_resource": 3, "reduction_factor": 2}  # read as TOML values: integers
    assert scaled.label == "successive_halving:min_resource=3:reduction_factor=2"
    cfg = config.load("cnn-quick")
    # The given options win over the study file's; the others stay.
    assert scaled.options(cfg) == {**cfg.pruner.options, "min_resource": 3, "reduction_factor": 2}
    study_cfg = pruner_bench.variant(cfg, scaled, 0)
    assert study_cfg.name == "cnn-quick-successive-halving-min-resource-3-reduction-factor-2-1"
    again = config.parse(tomllib.loads(to_toml(study_cfg)))
    assert again.pruner.options["min_resource"] == 3
    assert make_pruner(again)._min_resource == 3  # what Optuna was built with  # noqa: SLF001
    percentile, auto = pruner_bench.parse_pruners("percentile:percentile=25.5,hyperband:max_resource=auto")
    assert percentile.given == {"percentile": 25.5} and auto.given == {"max_resource": "auto"}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("median,successive_halving:min_resource", "'min_resource' is not key=value"),
        ("median,median:", "'' is not key=value"),
        ("median:n_warmup_steps=2,median:n_warmup_steps=2", "at least two different pruners"),  # twice the same
    ],
)
def test_bad_pruner_options_get_one_line_naming_the_fix(text, says):
    with pytest.raises(HpoError) as caught:
        pruner_bench.parse_pruners(text)
    message = str(caught.value)
    assert says in message and "successive_halving:min_resource=3" in message and "\n" not in message


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("median,successive_halving:bogus=1", "SuccessiveHalvingPruner has no option 'bogus'"),
        ("median,successive_halving:min_resource=0", "min_resource = 0 is out of range"),
    ],
)
def test_an_option_optuna_would_refuse_stops_the_bench_before_its_first_run(text, says, monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(pruner_bench, "optimize_in", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(pruner_bench, "shared_horizon", lambda setup, cfg: ran.append("calibrated"))
    setup = pruner_bench.Setup(config.resolve_path("tiny"), 60.0, 2, tmp_path, None, 1, tmp_path / "runs")
    with pytest.raises(HpoError) as caught:
        pruner_bench.compare(setup, pruner_bench.parse_pruners(text), 1)
    assert says in str(caught.value) and str(caught.value).startswith("--pruners: 'successive_halving:")
    assert ran == [] and not (tmp_path / "runs").exists()


def test_every_run_trains_the_one_horizon_fitted_from_one_calibration(monkeypatch, fake_data_dir, tmp_path):
    import optuna

    from hpo.learn.devices import finalizer_threads, threads_per_worker
    from hpo.search import horizon, objective

    written, calibrations = [], []
    calibrate = objective.calibrate_here
    monkeypatch.setattr(objective, "calibrate_here", lambda *a: calibrations.append(calibrate(*a)) or calibrations[-1])

    def searched(setup, final):  # the child `hpo optimize` is the integration test's part; here, its study file
        written.append(config.load(setup.study_file))
        return optuna.create_study(direction="maximize")

    monkeypatch.setattr(pruner_bench, "optimize_in", searched)
    monkeypatch.setattr(pruner_bench, "record", lambda study, label, seed, s: {"pruner": label, "seed": seed})
    monkeypatch.setattr(pruner_bench, "summarize", lambda runs, labels, direction: [])
    setup = pruner_bench.Setup(config.resolve_path("cnn-quick"), 600.0, 2, fake_data_dir, "cpu", 2, tmp_path / "r")
    arms = pruner_bench.parse_pruners("successive_halving,successive_halving:min_resource=3,hyperband")
    result = pruner_bench.compare(setup, arms, 2)
    assert len(calibrations) == 1 and len(written) == 6  # one calibration for 3 pruners x 2 seeds
    assert {c.budget.epochs for c in written} == {result["horizon"]}  # one horizon for every run
    assert not any(c.budget.fit_epochs for c in written)  # so no run fits its own
    # The horizon `hpo optimize --workers 2 --time 10m` fits to that calibration.
    threads = threads_per_worker(2)
    fitted = horizon.fit_horizon(
        config.load("cnn-quick"), calibrations[0], finalizer_threads(False, threads), 600.0, 2, True
    )
    assert fitted is not None and result["horizon"] == fitted.budget.epochs
    assert result["calibration_s"] == calibrations[0].epoch_s
    # hyperband's max_resource is the fitted horizon, whatever the file's epochs; given options win.
    assert written[2].pruner.options["max_resource"] == result["horizon"]
    assert written[1].pruner.options["min_resource"] == 3 and written[0].pruner.options["min_resource"] == 1


def test_a_study_without_fit_epochs_keeps_its_file_horizon(tmp_path):
    tiny = config.load("tiny")
    assert not tiny.budget.fit_epochs
    setup = pruner_bench.Setup(config.resolve_path("tiny"), 60.0, 2, tmp_path, None, 1, tmp_path / "runs")
    assert pruner_bench.shared_horizon(setup, tiny) == (tiny, None)


def _run(pruner, seed, best, trials=10):
    return {
        "pruner": pruner,
        "seed": seed,
        "horizon": 6,
        "best_value": best,
        "best_trial": None if best is None else 0,
        "trials": trials,
        "complete": 0 if best is None else 2,
        "pruned": trials - 2,
        "failed": 0,
        "epochs": 3 * trials,
        "wall_time_s": 60.0,
    }


def test_the_summary_pairs_each_pruner_with_the_first_on_the_same_seed():
    runs = [
        _run("median", 0, 0.90),
        _run("hyperband", 0, 0.92, 14),
        _run("median", 1, 0.91),
        _run("hyperband", 1, 0.90),
    ]
    median, hyperband = pruner_bench.summarize(runs, ["median", "hyperband"], "maximize")
    assert median["mean_best"] == pytest.approx(0.905) and median["vs_first"] is None
    assert hyperband["best_values"] == [0.92, 0.90] and hyperband["mean_trials"] == 12
    assert hyperband["vs_first"] == pytest.approx(((0.92 - 0.90) + (0.90 - 0.91)) / 2)
    # Minimizing, a lower value is the better one, so the sign turns.
    _, lower = pruner_bench.summarize([_run("median", 0, 0.40), _run("none", 0, 0.30)], ["median", "none"], "minimize")
    assert lower["vs_first"] == pytest.approx(0.10)


def test_the_ensembles_are_paired_like_the_best_values_and_higher_is_better_either_way():
    runs = [
        {**_run("median", 0, 0.40), "members": [0], "ensemble_value": 0.90},
        {**_run("none", 0, 0.30), "members": [0, 3], "ensemble_value": 0.93},
        {**_run("median", 1, 0.40), "members": [0], "ensemble_value": 0.91},
        {**_run("none", 1, None), "members": [], "ensemble_value": None},
    ]
    median, none = pruner_bench.summarize(runs, ["median", "none"], "minimize")
    assert median["mean_ensemble"] == pytest.approx(0.905) and median["ensemble_vs_first"] is None
    assert none["ensemble_values"] == [0.93] and none["ensemble_vs_first"] == pytest.approx(0.03)  # seed 0 only
    assert none["vs_first"] == pytest.approx(0.10)  # the best value's sign follows the direction
    line = report.bench_pruners_text(
        {"cpu": "x (AVX2 only)", "study": "s", "metric": "m", "runs": runs, "pruners": [median, none], "options": {}},
        2,
        None,
        "10m",
    )
    assert "ensemble 0.9300 (trial(s) 0, 3)" in line and "mean ensemble 0.9300" in line and "(ensemble +3.00)" in line


def test_a_run_without_a_complete_trial_is_counted_not_averaged():
    runs = [_run("median", 0, 0.90), _run("none", 0, None), _run("median", 1, 0.80), _run("none", 1, 0.85)]
    _, none = pruner_bench.summarize(runs, ["median", "none"], "maximize")
    assert none["best_values"] == [0.85] and none["runs_without_a_complete_trial"] == 1
    assert none["vs_first"] == pytest.approx(0.05)  # seed 1 only: seed 0 has nothing to pair


def test_pruners_without_search_is_refused_in_one_line():
    from click.testing import CliRunner

    from hpo.cli import cli

    result = CliRunner().invoke(cli, ["bench", "--pruners", "median,none"])
    assert result.exit_code != 0
    assert "--pruners needs --search DURATION" in result.output


def test_the_printed_report_names_the_cpu_each_run_and_the_paired_difference(monkeypatch, fake_data_dir):
    from click.testing import CliRunner

    from hpo.cli import cli

    runs = [_run("median", 0, 0.90), _run("successive_halving", 0, 0.91, 14)]
    result = {
        "study": "tiny",
        "metric": "val_accuracy",
        "options": {"median": {}, "successive_halving": {}},
        "runs": runs,
        "pruners": pruner_bench.summarize(runs, ["median", "successive_halving"], "maximize"),
    }
    monkeypatch.setattr(pruner_bench, "compare", lambda *args: dict(result))
    args = ["bench", "--search", "1m", "--pruners", "median,successive_halving", "--study", "tiny"]
    printed = CliRunner().invoke(cli, [*args, "--data-dir", str(fake_data_dir)])
    assert printed.exit_code == 0, printed.output
    assert "(AVX2 only)" in printed.output or "(AMX)" in printed.output or "(AVX-512 BF16)" in printed.output
    assert "median              seed   0  best 0.9000 (trial 0) at 6 epochs; 10 trials" in printed.output
    assert "+1.00 points against median, seed by seed" in printed.output
    assert "one horizon for every run" not in printed.output  # tiny keeps its file's horizon
    result.update(horizon=23, calibration_s=12.34)  # a study with [budget] fit_epochs
    printed = CliRunner().invoke(cli, [*args, "--data-dir", str(fake_data_dir)])
    assert "one horizon for every run: 23 epochs, fitted to 1m00s from one calibration here (12.3s" in printed.output
