"""Stage `promote`: register the better evaluated model and move the registry's aliases.

    python -m pipeline promote

`candidate` points at the better of dp and ddp on `promote.metric`; `champion` moves only when the
candidate beats it by `promote.min_improvement`. The whole decision goes to `metrics/promotion.json`
(its numbers to `metrics/promote.json`). The same inputs twice change nothing.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.config import PROMOTION_METRICS, STRATEGIES, Params
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_json
from pipeline.paths import Paths
from pipeline.registry import CANDIDATE, CHAMPION, existing_run, read_run_info

RECORD_TAG = "promotion_record"
SOURCE_RUN_TAG = "source_run_id"
# |a - b| below this counts as equal: 0.80 + 0.05 must reach 0.85.
_EPSILON = 1e-9


def read_evaluations(paths: Paths, metric: str) -> dict[str, dict[str, Any]]:
    """{strategy: {"eval": eval JSON, "run": run.json}} for every strategy that has been evaluated."""
    found: dict[str, dict[str, Any]] = {}
    for strategy in STRATEGIES:
        eval_file = paths.eval_metrics(strategy)
        if not eval_file.is_file():
            continue
        try:
            figures = json.loads(eval_file.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{eval_file} is not valid JSON: run `dvc repro -f evaluate@{strategy}`") from None
        value = figures.get(metric) if isinstance(figures, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{eval_file} has no number {metric!r} (promote.metric): run `dvc repro -f evaluate@{strategy}`")
        found[strategy] = {"eval": figures, "value": float(value), "run": read_run_info(paths.model_dir(strategy), strategy)}
    if not found:
        raise UserError(
            f"no evaluation to promote ({paths.eval_metrics('dp')} and {paths.eval_metrics('ddp')} are missing): "
            "run `dvc repro evaluate@dp` (or evaluate@ddp) first"
        )
    return found


def pick_candidate(values: dict[str, float]) -> str:
    """The strategy with the highest value; a tie goes to the one first in STRATEGIES (dp)."""
    ordered = [s for s in STRATEGIES if s in values]
    return max(ordered, key=lambda s: values[s])  # max keeps the first of equal values


def decide(candidate_value: float, champion_value: float | None, min_improvement: float, metric: str) -> tuple[str, str]:
    """(decision, reason) for a candidate that is not the champion version itself."""
    if champion_value is None:
        return "promoted", f"the champion has no recorded {metric}: the candidate ({candidate_value:.4f}) replaces it"
    improvement = candidate_value - champion_value
    if improvement > _EPSILON and improvement >= min_improvement - _EPSILON:
        return "promoted", (
            f"candidate {metric}={candidate_value:.4f} beats the champion's {champion_value:.4f} by {improvement:.4f} "
            f"(min_improvement {min_improvement:g})"
        )
    if improvement <= _EPSILON:
        relation = "equals" if abs(improvement) <= _EPSILON else "is below"
        return "kept_champion", f"candidate {metric}={candidate_value:.4f} {relation} the champion's {champion_value:.4f}"
    return "kept_champion", (
        f"candidate {metric}={candidate_value:.4f} beats the champion's {champion_value:.4f} by only {improvement:.4f}, "
        f"less than min_improvement {min_improvement:g}"
    )


# --- the registry --------------------------------------------------------------------------------


def _version_of_run(client, name: str, run_id: str):
    """The existing version registered from `run_id` (the oldest, should there be several), or None."""
    matches = [
        v for v in client.search_model_versions(f"name='{name}'")
        if v.run_id == run_id or (v.tags or {}).get(SOURCE_RUN_TAG) == run_id
    ]
    return min(matches, key=lambda v: int(v.version)) if matches else None


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import unreachable

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:  # no such alias (or no such registered model yet)
        if unreachable(err):
            raise
        return None


def _metric_of_version(client, version, metric: str) -> float | None:
    """A version's `metric`: its tag, else its run's logged metric, else None."""
    tag = (version.tags or {}).get(metric)
    if tag is not None:
        try:
            return float(tag)
        except ValueError:
            pass
    if version.run_id:
        from mlflow.exceptions import MlflowException

        from pipeline.tracking import unreachable

        try:
            value = client.get_run(version.run_id).data.metrics.get(metric)
        except MlflowException as err:
            if unreachable(err):
                raise
            return None
        return None if value is None else float(value)
    return None


def _version_tags(run, strategy: str, figures: dict[str, Any]) -> dict[str, str]:
    tags = {
        "strategy": strategy,
        "world_size": run.data.tags.get("world_size", "unknown"),
        "git_commit": run.data.tags.get("git_commit", "unknown"),
        SOURCE_RUN_TAG: run.info.run_id,
    }
    tags.update({m: repr(float(figures[m])) for m in PROMOTION_METRICS if isinstance(figures.get(m), (int, float))})
    return tags


def _recorded(version) -> dict | None:
    try:
        record = json.loads((version.tags or {}).get(RECORD_TAG, ""))
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


# What a decision depends on: the same inputs give the same record. Then what it decided.
_INPUT_KEYS = (
    "registered_model", "metric", "min_improvement", "candidate_strategy", "candidate_run_id", "candidate_value", "version", "evaluated",
)
_OUTPUT_KEYS = ("decision", "promoted", "champion_version", "previous_champion_version", "champion_value", "improvement", "reason")


def _register(client, name: str, model_uri: str, tags: dict[str, str]) -> tuple[Any, bool]:
    """(version, newly registered?): the training run's existing version, else a new one."""
    import mlflow

    version = _version_of_run(client, name, tags[SOURCE_RUN_TAG])
    if version is None:
        version = mlflow.register_model(model_uri, name, tags=tags)
        return client.get_model_version(name, str(version.version)), True
    for key, value in tags.items():  # the candidate's figures as evaluated now
        client.set_model_version_tag(name, str(version.version), key, value)
    return client.get_model_version(name, str(version.version)), False


