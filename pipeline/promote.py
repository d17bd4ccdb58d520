"""Stage `promote`: register the better evaluated model and move the registry's aliases.

    python -m pipeline promote

`candidate` points at the better of dp and ddp on `promote.metric`. `champion` moves only when
MLflow's model validation passes the candidate against the champion measured on the candidate's own
evaluation data (pipeline/champion.py); a comparison that cannot be made promotes nothing and says
why. One promote at a time per model; the same inputs twice change nothing. The whole decision goes
to `metrics/promotion.json` (its numbers to `metrics/promote.json`).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.aliases import (
    SOURCE_RUN_TAG,
    alias_number,
    alias_version,
    apply_aliases,
    register,
    registry_lock,
)
from pipeline.config import EXTERNAL_METRICS, PROMOTION_METRICS, STRATEGIES, Params
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_json
from pipeline.gate import compare, outputs
from pipeline.lineage import fingerprint_tag, fingerprint_tags, log_splits, split_fingerprint
from pipeline.paths import Paths
from pipeline.registry import CANDIDATE, CHAMPION, existing_run, read_run_info
from pipeline.shards import read_manifest

RECORD_TAG = "promotion_record"
_ATTEMPTS = 5
"""Decisions retried when another promote moves the champion meanwhile (a remote tracking server)."""


def _number(figures: Any, key: str) -> float | None:
    value = figures.get(key) if isinstance(figures, dict) else None
    return None if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)


def read_evaluations(
    paths: Paths, metric: str, external_metric: str | None = None
) -> dict[str, dict[str, Any]]:
    """{strategy: {"eval", "value", "external", "run"}} for every strategy that has been evaluated;
    "external" is the external metric's value, None without an external test set."""
    found: dict[str, dict[str, Any]] = {}
    for strategy in STRATEGIES:
        eval_file = paths.eval_metrics(strategy)
        if not eval_file.is_file():
            continue
        try:
            figures = json.loads(eval_file.read_text())
        except json.JSONDecodeError:
            raise UserError(
                f"{eval_file} is not valid JSON: run `dvc repro -f evaluate@{strategy}`"
            ) from None
        value = _number(figures, metric)
        if value is None and metric.startswith("external_") and not _number(figures, "external_images"):
            raise UserError(
                f"promote.metric={metric!r} needs an external test set, and {eval_file} has none: set"
                " data.external_test (and run `dvc repro`), or choose a val_* metric"
            )
        if value is None:
            raise UserError(
                f"{eval_file} has no number {metric!r} (promote.metric):"
                f" run `dvc repro -f evaluate@{strategy}`"
            )
        external = (
            _number(figures, external_metric)
            if external_metric and _number(figures, "external_images")
            else None
        )
        found[strategy] = {
            "eval": figures,
            "value": value,
            "external": external,
            "run": read_run_info(paths.model_dir(strategy), strategy),
        }
    if not found:
        raise UserError(
            f"no evaluation to promote ({paths.eval_metrics('dp')} and {paths.eval_metrics('ddp')} are"
            " missing): run `dvc repro evaluate@dp` (or evaluate@ddp) first"
        )
    return found


def pick_candidate(values: dict[str, float]) -> str:
    """The strategy with the highest value; a tie goes to the one first in STRATEGIES (dp)."""
    ordered = [s for s in STRATEGIES if s in values]
    return max(ordered, key=lambda s: values[s])  # max keeps the first of equal values


# --- the record ----------------------------------------------------------------------------------


def _version_tags(run, strategy: str, figures: dict[str, Any], manifest: dict) -> dict[str, str]:
    """What a version records: where it came from, its figures, and the data they were measured on."""
    tags = {
        "strategy": strategy,
        "world_size": run.data.tags.get("world_size", "unknown"),
        "git_commit": run.data.tags.get("git_commit", "unknown"),
        SOURCE_RUN_TAG: run.info.run_id,
    }
    splits = ("val", "external") if _number(figures, "external_images") else ("val",)
    names = PROMOTION_METRICS + (EXTERNAL_METRICS if "external" in splits else ())
    tags.update({m: repr(float(figures[m])) for m in names if _number(figures, m) is not None})
    tags.update(fingerprint_tags(manifest, splits))
    return tags


