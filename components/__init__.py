"""What each graftline stage computes: one module per stage plus the shared schemas.

Every stage module exposes ``run(params, inputs, outputs) -> metrics dict``; the
DVC adapter (pipeline/cli.py) and the TFX adapter (pipeline/tfx_pipeline.py)
call the same function.
"""
