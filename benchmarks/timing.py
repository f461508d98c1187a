"""Timing helper shared by the benchmark scripts (run them from the repository root: ``python benchmarks/x.py``)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median seconds of each function, calls interleaved round-robin ``repeats`` times after one warm-up round, so
    that contention from other processes hits every function alike."""
    for fn in fns.values():
        fn()  # warm-up (allocations, caches, lazy init)
    times: Dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