def _recorded(version) -> dict | None:
    try:
        record = json.loads((version.tags or {}).get(RECORD_TAG, ""))
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


# What a decision depends on: the same inputs give the same record. Then what it decided.
_INPUT_KEYS = (
    "registered_model",
    "metric",
    "external_metric",
    "min_improvement",
    "candidate_strategy",
    "candidate_run_id",
    "candidate_value",
    "candidate_external_value",
    "version",
    "evaluated",
    "data_fingerprints",
)
_OUTPUT_KEYS = (
    "decision",
    "promoted",
    "champion_version",
    "previous_champion_version",
    "champion_value",
    "champion_external_value",
    "improvement",
    "decided_on",
    "compared_on",
    "validation",
    "reason",
)


# --- the decision --------------------------------------------------------------------------------


def _decision(
    client, name: str, inputs: dict[str, Any], version, manifest: dict, paths: Paths, batch_size: int
):
    """(record, replayed?): compare the candidate `version` with the current champion."""
    number, metric, value = inputs["version"], inputs["metric"], inputs["candidate_value"]
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        strategy = inputs["candidate_strategy"]
        reason = f"no champion yet: version {number} ({strategy}, {metric}={value:.4f}) becomes the champion"
        decided = outputs("first_champion", number, None, reason)
    elif int(champion.version) == number:
        previous = _recorded(version)
        if (
            previous is not None
            and previous.get("champion_version") == number
            and all(previous.get(k) == inputs[k] for k in _INPUT_KEYS)
        ):
            return {
                k: previous.get(k) for k in (*_INPUT_KEYS, *_OUTPUT_KEYS)
            }, True  # the decision that made it champion
        decided = outputs(
            "already_champion",
            number,
            number,
            f"version {number} already is the champion",
            champion_value=value,
            improvement=0.0,
        )
    else:
        decided = compare(inputs, champion, manifest, paths, batch_size)
    merged = {**inputs, **decided}
    return {k: merged[k] for k in (*_INPUT_KEYS, *_OUTPUT_KEYS)}, False  # one key order, fresh or replayed


def _check_evaluated(client, evaluations: dict[str, dict[str, Any]], manifest: dict, paths: Paths) -> None:
    """Every evaluation belongs to its training run and was measured on the shards there now."""
    for each, evaluation in evaluations.items():
        existing_run(evaluation["run"], paths.model_dir(each), each)
        tags = client.get_run(evaluation["run"]["run_id"]).data.tags
        if tags.get("evaluated") != "true":
            raise UserError(
                f"{paths.eval_metrics(each)} does not belong to the training in"
                f" {paths.model_dir(each) / 'run.json'} (run {evaluation['run']['run_id']} was never"
                f" evaluated): run `dvc repro evaluate@{each}` first"
            )
        for split in ("val", "external"):
            if manifest["splits"].get(split, {}).get("count") and tags.get(
                fingerprint_tag(split)
            ) != split_fingerprint(manifest, split):
                raise UserError(
                    f"{paths.eval_metrics(each)} was not measured on the {split} shards in {paths.shards}: "
                    f"run `dvc repro evaluate@{each}` first"
                )


def write_outputs(paths: Paths, record: dict[str, Any]) -> None:
    """The whole record to promotion.json; its numbers, which `dvc metrics` and `dvc exp show`
    compare across experiments, to promote.json."""
    atomic_write_json(paths.promotion, record)
    atomic_write_json(
        paths.promote_metrics,
        {k: record[k] for k in ("promoted", "version", "champion_version", "improvement")},
    )


