"""The same stages as TFX components (the five and audit), run on LocalDagRunner with a SQLite ML-Metadata store.

Each component is a thin adapter: it rebuilds Params from JSON, maps its
artifacts' URIs to the paths ``components.stages.<stage>.run`` expects and calls it,
exactly as pipeline/cli.py does for DVC, so both paths give the same numbers.

Paths come from pipeline/stages.py, the table dvc.yaml is generated from: each
input and output lies at its project path under the artifact that holds it, e.g.
Examples: artifacts/examples/{split}-*.tfrecord.gz and artifacts/labels.json;
Bottlenecks: artifacts/bottlenecks/; Head: artifacts/head/; Model: artifacts/model/;
StageReport: the stage's reports/, metrics/ and plots/ files; Evaluation: evaluate's.
Per-epoch logs (DVCLive, TensorBoard) are the DVC path's: ML Metadata records this one.
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

from components import beam_runners
from components.fetch import DOWNLOAD_DIR
from pipeline import params as params_mod
from pipeline import runtime, stages

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


class AuditReport(Artifact):
    TYPE_NAME = "graftline.Audit"


LOGS = {"live", "tensorboard"}  # per-epoch logs: the DVC path's


def _inputs(stage: str, **uris) -> dict:
    """The named inputs of ``stage`` (pipeline/stages.py), each at its path under the artifact URI given for it."""
    table = stages.STAGES[stage].inputs
    return {name: Path(uri) / table[name].path for name, uri in uris.items()}


def _outputs(stage: str, default_uri: str, **uris) -> dict:
    """Every output of ``stage`` but the logs, at its path under its artifact's URI (``default_uri`` unless given)."""
    return {name: Path(uris.get(name, default_uri)) / io.path
            for name, io in stages.STAGES[stage].outputs.items() if name not in LOGS}


def _call(stage: str, params_json: str, inputs: dict, outputs: dict) -> dict:
    params = params_mod.from_dict(json.loads(params_json))
    # As pipeline/cli.py does, but without hiding GPUs: LocalDagRunner runs every component in one
    # process (run_local set its devices up for training), and compiled pipelines give GPUs to the
    # training components only (compile_spec).
    table = stages.STAGES[stage]
    runtime.configure_devices(table, params, own_process=False)
    runtime.configure(params.seed)
    run = importlib.import_module(table.module).run
    return run(params, {k: Path(v) for k, v in inputs.items()}, {k: Path(v) for k, v in outputs.items()})


@component
def Ingest(examples: OutputArtifact[Examples], report: OutputArtifact[StageReport],
           params_json: Parameter[str], downloads: Parameter[str], extract_dir: Parameter[str]):
    _call("ingest", params_json, {"downloads": downloads, "extract_dir": extract_dir},
          _outputs("ingest", report.uri, examples=examples.uri, labels=examples.uri))


@component
def Bottleneck(examples: InputArtifact[Examples], bottlenecks: OutputArtifact[Bottlenecks],
               report: OutputArtifact[StageReport], params_json: Parameter[str]):
    _call("bottleneck", params_json, _inputs("bottleneck", examples=examples.uri),
          _outputs("bottleneck", report.uri, bottlenecks=bottlenecks.uri))


@component
def Audit(examples: InputArtifact[Examples], bottlenecks: InputArtifact[Bottlenecks],
          audit: OutputArtifact[AuditReport], params_json: Parameter[str]):
    _call("audit", params_json, _inputs("audit", examples=examples.uri, labels=examples.uri,
                                        bottlenecks=bottlenecks.uri), _outputs("audit", audit.uri))


@component
def TrainHead(examples: InputArtifact[Examples], bottlenecks: InputArtifact[Bottlenecks],
              head: OutputArtifact[Head], report: OutputArtifact[StageReport], params_json: Parameter[str]):
    _call("train_head", params_json, _inputs("train_head", bottlenecks=bottlenecks.uri, labels=examples.uri),
          _outputs("train_head", report.uri, head=head.uri))


