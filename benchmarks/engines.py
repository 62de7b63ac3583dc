"""The frozen backbone on four CPU inference engines: photos/s, peak RSS and how far each engine's features
are from TensorFlow's, per model (the default's three EfficientNet-Lite bases side by side, and each base
alone, all at 260 px) and batch size (issue 35, item 1).

    KERAS_HOME=/tmp/kh .venv/bin/python benchmarks/engines.py                   # tensorflow + litert
    KERAS_HOME=/tmp/kh /tmp/engines-venv/bin/python benchmarks/engines.py       # + onnxruntime + openvino
    ... benchmarks/engines.py --models efficientnet_lite0 --batches 1 --engines tensorflow,litert --json
    ... benchmarks/engines.py --models default --batches 1 --engines tensorflow,litert-cf   # the NaN trap

Engines (every one on 2 threads, float32):

- ``tensorflow``: the Keras extractor (components/backbone.py) in a ``tf.function``, training=False: the
  baseline, and the reference every other engine's features are compared with.
- ``litert``: ai_edge_litert (a project dependency) on the float32 ``.tflite`` converted as
  components/export.py does: ``keras.export.ExportArchive`` with a float32 ``serve_images`` endpoint
  ([None, 260, 260, 3]), then ``TFLiteConverter.from_saved_model(signature_keys=["serve_images"])``, builtin
  ops only. Run with ``num_threads=2, experimental_default_delegate_latest_features=True`` (XNNPACK, 2
  threads), resized once to the batch.
- ``onnxruntime``: Keras' own ONNX export (``model.export(format="onnx")``, tf2onnx underneath), CPU provider,
  ``intra_op_num_threads=2``, ``ORT_ENABLE_ALL``.
- ``openvino``: ``ov.convert_model`` of the same SavedModel's ``serve_images`` signature, saved with
  ``compress_to_fp16=False`` (``ov.save_model`` stores float16 weights by default), reshaped to the batch,
  compiled for CPU with ``INFERENCE_PRECISION_HINT=f32`` (on a CPU with AVX512_BF16 OpenVINO computes in
  bfloat16 unless told), LATENCY, 2 threads, 1 stream.
- extra, not in the default list: ``openvino-bf16`` (the same without the precision hint: what a user gets
  by default on such a CPU) and ``litert-cf`` (``TFLiteConverter.from_concrete_functions([f], model)`` on the
  unfrozen function: the conversion that gave NaN features and a few photos/s. Its file holds no weights
  (0.7 MB instead of 49 MB: 885 VAR_HANDLE/READ_VARIABLE ops read variables nothing initialises), BatchNorm
  is not folded, and convolutions whose filters are not constants stay off XNNPACK (65 delegate partitions,
  the rest on reference kernels). Freezing the variables first (components/engines.py, what the bottleneck
  stage runs) gives the same ops as the SavedModel route above in a quarter of the time.)

How it measures. The photos (``--photos``, drawn with ``--seed`` from flower_photos' class folders) are
decoded and resized once with ``components.images.decode_and_resize`` to 260x260 float32 in [0, 255] and
saved; the same pixels go to every engine. Per model, one child process builds the extractor, computes
TensorFlow's reference features (batches of 16) and converts it for every engine (times recorded). Then every
engine x batch size runs in its own child process, so that its peak RSS is its own: it loads the photos
(memory-mapped; they count in the RSS, the same for every engine: ``rss_photos_mib``), loads the engine (only
``tensorflow`` imports TensorFlow and builds the model; the others load their converted file), runs two
batches to warm up, times ``--passes`` passes over all the photos (the fastest counts), and compares its
features with the reference: the largest absolute difference, the largest difference relative to the photo's
largest feature (``max_rel``), and the largest elementwise relative difference where the reference is >= 0.01
(``max_rel_elem``; the features are averages of ReLU6 outputs, many near 0). The tensorflow rows' own
difference (batch 1 vs the reference's 16) is TensorFlow's noise floor.

The machine has few cores and other work may run: before every timed child (and before machine.py's
describe(), which times too) it waits, polling every 20 s, until ``pgrep -f "pytest|real_scale|dvc
repro|graftline"`` finds nothing; a child during which such a process appeared, or other processes took
more than ``--max-other-cpu`` of the machine's CPU (from /proc/stat, the child's own time apart), is run
again (twice at most; the least disturbed try is kept, flagged).

Extra engines, without touching .venv (its pinned TFX/protobuf set is fragile): a venv that sees .venv's
packages after its own, and the engines installed without their dependencies (all but
openvino-telemetry are already in .venv)::

    python3.11 -m venv /tmp/engines-venv
    printf '%s\\n' "$PWD/.venv/lib/python3.11/site-packages" "$PWD" \\
        > /tmp/engines-venv/lib/python3.11/site-packages/zz_graftline.pth
    /tmp/engines-venv/bin/pip install --no-deps onnxruntime==1.32.0 openvino==2026.4.1 \\
        openvino-telemetry tf2onnx==1.17.0 onnx==1.23.2

Outputs go to ``--out`` (default /tmp/engines): engines.json (every row), summary.md (the table), and
models/ (the converted files).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_HOME", "/tmp/kh")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZE = 260
THREADS = 2
REF_BATCH = 16
WARMUP_BATCHES = 2
BUSY = "pytest|real_scale|dvc repro|graftline"
POLL_S = 20
ENGINES = ("tensorflow", "litert", "onnxruntime", "openvino")
EXTRA_ENGINES = ("openvino-bf16", "litert-cf")
# engine -> (modules it needs, how to get them)
NEEDS = {
    "tensorflow": (("tensorflow",), "make setup"),
    "litert": (("tensorflow", "ai_edge_litert"), "make setup"),
    "litert-cf": (("tensorflow", "ai_edge_litert"), "make setup"),
    "onnxruntime": (("onnxruntime", "tf2onnx", "onnx"), "pip install --no-deps onnxruntime tf2onnx onnx"),
    "openvino": (("openvino",), "pip install --no-deps openvino openvino-telemetry"),
    "openvino-bf16": (("openvino",), "pip install --no-deps openvino openvino-telemetry"),
}
MODEL_FILES = {"litert": "model.tflite", "litert-cf": "model_concrete_functions.tflite",
               "onnxruntime": "model.onnx", "openvino": "model.xml", "openvino-bf16": "model.xml"}


def default_model() -> str:
    from pipeline import params as params_mod

    return params_mod.from_dict({}).base.model


def extractor(model: str):
    from components.backbone import Backbone
    from pipeline import params as params_mod

    p = params_mod.from_dict({"base": {"model": model, "image_size": SIZE}})
    return Backbone.from_params(p, training=False).extractor()


def serving_function(ex):
    import tensorflow as tf

    return tf.function(lambda pixels: ex(pixels, training=False),
                       input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name="images")])


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ---------------------------------------------------------------- photos, reference, conversions (children)

def make_photos(args) -> None:
    """Child: draw --photos photos, decode and resize them once, save [n, 260, 260, 3] float32."""
    import numpy as np
    import tensorflow as tf

    from components.images import decode_and_resize

    files = sorted(Path(args.data).glob("*/*.jpg"))
    if len(files) < args.photos:
        sys.exit(f"{args.data}: {len(files)} photos in class folders, fewer than --photos {args.photos}")
    pick = np.random.default_rng(args.seed).choice(len(files), args.photos, replace=False)
    pixels = np.stack([decode_and_resize(tf.io.read_file(str(files[i])), SIZE).numpy() for i in pick])
    np.save(args.photos_file, pixels.astype(np.float32))
    Path(args.photos_file).with_suffix(".txt").write_text("".join(f"{files[i]}\n" for i in pick))


def prepare(args) -> None:
    """Child: the model's reference features (TensorFlow, batches of 16) and its file for every engine asked
    for. Prints a JSON line of conversion times and problems."""
    import contextlib
    import io

    import keras
    import numpy as np
    import tensorflow as tf

    out = Path(args.model_dir)
    out.mkdir(parents=True, exist_ok=True)
    engines = set(args.engines.split(","))
    pixels = np.load(args.photos_file, mmap_mode="r")
    info = {"convert_s": {}, "problems": {}}

    started = time.perf_counter()
    ex = extractor(args.model)
    fn = serving_function(ex)
    info["build_s"] = time.perf_counter() - started
    started = time.perf_counter()
    ref = np.concatenate([fn(np.asarray(pixels[i:i + REF_BATCH])).numpy() for i in range(0, len(pixels), REF_BATCH)])
    np.save(out / "reference.npy", ref)
    info["reference_s"] = time.perf_counter() - started
    info["features"] = int(ref.shape[1])

    def step(engine, make):
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                make()
            info["convert_s"][engine] = time.perf_counter() - started
        except Exception as error:  # one engine's failure is a row, not the end of the run
            info["problems"][engine] = f"{type(error).__name__}: {str(error)[:400]}"

    saved = out / "saved_model"

    def export_saved_model():
        archive = keras.export.ExportArchive()
        archive.track(ex)
        archive.add_endpoint("serve_images", fn)  # the only endpoint: also serving_default
        archive.write_out(str(saved), verbose=False)

    if engines & {"litert", "openvino", "openvino-bf16"}:
        step("saved_model", export_saved_model)

    if "litert" in engines:
        def litert():
            converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=["serve_images"])
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no Flex ops, or fail
            (out / MODEL_FILES["litert"]).write_bytes(converter.convert())
        step("litert", litert)

    if "litert-cf" in engines:
        def litert_cf():  # the colleague's conversion (see explain_concrete_functions)
            converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], ex)
            (out / MODEL_FILES["litert-cf"]).write_bytes(converter.convert())
        step("litert-cf", litert_cf)

    if "onnxruntime" in engines:
        def onnx_export():
            ex.export(str(out / MODEL_FILES["onnxruntime"]), format="onnx", verbose=False,
                      input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name="images")])
        step("onnxruntime", onnx_export)

    if engines & {"openvino", "openvino-bf16"}:
        def openvino():
            import openvino as ov

            loaded = tf.saved_model.load(str(saved))  # kept: a signature holds its variables weakly
            signature = loaded.signatures["serve_images"]
            # compress_to_fp16 defaults to True: float16 weights, ~1e-3 off before any bf16 question.
            ov.save_model(ov.convert_model(signature), str(out / MODEL_FILES["openvino"]), compress_to_fp16=False)
        step("openvino", openvino)

    print(json.dumps(info))


# ---------------------------------------------------------------- one engine at one batch size (a child)

def load_engine(engine: str, model_dir: Path, model: str, batch: int):
    """A function [batch, 260, 260, 3] float32 -> features (numpy), and facts about how it runs."""
    import numpy as np

    facts = {}
    if engine == "tensorflow":
        import tensorflow as tf

        fn = serving_function(extractor(model))
        facts["threads"] = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                            "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
        return lambda x: fn(x).numpy(), facts

    if engine in ("litert", "litert-cf"):
        from collections import Counter

        from ai_edge_litert.interpreter import Interpreter

        itp = Interpreter(model_content=(model_dir / MODEL_FILES[engine]).read_bytes(), num_threads=THREADS,
                          experimental_default_delegate_latest_features=True)
        source, target = itp.get_input_details()[0], itp.get_output_details()[0]
        itp.resize_tensor_input(source["index"], [batch, SIZE, SIZE, 3], strict=True)  # once, then allocate
        itp.allocate_tensors()
        ops = Counter(d["op_name"] for d in itp._get_ops_details())  # private, but the only way to see delegation
        facts["ops"] = dict(ops.most_common(8))
        facts["delegate_nodes"] = ops.get("DELEGATE", 0)
        facts["file_bytes"] = (model_dir / MODEL_FILES[engine]).stat().st_size

        def run(x):
            itp.set_tensor(source["index"], x)
            itp.invoke()
            return itp.get_tensor(target["index"])  # a copy
        return run, facts

    if engine == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(model_dir / MODEL_FILES[engine]), options,
                                       providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        facts["providers"] = session.get_providers()
        return lambda x: session.run(None, {name: x})[0], facts

    if engine in ("openvino", "openvino-bf16"):
        import openvino as ov

        core = ov.Core()
        ov_model = core.read_model(str(model_dir / MODEL_FILES[engine]))
        ov_model.reshape([batch, SIZE, SIZE, 3])
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": THREADS, "NUM_STREAMS": 1}
        if engine == "openvino":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        compiled = core.compile_model(ov_model, "CPU", config)
        facts["precision"] = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        facts["cpu_capabilities"] = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        request = compiled.create_infer_request()

        def run(x):
            request.infer({0: x})
            return np.array(request.get_output_tensor(0).data, copy=True)
        return run, facts

    raise ValueError(f"unknown engine {engine!r}")


def differences(features, ref) -> dict:
    import numpy as np

    diff = np.abs(features.astype(np.float64) - ref.astype(np.float64))
    scale = np.abs(ref).max(axis=1, keepdims=True).astype(np.float64)
    big = np.abs(ref) >= 0.01
    return {
        "nan": int(np.isnan(features).sum()),
        "max_abs": float(np.nanmax(diff)) if not np.isnan(diff).all() else float("nan"),
        "max_rel": float(np.nanmax(diff / scale)) if not np.isnan(diff).all() else float("nan"),
        "max_rel_elem": float(np.nanmax(diff[big] / np.abs(ref[big]))) if not np.isnan(diff).all() else float("nan"),
        "top_feature_agree": float(np.mean(np.nan_to_num(features, nan=-1).argmax(1) == ref.argmax(1))),
    }


def measure(args) -> None:
    """Child: one engine at one batch size over every photo; prints a JSON line."""
    import numpy as np

    pixels = np.load(args.photos_file, mmap_mode="r")
    np.asarray(pixels).sum()  # touch every page: the photos' share of the RSS is counted before the engine's
    rss_photos = rss_mib()
    batch = args.batch
    n = len(pixels) - len(pixels) % batch
    batches = [np.ascontiguousarray(pixels[i:i + batch]) for i in range(0, n, batch)]

    started = time.perf_counter()
    run, facts = load_engine(args.engine, Path(args.model_dir), args.model, batch)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    for x in batches[:WARMUP_BATCHES]:
        run(x)
    warmup_s = time.perf_counter() - started

    times = []
    for _ in range(args.passes):  # the features of the last pass are compared; the fastest pass is reported
        started = time.perf_counter()
        features = [run(x) for x in batches]
        times.append(time.perf_counter() - started)
    seconds = min(times)
    features = np.concatenate(features)
    ref = np.load(Path(args.model_dir) / "reference.npy")[:n]
    print(json.dumps({
        "model": args.label, "engine": args.engine, "batch": batch, "photos": n, "seconds": seconds,
        "photos_per_s": n / seconds, "pass_s": times, "load_s": load_s, "warmup_s": warmup_s,
        "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_photos_mib": rss_photos,
        **differences(features, ref), **facts,
    }))


def describe_machine(_args) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine import describe

    print(describe())


# ---------------------------------------------------------------- the parent

def busy() -> list[str]:
    """Command lines of the heavy processes timing must not overlap (this process and its ancestors apart)."""
    found = subprocess.run(["pgrep", "-af", BUSY], capture_output=True, text=True).stdout.splitlines()
    mine, pid = set(), os.getpid()
    while pid > 1:
        mine.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return [line for line in found if int(line.split()[0]) not in mine]


def wait_quiet(log) -> float:
    waited, started = False, time.perf_counter()
    while others := busy():
        if not waited:
            log(f"  waiting for: {others[0][:120]}" + (f" (+{len(others) - 1} more)" if len(others) > 1 else ""))
            waited = True
        time.sleep(POLL_S)
    return time.perf_counter() - started


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine since boot, CPU seconds of this process' waited-for children)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy / os.sysconf("SC_CLK_TCK"), children.ru_utime + children.ru_stime


def child(args, *extra, usage: dict | None = None) -> dict | str:
    """Run this script in a child mode; its JSON line (or what went wrong). ``usage`` gets the share of the
    machine's CPU that other processes took while it ran (``other_cpu``: 0 = none, 1 = every core)."""
    cmd = [sys.executable, __file__, *extra, "--photos-file", str(args.photos_file)]
    started, (machine_busy, mine) = time.perf_counter(), cpu_seconds()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if usage is not None:
        wall, (busy_after, mine_after) = time.perf_counter() - started, cpu_seconds()
        others = max(0.0, (busy_after - machine_busy) - (mine_after - mine))
        usage["other_cpu"] = others / (wall * (os.cpu_count() or 1))
    if out.returncode:
        return f"exit {out.returncode}: " + " | ".join(out.stderr.strip().splitlines()[-3:])[-600:]
    lines = [line for line in out.stdout.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else out.stdout.strip()


def available(engine: str) -> bool:
    return all(importlib.util.find_spec(module) for module in NEEDS[engine][0])


def fmt(value: float, digits: int = 1) -> str:
    if value != value:
        return "NaN"
    return f"{value:.{digits}e}" if digits < 0 else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | engine | batch | photos/s | ratio to TF (same batch) | ratio to TF's best batch | peak RSS MiB "
             "| max abs diff | max rel diff (to photo's max) | max rel diff (elementwise, ref >= 0.01) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['engine']} | {r['batch']} | failed: {r['error'][:150]} | | | | | | |")
            continue
        tf_rates = {t["batch"]: t["photos_per_s"] for t in rows
                    if t.get("engine") == "tensorflow" and "error" not in t and t["model"] == r["model"]}
        ratio = f"{r['photos_per_s'] / tf_rates[r['batch']]:.2f}" if r["batch"] in tf_rates else "-"
        best = f"{r['photos_per_s'] / max(tf_rates.values()):.2f}" if tf_rates else "-"
        flag = f" (disturbed: others {r['other_cpu']:.0%} CPU)" if r.get("disturbed") else ""
        lines.append(f"| {r['model']} | {r['engine']} | {r['batch']} | {r['photos_per_s']:.1f}{flag} | {ratio} "
                     f"| {best} | {r['rss_peak_mib']:.0f} | {r['max_abs']:.1e} | {r['max_rel']:.1e} "
                     f"| {r['max_rel_elem']:.1e} |")
    return "\n".join(lines)


