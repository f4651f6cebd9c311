"""The figures `hpo status` derives from a study: states, pruning savings and the ETA."""

from __future__ import annotations

import datetime
import time

from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from hpo.search.status import STATUS_SCHEMA, study_status
from hpo.search.storage import open_storage
from hpo.search.study import create_or_load
from hpo.settings import config


def test_summary_counts_epochs_saved_and_estimates_the_time_left(tmp_path):
    cfg = config.load("tiny")  # 8 trials of 3 epochs
    store = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}")
    study, cfg = create_or_load(store, cfg)
    start = datetime.datetime(2026, 1, 1, 12, 0, 0)
    dist = {"x": FloatDistribution(0, 1)}

    def add(state, values: dict[int, float], seconds: float, value=None):
        study.add_trial(
            FrozenTrial(
                number=0,
                trial_id=0,
                state=state,
                value=value,
                values=None,
                datetime_start=start,
                datetime_complete=start + datetime.timedelta(seconds=seconds),
                params={"x": 0.5},
                distributions=dist,
                user_attrs={},
                system_attrs={},
                intermediate_values=values,
            )
        )

    add(TrialState.COMPLETE, {1: 0.5, 2: 0.6, 3: 0.7}, 30, value=0.7)
    add(TrialState.COMPLETE, {1: 0.6, 2: 0.7, 3: 0.8}, 30, value=0.8)
    add(TrialState.PRUNED, {1: 0.1}, 10)  # saved 2 epochs
    add(TrialState.PRUNED, {1: 0.2, 2: 0.3}, 20)  # saved 1 epoch
    running = study.ask()  # a worker is on the fifth trial
    study.ask()  # and another on the sixth

    s = study_status(study, cfg, store)
    assert s["schema"] == STATUS_SCHEMA
    assert s["states"]["COMPLETE"] == 2 and s["states"]["PRUNED"] == 2 and s["states"]["RUNNING"] == 2
    assert s["finished"] == 4 and s["remaining"] == 4 and s["pruned_share"] == 0.5
    assert s["epochs"] == {"trained": 3 + 3 + 1 + 2, "saved_by_pruning": 3, "saved_share": 3 / 12}
    assert s["best"]["value"] == 0.8 and s["best"]["number"] == 1
    assert s["mean_trial_s"] == 22.5
    assert s["eta_s"] == 4 * 22.5 / 2  # 4 trials left at 22.5 s each, 2 workers
    assert [r["number"] for r in s["running"]] == [running.number, running.number + 1]
    running.set_user_attr("epoch", 2)  # two of its three epochs done: a third of a trial left
    assert study_status(study, cfg, store)["eta_s"] == round((2 + 1 / 3 + 1) * 22.5 / 2, 1)

    for t in study.get_trials(states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
    s = study_status(study, cfg, store)
    assert s["eta_s"] is None and s["remaining"] == 4  # nobody is working on it: no estimate


def test_summary_of_an_empty_study(tmp_path):
    store = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}")
    study, cfg = create_or_load(store, config.load("tiny"))
    s = study_status(study, cfg, store)
    assert s["finished"] == 0 and s["best"] is None and s["eta_s"] is None and s["mean_trial_s"] is None
    assert s["epochs"] == {"trained": 0, "saved_by_pruning": 0, "saved_share": 0.0}


def test_a_timed_study_leads_with_the_time_left_and_the_trials_run(tmp_path):
    """The clock, not the trial cap, ends a timed search: "finished 2/200" read as a failure."""
    from hpo.results.report import status_text
    from hpo.search import budget

    store = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}")
    study, cfg = create_or_load(store, config.load("tiny"))
    budget.set_deadline(study, 600, now=time.time() - 65)  # started 65 s ago: 8m55s left
    study.add_trial(
        FrozenTrial(
            number=0,
            trial_id=0,
            state=TrialState.PRUNED,
            value=None,
            values=None,
            datetime_start=datetime.datetime(2026, 1, 1),
            datetime_complete=datetime.datetime(2026, 1, 1, 0, 0, 9),
            params={"x": 0.5},
            distributions={"x": FloatDistribution(0, 1)},
            user_attrs={},
            system_attrs={},
            intermediate_values={1: 0.3},
        )
    )
    study.ask()
    s = study_status(study, cfg, store)
    assert s["started"] == 2
    first = status_text(s).splitlines()[0]
    assert first.startswith("study tiny: 8m5") and first.endswith(
        "of 10m00s left, 2 trials run (0 complete, 1 pruned, 1 running)"
    ), first
    assert "finished 1 (the clock ends this search; 8 is only a cap)" in status_text(s)
    # A timed study that met its trial cap before the clock (a fast machine, a small data set) says so.
    assert "finished 8/8, pruned share" in status_text({**s, "finished": 8})


def test_a_timed_study_whose_trial_cap_outlasts_its_clock_gives_no_eta_past_the_deadline():
    """A 60-minute cnn run said "ETA 10h05m for 197 remaining trial(s)" with 45 minutes left."""
    from hpo.results.report import _status_tail

    def tail(eta_s: float | None, left_s: float) -> str:
        clock = {"time_s": 3600, "left_s": left_s, "deadline": "2026-12-03T18:38:09Z"}
        s = {"remaining": 197, "running": [{}, {}], "mean_trial_s": 370.0, "eta_s": eta_s, "time_budget": clock}
        return "\n".join(_status_tail({**s, "final": None}))

    late = tail(36_450.0, 2_741.0)
    assert "ETA" not in late and "the clock ends this search before its 197 remaining trial(s)" in late, late
    assert "2 worker(s) at 6m10s per trial" in late and "45m41s left" in late
    assert "ETA 30m00s for 197 remaining trial(s)" in tail(1_800.0, 2_741.0)  # a cap the clock lets it reach
