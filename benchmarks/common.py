"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""
import time


def best_of(fn, repeats: int) -> float:
    """The fastest of `repeats` calls of fn, in seconds: the least disturbed by a noisy machine."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
