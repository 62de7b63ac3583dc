"""The evaluation gate: ``evaluate.thresholds`` and ``evaluate.max_drop`` applied to evaluate's metrics.

Used by the evaluate stage (thresholds, after its outputs are written) and by
``graftline gate`` (thresholds, and the drop of test accuracy against a
baseline such as main's metrics/evaluate.json). Plain Python, no TensorFlow,
so the CI gate answers in well under a second.
"""
from __future__ import annotations

import json
from pathlib import Path

from components.errors import GraftlineError

# The metric whose drop against the baseline is limited by evaluate.max_drop.
DROP_METRIC = "accuracy"
# Rounding slack: metrics are written with 6 decimals.
EPSILON = 1e-9


def read_metrics(path: Path, what: str) -> dict:
    """A metrics/evaluate.json-style file, or one clear error naming ``what`` it was given as."""
    try:
        metrics = json.loads(Path(path).read_text())
    except FileNotFoundError:
        hint = ("give main's, e.g. git show main:metrics/evaluate.json > baseline.json" if what == "--baseline"
                else "run the evaluate stage first (dvc repro evaluate)")
        raise GraftlineError(f"{what} {path} not found; {hint}") from None
    except (OSError, ValueError) as exc:
        raise GraftlineError(f"{what} {path} is not a readable JSON metrics file ({exc})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get(DROP_METRIC), (int, float)):
        raise GraftlineError(f"{what} {path} has no numeric '{DROP_METRIC}'; is it metrics/evaluate.json?")
    return metrics


def threshold_failures(metrics: dict, thresholds: dict[str, float]) -> list[str]:
    """One message per metric below its evaluate.thresholds minimum, naming metric, value and threshold."""
    failures = []
    for name, minimum in sorted(thresholds.items()):
        value = metrics.get(name)
        if not isinstance(value, (int, float)):
            failures.append(f"{name} is missing from the metrics, so evaluate.thresholds.{name} = {minimum} "
                            "cannot be checked")
        elif value < minimum - EPSILON:
            failures.append(f"{name} = {value} is below its threshold {minimum} (evaluate.thresholds.{name})")
    return failures


def drop_failure(metrics: dict, baseline: dict, max_drop: float) -> str | None:
    """A message when accuracy fell more than evaluate.max_drop below the baseline's, else None."""
    value, base = metrics[DROP_METRIC], baseline[DROP_METRIC]
    if base - value > max_drop + EPSILON:
        return (f"{DROP_METRIC} = {value} dropped {round(base - value, 6)} below the baseline {base}, "
                f"more than evaluate.max_drop = {max_drop}")
    return None


def failures(metrics: dict, baseline: dict | None, thresholds: dict[str, float], max_drop: float) -> list[str]:
    """Every failed check: thresholds always, the drop only when there is a baseline."""
    found = threshold_failures(metrics, thresholds)
    drop = drop_failure(metrics, baseline, max_drop) if baseline is not None else None
    return found + ([drop] if drop else [])


def summary(metrics: dict, baseline: dict | None, thresholds: dict[str, float], max_drop: float) -> str:
    """One line for a passed gate: what was compared with what."""
    parts = [f"{DROP_METRIC} = {metrics[DROP_METRIC]}"]
    if baseline is None:
        parts.append("no baseline (thresholds only)")
    else:
        parts.append(f"baseline {baseline[DROP_METRIC]}, evaluate.max_drop = {max_drop}")
    checked = ", ".join(f"{k} >= {v}" for k, v in sorted(thresholds.items())) or "none set"
    return "; ".join(parts) + f"; thresholds: {checked}"
