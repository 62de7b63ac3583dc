"""The crash harness (not a test module): kill a stage of a real `dvc repro` at a chosen moment, run `dvc repro`
once more, and check that nothing was lost or left behind.

A kill point is a stage, a signal (SIGKILL, SIGTERM), what is killed (the stage's own process, or `dvc repro`'s
whole process group, which leaves the stage a zombie where PID 1 does not reap) and a moment:

- ``Write``: just before the n-th Python-level write of a path matching a pattern (open for writing, rename,
  mkdir), in the stage's process (tests/crash_hook/sitecustomize.py);
- ``Appears``: as soon as a path matching a pattern exists (and is not empty), seen from outside;
- ``After``: a fraction of the stage process's lifetime in the uninterrupted run.

``Harness`` keeps one small DVC project (``tests/conftest.small_dvc_project``, its photos downloaded from a
throttled loopback server by the download stage) and its uninterrupted run as the reference. A kill point makes
its stage out of date without changing what it computes (a comment appended to the stage's module, one of its
code deps), runs `dvc repro`, kills at the moment, then runs `dvc repro` again and checks: exit 0, `dvc status`
clean, every metrics file equal to the reference's digit for digit, the same files in the project as after the
reference run and no temporary name anywhere, every feature and activation cache entry whole.

tests/test_crash.py runs a handful of points per stage in `make test`; benchmarks/crash.py runs many more.
"""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HOOK = Path(__file__).resolve().parent / "crash_hook"
STAGES = ("download", "ingest", "bottleneck", "audit", "train_head", "fine_tune", "evaluate")
# Names a writer gives what it has not finished: ours (.<name>.tmp-<pid>-*, <entry>.tmp-*), Beam's, TensorFlow's,
# and the usual others. None may be left in the project after a recovery.
TEMPORARY = re.compile(r"\.tmp|tmp-|beam-temp|tempstate|\.partial|\.part$|~$|\.swp$", re.IGNORECASE)
# Where a run writes what is not an output: TensorBoard's event files (named by time and pid; a killed run's stay,
# as TensorBoard's do) and DVC's own folder.
NOT_COMPARED = ("logs/", ".dvc/", ".git/")
CACHE = "data/feature_cache"


@dataclass(frozen=True)
class Write:
    event: str  # open | os.rename | os.mkdir
    pattern: str  # fnmatch, relative to the project
    nth: int = 1

    def __str__(self) -> str:
        return f"{self.event} #{self.nth} {self.pattern}"


@dataclass(frozen=True)
class Appears:
    pattern: str  # glob, relative to the project

    def __str__(self) -> str:
        return f"appears {self.pattern}"


@dataclass(frozen=True)
class After:
    fraction: float  # of the stage process's lifetime in the uninterrupted run

    def __str__(self) -> str:
        return f"at {self.fraction:.0%} of its run"


@dataclass(frozen=True)
class KillPoint:
    stage: str
    moment: Write | Appears | After
    signal: str = "KILL"  # KILL | TERM | INT (a terminal's Ctrl-C: to the whole group)
    scope: str = "stage"  # stage | group (dvc repro and the stage together)
    cold_cache: str = ""  # cache folders (a glob under data/feature_cache) removed first: the stage writes entries

    def __str__(self) -> str:
        return f"{self.stage} SIG{self.signal} ({self.scope}{', cold cache' if self.cold_cache else ''}) {self.moment}"


@dataclass
class Outcome:
    point: KillPoint
    reached: bool  # the stage was killed at the moment (False: it ended first)
    killed_rc: int | None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def recovered(self) -> bool:
        return self.reached and not self.problems


# ------------------------------------------------------------------ the project's photos, served slowly


class _Throttled(http.server.SimpleHTTPRequestHandler):
    """Sends files in 16 KiB pieces, 2 ms apart: a download lasts long enough to be killed half-way."""

    def copyfile(self, source, outputfile):
        while piece := source.read(16 << 10):
            outputfile.write(piece)
            time.sleep(0.002)

    def log_message(self, *args):
        pass


