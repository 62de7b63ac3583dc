"""A stage's console: its progress bars, Keras' epoch lines and its summary, not TensorFlow's C++ log.

TensorFlow writes its C++ log lines (``I0000 00:00:1796141291.65 2114 port.cc:153] oneDNN ...``,
``E0000 ... failed call to cuInit``) straight to file descriptor 2. The ones written while it
is imported come before absl's logging is set up, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them,
and Beam's and Dask's worker processes print their own. ``hide_native_logs`` puts a pipe in
front of descriptor 2, inherited by every child process, and a thread that forwards everything
to the real stderr as it comes, except those lines. ``GRAFTLINE_VERBOSE=1`` leaves stderr alone.
"""
from __future__ import annotations

import atexit
import os
import re
import sys
import threading

VERBOSE = "GRAFTLINE_VERBOSE"
# glog/absl format: severity, MMDD, time (seconds since the epoch before absl is set up), thread, file:line]
NATIVE_LINE = re.compile(rb"[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\]\s]+:\d+\] ")
# Native lines without that prefix: absl's preamble, the continuation of cpu_feature_guard's
# message, and the TFLite interpreter's own line.
NATIVE_TEXT = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
               b"To enable the following instructions:",
               b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.")
# A partial line this short that could still become a native line is held until it is complete.
_HOLD = re.compile(rb"[IWEF][\d :.]*|WA?R?N?I?N?G?(:.*)?|IN?F?O?(:.*)?|To( .*)?")
_installed = False


def is_native(segment: bytes) -> bool:
    segment = segment.lstrip(b"\r")
    return bool(NATIVE_LINE.match(segment)) or segment.startswith(NATIVE_TEXT)


def keep(line: bytes) -> bytes:
    """What of one complete line (with its newline) goes on to the terminal."""
    parts = line.split(b"\r")
    kept = [p for p in parts if not is_native(p)]
    if len(kept) == len(parts):
        return line
    text = b"\r".join(kept)
    return text if text.strip(b"\r\n") else b""


def _forward(source: int, target: int) -> None:
    pending = b""
    while True:
        try:
            chunk = os.read(source, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            break
        pending += chunk
        out = []
        while (end := pending.find(b"\n")) >= 0:
            out.append(keep(pending[:end + 1]))
            pending = pending[end + 1:]
        # A progress bar redraws with \r and no newline: pass it on at once unless it may be a native line.
        if pending and not (len(pending) < 48 and _HOLD.fullmatch(pending.rsplit(b"\r", 1)[-1])):
            out.append(pending)
            pending = b""
        _write_all(target, b"".join(out))
    _write_all(target, keep(pending) if pending else b"")


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:
            return


def end_progress_bars() -> None:
    """Close every progress bar still open, so that the line printed next starts a line of its own.

    A signal can land while a bar is being made, before its ``with`` block is entered: nothing
    closes that bar, and the one-line reason would be glued to it.
    """
    if "tqdm" not in sys.modules:
        return
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar torn by the signal itself: the reason matters more than its last frame
            pass
    sys.stderr.flush()


def hide_native_logs() -> None:
    """From now on, this process's and its children's native log lines do not reach stderr."""
    global _installed
    if _installed or os.environ.get(VERBOSE) == "1":
        return
    _installed = True
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    thread = threading.Thread(target=_forward, args=(read_end, real), name="graftline-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        # Close this process's end of the pipe, then let the thread pass on what is left.
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(real, 2)
        thread.join(timeout=2)

    atexit.register(restore)