def verdict(rows: list[dict], tolerance: float) -> list[str]:
    """Engine rows at least 1.5x TensorFlow at its best batch size, features within ``tolerance`` (max_rel)."""
    found = []
    for r in rows:
        if "error" in r or r["engine"] == "tensorflow":
            continue
        tf_rates = [t["photos_per_s"] for t in rows
                    if t.get("engine") == "tensorflow" and "error" not in t and t["model"] == r["model"]]
        if not tf_rates:
            continue
        ratio = r["photos_per_s"] / max(tf_rates)
        if ratio >= 1.5 and r["max_rel"] <= tolerance and not r["nan"]:
            found.append(f"{r['model']} / {r['engine']} / batch {r['batch']}: {ratio:.2f}x TensorFlow's best, max rel "
                         f"{r['max_rel']:.1e} (elementwise {r['max_rel_elem']:.1e})")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="default,each",
                        help="comma-separated base.model values; 'default' = params' default backbone, 'each' = "
                             "each of its bases alone (default: default,each)")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma-separated, of {', '.join(ENGINES + EXTRA_ENGINES)}")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--photos", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passes", type=int, default=2, help="timed passes over the photos; the fastest counts")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flower_photos"))
    parser.add_argument("--out", default="/tmp/engines")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max rel diff an engine must reach to win")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    parser.add_argument("--max-other-cpu", type=float, default=0.05,
                        help="a timed child during which other processes took more of the CPU is run again")
    parser.add_argument("--no-wait", action="store_true", help="time without waiting for other work (not for figures)")
    # child modes
    parser.add_argument("--child", choices=("photos", "prepare", "measure", "describe"), help=argparse.SUPPRESS)
    parser.add_argument("--photos-file", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        modes = {"photos": make_photos, "prepare": prepare, "measure": measure, "describe": describe_machine}
        return modes[args.child](args)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in NEEDS]
    if unknown:
        parser.error(f"unknown engines {unknown}; known: {', '.join(NEEDS)}")
    missing = [e for e in engines if not available(e)]
    if missing:
        print(f"unavailable (package missing in {sys.executable}): "
              + "; ".join(f"{e} ({NEEDS[e][1]}; see this script's docstring)" for e in missing), flush=True)
    engines = [e for e in engines if e not in missing]
    if "tensorflow" not in engines:
        engines.insert(0, "tensorflow")  # the reference rate every ratio needs
    from components import backbone

    batches = [int(b) for b in args.batches.split(",")]
    base = default_model()
    models = []
    for m in args.models.split(","):
        models += [(base, "default")] if m == "default" else \
            [(name, name) for name in backbone.names(base)] if m == "each" else [(m, m)]

    args.photos_file = out / f"photos_{args.photos}_seed{args.seed}_{SIZE}px.npy"
    if not args.photos_file.exists():
        log(f"decoding {args.photos} photos from {args.data} -> {args.photos_file}")
        made = child(args, "--child", "photos", "--photos", str(args.photos), "--seed", str(args.seed),
                     "--data", args.data)
        if isinstance(made, str) and made.startswith("exit"):
            sys.exit(f"photos: {made}")

    def quiet():
        return 0.0 if args.no_wait else wait_quiet(log)

    quiet()
    machine = child(args, "--child", "describe", usage=(describe_usage := {}))
    machine += f" (other processes took {describe_usage['other_cpu']:.0%} of the CPU meanwhile)"
    log(f"machine: {machine}")

    rows, prepared = [], {}
    for model, label in models:
        model_dir = out / "models" / label
        log(f"{label}: reference features and conversions ({', '.join(e for e in engines if e != 'tensorflow')})")
        info = child(args, "--child", "prepare", "--model", model, "--model-dir", str(model_dir),
                     "--engines", ",".join(engines))
        if isinstance(info, str):
            sys.exit(f"{label}: prepare failed: {info}")
        prepared[label] = info
        for engine, problem in info["problems"].items():
            log(f"  {engine}: conversion failed: {problem}")
        for batch in batches:
            for engine in engines:
                if engine in info["problems"] or ("saved_model" in info["problems"] and engine in (
                        "litert", "openvino", "openvino-bf16")):
                    rows.append({"model": label, "engine": engine, "batch": batch,
                                 "error": info["problems"].get(engine) or info["problems"]["saved_model"]})
                    continue
                kept = None
                for attempt in range(3):
                    waited, usage = quiet(), {}
                    r = child(args, "--child", "measure", "--engine", engine, "--model", model, "--label", label,
                              "--model-dir", str(model_dir), "--batch", str(batch), "--passes", str(args.passes),
                              usage=usage)
                    if isinstance(r, str):
                        kept = {"model": label, "engine": engine, "batch": batch, "error": r}
                        break
                    r["waited_s"], r["other_cpu"] = waited, usage["other_cpu"]
                    r["disturbed"] = not args.no_wait and (bool(busy()) or r["other_cpu"] > args.max_other_cpu)
                    if kept is None or r["other_cpu"] < kept["other_cpu"]:
                        kept = r
                    if not r["disturbed"]:
                        break
                    log(f"  disturbed by other work (other processes took {r['other_cpu']:.0%} of the CPU): again")
                r = kept
                rows.append(r)
                log(f"  {label} {engine} b{batch}: " + (r["error"] if "error" in r else
                    f"{r['photos_per_s']:.1f} photos/s, peak RSS {r['rss_peak_mib']:.0f} MiB, "
                    f"max abs {r['max_abs']:.1e}, max rel {r['max_rel']:.1e}"))

    winners = verdict(rows, args.tolerance)
    result = {"machine": machine, "python": sys.executable, "photos": args.photos, "seed": args.seed,
              "size": SIZE, "threads": THREADS, "engines_unavailable": missing, "prepare": prepared, "rows": rows,
              "winners": winners, "tolerance": args.tolerance}
    (out / "engines.json").write_text(json.dumps(result, indent=1))
    summary = (f"machine: {machine}\n\n{args.photos} flower_photos (seed {args.seed}) at {SIZE} px, "
               f"{THREADS} threads, float32; ratio = photos/s over TensorFlow's in the same run and batch; "
               f"differences from TensorFlow's features (tf.function, batch {REF_BATCH})\n\n{table(rows)}\n\n"
               f"at least 1.5x TensorFlow at its best batch size, max rel <= {args.tolerance:g}: "
               + ("; ".join(winners) if winners else "none") + "\n")
    (out / "summary.md").write_text(summary)
    print(json.dumps(result, indent=1) if args.json else summary)


if __name__ == "__main__":
    main()
