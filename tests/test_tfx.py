"""The TFX path: the same run functions (the five stages and audit) as @component on LocalDagRunner with a
SQLite MLMD store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def load(path: Path):
    return json.loads(path.read_text())


def test_tfx_run_gives_the_dvc_runs_metrics(project, tfx_run):
    latest = load(tfx_run / "latest.json")
    uris = latest["artifacts"]
    evaluation = Path(uris["graftline.Evaluation"])
    assert load(evaluation / "metrics/evaluate.json") == load(project.first / "metrics/evaluate.json")
    assert latest["evaluate"] == load(project.first / "metrics/evaluate.json")
    # Training stages too: same params, same CPU, same numbers.
    reports = {Path(u).parts[-3]: Path(u) for u in map(str, Path(tfx_run, "pipeline").glob("*/report/*"))}
    assert load(reports["TrainHead"] / "metrics/train_head.json") == load(project.first / "metrics/train_head.json")
    dvc_fine_tune = load(project.first / "metrics/fine_tune.json")
    tflite = {k for k in dvc_fine_tune if k.startswith("tflite_")}  # the TFX run skips TFLite (conftest)
    assert len(tflite) == 2 and load(reports["FineTune"] / "metrics/fine_tune.json") == {
        k: v for k, v in dvc_fine_tune.items() if k not in tflite}
    assert (Path(uris["graftline.Model"]) / "artifacts/model/model.keras").is_file()
    assert (Path(uris["graftline.Model"]) / "artifacts/model/saved_model/saved_model.pb").is_file()
    # The audit too: the same findings from the same features (its wall time aside).
    audit, dvc_audit = load(Path(uris["graftline.Audit"]) / "reports/audit.json"), load(project.first / "reports/audit.json")
    for found in (audit, dvc_audit):
        found["summary"].pop("wall_time_s")
    assert audit == dvc_audit and (Path(uris["graftline.Audit"]) / "reports/audit.html").is_file()


def test_tfx_lineage_is_recorded_in_sqlite_mlmd(tfx_run):
    from ml_metadata.metadata_store import metadata_store
    from tfx.orchestration.metadata import sqlite_metadata_connection_config

    assert (tfx_run / "metadata.sqlite").stat().st_size > 0
    store = metadata_store.MetadataStore(sqlite_metadata_connection_config(str(tfx_run / "metadata.sqlite")))
    executions = store.get_executions()
    types = {store.get_execution_types_by_id([e.type_id])[0].name for e in executions}
    assert {"pipeline.tfx_pipeline.Ingest", "pipeline.tfx_pipeline.Bottleneck", "pipeline.tfx_pipeline.TrainHead",
            "pipeline.tfx_pipeline.FineTune", "pipeline.tfx_pipeline.Evaluate",
            "pipeline.tfx_pipeline.Audit"} <= types, types
    # The model was made from the head, which was made from the features: lineage edges exist.
    model = store.get_artifacts_by_type("graftline.Model")[-1]
    producing = [e for e in store.get_events_by_artifact_ids([model.id]) if e.type == e.OUTPUT]
    inputs = [e for e in store.get_events_by_execution_ids([producing[0].execution_id]) if e.type == e.INPUT]
    input_types = {store.get_artifact_types_by_id([a.type_id])[0].name
                   for a in store.get_artifacts_by_id([e.artifact_id for e in inputs])}
    assert input_types == {"graftline.Examples", "graftline.Head"}
