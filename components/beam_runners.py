"""Which Beam runner the bottleneck stage runs on, and a Dask cluster's lifecycle around a run.

The stage builds one pipeline whatever the runner; this module turns ``bottleneck.runner``,
``bottleneck.workers``, ``bottleneck.dask_address`` and ``bottleneck.beam_options`` into Beam's
flags, starts (and stops) a local Dask cluster when no scheduler is given, and turns a runner's
failure into one line. It imports neither Beam nor Dask at the top, so params validation can ask
``is_dask`` for free.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from components.errors import GraftlineError

DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
# What Beam's DirectRunner runs a batch pipeline on, named in full: Beam builds it directly, with no Prism attempt.
FN_API_RUNNER = "apache_beam.runners.portability.fn_api_runner.fn_runner.FnApiRunner"


def is_dask(runner: str) -> bool:
    """bottleneck.runner names Beam's DaskRunner ('dask' or 'DaskRunner', any case)."""
    return runner.lower() in ("dask", "daskrunner", DASK_RUNNER.lower())


def beam_flags(p, units: int = 0, dask_address: str = "") -> list[str]:
    """The runner and what graftline derives for it from the params, then the user's flags.

    DirectRunner: the process count from bottleneck.workers. dask: the
    scheduler, and one task per shard (the DaskRunner's default puts up to 128
    elements in one task, which would give every shard to one worker).
    """
    given = " ".join(p.beam_options)
    if is_dask(p.runner):
        flags = [f"--runner={DASK_RUNNER}"] + ([f"--dask_client_address={dask_address}"] if dask_address else [])
        if units and "dask_npartitions" not in given and "dask_partition_size" not in given:
            flags.append(f"--dask_npartitions={units}")
        return flags + list(p.beam_options)
    flags = [f"--runner={p.runner}"]
    if p.runner == "DirectRunner" and p.workers > 1 and "direct_running_mode" not in given:
        flags += ["--direct_running_mode=multi_processing", f"--direct_num_workers={p.workers}"]
    return flags + list(p.beam_options)


def tfx_beam_args(p) -> list[str]:
    """beam_pipeline_args for TFX's own Beam-using components (StatisticsGen, Transform, Evaluator, any
    component with use_beam): bottleneck's runner and flags, DirectRunner named as its FnApiRunner.

    TFX makes those pipelines itself (``beam.Pipeline(argv=beam_pipeline_args)``), so the runner must be
    in the flags: DirectRunner would try Prism first (see pipeline_runner). A Dask runner needs the
    cluster the bottleneck stage starts around its own run, so TFX's components run on the FnApiRunner.
    """
    if p.runner != "DirectRunner" and not is_dask(p.runner):
        return beam_flags(p)
    flags = [f"--runner={FN_API_RUNNER}"]
    if p.workers > 1 and "direct_running_mode" not in " ".join(p.beam_options):
        flags += ["--direct_running_mode=multi_processing", f"--direct_num_workers={p.workers}"]
    return flags + ([] if is_dask(p.runner) else list(p.beam_options))


def pipeline_runner(p, options):
    """The runner object for ``beam.Pipeline``: for DirectRunner, the FnApiRunner that Beam's DirectRunner
    builds for a batch pipeline; None lets Beam resolve ``--runner``.

    Beam's DirectRunner first tries its Prism runner, which downloads a Go binary from GitHub: online, the
    stage would run on a runner it did not name; offline, every run makes a failing network call and leaves
    a ``beam-temp*`` folder in the temp directory. Built here, the stage runs the same way online or not.
    """
    if p.runner != "DirectRunner":
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


@contextlib.contextmanager
def dask_scheduler(p) -> Iterator[str]:
    """bottleneck.dask_address, or a local cluster of bottleneck.workers processes for the run."""
    if p.dask_address:
        yield p.dask_address
        return
    try:
        from distributed import LocalCluster
    except ImportError as e:
        raise GraftlineError("bottleneck.runner: dask needs Dask's scheduler: pip install 'dask[distributed]'") from e
    logging.getLogger("distributed").setLevel(logging.WARNING)  # not a line per worker start and stop
    with LocalCluster(n_workers=p.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def run_to_completion(pipeline, p, address: str, out: str) -> None:
    """Run and wait; a runner's failure becomes one line naming the runner and what to do."""
    try:
        result = pipeline.run()
    except OSError as e:  # the DaskRunner connects to the scheduler in run()
        if is_dask(p.runner):
            raise GraftlineError(f"bottleneck: cannot reach the Dask scheduler at {address} "
                                 f"(bottleneck.dask_address): {e}") from e
        raise
    try:
        result.wait_until_finish()
    except Exception as e:
        if not is_dask(p.runner):
            raise
        raise GraftlineError(
            f"bottleneck: the Dask run failed ({type(e).__name__}: {e}); nothing was written to {out}. "
            "Features already computed stay in the cache, so a re-run resumes. If workers died, give them "
            "more memory or make shards smaller (data.shard_size): a worker holds one shard's photos") from e
    finally:
        client = getattr(result, "client", None)  # the DaskRunner's client, left open by Beam
        if client is not None:
            client.close()
