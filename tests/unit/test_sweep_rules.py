"""Sweeps without a network: the search space, trial jobs, the study rebuilt from records, pruning,
the best trial, and who leads (``swarm.sweep``, ``peer.schedule.sweep_leader``)."""

from __future__ import annotations

import copy

import pytest

from peer.schedule import sweep_leader
from swarm.spec import JobSpec, JobSpecError
from swarm.sweep import (
    SearchSpec,
    TrialView,
    ask,
    best_trial,
    merge_trial_records,
    rebuild_study,
    should_prune,
    sweep_done,
    table_csv,
    trial_job_id,
    trials_plot,
    trials_table,
    trials_to_ask,
)

BASE = {
    "name": "digits-sweep", "type": "sweep", "task": "classification",
    "model": {"catalog": "mlp", "hidden": [128, 64]},
    "data": {"path": "digits.csv", "format": "csv", "label_column": "label"},
    "training": {"rounds": 4, "local_steps": 20, "batch_size": 32, "lr": 0.001},
    "search": {"space": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}, "hidden": {"choice": [[64], [128, 64]]}},
               "trials": 6, "parallel": 2},
}


def sweep_spec(**search) -> JobSpec:
    d = copy.deepcopy(BASE)
    d["search"].update(search)
    return JobSpec.from_dict(d, source="sweep.yaml")


def done(n, value, params=None, curve=None, state="complete", author="a"):
    return TrialView(number=n, job_id=f"{n:024x}", params=params or {"lr": 0.001, "hidden": "[64]"}, state=state,
                     value=value, intermediate=curve or {1: value - 0.1, 2: value}, author=author)


def test_a_trial_is_the_base_job_with_its_parameters_and_nothing_of_the_search():
    spec = sweep_spec()
    assert spec.search.direction == "maximize"  # accuracy's default
    trial = spec.trial({"lr": 0.003, "hidden": "[64]"})
    assert (trial.type, trial.search, trial.training.lr, trial.model.hidden) == ("training", None, 0.003, [64])
    assert trial.training.rounds == 4 and "type" not in trial.to_dict() and "search" not in trial.to_dict()
    # dotted names reach any section
    dotted = sweep_spec(space={"aggregation.outer_lr": {"uniform": [0.3, 0.9]}})
    assert dotted.trial({"aggregation.outer_lr": 0.5}).aggregation.outer_lr == 0.5


@pytest.mark.parametrize("space, says", [
    ({"lrr": {"uniform": [0.1, 0.2]}}, "search.space.lrr: 'lrr' is not a field"),
    ({"lr": {"loguniform": [0, 1]}}, "loguniform: low must be > 0"),
    ({"lr": {"uniform": [0.2, 0.1]}}, "low (0.2) must be below high (0.1)"),
    ({"lr": {"normal": [0, 1]}}, "one of loguniform, uniform, int, choice"),
    ({"batch_size": {"int": [0, 64]}}, "search.space.batch_size: value 0 does not make a valid job"),
    ({"batch_size": {"uniform": [16, 128]}}, "a whole-number field: use int: [low, high]"),
    ({"hidden": {"choice": [[64]]}}, "choice needs a list of at least 2 values"),
    ({"optimizer": {"choice": ["adam", "lion"]}}, "search.space.optimizer: value 'lion' does not make a valid job"),
])
def test_a_space_that_could_ask_for_an_invalid_job_is_refused_at_the_edge(space, says):
    with pytest.raises(JobSpecError, match="sweep.yaml") as e:
        sweep_spec(space=space)
    assert says in str(e.value)


def test_search_goes_with_a_sweep_only_and_a_sweep_needs_one():
    d = copy.deepcopy(BASE)
    d.pop("type")
    with pytest.raises(JobSpecError, match="search: only for a sweep"):
        JobSpec.from_dict(d)
    d = copy.deepcopy(BASE)
    d.pop("search")
    with pytest.raises(JobSpecError, match="search: required for type: sweep"):
        JobSpec.from_dict(d)
    with pytest.raises(JobSpecError, match="parallel"):
        sweep_spec(trials=2, parallel=3)
    with pytest.raises(JobSpecError, match="val_mse is a regression metric"):
        sweep_spec(metric="val_mse")


def test_a_training_jobs_dict_is_what_it_was():
    d = copy.deepcopy(BASE)
    d.pop("type"), d.pop("search")
    assert set(JobSpec.from_dict(d).to_dict()) == {"name", "task", "model", "data", "training", "swarm",
                                                   "aggregation", "verification", "privacy", "tracking"}


def test_asking_is_reproducible_from_the_records_whoever_leads():
    search = sweep_spec().search
    history = {0: done(0, 0.9), 1: done(1, 0.8, {"lr": 0.005, "hidden": "[128, 64]"})}
    first, again = ask(search, history, 2), ask(search, dict(history), 2)
    assert first == again  # a new leader rebuilding the study asks for the same trial
    assert 1e-4 <= first["lr"] <= 1e-2 and first["hidden"] in ("[64]", "[128, 64]")
    assert ask(search, history, 3) != first  # each number draws its own
    assert len(rebuild_study(search, {**history, 2: done(2, 0.5, state="pruned")}).trials) == 3


