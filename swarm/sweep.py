"""Sweeps: a hyperparameter search over a job, as pure functions around Optuna's ask-and-tell.

A sweep job holds a base job and a search space (``SearchSpec``, the job file's ``search:``).
Each trial is an ordinary job whose spec is the base with the trial's parameters put in
(``trial_spec``), trained by whichever peers pick it. The study is kept nowhere but in the trial
records in the DHT: the peer that leads the sweep rebuilds it from them at every step
(``rebuild_study``), asks for new trials (``ask``), and decides pruning (``should_prune``) from
the rounds each trial's peers merged. A leader that dies loses nothing: the next one reads the
same records. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
METRICS = ("val_accuracy", "val_loss", "val_mse", "val_mae", "train_loss")
PARAM_SECTIONS = ("training", "model", "aggregation")
TRIAL_STATES = ("running", "complete", "pruned", "failed")
MAX_TRIALS = 1000


class SearchSpec(BaseModel):
    """What a sweep searches: ``space`` maps a parameter (``lr``, or a dotted ``training.lr``) to
    one distribution: ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}``, ``{int: [lo, hi]}`` or
    ``{choice: [a, b, ...]}``."""

    model_config = ConfigDict(extra="forbid")

    space: dict[str, dict[str, Any]] = Field(min_length=1)
    trials: PositiveInt = Field(le=MAX_TRIALS)
    parallel: PositiveInt = 1  # trials running at once, each an ordinary job in the swarm
    metric: Literal["val_accuracy", "val_loss", "val_mse", "val_mae", "train_loss"] = "val_accuracy"
    direction: Literal["maximize", "minimize"] | None = None  # default: maximize accuracy, minimize the rest
    pruner: Literal["median", "none"] = "median"  # median: stop a trial worse than the median at a round
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        for name, dist in self.space.items():
            problem = _distribution_problem(dist)
            if problem:
                raise ValueError(f"space.{name}: {problem}")
        if self.parallel > self.trials:
            raise ValueError(f"parallel ({self.parallel}) must not exceed trials ({self.trials})")
        if self.direction is None:
            self.direction = "maximize" if self.metric == "val_accuracy" else "minimize"
        return self


def _distribution_problem(dist: Any) -> str | None:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        return f"one of {', '.join(DISTRIBUTIONS)} with its values, e.g. {{loguniform: [1.0e-4, 1.0e-2]}}"
    kind, values = next(iter(dist.items()))
    if kind == "choice":
        if not isinstance(values, list) or len(values) < 2:
            return "choice needs a list of at least 2 values"
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            return "choice values must be distinct"
        return None
    if not isinstance(values, list) or len(values) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return f"{kind} needs [low, high], two finite numbers"
    low, high = values
    if not low < high:
        return f"{kind}: low ({low}) must be below high ({high})"
    if kind == "loguniform" and low <= 0:
        return "loguniform: low must be > 0"
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        return "int: low and high must be whole numbers"
    return None


class SpaceError(ValueError):
    """A search parameter that names no field of the job, or names one ambiguously."""


def param_path(name: str, fields: dict[str, set[str]]) -> tuple[str, str]:
    """(section, field) of a search parameter: ``training.lr`` as written, or a bare ``lr`` found in
    exactly one of the sections (training, model, aggregation; ``fields`` lists each one's fields)."""
    if "." in name:
        section, _, key = name.partition(".")
        if section not in PARAM_SECTIONS or key not in fields.get(section, set()):
            raise SpaceError(f"{name!r} is not a field of {' / '.join(PARAM_SECTIONS)}")
        return section, key
    found = [s for s in PARAM_SECTIONS if name in fields.get(s, set())]
    if not found:
        raise SpaceError(f"{name!r} is not a field of {' / '.join(PARAM_SECTIONS)}")
    if len(found) > 1:
        raise SpaceError(f"{name!r} is in both {found[0]} and {found[1]}: write {found[0]}.{name}")
    return found[0], name


def distributions(search: SearchSpec) -> dict:
    """The space as Optuna distributions (a choice of lists or mappings is offered as JSON text,
    since Optuna's categorical values are scalars)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for name, dist in search.space.items():
        kind, values = next(iter(dist.items()))
        if kind == "choice":
            out[name] = CategoricalDistribution([_encode(v) for v in values])
        elif kind == "int":
            out[name] = IntDistribution(int(values[0]), int(values[1]))
        else:
            out[name] = FloatDistribution(float(values[0]), float(values[1]), log=kind == "loguniform")
    return out


def _encode(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def decode_params(search: SearchSpec, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's Optuna values as the job file's values (JSON-text choices back to lists)."""
    out = {}
    for name, value in params.items():
        kind, values = next(iter(search.space[name].items()))
        if kind == "choice" and isinstance(value, str) and any(isinstance(v, (list, dict)) for v in values):
            value = json.loads(value)
        out[name] = value
    return out


def trial_spec(base: dict, params: dict[str, Any], fields: dict[str, set[str]]) -> dict:
    """The trial's job: the sweep's base job with the (decoded) parameters put in; no ``search``."""
    spec = json.loads(json.dumps(base))
    spec.pop("search", None)
    spec.pop("type", None)
    for name, value in params.items():
        section, key = param_path(name, fields)
        spec.setdefault(section, {})[key] = value
    return spec


def trial_job_id(sweep_id: str, number: int, params: dict[str, Any]) -> str:
    """A trial's job id: the same for the same sweep, number and parameters, whoever publishes it."""
    canonical = json.dumps([sweep_id, number, params], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class TrialView:
    """One trial as the swarm's records say: its parameters (Optuna's values), its job, how far it is."""

    number: int
    job_id: str
    params: dict[str, Any]
    state: str = "running"  # running | complete | pruned | failed
    value: float | None = None  # the metric of its final model (complete trials)
    intermediate: dict[int, float] = field(default_factory=dict)  # round -> the metric of its merged model
    author: str = ""  # the peer that published the trial record


def merge_trial_records(records: list[TrialView]) -> dict[int, TrialView]:
    """One view per trial number. Two leaders may (for a moment) both publish a number: the lowest
    author's job is the trial, the other is ignored; of that job's records, the furthest state wins
    (a later leader marks complete what an earlier one started)."""
    by_number: dict[int, list[TrialView]] = {}
    for t in records:
        by_number.setdefault(t.number, []).append(t)
    merged = {}
    for number, views in by_number.items():
        job_id = min(views, key=lambda t: (t.author, t.job_id)).job_id
        same = [t for t in views if t.job_id == job_id]
        merged[number] = max(same, key=lambda t: (t.state != "running", len(t.intermediate), t.author))
    return merged


def _study(search: SearchSpec, number: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = search.seed * MAX_TRIALS + number  # each ask draws its own, reproducible numbers
    sampler = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, search.trials))
               if search.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed))
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
              if search.pruner == "median" else optuna.pruners.NopPruner())
    return optuna.create_study(direction=search.direction, sampler=sampler, pruner=pruner)


