"""Native libraries' log lines, dropped from the process's stderr.

TensorFlow's C++ runtime, absl and XLA write straight to file descriptor 2, below Python:
oneDNN notices, CUDA probing ("Could not find cuda drivers", a ``cuInit`` error) and absl's
"before absl::InitializeLog()" warning, which ignores ``TF_CPP_MIN_LOG_LEVEL``; Ray's core
worker logs its retries the same way. While
:func:`native_logs_dropped` is active, descriptor 2 is a pipe: a thread passes every line
on to the real stderr except those in the native log format, so featx's own lines and
progress bars (which Python also writes to descriptor 2) still arrive, in order.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

# "I0000 00:00:1796627658.766790   24221 port.cc:153] ..." (absl / TensorFlow / XLA) and
# "[2026-12-07 14:10:32,241 W 20166 20166] gcs_client.cc:210: ..." (Ray's core worker)
NATIVE_LOG_LINE = re.compile(
    rb"[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.+-]+:\d+\] "
    rb"|\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IWEF] \d+ \d+\] [\w.+-]+:\d+: "
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called")
_PIECES = re.compile(rb"(?<=[\n\r])")  # split after each line end, keeping it
# Written through the pipe at the end: once the forwarder reaches it, all that came before
# is out. (Waiting for the pipe to close instead would wait for every child process that
# inherited it, such as joblib's workers.)
_END = b"\0featx: end of native log filtering\0"


@contextlib.contextmanager
def native_logs_dropped():
    """Inside the block, native log lines written to stderr (by this process or its
    children) are dropped; everything else is passed on."""
    sys.stderr.flush()
    real_stderr = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    drained = threading.Event()
    threading.Thread(target=_forward, args=(read_end, real_stderr, drained),
                     name="featx-native-logs", daemon=True).start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.write(2, _END)
        drained.wait(5.0)
        os.dup2(real_stderr, 2)
        os.close(real_stderr)


def _forward(read_end: int, out: int, drained: threading.Event):
    """Pass lines from ``read_end`` to ``out``, but native log lines; set ``drained`` at
    the end marker, then go on passing what children still write (until exit)."""
    pending = b""
    try:
        while chunk := os.read(read_end, 1 << 16):
            pending += chunk
            if _END in pending:
                before, pending = pending.split(_END, 1)
                _pass_on(out, before, whole=True)  # a last line without an end included
                drained.set()
            pending = _pass_on(out, pending)
        _pass_on(out, pending, whole=True)
    except OSError:  # stderr closed under us (a pipe whose reader left): nothing to keep
        pass
    finally:
        drained.set()


def _pass_on(out: int, data: bytes, whole: bool = False) -> bytes:
    """Write ``data``'s lines to ``out``, but native log lines; return the unfinished last
    line, unless ``whole`` (then it is judged and written too)."""
    *lines, rest = _PIECES.split(data)
    if whole:
        lines, rest = [*lines, rest], b""
    _write_all(out, b"".join(line for line in lines if not NATIVE_LOG_LINE.match(line)))
    return rest


def _write_all(fd: int, data: bytes):
    while data:
        data = data[os.write(fd, data):]
