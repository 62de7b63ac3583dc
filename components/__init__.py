"""graftline's code: the stages in ``components/stages/``, the library they share here.

- ``components/stages/<stage>.py``: one module per DVC stage (download, ingest,
  bottleneck, train_head, fine_tune, evaluate) and per extra command (scratch,
  predict, pretrain). Each exposes ``run(params, inputs, outputs)`` (predict and
  pretrain take what their commands take), called the same way by the DVC adapter
  (pipeline/cli.py) and the TFX adapter (pipeline/tfx_pipeline.py). A stage module
  never imports another stage module: tests/test_structure.py fails if one does.
- ``components/*.py``: what stages share, each module named for what it holds:
  file formats (records, features, vector_cache), the one image path (images),
  photo checks (photos), batches of photos (datasets), the head and its files
  (head), the base of a model, one network or several side by side (backbone),
  the registry of single networks (base_models), cached activations (activations),
  devices (devices), training on several machines (multi_worker), the backbone as a
  Beam model handler (beam_inference), Beam runners and Dask (beam_runners),
  where parts land (publishing), the export (export), inference one photo at a
  time (inference), plots, the evaluation page (report), the logs a training
  stage writes (callbacks), the gate, downloads (fetch), atomic writes (atomic)
  and the one error type (errors).
"""