def rebuild_study(search: SearchSpec, trials: dict[int, TrialView], number: int = 0):
    """An in-memory Optuna study holding every finished trial (complete ones with their value,
    pruned ones with the rounds they ran), in trial-number order."""
    from optuna.trial import TrialState, create_trial

    study, dists = _study(search, number), distributions(search)
    for t in sorted(trials.values(), key=lambda t: t.number):
        if t.state == "complete" and t.value is not None:
            study.add_trial(create_trial(params=t.params, distributions=dists, value=t.value,
                                         intermediate_values=t.intermediate))
        elif t.state == "pruned":
            study.add_trial(create_trial(params=t.params, distributions=dists, state=TrialState.PRUNED,
                                         intermediate_values=t.intermediate))
    return study


def ask(search: SearchSpec, trials: dict[int, TrialView], number: int) -> dict[str, Any]:
    """Trial ``number``'s parameters (Optuna's values), asked of the study the records rebuild."""
    study = rebuild_study(search, trials, number)
    return dict(study.ask(distributions(search)).params)


def should_prune(search: SearchSpec, trials: dict[int, TrialView], trial: TrialView) -> bool:
    """Whether the pruner stops a running trial at the last round it merged."""
    from optuna.trial import TrialState, create_trial

    if search.pruner == "none" or not trial.intermediate:
        return False
    study = rebuild_study(search, {n: t for n, t in trials.items() if n != trial.number})
    frozen = create_trial(state=TrialState.RUNNING, params=trial.params, distributions=distributions(search),
                          intermediate_values=trial.intermediate)
    return bool(study.pruner.prune(study, frozen))