def serve_slowly(folder: Path) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Throttled, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def archive_of(photos: Path, archive: Path) -> str:
    """``photos`` (class folders) as a .tar.gz of fixed bytes; returns its sha256."""
    import hashlib

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for path in sorted(p for p in photos.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(f"photos/{path.relative_to(photos).as_posix()}")
            data = path.read_bytes()
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    archive.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def default_sigint() -> None:
    """In the child before exec: SIGINT as a terminal's Ctrl-C finds it. A suite started in the background
    (`make test &`, some CI runners) passes SIGINT on ignored, and Python then installs no handler for it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# ------------------------------------------------------------------ watching stage processes


def stages_running(root: Path) -> dict[str, psutil.Process]:
    """Stage -> the live process running `graftline <stage>` in ``root`` (an argument of its own, not a shell's
    -c; zombies left out)."""
    found = {}
    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["cwd"] == str(root) and proc.info["status"] != psutil.STATUS_ZOMBIE \
                and any(a.endswith("graftline") for a in cmdline[:2]):
            stage = next((s for s in STAGES if s in cmdline[1:]), None)
            if stage:
                found[stage] = proc
    return found


def stage_process(root: Path, stage: str) -> psutil.Process | None:
    return stages_running(root).get(stage)


class Lifetimes(threading.Thread):
    """How long each stage's process lived during a run (polled every 50 ms)."""

    def __init__(self, root: Path):
        super().__init__(daemon=True)
        self.root, self.seen, self.done = root, {}, threading.Event()

    def run(self):
        while not self.done.is_set():
            now = time.monotonic()
            for stage in stages_running(self.root):
                first, _ = self.seen.get(stage, (now, now))
                self.seen[stage] = (first, now)
            time.sleep(0.05)

    def seconds(self) -> dict[str, float]:
        return {stage: last - first for stage, (first, last) in self.seen.items()}


# ------------------------------------------------------------------ the harness


class Harness:
    def __init__(self, root: Path, env: dict, logs: Path):
        self.root, self.env, self.logs = root, env, logs
        self.reference: dict = {}
        self.lifetimes: dict[str, float] = {}
        self.touches = 0

    def dvc(self, *args: str, timeout: int = 900, **extra_env) -> subprocess.CompletedProcess:
        return subprocess.run(["dvc", *args], cwd=self.root, env={**self.env, **extra_env}, capture_output=True,
                              text=True, timeout=timeout)

    def run_reference(self) -> None:
        """The uninterrupted `dvc repro`: what every recovery must equal."""
        watch = Lifetimes(self.root)
        watch.start()
        done = self.dvc("repro")
        watch.done.set()
        watch.join()
        (self.logs / "reference.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        self.lifetimes = watch.seconds()
        self.reference = self.state()

    def measure_reruns(self) -> list[Outcome]:
        """Each stage made out of date and re-run uninterrupted (the control: it must recover too): how long
        its process lives in a re-run, with the caches warm, which is what the fractions of ``After`` take."""
        controls = []
        for stage in STAGES:
            started = time.monotonic()
            self.touch(stage)
            watch = Lifetimes(self.root)
            watch.start()
            done = self.dvc("repro")
            watch.done.set()
            watch.join()
            log = self.logs / f"rerun-{stage}.log"
            log.write_text(done.stdout + done.stderr)
            self.lifetimes[stage] = watch.seconds().get(stage, self.lifetimes[stage])
            controls.append(Outcome(KillPoint(stage, After(1.0)), True, None, self.check(done, log),
                                    time.monotonic() - started))
        return controls

    def state(self) -> dict:
        return {"metrics": metrics_of(self.root), "files": files_of(self.root)}

    def touch(self, stage: str, cold_cache: str = "") -> None:
        """The stage out of date, computing the same: a comment appended to its module (a code dep of it alone)."""
        self.touches += 1
        for folder in (self.root / CACHE).glob(cold_cache) if cold_cache else ():
            shutil.rmtree(folder)
        module = self.root / "components" / "stages" / f"{stage}.py"
        with open(module, "a") as handle:
            handle.write(f"# crash harness: out of date ({self.touches})\n")
        if stage == "download":  # the archive is downloaded only when it is not there: a first download
            for archive in (self.root / "data" / "download").glob("*.tar.gz"):
                archive.unlink()

    def kill(self, point: KillPoint) -> Outcome:
        """Run `dvc repro` with ``point``'s stage out of date, killed at its moment; then recover and check."""
        started = time.monotonic()
        self.touch(point.stage, point.cold_cache)
        env = {**self.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOK), self.env.get("PYTHONPATH")]))}
        if isinstance(point.moment, Write):
            m = point.moment
            marker = self.logs / f"fired-{self.touches:03d}"
            env["GRAFTLINE_CRASH"] = "|".join([point.stage, m.event, m.pattern, str(m.nth), point.signal, point.scope,
                                               str(marker)])
        proc = subprocess.Popen(["dvc", "repro"], cwd=self.root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=default_sigint)
        reached = self._kill_from_outside(proc, point) if not isinstance(point.moment, Write) else None
        output, _ = proc.communicate(timeout=900)
        if reached is None:  # killed from inside: the hook leaves its marker when it fires
            reached = marker.exists()
        # A signal that came as the stage had finished (its outputs in place, its last line printed) found
        # nothing to interrupt: Python restores the default handlers as it exits.
        reached = reached and f"graftline {point.stage}: done" not in output
        outcome = Outcome(point, bool(reached), proc.returncode)
        self._wait_for_stage_gone(point.stage)
        recovery = self.dvc("repro")
        log = self.logs / f"kill-{self.touches:03d}.log"
        log.write_text(f"{point}\n--- killed run (exit {proc.returncode})\n{output}\n--- recovery\n"
                       f"{recovery.stdout}{recovery.stderr}")
        outcome.problems = (self.said_so(point, output) if outcome.reached else []) + self.check(recovery, log)
        outcome.seconds = time.monotonic() - started
        return outcome

    @staticmethod
    def said_so(point: KillPoint, output: str) -> list[str]:
        """A stage stopped by SIGTERM or SIGINT says so in one line, and shows no traceback."""
        if point.signal == "KILL":
            return []
        line = f"graftline {point.stage}: interrupted by SIG{point.signal}; no output was half-written."
        return [] if line in output and "Traceback" not in output else [f"no line '{line}', or a traceback"]

    def _kill_from_outside(self, proc: subprocess.Popen, point: KillPoint) -> bool:
        signum = signal.Signals[f"SIG{point.signal}"]
        deadline = time.monotonic() + 600
        found = None
        while proc.poll() is None and time.monotonic() < deadline:
            found = found or stage_process(self.root, point.stage)
            if found:
                break
            time.sleep(0.01)
        if not found:
            return False
        if isinstance(point.moment, After):
            time.sleep(point.moment.fraction * self.lifetimes[point.stage])
        else:
            while not any(p.is_file() and p.stat().st_size or p.is_dir() for p in self.root.glob(point.moment.pattern)):
                if not found.is_running() or found.status() == psutil.STATUS_ZOMBIE:
                    return False
                time.sleep(0.005)
        if not found.is_running() or found.status() == psutil.STATUS_ZOMBIE:
            return False
        if point.scope == "group":
            os.killpg(proc.pid, signum)
        else:
            found.send_signal(signum)
        return True

    def _wait_for_stage_gone(self, stage: str, timeout: float = 120) -> None:
        """A SIGTERMed stage, or one whose dvc was killed, may still be cleaning up: the next run starts after it."""
        deadline = time.monotonic() + timeout
        while stage_process(self.root, stage) and time.monotonic() < deadline:
            time.sleep(0.05)

    def check(self, recovery: subprocess.CompletedProcess, log: Path) -> list[str]:
        problems = []
        if recovery.returncode != 0:
            problems.append(f"the recovering `dvc repro` exited {recovery.returncode} ({log})")
        status = self.dvc("status", "--json")
        if status.returncode != 0 or json.loads(status.stdout or "null") != {}:
            problems.append(f"dvc status after recovery: {status.stdout.strip() or status.stderr.strip()}")
        now = self.state()
        for name in sorted(set(now["metrics"]) | set(self.reference["metrics"])):
            if now["metrics"].get(name) != self.reference["metrics"].get(name):
                problems.append(f"{name} differs from the uninterrupted run's: {now['metrics'].get(name)} "
                                f"vs {self.reference['metrics'].get(name)}")
        extra = sorted(set(now["files"]) - set(self.reference["files"]))
        lost = sorted(set(self.reference["files"]) - set(now["files"]))
        if extra:
            problems.append(f"left behind: {extra[:10]}")
        if lost:
            problems.append(f"missing after recovery: {lost[:10]}")
        temporary = temporaries(self.root)
        if temporary:
            problems.append(f"temporary names left: {temporary[:10]}")
        torn = torn_cache_entries(self.root / CACHE)
        if torn:
            problems.append(f"cache entries not whole: {torn[:10]}")
        return problems