def test_trial_job_ids_follow_sweep_number_and_parameters():
    a = trial_job_id("0" * 24, 1, {"lr": 0.001})
    assert a == trial_job_id("0" * 24, 1, {"lr": 0.001}) and len(a) == 24
    assert len({a, trial_job_id("0" * 24, 2, {"lr": 0.001}), trial_job_id("0" * 24, 1, {"lr": 0.002})}) == 3


def test_the_median_pruner_stops_a_trial_below_the_median_of_finished_ones():
    search = sweep_spec().search
    finished = {0: done(0, 0.9, curve={1: 0.7, 2: 0.85, 3: 0.9}), 1: done(1, 0.88, curve={1: 0.6, 2: 0.8, 3: 0.88})}
    poor = TrialView(number=2, job_id="2" * 24, params={"lr": 1e-4, "hidden": "[64]"}, intermediate={1: 0.2, 2: 0.3})
    good = TrialView(number=3, job_id="3" * 24, params={"lr": 1e-3, "hidden": "[64]"}, intermediate={1: 0.7, 2: 0.9})
    early = TrialView(number=4, job_id="4" * 24, params={"lr": 1e-4, "hidden": "[64]"}, intermediate={1: 0.1})
    trials = {**finished, 2: poor, 3: good, 4: early}
    assert should_prune(search, trials, poor)
    assert not should_prune(search, trials, good)
    assert not should_prune(search, trials, early)  # round 1 is warm-up: too early to judge
    assert not should_prune(search, {2: poor}, poor)  # too few finished trials to judge against
    assert not should_prune(sweep_spec(pruner="none").search, trials, poor)


def test_trials_start_up_to_parallel_and_stop_at_the_count():
    search = sweep_spec(trials=3, parallel=2).search
    assert trials_to_ask(search, {}) == [0, 1]
    running = TrialView(number=1, job_id="1" * 24, params={})
    assert trials_to_ask(search, {0: done(0, 0.9), 1: running}) == [2]
    assert trials_to_ask(search, {0: done(0, 0.9), 1: running, 2: running}) == []
    # a gap (a number another leader's record left out) is filled; a number with a record never again
    assert trials_to_ask(search, {0: done(0, 0.9), 2: running}) == [1]
    assert not sweep_done(search, {0: done(0, 0.9), 1: running, 2: done(2, 0.5)})
    assert sweep_done(search, {0: done(0, 0.9), 1: done(1, 0.4, state="pruned"), 2: done(2, 0.5, state="failed")})


def test_best_trial_follows_the_direction_and_skips_unfinished_ones():
    trials = {0: done(0, 0.8), 1: done(1, 0.95, state="pruned"), 2: done(2, 0.9), 3: done(3, 0.9)}
    assert best_trial(sweep_spec().search, trials).number == 2  # the lower number on a tie
    assert best_trial(sweep_spec(metric="val_loss").search, trials).number == 0  # minimize
    assert best_trial(sweep_spec().search, {1: trials[1]}) is None


def test_records_of_two_leaders_merge_into_one_trial_per_number():
    started = TrialView(number=0, job_id="a" * 24, params={"lr": 0.001}, author="peerA")
    finished = TrialView(number=0, job_id="a" * 24, params={"lr": 0.001}, state="complete", value=0.9,
                         intermediate={1: 0.9}, author="peerB")  # the next leader marked it complete
    rival = TrialView(number=0, job_id="b" * 24, params={"lr": 0.002}, author="peerC")  # a leader's twin
    merged = merge_trial_records([rival, started, finished])
    assert merged[0].job_id == "a" * 24 and merged[0].state == "complete"


def test_the_table_and_plot_show_every_trial():
    search = sweep_spec().search
    trials = {0: done(0, 0.8), 1: done(1, 0.9, {"lr": 0.004, "hidden": "[128, 64]"}),
              2: done(2, None, state="pruned", curve={1: 0.2, 2: 0.3})}
    rows = trials_table(search, trials)
    assert [r["trial"] for r in rows] == [0, 1, 2] and [r["best"] for r in rows] == [False, True, False]
    assert rows[1]["param_hidden"] == [128, 64] and rows[2]["val_accuracy"] is None
    csv = table_csv(rows).splitlines()
    assert csv[0].startswith("trial,job_id,state,val_accuracy,rounds,best,param_hidden,param_lr") and len(csv) == 4
    assert trials_plot(search, trials)[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_lowest_live_lease_holder_leads():
    assert sweep_leader({"b", "a"}, {"a", "b", "c"}) == "a"
    assert sweep_leader({"b", "a"}, {"b", "c"}) == "b"  # a's lease outlived its heartbeat: not a leader
    assert sweep_leader(set(), {"a"}) is None


def test_a_sweep_with_a_budget_is_refused_in_one_line():
    from swarm.client import SweepUnpaid, price_per_sample

    with pytest.raises(SweepUnpaid, match="a sweep cannot be paid yet"):
        price_per_sample(sweep_spec(), budget=100.0)
