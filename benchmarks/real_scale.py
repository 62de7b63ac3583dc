"""The default run at real scale, against TensorFlow's tutorial recipe, in one invocation.

    .venv/bin/python benchmarks/real_scale.py --photos ../shared/data/flower_photos \
        --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5

1. graftline as a user runs it: the photo folder is packed as the archive
   TensorFlow publishes (``flower_photos/<class>/...``) and served over
   loopback, so ``data.url`` is downloaded (progress bar, sha256) and extracted;
   the ImageNet weights are found through ``$KERAS_HOME``; every other param is
   at its default (or ``--set key=value``); then ``dvc repro`` in a fresh git
   repo. Each stage's wall time and peak RSS (its process tree, sampled).
2. The tutorial's recipe as its users run it, on the same train/val/test photos
   (graftline's split): ``image_dataset_from_directory`` at 160 px, MobileNetV2
   1.0 frozen with RandomFlip + RandomRotation(0.2) in the model, the head 10
   epochs at RMSprop 1e-4, then layers >= 100 at RMSprop 1e-5 for 10 more, the
   base run on the images every epoch; then its test accuracy.

Several graftline configurations in one invocation, beside one tutorial run
(``--run LABEL KEY=VALUE ...``, repeatable; without it, the defaults):

    .venv/bin/python benchmarks/real_scale.py --photos ../shared/data/flower_photos --weights ... \
        --run mobilenet_v2@160 --run mobilenet_v2@224 base.image_size=224 \
        --run lite0 base.model=efficientnet_lite0 --json out.json --plot accuracy_time.png

Prints the machine, a table per run, the test accuracies and the ratios to the
tutorial; ``--json`` keeps every figure, ``--plot`` draws test accuracy against
whole-run wall time. Run it alone: the runs are timed on the same cores.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))  # loopback.serve: the URL path over 127.0.0.1, as the tests run it

from loopback import serve  # noqa: E402
STAGE_REPORTS = {"download": None, "ingest": "reports/ingest.json", "bottleneck": "reports/bottleneck.json",
                 "audit": "reports/audit.json",
                 "train_head": "reports/train_head.json", "fine_tune": "reports/fine_tune.json",
                 "evaluate": "reports/evaluate.json"}
KERAS_NAMES = [f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{s}_no_top.h5" for s in (96, 128, 160, 192, 224)]


class Sampler:
    """Peak RSS of a process tree, sampled every 0.1 s, attributed to the current label."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.label, self.peaks, self._stop = psutil.Process(pid), "", {}, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop:
            try:
                procs = [self.root] + self.root.children(recursive=True)
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.peaks[self.label] = max(self.peaks.get(self.label, 0), rss)
            time.sleep(0.1)

    def stop(self) -> dict:
        self._stop = True
        self.thread.join()
        return self.peaks


