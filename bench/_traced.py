"""Run a script with tracemalloc on, writing a snapshot on each SIGUSR1 (used by Shop(trace=...)).

    python bench/_traced.py run.py --service gateway --port N

Snapshots go to ``$BENCH_TRACEMALLOC_DIR/<n>.snap`` (n = 1, 2, ...), written to a temporary name first
and renamed when complete, so a reader never sees half a file.
"""
import _bootstrap  # noqa: F401  (must come first: takes bench/ off sys.path)

import os
import runpy
import signal
import sys
import tracemalloc

FRAMES = 4


def main() -> None:
    directory = os.environ["BENCH_TRACEMALLOC_DIR"]
    taken = 0

    def snapshot(signum, frame) -> None:
        nonlocal taken
        taken += 1
        path = os.path.join(directory, f"{taken}.snap")
        tracemalloc.take_snapshot().dump(path + ".part")
        os.rename(path + ".part", path)

    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR1, snapshot)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
