"""Write outputs so that a run that dies never leaves a half-written file or folder.

DVC caches whatever is at an output path when a stage ends, and a later stage
trusts it; so every output is written under a temporary name beside its
final place and renamed into place only when complete. A stage's outputs go
further, as one set (``output_set``): a run that fails or is killed leaves the
last good set in place, whole, and a complete run replaces all of it.
"""
from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

_UMASK = os.umask(0)
os.umask(_UMASK)


def _boot_time() -> float | None:
    try:
        return next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None


def _alive(pid: int, made_at: float) -> bool:
    """Whether the process that wrote a temporary last at ``made_at`` still runs.

    A zombie is dead: a stage killed with its `dvc repro` is re-parented to PID 1, and in a container
    whose PID 1 does not reap it stays a zombie for good (kill(pid, 0) still succeeds). A process that
    started after the temporary was last written is another one that got the same pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        stat = None
    boot = _boot_time()
    if stat is not None and boot is not None:
        fields = stat.rsplit(")", 1)[1].split()  # the command name, in parentheses, may hold spaces
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return fields[0] not in ("Z", "X") and started <= made_at + 2  # btime is whole seconds
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def left_by_a_dead_process(path: Path) -> bool:
    """Whether ``path`` is a temporary (``.<name>.tmp-<pid>-*``) whose writing process is gone."""
    if ".tmp-" not in path.name:
        return False
    pid = path.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
    if not pid.isdigit():  # not a name this module gives: nobody's
        return True
    if int(pid) == os.getpid():
        return False
    try:
        made_at = path.lstat().st_ctime  # never earlier than its last write (copy2 can back-date mtime)
    except FileNotFoundError:  # its own process put it in place or removed it meanwhile
        return False
    return not _alive(int(pid), made_at)


def remove_leftovers(final: Path) -> list[Path]:
    """What killed runs left beside ``final`` (``.<name>.tmp-<pid>-*``, their process gone); removed.

    SIGKILL (an OOM kill, a pre-empted machine, a cancelled CI job's last resort) gives a run no
    chance to clean up, so the next run writing ``final`` does. A temporary of a live process (another
    run writing the same output right now) is left alone.
    """
    removed = []
    for path in Path(final).parent.glob(glob.escape(f".{Path(final).name}.tmp-") + "*"):
        if left_by_a_dead_process(path):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _prefix(final: Path) -> str:
    return f".{final.name}.tmp-{os.getpid()}-"


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(final), dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private; outputs are ordinary folders
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_path(final: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path beside ``final`` (ending in ``suffix``, for writers that check the name);
    on success it replaces ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(final), suffix=suffix, dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``final``; on success it replaces ``final``."""
    with atomic_path(final) as tmp, open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as handle:
        yield handle


@contextlib.contextmanager
def output_set(finals: dict[str, Path], journal: Path) -> Iterator[dict[str, Path]]:
    """Yield a temporary path per output (``<parent>/.<name>.tmp-<pid>-*/<name>``: same name, same folder, so
    writers that go by the suffix work); when the block ends without an error, they replace ``finals`` as one set.

    An output the block did not make is removed from its final place (the set is what this run made).
    The replacing is journalled first: a run killed in the middle of it is completed by the next run
    (``complete``), never left half old, half new. An error (or a kill) before that leaves ``finals``
    untouched; ``FailedWithOutputs`` replaces them and is raised on.
    """
    from components.errors import FailedWithOutputs

    complete(journal)
    staged = {}
    for name, final in finals.items():
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(final)
        holder = Path(tempfile.mkdtemp(prefix=_prefix(final), dir=final.parent))
        os.chmod(holder, 0o777 & ~_UMASK)
        staged[name] = holder / final.name
    try:
        yield staged
    except FailedWithOutputs:
        _replace(staged, finals, journal)
        raise
    except BaseException:
        for path in staged.values():
            shutil.rmtree(path.parent, ignore_errors=True)
        raise
    _replace(staged, finals, journal)


def _replace(staged: dict[str, Path], finals: dict[str, Path], journal: Path) -> None:
    write_json(journal, [[str(staged[name]), str(final), staged[name].exists()] for name, final in finals.items()])
    complete(journal)


def complete(journal: Path) -> None:
    """Finish the replacing that ``journal`` lists (a killed run's), if any.

    Each step can be repeated after a kill: a temporary folder goes only once its output is in place.
    """
    journal = Path(journal)
    if not journal.exists():
        return
    for staged, final, made in read_json(journal):
        staged, final = Path(staged), Path(final)
        if not staged.parent.exists() or (made and not staged.exists()):  # put in place before the kill
            shutil.rmtree(staged.parent, ignore_errors=True)
            continue
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        if made:
            os.replace(staged, final)
        shutil.rmtree(staged.parent)
    journal.unlink()


@contextlib.contextmanager
def one_at_a_time(lock: Path, what: str) -> Iterator[None]:
    """Hold ``lock`` (a file, locked while held; the lock dies with the process, however it ends) inside the block;
    when another process holds it, refuse with one line naming it. Two runs of one stage would each put a whole
    set in place, but share its checkpoints and journal."""
    import fcntl

    from components.errors import GraftlineError

    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise GraftlineError(f"{what} is already running in this project ({holder}; {lock} is locked): wait for "
                                 "it to end, or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield


def write_json(path: Path, obj) -> None:
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False)
        handle.write("\n")


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with atomic_file(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def read_json(path: Path):
    with open(path) as handle:
        return json.load(handle)
