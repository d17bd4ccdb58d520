"""The promotion gate: MLflow's model validation of a candidate against the champion, both measured
on the candidate's evaluation data, and the record of what it decided and why.

Used by `promote`. The validation figures decide (`promote.metric`, by `promote.min_improvement`);
the external test set, when there is one, guards (`promote.external_metric` must not get worse),
and decides alone when the champion trained on the candidate's validation images.
"""

from __future__ import annotations

from typing import Any

from pipeline.champion import score_champion
from pipeline.paths import Paths

# |a - b| below this counts as equal: 0.80 + 0.05 must reach 0.85.
EPSILON = 1e-9


def validate(
    candidate: dict[str, float],
    champion: dict[str, float],
    deciding: str,
    guard: str | None,
    min_improvement: float,
) -> str | None:
    """MLflow's model validation: `deciding` must beat the champion's by `min_improvement`, and
    `guard` (the external metric) must not fall below the champion's. None if it passes, else why not."""
    import mlflow
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    # MetricThreshold takes only a positive change: EPSILON makes a tie fail and lets 0.70 + 0.05 reach 0.75.
    change = max(min_improvement - EPSILON, EPSILON)
    thresholds = {deciding: MetricThreshold(min_absolute_change=change, greater_is_better=True)}
    if guard is not None:
        thresholds[guard] = MetricThreshold(threshold=champion[guard] - EPSILON, greater_is_better=True)
    try:
        mlflow.validate_evaluation_results(
            thresholds, EvaluationResult(candidate, {}, run_id=""), EvaluationResult(champion, {}, run_id="")
        )
    except ModelValidationFailedException as failed:
        return " ".join(failed.message.split())
    return None


def verdict(candidate: float, champion: float, min_improvement: float, metric: str) -> str:
    improvement = candidate - champion
    if improvement > EPSILON and improvement >= min_improvement - EPSILON:
        return (
            f"candidate {metric}={candidate:.4f} beats the champion's {champion:.4f} by {improvement:.4f} "
            f"(min_improvement {min_improvement:g})"
        )
    if improvement <= EPSILON:
        relation = "equals" if abs(improvement) <= EPSILON else "is below"
        return f"candidate {metric}={candidate:.4f} {relation} the champion's {champion:.4f}"
    return (
        f"candidate {metric}={candidate:.4f} beats the champion's {champion:.4f} by only {improvement:.4f}, "
        f"less than min_improvement {min_improvement:g}"
    )


def outputs(decision: str, number: int, champion: int | None, reason: str, **figures: Any) -> dict[str, Any]:
    """The decision's part of a promotion record; `figures` fills in what the comparison measured."""
    promoted = decision in ("promoted", "first_champion")
    base = {
        "decision": decision,
        "promoted": int(promoted),
        "champion_version": number if promoted else champion,
        "previous_champion_version": champion,
        "champion_value": None,
        "champion_external_value": None,
        "improvement": None,
        "decided_on": None,
        "compared_on": {},
        "validation": None,
        "reason": reason,
    }
    return {**base, **figures}


def split_of(metric: str) -> str:
    """The evaluation split a metric is measured on: `external_*` on the external set, else validation."""
    return "external" if metric.startswith("external_") else "val"


def _not_compared(inputs: dict[str, Any], previous: int, scores: dict, figures: dict) -> dict[str, Any]:
    number, model = inputs["version"], inputs["registered_model"]
    refused = "; ".join(f"{s.split}: {s.how}" for s in scores.values() if s.metrics is None)
    by_hand = f"MlflowClient().set_registered_model_alias({model!r}, 'champion', '{number}')"
    reason = (
        f"version {previous} (the champion) cannot be measured on the candidate's data ({refused}): it"
        f" stays the champion, as no comparison was made; if you trust version {number}, move the alias"
        f" by hand: {by_hand}"
    )
    return outputs("not_compared", number, previous, reason, **figures)


def compare(
    inputs: dict[str, Any], champion, manifest: dict, paths: Paths, batch_size: int
) -> dict[str, Any]:
    """Outputs of comparing the candidate with `champion`, both measured on the candidate's data.

    `inputs["metric"]` decides; `inputs["external_metric"]` (None: no guard) must not get worse."""
    metric, guard, previous = inputs["metric"], inputs["external_metric"], int(champion.version)
    wanted: dict[str, list[str]] = {split_of(metric): [metric]}
    if guard is not None:
        wanted.setdefault(split_of(guard), []).append(guard)
    scores = {
        split: score_champion(champion, manifest, paths, split, names, batch_size)
        for split, names in wanted.items()
    }
    champion_figures = {k: v for score in scores.values() for k, v in (score.metrics or {}).items()}
    candidate = {
        metric: inputs["candidate_value"],
        **({guard: inputs["candidate_external_value"]} if guard else {}),
    }
    figures: dict[str, Any] = {"compared_on": {split: score.record() for split, score in scores.items()}}
    if metric in champion_figures:
        figures.update(
            champion_value=champion_figures[metric], improvement=candidate[metric] - champion_figures[metric]
        )
    if guard is not None and guard in champion_figures:
        figures["champion_external_value"] = champion_figures[guard]
    primary = scores[split_of(metric)]
    if all(score.metrics is not None for score in scores.values()):
        deciding, guarded, prefix = metric, guard, ""
    elif primary.leaked and guard is not None and guard in champion_figures:
        # The external images are nobody's training data: the one fair comparison left.
        deciding, guarded = guard, None
        prefix = (
            f"the validation figures cannot be compared ({primary.how}); decided on the external test set: "
        )
    else:
        return _not_compared(inputs, previous, scores, figures)
    failure = validate(candidate, champion_figures, deciding, guarded, inputs["min_improvement"])
    reason = prefix + verdict(
        candidate[deciding], champion_figures[deciding], inputs["min_improvement"], deciding
    )
    if guarded is not None:
        worse = candidate[guarded] < champion_figures[guarded] - EPSILON
        relation = "is below" if worse else "is no worse than"
        reason += (
            f"; {guarded}={candidate[guarded]:.4f} {relation} the champion's {champion_figures[guarded]:.4f}"
        )
    reason += " (" + "; ".join(f"{s.split}: {s.how}" for s in scores.values()) + ")"
    figures.update(decided_on=deciding, validation=failure or "passed")
    return outputs("kept_champion" if failure else "promoted", inputs["version"], previous, reason, **figures)
