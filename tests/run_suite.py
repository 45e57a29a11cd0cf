"""`python tests/run_suite.py PYTEST_ARGS...`: pytest, run once more, whole, if a test process crashed.

A pytest-xdist worker that dies (a signal inside XLA:CPU, not a failing assertion) is reported as "worker 'gwN'
crashed while running 'TEST'". It has happened in the middle of the suite: SIGABRT with no message, in a test that
passes alone. Such a run is repeated once, whole, and the second run's exit status is the result. A test that fails
fails both runs; a run whose only failures are ordinary test failures is not repeated.

`--max-worker-restart=0` belongs with it: with `--dist loadgroup`, pytest-xdist 3.8 hangs after it restarts a
crashed worker (the replacement is never given the lost tests), where with no restart it stops at once.
"""

import os
import subprocess
import sys

CRASHED = b"crashed while running"


def run(args: list[str]) -> tuple[int, bool]:
    """pytest's exit status, and whether a worker crashed; its output passes through as it comes."""
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    crashed, tail = False, b""
    while chunk := os.read(proc.stdout.fileno(), 65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        crashed = crashed or CRASHED in tail + chunk  # the tail: a match split across two reads
        tail = chunk[-len(CRASHED) :]
    return proc.wait(), crashed


def main(args: list[str]) -> int:
    status, crashed = run(args)
    if status != 0 and crashed:
        print("\nA test process crashed (above): the same invocation runs once more, whole.\n", flush=True)
        status, _ = run(args)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
