"""The crash harness at length: every stage killed at many moments, one `dvc repro` after each.

    .venv/bin/python benchmarks/crash.py [--out docs/crash.json] [--fractions 0.3 0.7]

tests/crash.py's harness on its small project (48 shared flower photos, MobileNetV2 at 160 px fine-tuned from
layer 100, the photos downloaded from a throttled loopback server): for each stage, SIGKILL to the stage, SIGTERM
to the stage and SIGKILL to `dvc repro`'s whole process group at fractions of the stage's uninterrupted run, and
kills at the writes that matter (a partial archive, a shard, a cache entry, a checkpoint, the export, each output
set being put in place, a metrics file, a plot). The fractions are of each stage's uninterrupted re-run (caches
warm), measured first, which must itself come out equal to the first run. Each point: did one `dvc repro` recover (exit 0, `dvc status`
clean, metrics equal digit for digit, the same files, no temporary name, no torn cache entry)? Prints a line per
point and writes the counts, the machine and every point's outcome to ``--out``; docs/testing.md cites them.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

from crash import STAGES, After, Appears, KillPoint, Write, make_project  # noqa: E402

MOMENTS = [
    KillPoint("download", Appears("data/download/.photos.tar.gz.tmp-*"), "TERM"),
    KillPoint("download", Write("os.rename", "data/download/photos.tar.gz"), "KILL"),
    KillPoint("ingest", Write("open", "artifacts/.examples.tmp-*/*/*", 2), "KILL"),
    KillPoint("ingest", Write("open", "artifacts/.labels.json.tmp-*/*"), "KILL", "group"),
    KillPoint("ingest", Write("os.rename", "artifacts/examples"), "KILL"),
    KillPoint("ingest", Write("os.rename", "reports/ingest.json"), "KILL", "group"),  # two of three in place
    KillPoint("bottleneck", Write("os.rename", "data/feature_cache/*"), "KILL", cold_cache="mobilenet_v2-*"),
    KillPoint("bottleneck", Write("os.rename", "data/feature_cache/*", 25), "TERM", cold_cache="mobilenet_v2-*"),
    KillPoint("bottleneck", Write("os.rename", "reports/bottleneck.json"), "KILL"),
    KillPoint("audit", Write("open", "reports/.audit.json.tmp-*/*"), "KILL", "group"),
    KillPoint("audit", Write("os.rename", "reports/audit.html"), "KILL"),
    KillPoint("train_head", Write("open", "artifacts/.head.tmp-*/*"), "KILL"),
    KillPoint("train_head", Write("os.rename", "metrics/train_head.json"), "KILL", "group"),
    KillPoint("train_head", Write("os.rename", "plots/train_head.csv"), "TERM"),
    KillPoint("fine_tune", Write("os.rename", "data/feature_cache/*", 5), "KILL", cold_cache="activations-*"),
    KillPoint("fine_tune", Write("os.rename", "data/checkpoints/fine_tune/epoch-0001"), "TERM", "group"),
    KillPoint("fine_tune", Write("os.rename", "artifacts/model"), "KILL"),
    KillPoint("fine_tune", Write("os.rename", "plots/learning_curves.png"), "KILL", "group"),
    KillPoint("fine_tune", Write("os.rename", "dvclive/fine_tune"), "KILL"),
    KillPoint("evaluate", Write("os.rename", "reports/evaluate.html"), "TERM"),
    KillPoint("evaluate", Write("os.rename", "plots/confusion.png"), "KILL", "group"),
]


def points(fractions: list[float]) -> list[KillPoint]:
    timed = [KillPoint(stage, After(f), signal, scope) for stage in STAGES for f in fractions
             for signal, scope in (("KILL", "stage"), ("TERM", "stage"), ("KILL", "group"))]
    return MOMENTS + timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/crash.json")
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.3, 0.7])
    args = parser.parse_args()
    from machine import describe

    machine = describe()
    print(machine, flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="graftline-crash-") as folder:
        harness, server = make_project(Path(folder))
        try:
            harness.run_reference()
            print(f"reference run: {sum(harness.lifetimes.values()):.0f} s of stages", flush=True)
            controls = harness.measure_reruns()
            print("uninterrupted re-runs: " + ", ".join(f"{o.point.stage} {harness.lifetimes[o.point.stage]:.1f} s"
                                                        f"{' FAILED ' + '; '.join(o.problems) if o.problems else ''}"
                                                        for o in controls), flush=True)
            outcomes = []
            for point in points(args.fractions):
                outcome = harness.kill(point)
                outcomes.append(outcome)
                verdict = "recovered" if outcome.recovered else "NOT REACHED" if not outcome.reached else "FAILED"
                print(f"{verdict:11} {outcome.seconds:5.1f} s  {point}  {'; '.join(outcome.problems)}", flush=True)
        finally:
            server.shutdown()
    reached = [o for o in outcomes if o.reached]
    summary = {
        "machine": machine, "date": time.strftime("%Y-%m-%d"), "minutes": round((time.time() - started) / 60, 1),
        "uninterrupted_reruns_recovered": sum(not o.problems for o in controls), "stages": len(controls),
        "points_tried": len(outcomes), "reached": len(reached), "recovered": sum(o.recovered for o in outcomes),
        "failed": sum(bool(o.problems) for o in outcomes),  # a point not reached must still recover
        "outcomes": [{"point": str(o.point), "reached": o.reached, "problems": o.problems,
                      "seconds": round(o.seconds, 1)} for o in outcomes],
    }
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "outcomes"}))


if __name__ == "__main__":
    main()