def metrics_of(root: Path) -> dict:
    """Every metrics file DVC tracks (metrics/, DVCLive's), parsed; and the curves, as text."""
    found = {str(p.relative_to(root)): json.loads(p.read_text())
             for p in [*root.glob("metrics/*.json"), *root.glob("dvclive/*/metrics.json")]}
    found |= {str(p.relative_to(root)): p.read_text() for p in root.glob("plots/*.csv")}
    return found


def files_of(root: Path) -> list[str]:
    """Every file and folder in the project but TensorBoard's, DVC's and git's own."""
    return sorted(rel for p in root.rglob("*")
                  if not (rel := p.relative_to(root).as_posix() + ("/" if p.is_dir() else "")).startswith(NOT_COMPARED))


def temporaries(root: Path) -> list[str]:
    """Paths anywhere in the project (TensorBoard's logs too; not DVC's or git's) whose names say unfinished."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if TEMPORARY.search(p.name) and not p.relative_to(root).as_posix().startswith((".dvc/", ".git/")))


def torn_cache_entries(cache: Path) -> list[str]:
    """Entries of the per-photo caches (components/vector_cache.py: ``<folder>/ab/<sha256>.<suffix>``, the array
    then its CRC32) that are not whole, or not the size of most others in their folder."""
    torn, sizes = [], {}
    for entry in (p for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else ():
        data = entry.read_bytes()
        sizes.setdefault(entry.parent.parent, {}).setdefault(len(data), []).append(entry)
        if len(data) < 4 or zlib.crc32(data[:-4]).to_bytes(4, "little") != data[-4:]:
            torn.append(str(entry.relative_to(cache)))
    for by_size in sizes.values():
        usual = max(by_size, key=lambda n: len(by_size[n]))
        torn += [str(e.relative_to(cache)) for n, entries in by_size.items() if n != usual for e in entries]
    return torn


# ------------------------------------------------------------------ the project


CLASSES, PER_CLASS = ("daisy", "roses", "tulips"), 16


def make_project(folder: Path) -> tuple[Harness, http.server.ThreadingHTTPServer]:
    """A small DVC project (tests/conftest.ONE_BASE: MobileNetV2 at 160 px, fine-tuned from layer 100; 48 shared
    flower photos) whose photos are an archive on a throttled loopback server, so the download stage runs too;
    the server to shut down when done."""
    from conftest import keras_home_with_weights, run, small_dvc_project

    root, photos, env, logs = small_dvc_project(
        folder, CLASSES, PER_CLASS, train_head={"epochs": 3},
        fine_tune={"epochs": 2, "batch_size": 8, "early_stopping_patience": 0}, export={"tflite": []})
    keras_home_with_weights(folder / "keras")
    served = folder / "served"
    served.mkdir()
    sha256 = archive_of(photos, served / "photos.tar.gz")
    server = serve_slowly(served)
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source="data/download/photos.tar.gz", sha256=sha256,
                          url=f"http://127.0.0.1:{server.server_address[1]}/photos.tar.gz")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "photos from a URL"], root, env, logs / "git.log")
    return Harness(root, env, logs), server