@component
def FineTune(examples: InputArtifact[Examples], head: InputArtifact[Head], model: OutputArtifact[Model],
             report: OutputArtifact[StageReport], params_json: Parameter[str]):
    # <pipeline root>/FineTune/model/<execution>: checkpoints go under the pipeline root, where a
    # re-run of a killed execution (a new execution id) finds them.
    pipeline_root = model.uri.rstrip("/").rsplit("/", 3)[0]
    _call("fine_tune", params_json,
          {**_inputs("fine_tune", examples=examples.uri, labels=examples.uri, head=head.uri),
           "checkpoints": f"{pipeline_root}/checkpoints/fine_tune"},
          _outputs("fine_tune", report.uri, model=model.uri))


@component
def Evaluate(examples: InputArtifact[Examples], model: InputArtifact[Model], fine_tune_report: InputArtifact[StageReport],
             evaluation: OutputArtifact[Evaluation], params_json: Parameter[str]):
    _call("evaluate", params_json,
          _inputs("evaluate", examples=examples.uri, model=model.uri, curves=fine_tune_report.uri),
          _outputs("evaluate", evaluation.uri))


def create_pipeline(params, pipeline_root: str, downloads: str, extract_dir: str,
                    metadata_path: str | None = None) -> Pipeline:
    """The components wired as in dvc.yaml; params travel as one JSON parameter.

    ``metadata_path``: a SQLite ML-Metadata store for LocalDagRunner; compiled
    pipelines (Vertex, Kubeflow) bring their own store, so they leave it out.
    """
    params_json = json.dumps(params.to_dict(), sort_keys=True)
    ingest = Ingest(params_json=params_json, downloads=downloads, extract_dir=extract_dir)
    bottleneck = Bottleneck(examples=ingest.outputs["examples"], params_json=params_json)
    audit = Audit(examples=ingest.outputs["examples"], bottlenecks=bottleneck.outputs["bottlenecks"],
                        params_json=params_json)
    train_head = TrainHead(examples=ingest.outputs["examples"], bottlenecks=bottleneck.outputs["bottlenecks"],
                           params_json=params_json)
    fine_tune = FineTune(examples=ingest.outputs["examples"], head=train_head.outputs["head"],
                         params_json=params_json)
    evaluate = Evaluate(examples=ingest.outputs["examples"], model=fine_tune.outputs["model"],
                        fine_tune_report=fine_tune.outputs["report"], params_json=params_json)
    return Pipeline(
        pipeline_name=PIPELINE_NAME,
        pipeline_root=pipeline_root,
        components=[ingest, bottleneck, audit, train_head, fine_tune, evaluate],
        metadata_connection_config=sqlite_metadata_connection_config(metadata_path) if metadata_path else None,
        enable_cache=True,
        beam_pipeline_args=beam_runners.tfx_beam_args(params.bottleneck),
    )


def latest_artifacts(root: Path) -> dict[str, str]:
    """URI of the newest artifact of each graftline type, read from the ML-Metadata store."""
    from ml_metadata.metadata_store import metadata_store

    store = metadata_store.MetadataStore(sqlite_metadata_connection_config(str((root / "metadata.sqlite").resolve())))
    latest = {}
    for artifact_type in (Examples, Bottlenecks, AuditReport, Head, Model, Evaluation):
        found = store.get_artifacts_by_type(artifact_type.TYPE_NAME)
        if found:
            latest[artifact_type.TYPE_NAME] = max(found, key=lambda a: a.id).uri
    return latest