def run_promote(params: Params, paths: Paths) -> dict[str, Any]:
    """The stage's entry point; returns what it wrote to promotion.json."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import configure

    cfg, name = params.promote, params.mlflow.registered_model
    evaluations = read_evaluations(paths, cfg.metric, cfg.external_metric)
    values = {s: e["value"] for s, e in evaluations.items()}
    strategy = pick_candidate(values)
    chosen = evaluations[strategy]
    manifest = read_manifest(paths.shards)

    configure(params.mlflow.experiment)
    client = MlflowClient()
    _check_evaluated(client, evaluations, manifest, paths)
    external = chosen["external"]
    inputs = {
        "registered_model": name,
        "metric": cfg.metric,
        "external_metric": cfg.external_metric
        if external is not None and cfg.external_metric != cfg.metric
        else None,
        "min_improvement": cfg.min_improvement,
        "candidate_strategy": strategy,
        "candidate_run_id": chosen["run"]["run_id"],
        "candidate_value": values[strategy],
        "candidate_external_value": external,
        "evaluated": {s: values[s] for s in STRATEGIES if s in values},
        "data_fingerprints": {
            split: split_fingerprint(manifest, split)
            for split in ("val", "external")
            if manifest["splits"].get(split, {}).get("count")
        },
    }
    tags = _version_tags(client.get_run(inputs["candidate_run_id"]), strategy, chosen["eval"], manifest)
    with registry_lock(name):
        version, registered = register(client, name, chosen["run"]["model_uri"], tags)
        inputs["version"] = int(version.version)
        for _ in range(_ATTEMPTS):
            record, replayed = _decision(
                client, name, inputs, version, manifest, paths, params.evaluate.batch_size
            )
            if replayed and not registered and alias_number(client, name, CANDIDATE) == record["version"]:
                # The same inputs were decided before: the registry already says so. Touch nothing, not
                # even the MLflow record of promotions.
                write_outputs(paths, record)  # byte-identical; restores a deleted file
                print(
                    f"promote: nothing to change: {name} version {record['version']} ({strategy}) was already"
                    f" decided: {record['decision']}"
                )
                return record
            if apply_aliases(client, name, record, replayed):
                break
        else:
            raise UserError(
                f"the {CHAMPION} alias of {name} kept moving while this promote decided: run it again"
            )
        _record(client, params, paths, record, registered, replayed, manifest)
    print(
        f"promote: {name} version {record['version']} ({strategy}, {cfg.metric}={values[strategy]:.4f})"
        f" is the candidate; {record['decision']}: {record['reason']}; the champion is version"
        f" {record['champion_version']}"
    )
    return record


def _record(
    client,
    params: Params,
    paths: Paths,
    record: dict[str, Any],
    registered: bool,
    replayed: bool,
    manifest: dict,
) -> None:
    """The decision on the version's tags, in promotion.json and in a `promote` MLflow run."""
    import mlflow

    from pipeline.tracking import tracked_run

    name, number, cfg = params.mlflow.registered_model, str(record["version"]), params.promote
    run_params = {
        "promote.metric": cfg.metric,
        "promote.min_improvement": cfg.min_improvement,
        "promote.external_metric": cfg.external_metric,
        "mlflow.registered_model": name,
    }
    with tracked_run(
        params.mlflow.experiment,
        "promote",
        params=run_params,
        tags={"candidate_strategy": record["candidate_strategy"]},
    ):
        decision_tags = {
            "promotion_decision": record["decision"],
            "promotion_reason": record["reason"][:5000],
            "promotion_metric": cfg.metric,
            "promotion_min_improvement": repr(cfg.min_improvement),
            RECORD_TAG: json.dumps(record),  # key order kept: a replay writes the same bytes
        }
        for key, value in decision_tags.items():
            client.set_model_version_tag(name, number, key, value)
        write_outputs(paths, record)
        log_splits(manifest, ("val", "external"))
        mlflow.set_tags(
            {
                "promotion_decision": record["decision"],
                "model_version": number,
                "registered_new_version": str(registered).lower(),
                "replayed_decision": str(replayed).lower(),
            }
        )
        figures = (
            "candidate_value",
            "champion_value",
            "candidate_external_value",
            "champion_external_value",
            "improvement",
            "promoted",
            "version",
            "champion_version",
        )
        mlflow.log_metrics({k: float(record[k]) for k in figures if record[k] is not None})
        mlflow.log_artifact(str(paths.promotion))
