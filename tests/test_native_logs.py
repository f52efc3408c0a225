"""The stderr filter that the `featx` program puts under native libraries' log lines."""

import os
import subprocess
import sys

from featx._native_logs import native_logs_dropped

ABSL = (b"WARNING: All log messages before absl::InitializeLog() is called are written to "
        b"STDERR\n")
ONEDNN = (b"I0000 00:00:1796641133.119013   26478 port.cc:153] oneDNN custom operations are "
          b"on.\n")
CUINIT = (b"E0000 00:00:1796641137.958900   26478 cuda_platform.cc:52] failed call to cuInit: "
          b"INTERNAL: CUDA error\n")
RAY = (b"[2026-12-07 14:10:32,241 W 20166 20166] gcs_client.cc:210: Failed to get cluster ID "
       b"from GCS server: Unauthenticated: RPC error: InvalidAuthToken\n")


def test_native_lines_are_dropped_and_the_rest_kept_in_order(capfd):
    with native_logs_dropped():
        os.write(2, ABSL + ONEDNN + RAY + b"featx: INFO: first\n")
        os.write(2, b"extract:  50%|#####     | 1/2\r")  # a progress bar
        os.write(2, CUINIT[:20])  # a native line that arrives in two writes
        os.write(2, CUINIT[20:] + b"featx: WARNING: second\n")
    os.write(2, b"after\n")  # stderr is itself again
    assert capfd.readouterr().err == ("featx: INFO: first\nextract:  50%|#####     | 1/2\r"
                                      "featx: WARNING: second\nafter\n")


def test_a_child_process_is_filtered_too(capfd):
    script = "import os; os.write(2, %r + b'child line\\n')" % ONEDNN
    with native_logs_dropped():
        subprocess.run([sys.executable, "-c", script], check=True)
    assert capfd.readouterr().err == "child line\n"


def test_a_line_without_an_end_is_kept(capfd):
    with native_logs_dropped():
        os.write(2, b"no newline at the end")
    assert capfd.readouterr().err == "no newline at the end"
