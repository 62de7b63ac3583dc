"""The evaluation gate: evaluate.thresholds and evaluate.max_drop (components/gate.py, `graftline gate`)."""
from __future__ import annotations

import json

import pytest

from components import gate
from components.errors import GraftlineError
from test_cli import assert_one_line_error, graftline, write_params

CURRENT = {"accuracy": 0.8, "macro_f1": 0.79, "loss": 0.6, "num_test": 60}


def test_thresholds_name_metric_value_and_threshold():
    assert gate.threshold_failures(CURRENT, {"accuracy": 0.8, "macro_f1": 0.5}) == []  # equal passes
    assert gate.threshold_failures(CURRENT, {"accuracy": 0.9, "macro_f1": 0.8}) == [
        "accuracy = 0.8 is below its threshold 0.9 (evaluate.thresholds.accuracy)",
        "macro_f1 = 0.79 is below its threshold 0.8 (evaluate.thresholds.macro_f1)",
    ]
    assert "cannot be checked" in gate.threshold_failures({"accuracy": 0.8}, {"macro_f1": 0.5})[0]


@pytest.mark.parametrize("baseline, fails", [(0.82, False), (0.820001, True), (0.75, False), (0.9, True)])
def test_drop_against_the_baseline(baseline, fails):
    failure = gate.drop_failure(CURRENT, {"accuracy": baseline}, 0.02)
    assert (failure is not None) == fails
    if fails:
        assert failure == (f"accuracy = 0.8 dropped {round(baseline - 0.8, 6)} below the baseline {baseline}, "
                           "more than evaluate.max_drop = 0.02")


def test_no_baseline_checks_thresholds_only():
    assert gate.failures(CURRENT, None, {}, 0.0) == []
    assert len(gate.failures(CURRENT, {"accuracy": 0.95}, {"accuracy": 0.9}, 0.02)) == 2


def test_unreadable_metrics_are_one_clear_error(tmp_path):
    with pytest.raises(GraftlineError, match="--baseline .* not found"):
        gate.read_metrics(tmp_path / "missing.json", "--baseline")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GraftlineError, match="not a readable JSON"):
        gate.read_metrics(tmp_path / "bad.json", "--current")
    (tmp_path / "other.json").write_text(json.dumps({"val_accuracy": 0.8}))
    with pytest.raises(GraftlineError, match="no numeric 'accuracy'"):
        gate.read_metrics(tmp_path / "other.json", "--current")


def test_gate_command_exit_codes(tmp_path):
    write_params(tmp_path, {"evaluate": {"max_drop": 0.05}})
    (tmp_path / "now.json").write_text(json.dumps(CURRENT))
    (tmp_path / "main.json").write_text(json.dumps({**CURRENT, "accuracy": 0.84}))
    result, _ = graftline(["gate", "--current", "now.json", "--baseline", "main.json"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "graftline gate: passed: accuracy = 0.8; baseline 0.84, evaluate.max_drop = 0.05" in result.stdout

    (tmp_path / "main.json").write_text(json.dumps({**CURRENT, "accuracy": 0.9}))
    result, _ = graftline(["gate", "--current", "now.json", "--baseline", "main.json"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == ("graftline gate: failed: accuracy = 0.8 dropped 0.1 below the baseline 0.9, "
                                     "more than evaluate.max_drop = 0.05")

    write_params(tmp_path, {"evaluate": {"thresholds": {"macro_f1": 0.85}}})
    result, _ = graftline(["gate", "--current", "now.json"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == ("graftline gate: failed: macro_f1 = 0.79 is below its threshold 0.85 "
                                     "(evaluate.thresholds.macro_f1)")

    result, _ = graftline(["gate", "--baseline", "nope.json"], tmp_path)  # default --current is missing too
    assert_one_line_error(result, "gate", "metrics/evaluate.json", "not found")