def _decision(client, name: str, inputs: dict[str, Any], version) -> tuple[dict[str, Any], bool]:
    """(record, replayed?): compare the candidate `version` with the current champion."""
    number, metric, value = inputs["version"], inputs["metric"], inputs["candidate_value"]
    champion = _alias_version(client, name, CHAMPION)
    if champion is None:
        reason = f"no champion yet: version {number} ({inputs['candidate_strategy']}, {metric}={value:.4f}) becomes the champion"
        outputs = dict(decision="first_champion", promoted=1, champion_version=number, previous_champion_version=None,
                       champion_value=None, improvement=None, reason=reason)
    elif int(champion.version) == number:
        previous = _recorded(version)
        if previous is not None and previous.get("champion_version") == number and all(previous.get(k) == inputs[k] for k in _INPUT_KEYS):
            return {k: previous[k] for k in (*_INPUT_KEYS, *_OUTPUT_KEYS)}, True  # the decision that made it champion
        outputs = dict(decision="already_champion", promoted=0, champion_version=number, previous_champion_version=number,
                       champion_value=value, improvement=0.0, reason=f"version {number} already is the champion")
    else:
        champion_value = _metric_of_version(client, champion, metric)
        decision, reason = decide(value, champion_value, inputs["min_improvement"], metric)
        promoted = decision == "promoted"
        outputs = dict(decision=decision, promoted=int(promoted), champion_version=number if promoted else int(champion.version),
                       previous_champion_version=int(champion.version), champion_value=champion_value,
                       improvement=None if champion_value is None else value - champion_value, reason=reason)
    return {**inputs, **outputs}, False


def write_outputs(paths: Paths, record: dict[str, Any]) -> None:
    """The whole record to promotion.json; its numbers, which `dvc metrics` and `dvc exp show`
    compare across experiments, to promote.json."""
    atomic_write_json(paths.promotion, record)
    atomic_write_json(paths.promote_metrics, {k: record[k] for k in ("promoted", "version", "champion_version", "improvement")})


def run_promote(params: Params, paths: Paths) -> dict[str, Any]:
    """The stage's entry point; returns what it wrote to promotion.json."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import configure, tracked_run

    metric, min_improvement, name = params.promote.metric, params.promote.min_improvement, params.mlflow.registered_model
    evaluations = read_evaluations(paths, metric)
    values = {s: e["value"] for s, e in evaluations.items()}
    strategy = pick_candidate(values)
    chosen = evaluations[strategy]
    run_id = chosen["run"]["run_id"]

    configure(params.mlflow.experiment)
    client = MlflowClient()
    for each, evaluation in evaluations.items():
        existing_run(evaluation["run"], paths.model_dir(each), each)
        if client.get_run(evaluation["run"]["run_id"]).data.tags.get("evaluated") != "true":
            raise UserError(
                f"{paths.eval_metrics(each)} does not belong to the training in {paths.model_dir(each) / 'run.json'} "
                f"(run {evaluation['run']['run_id']} was never evaluated): run `dvc repro evaluate@{each}` first"
            )

    run_params = {"promote.metric": metric, "promote.min_improvement": min_improvement, "mlflow.registered_model": name}
    tags = _version_tags(client.get_run(run_id), strategy, chosen["eval"])
    version, registered = _register(client, name, chosen["run"]["model_uri"], tags)
    number = int(version.version)
    inputs = {
        "registered_model": name,
        "metric": metric,
        "min_improvement": min_improvement,
        "candidate_strategy": strategy,
        "candidate_run_id": run_id,
        "candidate_value": values[strategy],
        "version": number,
        "evaluated": {s: values[s] for s in STRATEGIES if s in values},
    }
    record, replayed = _decision(client, name, inputs, version)
    current_candidate = _alias_version(client, name, CANDIDATE)
    if replayed and not registered and current_candidate is not None and int(current_candidate.version) == number:
        # The same inputs were decided before: the registry already says so. Touch nothing, not
        # even the MLflow record of promotions.
        write_outputs(paths, record)  # byte-identical; restores a deleted file
        print(f"promote: nothing to change: {name} version {number} ({strategy}) was already decided: {record['decision']}")
        return record

    with tracked_run(params.mlflow.experiment, "promote", params=run_params, tags={"candidate_strategy": strategy}):
        client.set_registered_model_alias(name, CANDIDATE, str(number))
        if record["promoted"] and not replayed:
            client.set_registered_model_alias(name, CHAMPION, str(number))
        decision_tags = {
            "promotion_decision": record["decision"],
            "promotion_reason": record["reason"],
            "promotion_metric": metric,
            "promotion_min_improvement": repr(min_improvement),
            RECORD_TAG: json.dumps(record),  # key order kept: a replay writes the same bytes
        }
        for key, value in decision_tags.items():
            client.set_model_version_tag(name, str(number), key, value)

        write_outputs(paths, record)
        mlflow.set_tags({
            "promotion_decision": record["decision"],
            "model_version": str(number),
            "registered_new_version": str(registered).lower(),
            "replayed_decision": str(replayed).lower(),
        })
        figures = ("candidate_value", "champion_value", "improvement", "promoted", "version", "champion_version")
        mlflow.log_metrics({k: float(record[k]) for k in figures if record[k] is not None})
        mlflow.log_artifact(str(paths.promotion))

    print(
        f"promote: {name} version {number} ({strategy}, {metric}={values[strategy]:.4f}) is the candidate; "
        f"{record['decision']}: {record['reason']}; the champion is version {record['champion_version']}"
    )
    return record
