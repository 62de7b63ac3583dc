"""A TFX component that uses Beam the way TFX's own ones do (use_beam: TFX builds its pipeline from the
Pipeline's beam_pipeline_args); it records which runner that pipeline got. Imported by tests/test_tfx_beam.py
inside the test, so collecting the tests never imports TFX."""
import json
from pathlib import Path

import apache_beam as beam
from tfx.dsl.component.experimental.annotations import BeamComponentParameter, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types.standard_artifacts import ExampleStatistics


@component(use_beam=True)
def SquareSum(n: Parameter[int], result: OutputArtifact[ExampleStatistics],
              beam_pipeline: BeamComponentParameter[beam.Pipeline] = None):
    with beam_pipeline as p:
        total = p | beam.Create(range(n)) | beam.Map(lambda x: x * x) | beam.CombineGlobally(sum)
        total | beam.Map(lambda t, uri=result.uri: (Path(uri) / "sum.json").write_text(json.dumps(t)))
    (Path(result.uri) / "runner.txt").write_text(type(beam_pipeline.runner).__name__)