def pack(photos: Path, archive: Path) -> str:
    """The folder as TensorFlow's archive lays it out (flower_photos/<class>/...); returns its sha256."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(photos, arcname="flower_photos")
    return hashlib.sha256(archive.read_bytes()).hexdigest()


def set_key(params: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for key in path:
        params = params.setdefault(key, {})
    params[last] = value


def run_graftline(work: Path, url: str, sha256: str, weights: Path, overrides: list[str]) -> dict:
    import yaml

    project, keras_home = work / "project", work / "keras"
    (keras_home / "models").mkdir(parents=True)
    for name in KERAS_NAMES:  # the 224 file works at every size (the network is fully convolutional)
        os.symlink(weights.resolve(), keras_home / "models" / name)
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (project / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, project / rel)
    params = yaml.safe_load((project / "params.yaml").read_text())
    set_key(params, "data.url", url)
    set_key(params, "data.sha256", sha256)
    for item in overrides:
        key, value = item.split("=", 1)
        set_key(params, key, yaml.safe_load(value))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "KERAS_HOME": str(keras_home), "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@invalid"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True)

    started = time.time()
    proc = subprocess.Popen(["dvc", "repro"], cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(proc.pid)
    marks, log = [], []
    for line in proc.stdout:
        log.append(line)
        found = re.match(r"Running stage '(\w+)'", line)
        if found:
            marks.append((found.group(1), time.time()))
            sampler.label = found.group(1)
    proc.wait()
    ended = time.time()
    peaks = sampler.stop()
    if proc.returncode:
        sys.exit("dvc repro failed:\n" + "".join(log)[-4000:])
    stages = []
    for i, (stage, at) in enumerate(marks):
        until = marks[i + 1][1] if i + 1 < len(marks) else ended
        report = STAGE_REPORTS.get(stage)
        inner = json.loads((project / report).read_text()).get("wall_time_s") if report else None
        stages.append({"stage": stage, "wall_s": until - at, "in_stage_s": inner, "peak_rss_mb": peaks.get(stage, 0) / 2**20})
    metrics = {name: json.loads((project / "metrics" / f"{name}.json").read_text())
               for name in ("train_head", "fine_tune", "evaluate")}
    ingest = json.loads((project / "reports" / "ingest.json").read_text())
    return {"project": project, "wall_s": ended - started, "stages": stages, "metrics": metrics, "ingest": ingest,
            "peak_rss_mb": max(peaks.values()) / 2**20, "keras_home": keras_home}


def split_folders(project: Path, photos_root: Path, out: Path) -> dict[str, int]:
    """graftline's split as the tutorial's folders: out/{train,val,test}/<class>/<photo> (symlinks)."""
    from components import records

    counts = {}
    for split in records.SPLITS:
        n = 0
        for shard in records.shard_paths(project / "artifacts" / "examples", split):
            for r in records.read_shard(str(shard)):
                target = out / split / r.key
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(photos_root / r.key, target)
                n += 1
        counts[split] = n
    return counts


def tutorial(folders: Path, result: Path) -> None:
    """Child process: the tutorial's recipe, five classes (softmax), on folders/{train,val,test}."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(42)
    size, batch = (160, 160), 32
    load = functools.partial(keras.utils.image_dataset_from_directory, batch_size=batch, image_size=size)
    train = load(folders / "train", shuffle=True, seed=42).prefetch(tf.data.AUTOTUNE)
    val = load(folders / "val", shuffle=False).prefetch(tf.data.AUTOTUNE)
    test = load(folders / "test", shuffle=False).prefetch(tf.data.AUTOTUNE)
    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2)])
    base = keras.applications.MobileNetV2(input_shape=size + (3,), include_top=False, weights="imagenet")
    base.trainable = False
    inputs = keras.Input(size + (3,))
    x = keras.applications.mobilenet_v2.preprocess_input(augmentation(inputs))
    x = base(x, training=False)
    x = keras.layers.Dropout(0.2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, keras.layers.Dense(5)(x))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    timings = {}
    started = time.time()
    model.compile(keras.optimizers.RMSprop(1e-4), loss, metrics=["accuracy"])
    head = model.fit(train, validation_data=val, epochs=10, verbose=2)
    timings["head_s"] = time.time() - started
    base.trainable = True
    for layer in base.layers[:100]:
        layer.trainable = False
    model.compile(keras.optimizers.RMSprop(1e-5), loss, metrics=["accuracy"])
    started = time.time()
    fine = model.fit(train, validation_data=val, epochs=20, initial_epoch=len(head.epoch), verbose=2)
    timings["fine_tune_s"] = time.time() - started
    _, accuracy = model.evaluate(test, verbose=0)
    result.write_text(json.dumps({**timings, "val_accuracy": fine.history["val_accuracy"][-1],
                                  "test_accuracy": accuracy}))


