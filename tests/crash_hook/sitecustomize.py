"""Kill a stage at a chosen write (tests/crash.py); loaded by every Python started with this folder on PYTHONPATH.

GRAFTLINE_CRASH="<stage>|<event>|<pattern>|<nth>|<signal>|<scope>|<marker>": in the process running
`graftline <stage>` only, the ``nth`` Python audit event ``event`` ("open" for writing, "os.rename" (also
os.replace), "os.mkdir") whose path, relative to the working directory, matches the fnmatch ``pattern`` sends
``signal`` (KILL, TERM, INT) to the process itself (scope "stage") or to its process group (scope "group":
`dvc repro` and the stage together), just before the call runs, having first created the file ``marker`` (so the
harness knows it fired). Nothing else changes: a real process dies at a real moment of a real run.
"""
import os
import sys


def _install() -> None:
    spec = os.environ.get("GRAFTLINE_CRASH")
    if not spec:
        return
    stage, event, pattern, nth, signame, scope, marker = spec.split("|")
    try:
        with open("/proc/self/cmdline", "rb") as handle:
            argv = handle.read().decode(errors="replace").split("\0")
    except OSError:
        return
    if not (any(a.endswith("graftline") for a in argv[:2]) and stage in argv[1:]):
        return
    os.environ.pop("GRAFTLINE_CRASH")  # the stage's own subprocesses run on
    import fnmatch
    import signal

    signum, wanted, seen = signal.Signals[f"SIG{signame}"], int(nth), [0]
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def for_writing(args) -> bool:
        mode, flags = args[1], args[2]
        if isinstance(mode, str):
            return any(c in mode for c in "wax+")
        return isinstance(flags, int) and bool(flags & writes)

    def hook(name, args):
        if name != event or seen[0] >= wanted:
            return
        if name == "open" and not for_writing(args):
            return
        paths = args[:2] if name == "os.rename" else args[:1]
        for path in paths:
            if isinstance(path, bytes):
                path = os.fsdecode(path)
            if isinstance(path, (str, os.PathLike)):
                rel = os.path.relpath(os.fspath(path))
                if fnmatch.fnmatch(rel, pattern):
                    seen[0] += 1
                    if seen[0] == wanted:
                        with open(marker, "w") as fired:
                            fired.write(f"{name} {rel}\n")
                        if scope == "group":
                            os.killpg(os.getpgid(0), signum)
                        else:
                            os.kill(os.getpid(), signum)
                    return

    sys.addaudithook(hook)


_install()
