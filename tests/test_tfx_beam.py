"""TFX's own Beam-using components never try Beam's Prism runner.

TFX builds their pipelines itself from the Pipeline's beam_pipeline_args; with Beam's DirectRunner
there, Beam first tries Prism (a Go binary downloaded from GitHub: offline a failing network call
and a beam-temp folder left behind, online a runner nobody named). graftline's pipeline names the
DirectRunner's FnApiRunner instead. Checked here by a real LocalDagRunner run, with a SQLite
ML-Metadata store, of a component declared with use_beam, given the args graftline's pipeline carries.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from components import beam_runners
from pipeline import params as params_mod


def params(**bottleneck):
    return params_mod.from_dict({"data": {"source": "photos", "sha256": ""}, "bottleneck": bottleneck})


def args(**bottleneck) -> list[str]:
    return beam_runners.tfx_beam_args(params(**bottleneck).bottleneck)


def test_graftline_pipeline_carries_the_fn_api_runner(tmp_path):
    from pipeline import tfx_pipeline

    p = params()
    built = tfx_pipeline.create_pipeline(p, str(tmp_path / "root"), str(tmp_path / "dl"), str(tmp_path / "raw"),
                                         str(tmp_path / "metadata.sqlite"))
    assert built.beam_pipeline_args == [f"--runner={beam_runners.FN_API_RUNNER}"]
    assert args(workers=2) == [f"--runner={beam_runners.FN_API_RUNNER}", "--direct_running_mode=multi_processing",
                               "--direct_num_workers=2"]
    assert args(runner="dask", workers=2)[0] == f"--runner={beam_runners.FN_API_RUNNER}"
    # a runner that is not local is passed on as the bottleneck names it
    assert args(runner="FlinkRunner", beam_options=["--flink_master=x:8081"]) == [
        "--runner=FlinkRunner", "--flink_master=x:8081"]


def test_a_beam_component_runs_on_the_fn_api_runner_without_prism(tmp_path, monkeypatch, caplog):
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner
    from tfx.orchestration.metadata import sqlite_metadata_connection_config
    from tfx.orchestration.pipeline import Pipeline

    from tfx_beam_probe import SquareSum

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where Beam makes its temporary folders
    square_sum = SquareSum(n=10)
    LocalDagRunner().run(Pipeline(
        pipeline_name="beam-probe", pipeline_root=str(tmp_path / "root"), components=[square_sum],
        metadata_connection_config=sqlite_metadata_connection_config(str(tmp_path / "metadata.sqlite")),
        beam_pipeline_args=args()))

    written = next((tmp_path / "root").rglob("runner.txt")).parent
    assert json.loads((written / "sum.json").read_text()) == sum(x * x for x in range(10))  # it really ran
    assert (written / "runner.txt").read_text() == "FnApiRunner"
    assert "PrismRunner" not in caplog.text
    assert not list(temp.glob("beam-temp*"))
