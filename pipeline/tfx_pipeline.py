"""The same five stages as TFX components, run on LocalDagRunner with a SQLite ML-Metadata store.

Each component is a thin adapter: it rebuilds Params from JSON, maps its
artifacts' URIs to the paths ``components.<stage>.run`` expects and calls it,
exactly as pipeline/cli.py does for DVC, so both paths give the same numbers.

Artifact layouts (under each artifact's URI):
  Examples: records/{split}-*.tfrecord.gz, labels.json
  Bottlenecks: parquet/{split}-*.parquet
  Head: head/ (head.keras, head.json)
  Model: model/ (model.keras, saved_model/, labels.json)
  StageReport: report.json and, for training and evaluation, metrics.json and plots.csv
"""

import importlib
import json
from pathlib import Path

from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.orchestration.local.local_dag_runner import LocalDagRunner
from tfx.orchestration.metadata import sqlite_metadata_connection_config
from tfx.orchestration.pipeline import Pipeline
from tfx.types.artifact import Artifact

from pipeline import params as params_mod
from pipeline import runtime

PIPELINE_NAME = "graftline"


class Examples(Artifact):
    TYPE_NAME = "graftline.Examples"


class Bottlenecks(Artifact):
    TYPE_NAME = "graftline.Bottlenecks"


class Head(Artifact):
    TYPE_NAME = "graftline.Head"


class Model(Artifact):
    TYPE_NAME = "graftline.Model"


class StageReport(Artifact):
    TYPE_NAME = "graftline.StageReport"


class Evaluation(Artifact):
    TYPE_NAME = "graftline.Evaluation"


def _examples(a) -> Path:
    return Path(a.uri) / "records"


def _labels(a) -> Path:
    return Path(a.uri) / "labels.json"


def _call(stage: str, params_json: str, inputs: dict, outputs: dict) -> dict:
    params = params_mod.from_dict(json.loads(params_json))
    runtime.configure(params.seed)
    run = importlib.import_module(f"components.{stage}").run
    return run(params, {k: Path(v) for k, v in inputs.items()}, {k: Path(v) for k, v in outputs.items()})


@component
def Ingest(examples: OutputArtifact[Examples], report: OutputArtifact[StageReport],
           params_json: Parameter[str], download_dir: Parameter[str]):
    _call("ingest", params_json, {"download_dir": download_dir},
          {"examples": _examples(examples), "labels": _labels(examples),
           "report": Path(report.uri) / "report.json"})


@component
def Bottleneck(examples: InputArtifact[Examples], bottlenecks: OutputArtifact[Bottlenecks],
               report: OutputArtifact[StageReport], params_json: Parameter[str]):
    _call("bottleneck", params_json, {"examples": _examples(examples)},
          {"bottlenecks": Path(bottlenecks.uri) / "parquet", "report": Path(report.uri) / "report.json"})


def _training_outputs(report) -> dict:
    uri = Path(report.uri)
    return {"metrics": uri / "metrics.json", "plots": uri / "plots.csv", "report": uri / "report.json"}


@component
def TrainHead(examples: InputArtifact[Examples], bottlenecks: InputArtifact[Bottlenecks],
              head: OutputArtifact[Head], report: OutputArtifact[StageReport], params_json: Parameter[str]):
    _call("train_head", params_json,
          {"bottlenecks": Path(bottlenecks.uri) / "parquet", "labels": _labels(examples)},
          {"head": Path(head.uri) / "head", **_training_outputs(report)})


@component
def FineTune(examples: InputArtifact[Examples], head: InputArtifact[Head], model: OutputArtifact[Model],
             report: OutputArtifact[StageReport], params_json: Parameter[str]):
    _call("fine_tune", params_json,
          {"examples": _examples(examples), "labels": _labels(examples), "head": Path(head.uri) / "head"},
          {"model": Path(model.uri) / "model", **_training_outputs(report)})


@component
def Evaluate(examples: InputArtifact[Examples], model: InputArtifact[Model],
             evaluation: OutputArtifact[Evaluation], params_json: Parameter[str]):
    uri = Path(evaluation.uri)
    _call("evaluate", params_json, {"examples": _examples(examples), "model": Path(model.uri) / "model"},
          {"metrics": uri / "metrics.json", "confusion": uri / "confusion.csv", "report": uri / "report.json"})


def create_pipeline(params, root: Path, download_dir: Path) -> Pipeline:
    """The five components wired as in dvc.yaml; params travel as one JSON parameter."""
    params_json = json.dumps(params.to_dict(), sort_keys=True)
    ingest = Ingest(params_json=params_json, download_dir=str(download_dir.resolve()))
    bottleneck = Bottleneck(examples=ingest.outputs["examples"], params_json=params_json)
    train_head = TrainHead(examples=ingest.outputs["examples"], bottlenecks=bottleneck.outputs["bottlenecks"],
                           params_json=params_json)
    fine_tune = FineTune(examples=ingest.outputs["examples"], head=train_head.outputs["head"],
                         params_json=params_json)
    evaluate = Evaluate(examples=ingest.outputs["examples"], model=fine_tune.outputs["model"],
                        params_json=params_json)
    return Pipeline(
        pipeline_name=PIPELINE_NAME,
        pipeline_root=str((root / "pipeline").resolve()),
        components=[ingest, bottleneck, train_head, fine_tune, evaluate],
        metadata_connection_config=sqlite_metadata_connection_config(str((root / "metadata.sqlite").resolve())),
        enable_cache=True,
    )


def latest_artifacts(root: Path) -> dict[str, str]:
    """URI of the newest artifact of each graftline type, read from the ML-Metadata store."""
    from ml_metadata.metadata_store import metadata_store

    store = metadata_store.MetadataStore(sqlite_metadata_connection_config(str((root / "metadata.sqlite").resolve())))
    latest = {}
    for artifact_type in (Examples, Bottlenecks, Head, Model, Evaluation):
        found = store.get_artifacts_by_type(artifact_type.TYPE_NAME)
        if found:
            latest[artifact_type.TYPE_NAME] = max(found, key=lambda a: a.id).uri
    return latest


def run_local(params_path: str, root: Path) -> dict:
    """`graftline tfx-run`: run the pipeline with LocalDagRunner; returns the evaluation metrics."""
    params = params_mod.load(params_path)
    root.mkdir(parents=True, exist_ok=True)
    LocalDagRunner().run(create_pipeline(params, root, Path("data/raw")))
    uris = latest_artifacts(root)
    metrics = json.loads((Path(uris[Evaluation.TYPE_NAME]) / "metrics.json").read_text())
    (root / "latest.json").write_text(json.dumps({"artifacts": uris, "evaluate": metrics}, indent=2) + "\n")
    return metrics
