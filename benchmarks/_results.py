"""What every featx benchmark's JSON records besides its figures, and how it is written."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from featx import __version__
from featx.options import usable_cores


def write_results(out, figures: dict, load_before) -> None:
    """Write ``figures`` to ``out`` with the featx version, the machine and the load
    average before (``load_before``, from ``os.getloadavg()``) and now; print the loads."""
    load_after = os.getloadavg()
    report = {"featx_version": __version__,
              "machine": platform.processor() or platform.machine(), "cores": usable_cores(),
              "load_average_before": load_before, "load_average_after": load_after, **figures}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; wrote {out}")