def run_tutorial(work: Path, folders: Path, keras_home: Path) -> dict:
    out = work / "tutorial.json"
    env = {**os.environ, "KERAS_HOME": str(keras_home), "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--tutorial-child", str(folders), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    _, err = proc.communicate()
    wall = time.time() - started
    peaks = sampler.stop()
    if proc.returncode:
        sys.exit("the tutorial recipe failed:\n" + err[-4000:])
    return {**json.loads(out.read_text()), "wall_s": wall, "peak_rss_mb": max(peaks.values()) / 2**20}


def report_graftline(label: str, g: dict) -> None:
    print(f"\n## {label}\n\nphotos: {g['ingest']['num_examples']} ({g['ingest']['splits']}), "
          f"{g['ingest']['num_duplicates']} duplicates, {g['ingest']['num_label_conflicts']} label conflicts\n")
    print("| graftline stage | wall s | in-stage s | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for s in g["stages"]:
        inner = f"{s['in_stage_s']:.1f}" if s["in_stage_s"] is not None else "-"
        print(f"| {s['stage']} | {s['wall_s']:.1f} | {inner} | {s['peak_rss_mb']:.0f} |")
    print(f"| `dvc repro` | {g['wall_s']:.1f} | | {g['peak_rss_mb']:.0f} |")
    m = g["metrics"]
    print(f"\ngraftline {label}: head val {m['train_head']['val_accuracy']:.3f}, fine-tune val "
          f"{m['fine_tune']['val_accuracy']:.3f}, **test {m['evaluate']['accuracy']:.3f}** "
          f"({m['evaluate']['num_test']} photos)", flush=True)


def write_results(path: Path, machine: str, photos: Path, results: list[dict], tutorial_row: dict | None) -> None:
    kept = [{k: v for k, v in r.items() if k not in ("project", "keras_home")} for r in results]
    path.write_text(json.dumps({"machine": machine, "photos": str(photos), "runs": kept, "tutorial": tutorial_row},
                               indent=2) + "\n")


def plot(rows: list[dict], tutorial_row: dict | None, path: Path, machine: str) -> None:
    """Test accuracy against whole-run wall time, one point per run (the tutorial's marked apart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, row in enumerate(sorted(rows, key=lambda r: r["wall_s"])):  # labels above and below by turns
        ax.scatter(row["wall_s"], row["test"], color="tab:blue")
        ax.annotate(row["label"], (row["wall_s"], row["test"]), textcoords="offset points",
                    xytext=(5, 5 if i % 2 == 0 else -12), fontsize=8)
    times, tests = [r["wall_s"] for r in rows], [r["test"] for r in rows]
    if tutorial_row:
        ax.scatter(tutorial_row["wall_s"], tutorial_row["test"], color="tab:red", marker="s")
        ax.annotate("tutorial recipe", (tutorial_row["wall_s"], tutorial_row["test"]), textcoords="offset points",
                    xytext=(-40, 6), fontsize=8)
        ax.axvline(tutorial_row["wall_s"] / 4, color="grey", linestyle=":", label="1/4 of the tutorial's time")
        times, tests = times + [tutorial_row["wall_s"]], tests + [tutorial_row["test"]]
    ax.axhline(0.95, color="grey", linestyle="--", label="test accuracy 0.95")
    ax.set_xlim(0, max(times) * 1.15)
    ax.set_ylim(min(tests) - 0.01, max(max(tests), 0.95) + 0.01)
    ax.set_xlabel("whole run wall time, s (graftline: dvc repro from the download)")
    ax.set_ylabel("test accuracy")
    ax.set_title("flower_photos, one run each\n" + machine.replace("; ", "\n"), fontsize=8)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", help="flower_photos folder (class folders)")
    parser.add_argument("--weights", help="MobileNetV2 1.0 ImageNet weights file (no top)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="graftline params, every run")
    parser.add_argument("--run", action="append", nargs="+", metavar="LABEL [KEY=VALUE ...]",
                        help="one graftline configuration (repeatable); default: one run with the defaults")
    parser.add_argument("--skip-tutorial", action="store_true", help="graftline only")
    parser.add_argument("--keep", help="leave the work folder here")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--plot", help="draw test accuracy against wall time here (PNG)")
    parser.add_argument("--replot", metavar="JSON", help="only draw --plot from a --json file of an earlier run")
    parser.add_argument("--tutorial-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tutorial_child:
        return tutorial(Path(args.tutorial_child[0]), Path(args.tutorial_child[1]))
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        return plot(saved["runs"], saved["tutorial"], Path(args.plot or "accuracy_time.png"), saved["machine"])
    if not (args.photos and args.weights):
        parser.error("give --photos and --weights")

    from machine import describe

    machine = describe()
    print(f"machine: {machine}", flush=True)
    photos, weights = Path(args.photos).resolve(), Path(args.weights).resolve()
    work = Path(args.keep or tempfile.mkdtemp(prefix="graftline-real-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    served = work / "served"
    served.mkdir(exist_ok=True)
    sha256 = pack(photos, served / "flower_photos.tgz")
    runs = args.run or [["defaults"]]
    print(f"\ndata: {photos} as flower_photos.tgz over loopback; graftline params: defaults"
          + (f" with {', '.join(args.set)}" if args.set else ""))
    server = serve(served)
    results = []
    try:
        for label, *overrides in runs:
            g = run_graftline(work / label.replace("/", "_"), f"http://127.0.0.1:{server.server_address[1]}/flower_photos.tgz",
                              sha256, weights, args.set + overrides)
            report_graftline(f"{label} ({', '.join(overrides) or 'defaults'})", g)
            m = g["metrics"]
            results.append({"label": label, "set": args.set + overrides, "wall_s": round(g["wall_s"], 1),
                            "peak_rss_mb": round(g["peak_rss_mb"]), "head_val": m["train_head"]["val_accuracy"],
                            "val": m["fine_tune"]["val_accuracy"], "test": m["evaluate"]["accuracy"],
                            "num_test": m["evaluate"]["num_test"], "project": g["project"], "keras_home": g["keras_home"],
                            "stages": {s["stage"]: round(s["wall_s"], 1) for s in g["stages"]}})
            if args.json:  # after every run, so a long invocation that dies keeps what it measured
                write_results(Path(args.json), machine, photos, results, None)
    finally:
        server.shutdown()
    tutorial_row = None
    if not args.skip_tutorial:
        folders = work / "tutorial-split"
        counts = split_folders(results[0]["project"], photos, folders)  # keys are paths relative to the class folders
        t = run_tutorial(work, folders, results[0]["keras_home"])
        print(f"\ntutorial recipe on the same split {counts}: wall {t['wall_s']:.1f} s (head {t['head_s']:.1f} s, "
              f"fine-tune {t['fine_tune_s']:.1f} s), peak RSS {t['peak_rss_mb']:.0f} MB, val {t['val_accuracy']:.3f}, "
              f"**test {t['test_accuracy']:.3f}**")
        tutorial_row = {"label": "tutorial", "wall_s": round(t["wall_s"], 1), "peak_rss_mb": round(t["peak_rss_mb"]),
                        "val": t["val_accuracy"], "test": t["test_accuracy"]}
    print("\n| run | head val | fine-tune val | test | `dvc repro` s | peak RSS MB |"
          + (" time / tutorial |" if tutorial_row else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if tutorial_row else ""))
    for r in results:
        ratio = f" {r['wall_s'] / tutorial_row['wall_s']:.2f} |" if tutorial_row else ""
        print(f"| {r['label']} | {r['head_val']:.3f} | {r['val']:.3f} | {r['test']:.3f} | {r['wall_s']:.1f} | "
              f"{r['peak_rss_mb']} |{ratio}")
    if tutorial_row:
        print(f"| tutorial recipe | | {tutorial_row['val']:.3f} | {tutorial_row['test']:.3f} | "
              f"{tutorial_row['wall_s']:.1f} | {tutorial_row['peak_rss_mb']} | 1.00 |")
    if args.json:
        write_results(Path(args.json), machine, photos, results, tutorial_row)
    if args.plot:
        plot(results, tutorial_row, Path(args.plot), machine)


if __name__ == "__main__":
    main()
