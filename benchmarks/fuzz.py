"""The long fuzz run: the suite's fuzz tests again, with many more (and freshly random)
examples, each file in a process of its own, and what they survived counted.

Each file is first run at the suite's size (FEATX_FUZZ_SCALE=1) and at three times it, to
time it, then at the scale that fills what is left of its share of --minutes. Hypothesis'
statistics give the inputs tried per test; a test whose property failed is a failure
(Hypothesis prints the input that broke it), a process killed by a signal is a crash, and a
process still running at three times its share is a hang (killed, and counted).

Usage:
    python benchmarks/fuzz.py [--minutes 10] [--max-scale 100] [--out FILE.json] [TEST_FILE ...]
FILEs default to tests/test_fuzz_*.py. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._results import write_results  # noqa: E402

# "tests/test_x.py::test_y:" then, per phase, "- 30 passing, 0 failing, and 0 invalid test cases"
TEST_LINE = re.compile(r"^(\S+\.py::\S+?):\s*$")
COUNTS = re.compile(r"(\d+) passing, (\d+) failing, and (\d+) invalid")


def run_file(path: Path, scale: int, timeout_s: float) -> dict:
    """One pytest process over ``path`` at ``scale``; its tests' counts and its fate."""
    env = {**os.environ, "FEATX_FUZZ_SCALE": str(scale)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
           "--hypothesis-show-statistics", str(path)]
    start = time.monotonic()
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        hung = True
    seconds = time.monotonic() - start
    return {"file": str(path.relative_to(ROOT)), "scale": scale, "seconds": round(seconds, 1),
            "returncode": process.returncode, "hung": hung,
            "crashed": process.returncode is not None and process.returncode < 0 and not hung,
            "tests": parse_statistics(output),
            "failed_tests": re.findall(r"^FAILED (\S+)", output, flags=re.M),
            "tail": output[-3000:] if process.returncode else ""}


def scale_for(path: Path, share: float) -> int:
    """The scale whose run takes about ``share`` seconds: two probes (scales 1 and 3) split
    a run's time into its fixed cost (starting Python, imports, fixtures) and its examples."""
    one, three = run_file(path, 1, share)["seconds"], run_file(path, 3, share)["seconds"]
    per_scale = max((three - one) / 2, 0.05)
    return max(1, int((share - 2 * one - three - (one - per_scale)) / per_scale))


def parse_statistics(output: str) -> dict:
    """test id -> {"passing", "failing", "invalid"} summed over Hypothesis' phases."""
    tests, current = {}, None
    for line in output.splitlines():
        match = TEST_LINE.match(line.strip())
        if match:
            current = tests.setdefault(match.group(1),
                                       {"passing": 0, "failing": 0, "invalid": 0})
            continue
        counts = COUNTS.search(line)
        if counts and current is not None:
            for name, value in zip(("passing", "failing", "invalid"), counts.groups()):
                current[name] += int(value)
    return tests


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", default="benchmarks/results/fuzz.json")
    # a file of many plain tests and one property test times its examples badly: its
    # probes hardly differ, and a scale of thousands outlives the share (seen: 1900)
    parser.add_argument("--max-scale", type=int, default=100)
    args = parser.parse_args()
    files = [f.resolve() for f in args.files] or sorted((ROOT / "tests").glob("test_fuzz_*.py"))
    load_before = os.getloadavg()
    share = args.minutes * 60 / len(files)
    runs = []
    for path in files:
        scale = min(scale_for(path, share), args.max_scale)
        runs.append(run_file(path, scale, 3 * share))
    print_table(runs)
    totals = {"inputs": sum(t["passing"] + t["failing"] + t["invalid"]
                            for r in runs for t in r["tests"].values()),
              "failing_examples": sum(t["failing"] for r in runs for t in r["tests"].values()),
              "failed_tests": sum(len(r["failed_tests"]) for r in runs),
              "crashes": sum(r["crashed"] for r in runs), "hangs": sum(r["hung"] for r in runs),
              "seconds": round(sum(r["seconds"] for r in runs), 1)}
    print(f"\ntotal: {totals}")
    write_results(args.out, {"minutes": args.minutes, "runs": runs, "totals": totals},
                  load_before)
    return 1 if totals["failed_tests"] or totals["crashes"] or totals["hangs"] else 0


def print_table(runs):
    print(f"{'test':<72} {'inputs':>8} {'failing':>8}")
    for run in runs:
        for test, counts in run["tests"].items():
            tried = counts["passing"] + counts["failing"] + counts["invalid"]
            print(f"{test:<72} {tried:>8} {counts['failing']:>8}")
        fate = "HUNG" if run["hung"] else "CRASHED" if run["crashed"] else (
            f"exit {run['returncode']}")
        print(f"  {run['file']}: scale {run['scale']}, {run['seconds']} s, {fate}")


if __name__ == "__main__":
    sys.exit(main())
