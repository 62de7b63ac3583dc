"""`graftline tfx-compile`: the TFX pipeline compiled offline to a Kubeflow V2 / Vertex PipelineJob spec."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_cli import assert_one_line_error, graftline, write_params

IMAGE = "registry.example.org/team/graftline:1.2.3"
COMPONENTS = {"Ingest", "Bottleneck", "Audit", "TrainHead", "FineTune", "Evaluate"}  # one per stage but download


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """Both targets compiled from the same params: an L4 pair for training, a custom image, fine_tune_at 120."""
    work = tmp_path_factory.mktemp("compile")
    write_params(work, {"fine_tune_at": 120, "base": {"model": "mobilenet_v2"}, "tfx": {"image": IMAGE},
                        "train": {"accelerator": "NVIDIA_L4", "accelerator_count": 2}})
    specs = {}
    for target in ("vertex", "kubeflow"):
        result, _ = graftline(["tfx-compile", "--target", target], work)
        assert result.returncode == 0, result.stdout + result.stderr
        path = work / "build" / target / "pipeline.json"
        assert f'"pipeline_spec": "build/{target}/pipeline.json"' in result.stdout
        specs[target] = json.loads(path.read_text())
    return specs


def executors(spec: dict) -> dict:
    return spec["pipelineSpec"]["deploymentSpec"]["executors"]


def test_only_the_training_components_request_gpus(compiled):
    for spec in compiled.values():
        found = {name: e["container"].get("resources") for name, e in executors(spec).items()}
        assert set(found) == {f"{c}_executor" for c in COMPONENTS}
        with_gpu = {name for name, resources in found.items() if resources}
        assert with_gpu == {"TrainHead_executor", "FineTune_executor"}
        for name in with_gpu:
            assert found[name] == {"accelerator": {"type": "NVIDIA_L4", "count": "2"}}


def test_every_component_runs_the_image_from_params(compiled):
    for spec in compiled.values():
        images = {e["container"]["image"] for e in executors(spec).values()}
        assert images == {IMAGE}
        # Each executor is graftline's own component, run by TFX's Kubeflow V2 entrypoint.
        for name, e in executors(spec).items():
            assert e["container"]["args"][:2] == ["--executor_class_path",
                                                  f"pipeline.tfx_pipeline.{name.removesuffix('_executor')}_Executor"]


def test_the_dag_is_the_dvc_pipelines_with_its_params(compiled):
    tasks = compiled["vertex"]["pipelineSpec"]["root"]["dag"]["tasks"]
    assert set(tasks) == COMPONENTS
    inputs = tasks["FineTune"]["inputs"]
    assert {a["taskOutputArtifact"]["producerTask"] for a in inputs["artifacts"].values()} == {"Ingest", "TrainHead"}
    params = json.loads(inputs["parameters"]["params_json"]["runtimeValue"]["constantValue"]["stringValue"])
    assert params["fine_tune_at"] == 120 and params["train"]["accelerator_count"] == 2


def test_targets_differ_only_in_the_default_pipeline_root(compiled):
    vertex, kubeflow = compiled["vertex"], compiled["kubeflow"]
    assert vertex["pipelineSpec"] == kubeflow["pipelineSpec"]  # TFX compiles both the same way
    assert vertex["runtimeConfig"]["gcsOutputDirectory"] == "gs://YOUR_BUCKET/graftline"
    assert kubeflow["runtimeConfig"]["gcsOutputDirectory"] == "minio://mlpipeline/v2/artifacts/graftline"


def test_pipeline_root_and_output_folder_can_be_given(tmp_path):
    write_params(tmp_path, {})
    result, _ = graftline(["tfx-compile", "--target", "vertex", "--output", "out",
                           "--pipeline-root", "gs://bucket/runs"], tmp_path)
    assert result.returncode == 0, result.stderr
    spec = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert spec["runtimeConfig"]["gcsOutputDirectory"] == "gs://bucket/runs"
    assert {e["container"]["image"] for e in executors(spec).values()} == {"ghcr.io/graftline/graftline:latest"}
    assert not (tmp_path / "build").exists()


def test_bad_accelerator_count_is_one_line_before_compiling(tmp_path):
    write_params(tmp_path, {"train": {"accelerator_count": 0}})
    result, _ = graftline(["tfx-compile", "--target", "kubeflow"], tmp_path)
    assert_one_line_error(result, "tfx-compile", "train.accelerator_count", "0")
    assert not Path(tmp_path, "build").exists()