def run_local(params_path: str, root: Path) -> dict:
    """`graftline tfx-run`: run the pipeline with LocalDagRunner; returns the evaluation metrics."""
    params = params_mod.load(params_path)
    if params.train.strategy == "multi_worker":
        from components.errors import GraftlineError

        raise GraftlineError("params: train.strategy = 'multi_worker' is not for tfx-run: LocalDagRunner runs all "
                             "five stages in one process; use auto here, or run the training stages on each worker "
                             "with graftline train_head / fine_tune (see docs/scale-out.md)")
    root.mkdir(parents=True, exist_ok=True)
    runtime.configure_training(params.train)  # one process for all five: set up for the training stages
    LocalDagRunner().run(create_pipeline(params, str((root / "pipeline").resolve()), str(Path(DOWNLOAD_DIR).resolve()),
                                         str(Path("data/raw").resolve()), str((root / "metadata.sqlite").resolve())))
    uris = latest_artifacts(root)
    metrics_file = stages.STAGES["evaluate"].outputs["metrics"].path
    metrics = json.loads((Path(uris[Evaluation.TYPE_NAME]) / metrics_file).read_text())
    (root / "latest.json").write_text(json.dumps({"artifacts": uris, "evaluate": metrics}, indent=2) + "\n")
    return metrics


# `graftline tfx-compile`. TFX compiles for Vertex AI Pipelines and for Kubeflow Pipelines (v2) with
# the same KubeflowV2DagRunner into the same PipelineJob spec; the targets differ only in these
# defaults for where runs write their artifacts (both can be overridden at submission).
PIPELINE_ROOTS = {
    "vertex": "gs://YOUR_BUCKET/graftline",  # Vertex needs a Cloud Storage folder of yours
    "kubeflow": "minio://mlpipeline/v2/artifacts/graftline",  # the bucket a Kubeflow install comes with
}
def component_name(stage: str) -> str:
    """The TFX component of a stage: train_head -> TrainHead."""
    return "".join(word.title() for word in stage.split("_"))


GPU_COMPONENTS = tuple(component_name(name) for name, stage in stages.STAGES.items() if stage.trains)
CONTAINER_EXTRACT_DIR = "/tmp/graftline/raw"  # inside a component's container (data.url still lands in data/download/)


def _allow_compiling_without_tfma() -> None:
    """KubeflowV2's step builder isinstance-checks tfx.components.FileBasedExampleGen and InfraValidator,
    which are None when TFMA is not installed (TFX goes in without its dependencies: pyproject.toml, tfx-sdk):
    stand-in classes no node is an instance of."""
    import tfx.components

    for name in ("FileBasedExampleGen", "InfraValidator"):
        if getattr(tfx.components, name, None) is None:
            setattr(tfx.components, name, type(name, (), {}))


def gpu_request(train):
    """The ResourceSpec the training components carry: train.accelerator x train.accelerator_count."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    spec = pipeline_spec_pb2.PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec
    return spec(accelerator=spec.AcceleratorConfig(type=train.accelerator, count=train.accelerator_count))


def compile_spec(params_path: str, target: str, output: str | None = None, pipeline_root: str | None = None) -> dict:
    """Compile create_pipeline offline to <output>/pipeline.json, images from tfx.image, GPUs for training only."""
    from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner as v2

    from components.atomic import write_json

    params = params_mod.load(params_path)
    _allow_compiling_without_tfma()
    pipeline = create_pipeline(params, pipeline_root or PIPELINE_ROOTS[target], DOWNLOAD_DIR, CONTAINER_EXTRACT_DIR)
    for node in pipeline.components:
        if node.id in GPU_COMPONENTS:
            node.with_platform_config(gpu_request(params.train))
    runner = v2.KubeflowV2DagRunner(config=v2.KubeflowV2DagRunnerConfig(default_image=params.tfx.image))
    spec = runner.run(pipeline, write_out=False)
    path = Path(output or f"build/{target}") / "pipeline.json"
    write_json(path, spec)  # all or nothing, like every other output
    return {"pipeline_spec": str(path), "training_nodes_with_gpu": list(GPU_COMPONENTS)}