def trials_to_ask(search: SearchSpec, trials: dict[int, TrialView]) -> list[int]:
    """The trial numbers to start now, lowest first: up to ``parallel`` running, each number below
    ``trials`` once (a number that has a record is never asked again)."""
    running = sum(t.state == "running" for t in trials.values())
    free = [n for n in range(search.trials) if n not in trials]
    return free[:max(search.parallel - running, 0)]


def params_in_space(search: SearchSpec, params: dict[str, Any]) -> bool:
    """Whether a record's parameters are one point of the space (every name, each value inside)."""
    if set(params) != set(search.space):
        return False
    for name, dist in distributions(search).items():
        try:
            if not dist._contains(dist.to_internal_repr(params[name])):
                return False
        except (ValueError, TypeError, KeyError):
            return False
    return True


def sweep_done(search: SearchSpec, trials: dict[int, TrialView]) -> bool:
    return len(trials) >= search.trials and all(t.state != "running" for t in trials.values())


def best_trial(search: SearchSpec, trials: dict[int, TrialView]) -> TrialView | None:
    """The complete trial with the best value (the lower number on a tie)."""
    complete = [t for t in trials.values() if t.state == "complete" and t.value is not None]
    if not complete:
        return None
    sign = -1.0 if search.direction == "maximize" else 1.0
    return min(complete, key=lambda t: (sign * t.value, t.number))


def metric_of(summary: dict, metric: str) -> float | None:
    """A round's (or a report's final) value of the sweep's metric, when it has one."""
    value = summary.get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def trials_table(search: SearchSpec, trials: dict[int, TrialView]) -> list[dict]:
    """One row per trial, in number order: its parameters, state, value and rounds."""
    best = best_trial(search, trials)
    return [{"trial": t.number, "job_id": t.job_id, "state": t.state, search.metric: t.value,
             "rounds": len(t.intermediate), "best": best is not None and t.number == best.number,
             **{f"param_{k}": v for k, v in sorted(decode_params(search, t.params).items())}}
            for t in sorted(trials.values(), key=lambda t: t.number)]


def table_csv(rows: list[dict]) -> str:
    import csv

    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return out.getvalue()


def trials_plot(search: SearchSpec, trials: dict[int, TrialView]) -> bytes:
    """A PNG: each trial's metric by round (pruned ones dashed), and the final value by trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, finals) = plt.subplots(1, 2, figsize=(10, 4))
    best = best_trial(search, trials)
    for t in sorted(trials.values(), key=lambda t: t.number):
        rounds = sorted(t.intermediate)
        style = "--" if t.state == "pruned" else "-"
        width = 2.5 if best is not None and t.number == best.number else 1.0
        curves.plot(rounds, [t.intermediate[r] for r in rounds], style, linewidth=width, label=f"trial {t.number}")
    curves.set(xlabel="round", ylabel=search.metric, title="by round (dashed: pruned)")
    curves.legend(fontsize=7)
    done = [t for t in sorted(trials.values(), key=lambda t: t.number) if t.value is not None]
    finals.scatter([t.number for t in done], [t.value for t in done])
    if best is not None:
        finals.scatter([best.number], [best.value], marker="*", s=200, label="best")
        finals.legend(fontsize=7)
    finals.set(xlabel="trial", ylabel=search.metric, title=f"final ({search.direction})")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=80)
    plt.close(fig)
    return out.getvalue()
